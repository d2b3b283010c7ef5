//! `ferry consumer`: prints each delivered payload on its own line of stdout (with
//! `--json`, the whole message frame as one JSON line), then acks it; with `--count N`,
//! exits 0 after N acks.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;

use ferry::Consumer;
use ferry::protocol::DEFAULT_PREFETCH;

use super::ClientArgs;

#[derive(clap::Args, Debug)]
pub struct ConsumerArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Most unacked messages the broker sends this consumer at once (1-65535).
    #[arg(long, default_value_t = DEFAULT_PREFETCH, value_parser = clap::value_parser!(u16).range(1..))]
    prefetch: u16,
    /// Exit after acking this many messages. The prefetch is capped at N, so no message
    /// is taken only to be handed back at exit.
    #[arg(long)]
    count: Option<u64>,
    /// Print each message frame (id, payload, attempt, priority, published_at,
    /// ack_timeout_ms, dead_letter when it has one) as one JSON line instead of its
    /// payload.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: ConsumerArgs) -> anyhow::Result<ExitCode> {
    let prefetch = match args.count {
        Some(0) => return Ok(ExitCode::SUCCESS),
        Some(count) => args.prefetch.min(u16::try_from(count).unwrap_or(u16::MAX)),
        None => args.prefetch,
    };
    let options = args.client.consumer_options(prefetch)?;
    let mut consumer = Consumer::connect_with(args.client.addr.as_str(), &options)
        .await
        .with_context(|| format!("cannot register as a consumer on queue `{}`", options.queue))?;
    let mut stdout = std::io::stdout().lock();
    let mut acked = 0u64;
    while args.count.is_none_or(|count| acked < count) {
        let message = consumer.recv().await?;
        // The line is out of this process before the ack is: at-least-once, end to end.
        let written = if args.json {
            serde_json::to_writer(&mut stdout, &message)
                .map_err(std::io::Error::from)
                .and_then(|()| writeln!(stdout))
        } else {
            writeln!(stdout, "{}", message.payload)
        };
        written
            .and_then(|()| stdout.flush())
            .context("cannot write to standard output")?;
        consumer.queue_ack(message.id);
        acked += 1;
    }
    consumer.close().await?;
    Ok(ExitCode::SUCCESS)
}
