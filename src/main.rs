mod check;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "spate",
    version,
    about = "Spate: a Kafka-compatible streaming broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Verify this machine can run the broker: io_uring, direct I/O on the data dir, limits.
    Check {
        /// The data directory the broker will use.
        #[arg(long, default_value = "./spate-data")]
        data_dir: PathBuf,
        /// Shards the broker will run (default: all cores).
        #[arg(long)]
        cores: Option<usize>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            data_dir,
            cores,
            json,
        } => {
            let cores = cores
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let (text, ok) = check::report(&check::run_checks(&data_dir, cores), json);
            print!("{text}");
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
