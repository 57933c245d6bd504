//! spate-perf: a load generator and latency benchmark that speaks the Kafka protocol itself, so
//! it measures any Kafka-compatible broker the same way.
//!
//! The Kafka client parts ([`wire`], [`cluster`], [`batch`]) live in the `spate-client` crate,
//! which the `spate` CLI shares; they are re-exported here under their old paths.

pub mod config;
pub mod error;
pub mod plot;
pub mod producer;
pub mod runner;
pub mod schedule;
pub mod stats;

pub use error::{PerfError, Result};
pub use spate_client::{batch, cluster, wire};

use config::{Command, Mode, RunArgs};

/// Runs a parsed command line: a benchmark (printing progress and summary) or a plot.
pub fn execute(command: Command) -> Result<()> {
    let (mode, args): (Mode, RunArgs) = match command {
        Command::Produce(a) => (Mode::Produce, a),
        Command::Consume(a) => (Mode::Consume, a),
        Command::E2e(a) => (Mode::E2e, a),
        Command::Plot(p) => {
            let runs = p
                .runs
                .iter()
                .map(|f| plot::load_summary(f))
                .collect::<Result<Vec<_>>>()?;
            return plot::draw(&p.out, &p.title, &runs, p.y_scale);
        }
    };
    let cfg = args.validate(mode)?;
    let summary = runner::run(&cfg)?;
    if let Some(line) = summary.send_lag_line() {
        println!("{line}");
    }
    println!("{}", summary.line());
    if let Some(path) = &cfg.args.json {
        let text = serde_json::to_string_pretty(&summary).map_err(|e| PerfError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        std::fs::write(path, text).map_err(|e| PerfError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    }
    if let Some(path) = &cfg.args.plot {
        plot::draw(
            path,
            &summary.label,
            std::slice::from_ref(&summary),
            plot::YScale::Auto,
        )?;
    }
    Ok(())
}
