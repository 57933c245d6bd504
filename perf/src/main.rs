use clap::Parser;

fn main() {
    let cli = spate_perf::config::Cli::parse();
    if let Err(e) = spate_perf::execute(cli.command) {
        eprintln!("spate-perf: {e}");
        std::process::exit(1);
    }
}
