//! `ferry bench`: the at-least-once workload (every publish confirmed, every message
//! acked) against a broker it starts itself (or `--addr`), reported honestly: end-to-end
//! and confirm throughput, publish-to-delivery latency percentiles, lost and duplicated
//! messages, and the broker's CPU time and peak memory. Protocol 1.1 workloads:
//! `--nack-ratio` (a share of messages nacked once before their ack) and `--delay`
//! (delayed publishes; latency is then lateness past each message's due time). Without
//! them the clients speak version 1.0, the path every client takes.

mod broker_child;
mod report;
mod tally;
mod workload;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinSet;
use tokio::time::Instant;

use ferry::protocol::Version;
use ferry::transport::ClientTls;
use ferry::{Consumer, ConsumerOptions, Producer, ProducerOptions};

use super::SecurityArgs;

use broker_child::{BrokerChild, MachineCpu, own_cpu_time};
use report::{BrokerFigures, Report};
use tally::QueueTally;
use workload::{
    ConsumerOutcome, ConsumerPlan, ProducerOutcome, ProducerPlan, Quota, consume, produce,
};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Benchmark a running broker instead of starting one (then no broker CPU or memory
    /// figures are reported).
    #[arg(long)]
    addr: Option<String>,
    /// Producers per queue.
    #[arg(short = 'p', long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    producers: u32,
    /// Consumers per queue. With 0, messages are only published and stay queued (to
    /// measure the broker holding a backlog); nothing is delivered or counted lost.
    #[arg(short = 'c', long, default_value_t = 1)]
    consumers: u32,
    /// Messages to publish in all (ignored with --duration).
    #[arg(short = 'm', long, default_value_t = 1_000_000)]
    messages: u64,
    /// Payload size in bytes (at least the ~30-byte header that carries the send time).
    #[arg(short = 's', long = "size", default_value_t = 100)]
    payload_bytes: usize,
    /// Publishes per producer awaiting their confirm at once.
    #[arg(short = 'w', long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    window: u32,
    /// Prefetch of every consumer.
    #[arg(short = 'q', long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..))]
    prefetch: u16,
    /// Queue name; with --queues N, the queues are NAME-0 … NAME-(N-1).
    #[arg(long, default_value = "bench")]
    queue: String,
    /// Number of queues, each with its own -p producers and -c consumers.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    queues: u32,
    /// Total publish rate in messages per second, shared evenly by all producers; without
    /// it producers publish as fast as their window allows.
    #[arg(long)]
    rate: Option<f64>,
    /// Publish for this long instead of a fixed number of messages.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Share of messages (0 to 1) that consumers nack once, without a delay, before
    /// acking their redelivery (protocol 1.1).
    #[arg(long, default_value_t = 0.0)]
    nack_ratio: f64,
    /// Publish every message delayed, the delays spread evenly from 0 up to this (e.g.
    /// 60s; protocol 1.1). Latency figures are then lateness: delivery time past each
    /// message's due time, counted from its send.
    #[arg(long, value_parser = humantime::parse_duration)]
    delay: Option<Duration>,
    /// Publish with this many priorities, 1 to 10, in turn (message i gets priority
    /// i mod N; protocol 1.1 above 1), to measure what priorities cost the queue.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=10))]
    priorities: u8,
    /// Publish in publish_batch frames of this many messages (1 to 1000; protocol 1.1
    /// above 1); the window still counts messages.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1000))]
    batch: u16,
    /// The protocol version the clients ask for: 1.0 (the default, what every client can
    /// speak) or 1.1 (the default with --nack-ratio, --delay or --priorities, which need
    /// it), to measure what 1.1's longer message frames cost.
    #[arg(long, value_parser = parse_version)]
    protocol: Option<Version>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Run the workload this many times (each against a fresh broker) and report the
    /// median of every figure.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// An extra flag for the broker the bench starts, e.g. --broker-arg=--data-dir=/tmp/d
    /// (repeatable).
    #[arg(long = "broker-arg", allow_hyphen_values = true)]
    broker_args: Vec<String>,
    /// The ferry binary whose broker to start (default: this one), to compare builds
    /// under one load generator.
    #[arg(long)]
    broker_exe: Option<std::path::PathBuf>,
    /// Threads of the load generator itself (the broker's are --broker-arg=--threads=N).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
    /// For a broker with TLS or --auth-file: the clients' token and TLS trust. A broker
    /// the bench starts gets its side through --broker-arg (--tls-cert, --tls-key,
    /// --auth-file).
    #[command(flatten)]
    security: SecurityArgs,
}

impl BenchArgs {
    pub fn threads(&self) -> usize {
        self.threads.into()
    }
}

/// What one queue's producers and consumers did.
struct QueueRun {
    tally: Arc<QueueTally>,
    producers: Vec<ProducerOutcome>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        bail!("--rate must be a positive number of messages per second");
    }
    if !(0.0..=1.0).contains(&args.nack_ratio) {
        bail!("--nack-ratio must be from 0 to 1 (the share of messages nacked once)");
    }
    if args.protocol.is_some_and(|v| v < Version::V1_1)
        && (args.nack_ratio > 0.0 || args.delay.is_some() || args.priorities > 1 || args.batch > 1)
    {
        bail!("--nack-ratio, --delay, --priorities and --batch need --protocol 1.1");
    }
    if cfg!(debug_assertions) {
        eprintln!(
            "ferry bench: this is a debug build; figures mean little (use cargo run --release)"
        );
    }
    let tls = args.security.tls()?;
    let mut reports = Vec::new();
    for run in 1..=args.runs {
        let report = run_once(&args, tls.as_ref()).await?;
        if args.runs > 1 {
            eprintln!("run {run}/{}: {}", args.runs, report.one_line());
        }
        reports.push(report);
    }
    let report = Report::median_of(reports);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print_text();
    }
    Ok(if report.counts.lost == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "ferry bench: {} confirmed messages were never delivered",
            report.counts.lost
        );
        ExitCode::FAILURE
    })
}

/// One run of the workload, against a broker of its own unless `--addr` is given.
async fn run_once(args: &BenchArgs, tls: Option<&ClientTls>) -> anyhow::Result<Report> {
    let connections = (args.producers as u64 + args.consumers as u64) * args.queues as u64;
    raise_open_file_limit(connections)?;
    let broker = match &args.addr {
        Some(_) => None,
        None => Some(BrokerChild::start(
            args.broker_exe.as_deref(),
            &args.broker_args,
        )?),
    };
    let addr = match (&args.addr, &broker) {
        (Some(addr), _) => addr.clone(),
        (None, Some(child)) => child.addr.to_string(),
        (None, None) => unreachable!("a broker was started"),
    };

    let queue_names: Vec<String> = match args.queues {
        1 => vec![args.queue.clone()],
        n => (0..n).map(|k| format!("{}-{k}", args.queue)).collect(),
    };
    let total_producers = (args.producers * args.queues) as u64;
    let per_producer_rate = args.rate.map(|rate| rate / total_producers as f64);
    // Nacks, delays and priorities need version 1.1; everything else speaks 1.0, as
    // every client can, so that the figures compare with builds before 1.1.
    let consumer_version = args
        .protocol
        .or((args.nack_ratio > 0.0 || args.priorities > 1).then_some(Version::V1_1));
    let producer_version = args.protocol.or((args.delay.is_some()
        || args.priorities > 1
        || args.batch > 1)
        .then_some(Version::V1_1));

    // Consumers first, so deliveries start with the first publish.
    let mut consumers = Vec::new();
    let mut producers = Vec::new();
    for name in &queue_names {
        for _ in 0..args.consumers {
            let options = ConsumerOptions {
                queue: name.clone(),
                prefetch: args.prefetch,
                token: args.security.token.clone(),
                tls: tls.cloned(),
                version: consumer_version,
                ack_timeout: None,
            };
            consumers.push((
                name.clone(),
                Consumer::connect_with(addr.as_str(), &options).await?,
            ));
        }
    }
    for name in &queue_names {
        for _ in 0..args.producers {
            let options = ProducerOptions {
                queue: name.clone(),
                token: args.security.token.clone(),
                tls: tls.cloned(),
                version: producer_version,
            };
            producers.push((
                name.clone(),
                Producer::connect_with(addr.as_str(), &options).await?,
            ));
        }
    }

    let broker_cpu_before = broker.as_ref().map(BrokerChild::cpu_time).transpose()?;
    let own_cpu_before = own_cpu_time()?;
    let machine_before = MachineCpu::now()?;
    let origin = Instant::now();
    let tallies: Vec<Arc<QueueTally>> = queue_names
        .iter()
        .map(|_| Arc::new(QueueTally::new(args.producers as usize)))
        .collect();
    let tally_of =
        |name: &str| tallies[queue_names.iter().position(|n| n == name).unwrap_or(0)].clone();

    let mut consumer_tasks = JoinSet::new();
    let consumer_plan = ConsumerPlan {
        nack_ratio: args.nack_ratio,
        delay_span: args.delay,
    };
    for (name, consumer) in consumers {
        consumer_tasks.spawn(consume(consumer, consumer_plan, tally_of(&name), origin));
    }
    let mut producer_tasks = JoinSet::new();
    let mut producer_index_in_queue = std::collections::HashMap::<String, usize>::new();
    for (n, (name, producer)) in producers.into_iter().enumerate() {
        let index = producer_index_in_queue.entry(name.clone()).or_default();
        let quota = match args.duration {
            Some(duration) => Quota::Until(origin + duration),
            None => Quota::Messages(share(args.messages, total_producers, n as u64)),
        };
        let plan = ProducerPlan {
            index: *index,
            quota,
            payload_bytes: args.payload_bytes,
            window: args.window as usize,
            rate: per_producer_rate,
            phase: n as f64 / total_producers as f64,
            delay_span: args.delay,
            priorities: args.priorities,
            batch: usize::from(args.batch),
        };
        *index += 1;
        let queue_tally = tally_of(&name);
        producer_tasks
            .spawn(async move { (name, produce(producer, plan, queue_tally, origin).await) });
    }

    let progress = show_progress(&tallies, args.duration.is_none().then_some(args.messages));
    let mut runs: Vec<QueueRun> = tallies
        .iter()
        .map(|tally| QueueRun {
            tally: tally.clone(),
            producers: Vec::new(),
        })
        .collect();
    while let Some(joined) = producer_tasks.join_next().await {
        let (name, outcome) = joined?;
        let outcome = outcome.with_context(|| format!("a producer of queue {name} failed"))?;
        let position = queue_names.iter().position(|n| *n == name).unwrap_or(0);
        runs[position].producers.push(outcome);
    }
    let mut consumer_outcomes: Vec<ConsumerOutcome> = Vec::new();
    while let Some(joined) = consumer_tasks.join_next().await {
        consumer_outcomes.push(joined?.context("a consumer failed")?);
    }
    progress.finish_and_clear();

    let own_cpu = own_cpu_time()?.0.saturating_sub(own_cpu_before.0);
    let steal_percent = MachineCpu::now()?.steal_percent_since(&machine_before);
    let broker_figures = match (&broker, broker_cpu_before) {
        (Some(child), Some(before)) => Some(BrokerFigures {
            cpu: child.cpu_time()?.0.saturating_sub(before.0),
            peak_rss_bytes: child.peak_rss_bytes()?,
        }),
        _ => None,
    };
    let report = summarize(
        args,
        &runs,
        &consumer_outcomes,
        broker_figures,
        own_cpu,
        steal_percent,
    );
    if let Some(child) = broker {
        child.stop()?;
    }
    Ok(report)
}

/// A protocol version as `--protocol` takes it: `1.0` or `1.1`.
fn parse_version(text: &str) -> Result<Version, String> {
    Version::parse(text)
        .filter(|v| *v <= Version::SUPPORTED)
        .ok_or_else(|| format!("`{text}` is not a version this build speaks; use 1.0 or 1.1"))
}

/// Producer `n`'s share of `total` messages split over `producers`.
fn share(total: u64, producers: u64, n: u64) -> u64 {
    total / producers + u64::from(n < total % producers)
}

fn summarize(
    args: &BenchArgs,
    runs: &[QueueRun],
    consumers: &[ConsumerOutcome],
    broker: Option<BrokerFigures>,
    bench_cpu: Duration,
    steal_percent: f64,
) -> Report {
    let all_producers = || runs.iter().flat_map(|run| run.producers.iter());
    let first_send = all_producers().filter_map(|p| p.first_send).min();
    let last_confirm = all_producers().filter_map(|p| p.last_confirm).max();
    let last_ack = consumers.iter().filter_map(|c| c.last_ack).max();
    let mut latency =
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds");
    for consumer in consumers {
        latency
            .add(&consumer.latency_ns)
            .expect("histograms of equal bounds");
    }
    let confirmed: u64 = all_producers().map(|p| p.confirmed.len() as u64).sum();
    // Without consumers nothing was meant to be delivered: the messages stay queued.
    let lost = runs
        .iter()
        .filter(|_| args.consumers > 0)
        .map(|run| {
            let confirmed: Vec<Vec<u64>> =
                run.producers.iter().map(|p| p.confirmed.clone()).collect();
            run.tally.lost(&confirmed)
        })
        .sum();
    let span = |end: Option<Instant>| match (first_send, end) {
        (Some(start), Some(end)) if end > start => end - start,
        _ => Duration::ZERO,
    };
    Report::new(report::Inputs {
        workload: report::Workload {
            producers: args.producers * args.queues,
            consumers: args.consumers * args.queues,
            queues: args.queues,
            payload_bytes: args.payload_bytes,
            window: args.window,
            prefetch: args.prefetch,
            rate: args.rate,
            nack_ratio: args.nack_ratio,
            delay_ms: args.delay.map(ferry::protocol::whole_millis),
            priorities: args.priorities,
            batch: args.batch,
        },
        counts: report::Counts {
            confirmed,
            refused: all_producers().map(|p| p.refused).sum(),
            delivered: runs.iter().map(|run| run.tally.unique_received()).sum(),
            nacked: consumers.iter().map(|c| c.nacked).sum(),
            duplicates: runs.iter().map(|run| run.tally.duplicates()).sum(),
            lost,
        },
        end_to_end: span(last_ack),
        confirm_span: span(last_confirm),
        latency_ns: latency,
        broker,
        bench_cpu,
        steal_percent,
    })
}

/// A progress bar on a terminal; a plain line a second otherwise.
fn show_progress(tallies: &[Arc<QueueTally>], total: Option<u64>) -> ProgressBar {
    let bar = match total {
        Some(total) => ProgressBar::new(total),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} delivered {per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let interactive = !bar.is_hidden();
    let tallies = tallies.to_vec();
    let updated = bar.clone();
    tokio::spawn(async move {
        let mut tick =
            tokio::time::interval(Duration::from_millis(if interactive { 100 } else { 1000 }));
        tick.tick().await;
        while !updated.is_finished() {
            tick.tick().await;
            let delivered: u64 = tallies.iter().map(|t| t.unique_received()).sum();
            updated.set_position(delivered);
            if !interactive && !updated.is_finished() {
                eprintln!(
                    "{:>6.1}s {delivered} delivered",
                    updated.elapsed().as_secs_f64()
                );
            }
        }
    });
    bar
}

/// Lifts the soft limit on open files so thousands of connections fit (the broker child
/// inherits it).
fn raise_open_file_limit(connections: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let wanted = (2 * connections + 256).min(hard);
    if soft < wanted {
        setrlimit(Resource::RLIMIT_NOFILE, wanted, hard)?;
    }
    if 2 * connections + 64 > hard {
        bail!(
            "{connections} connections need {} open files; the hard limit is {hard} (raise it with ulimit -Hn)",
            2 * connections + 64
        );
    }
    Ok(())
}
