//! The `ferry` command line: `ferry broker`, `ferry producer`, `ferry consumer`
//! (contract §7). Parses flags, sets up logging on stderr, and runs the subcommand.

mod cli;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Hands the memory freed so far back to the operating system. mimalloc returns freed
/// memory lazily, as later allocations come; a broker that has just recovered a large log
/// and then waits for clients would keep recovery's peak (~320 MB instead of ~170 MB for
/// a million messages).
fn release_freed_memory() {
    // SAFETY: mi_collect only tidies mimalloc's own heaps and may be called at any time.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Keeps the broker's memory in small pages. With transparent huge pages, every page
/// the allocator touches first (a backlog growing, memory handed back and taken again)
/// is a 2 MiB one the kernel must zero whole, which costs the broker more CPU than it
/// saves in TLB misses; Redis and MongoDB turn them off for the same reason.
/// docs/PERFORMANCE.md has the figures.
fn disable_transparent_huge_pages() {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::warn!("cannot turn transparent huge pages off for the broker: {e}");
    }
}

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
    let threads = match &cli.command {
        Command::Broker(args) => {
            disable_transparent_huge_pages();
            args.threads()
        }
        Command::Bench(args) => args.threads(),
        Command::Producer(_) | Command::Consumer(_) => 1,
    };
    let runtime = match runtime(threads) {
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

/// One thread runs everything on a current-thread runtime: no wakeups between worker
/// threads, which on small and virtualised machines cost more latency than a second
/// thread gains (docs/PERFORMANCE.md has the measurements). More threads get tokio's
/// work-stealing runtime.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    builder.enable_all().build()
}
