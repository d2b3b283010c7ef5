//! `ferry producer`: publishes each MESSAGE argument, or each line of standard input,
//! printing each confirmed id on its own line; exits non-zero if any publish was refused.
//! With `--delay`, every message waits that long before it can be delivered; with
//! `--priority`, every message goes ahead of those of lower priorities; with `--header`,
//! every message carries those headers.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};

use ferry::protocol::{Headers, PRIORITY_MAX};
use ferry::{ClientError, MessageId, Producer, PublishOptions};

use super::ClientArgs;

/// Publishes awaiting confirms at once when reading a pipe or file.
const WINDOW: usize = 1000;
/// Queued bytes after which publishes are written without waiting for the window.
const FLUSH_BYTES: usize = 64 * 1024;

#[derive(clap::Args, Debug)]
pub struct ProducerArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Messages to publish; without any, each line of standard input is one message.
    messages: Vec<String>,
    /// Deliver no message before this long after it is published (e.g. 5s, 10m; at
    /// most the queue's max_delay, 7 days by default).
    #[arg(long, value_parser = humantime::parse_duration)]
    delay: Option<Duration>,
    /// Priority of every message, 0 to 9: higher priorities are delivered first.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=i64::from(PRIORITY_MAX)))]
    priority: u8,
    /// A header of every message, KEY=VALUE (repeatable, at most 32; KEY is 1 to 128
    /// characters of [A-Za-z0-9._-], not starting with `ferry.`).
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = header_entry)]
    headers: Vec<(String, String)>,
}

fn header_entry(entry: &str) -> Result<(String, String), String> {
    let (key, value) = entry
        .split_once('=')
        .ok_or_else(|| format!("`{entry}` has no `=`; write KEY=VALUE"))?;
    Ok((key.to_owned(), value.to_owned()))
}

/// Prints confirms as they come and counts refusals.
struct Confirms<W: Write> {
    out: W,
    refused: usize,
    /// Flush stdout after every id, for someone watching a terminal.
    interactive: bool,
}

impl<W: Write> Confirms<W> {
    fn record(&mut self, outcome: Result<MessageId, ClientError>) -> anyhow::Result<()> {
        match outcome {
            Ok(id) => {
                writeln!(self.out, "{id}")?;
                if self.interactive {
                    self.out.flush()?;
                }
            }
            Err(ClientError::Refused(refusal)) if !refusal.code.is_fatal() => {
                eprintln!("ferry producer: publish refused: {refusal}");
                self.refused += 1;
            }
            Err(other) => return Err(other.into()),
        }
        Ok(())
    }
}

pub async fn run(args: ProducerArgs) -> anyhow::Result<ExitCode> {
    let options = args.client.producer_options()?;
    let mut producer = Producer::connect_with(args.client.addr.as_str(), &options)
        .await
        .with_context(|| format!("cannot register as a producer on queue `{}`", options.queue))?;
    let stdin_is_terminal = std::io::stdin().is_terminal();
    let mut confirms = Confirms {
        out: std::io::BufWriter::new(std::io::stdout().lock()),
        refused: 0,
        interactive: args.messages.is_empty() && stdin_is_terminal,
    };
    // Someone typing lines wants each id before typing the next.
    let window = if confirms.interactive { 1 } else { WINDOW };
    let headers = if args.headers.is_empty() {
        None
    } else {
        let headers = Headers::new(args.headers.iter().map(|(k, v)| (k, v)))
            .map_err(|problem| anyhow::anyhow!("--header: the headers {problem}"))?;
        Some(headers)
    };
    let options = PublishOptions {
        priority: args.priority,
        delay: args.delay,
        headers,
    };

    if args.messages.is_empty() {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Some(line) = lines
            .next_line()
            .await
            .context("cannot read standard input")?
        {
            publish(&mut producer, &mut confirms, &line, window, &options).await?;
        }
    } else {
        for message in &args.messages {
            publish(&mut producer, &mut confirms, message, window, &options).await?;
        }
    }
    while producer.unconfirmed() > 0 {
        let outcome = producer.confirm().await;
        confirms.record(outcome)?;
    }
    confirms.out.flush()?;
    producer.close().await?;
    Ok(if confirms.refused == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("ferry producer: {} publishes refused", confirms.refused);
        ExitCode::FAILURE
    })
}

async fn publish<W: Write>(
    producer: &mut Producer,
    confirms: &mut Confirms<W>,
    payload: &str,
    window: usize,
    options: &PublishOptions,
) -> anyhow::Result<()> {
    if producer.unconfirmed() >= window {
        let outcome = producer.confirm().await;
        confirms.record(outcome)?;
    }
    producer.send_with(payload, options);
    if producer.queued_bytes() >= FLUSH_BYTES {
        producer.flush().await?;
    }
    Ok(())
}
