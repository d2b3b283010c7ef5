//! The `ferry` command line: `ferry broker`, `ferry producer`, `ferry consumer`
//! (contract §7). Parses flags, sets up logging on stderr, and runs the subcommand.

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: an at-least-once work-queue broker and its clients"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (in memory unless --data-dir is given).
    Broker(cli::broker::BrokerArgs),
    /// Publish each MESSAGE, or each line of standard input; print each confirmed id.
    Producer(cli::producer::ProducerArgs),
    /// Print each delivered payload on its own line, then ack it.
    Consumer(cli::consumer::ConsumerArgs),
    /// Measure the at-least-once workload: throughput, latency, broker CPU and memory.
    Bench(cli::bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Broker(args) => cli::broker::run(args).await,
            Command::Producer(args) => cli::producer::run(args).await,
            Command::Consumer(args) => cli::consumer::run(args).await,
            Command::Bench(args) => cli::bench::run(args).await,
        }
    });
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            ExitCode::FAILURE
        }
    }
}
