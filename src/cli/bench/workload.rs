//! The at-least-once workload: producers that keep up to a window of publishes awaiting
//! their confirms (optionally at a fixed rate, optionally delayed), and consumers that ack
//! every message (optionally nacking a share of them once first) and measure
//! publish-to-delivery latency from the send time carried in each payload (with delays,
//! lateness past each message's due time).

use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use ferry::{ClientError, Consumer, Producer, PublishOptions};

use super::tally::{QueueTally, decode_payload, encode_payload};

/// Queued publish bytes after which they are written without waiting to fill the window.
const FLUSH_BYTES: usize = 64 * 1024;
/// Longest latency the histograms hold: an hour, in nanoseconds.
const LATENCY_NS_MAX: u64 = 3_600_000_000_000;

/// When a producer stops.
#[derive(Debug, Clone, Copy)]
pub enum Quota {
    Messages(u64),
    Until(Instant),
}

pub struct ProducerPlan {
    /// Index among the producers of its queue, carried in each payload.
    pub index: usize,
    pub quota: Quota,
    pub payload_bytes: usize,
    pub window: usize,
    /// Messages per second, or as fast as the window allows.
    pub rate: Option<f64>,
    /// Where in its period this producer's fixed-rate schedule starts, as a fraction of
    /// the period, so that many producers together send at an even rate instead of all
    /// at the same instant.
    pub phase: f64,
    /// Publish every message delayed, by [`delay_of`] its index within this span.
    pub delay_span: Option<Duration>,
    /// Message `i` gets priority `i mod priorities`.
    pub priorities: u8,
    /// Messages per publish_batch frame; 1 publishes one by one.
    pub batch: usize,
}

/// What consumers do besides acking.
#[derive(Debug, Clone, Copy)]
pub struct ConsumerPlan {
    /// Share of messages nacked once (by [`nacked_once`] their index) before the ack.
    pub nack_ratio: f64,
    /// The producers' delay span: latency is then counted from each message's due time.
    pub delay_span: Option<Duration>,
}

/// The delay of message `index` in a span: spread evenly over it (a stride prime to
/// the span's milliseconds scatters neighbours), the same in producer and consumer.
pub fn delay_of(index: u64, span: Duration) -> Duration {
    let span_ms = ferry::protocol::whole_millis(span).max(1);
    Duration::from_millis(index.wrapping_mul(7_919) % span_ms)
}

/// Whether message `index` is nacked once, for a share `ratio` of all messages.
fn nacked_once(index: u64, ratio: f64) -> bool {
    ((index % 1000) as f64) < ratio * 1000.0
}

#[derive(Debug, Default)]
pub struct ProducerOutcome {
    /// Indices the broker confirmed.
    pub confirmed: Vec<u64>,
    pub refused: u64,
    pub first_send: Option<Instant>,
    pub last_confirm: Option<Instant>,
}

/// Publishes per the plan; every message waits for its confirm within the window.
pub async fn produce(
    mut producer: Producer,
    plan: ProducerPlan,
    tally: Arc<QueueTally>,
    origin: Instant,
) -> Result<ProducerOutcome, ClientError> {
    let mut outcome = ProducerOutcome::default();
    let mut payload = String::with_capacity(plan.payload_bytes + 32);
    let padding = "x".repeat(plan.payload_bytes);
    let interval = plan.rate.map(|rate| Duration::from_secs_f64(1.0 / rate));
    let start = Instant::now() + interval.map_or(Duration::ZERO, |every| every.mul_f64(plan.phase));
    // Indices of the publishes awaiting confirms, oldest first.
    let mut awaiting = std::collections::VecDeque::with_capacity(plan.window);
    // With batches: how many messages each frame awaiting its confirm carries.
    let mut frames = std::collections::VecDeque::new();
    let mut batch_payloads: Vec<String> = Vec::new();
    let mut sent = 0u64;
    loop {
        let now = Instant::now();
        let more = match plan.quota {
            Quota::Messages(total) => sent < total,
            Quota::Until(end) => now < end,
        };
        if !more && awaiting.is_empty() {
            break;
        }
        // When the next message is due: now, or on the fixed-rate schedule.
        let due_at = interval.map(|every| start + every.mul_f64(sent as f64));
        if more
            && awaiting.len() < plan.window
            && due_at.is_none_or(|at| at <= now)
            && plan.batch > 1
        {
            let left = match plan.quota {
                Quota::Messages(total) => total - sent,
                Quota::Until(_) => u64::MAX,
            };
            let count = plan
                .batch
                .min(plan.window - awaiting.len())
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            batch_payloads.resize_with(count, String::new);
            let mut options = Vec::with_capacity(count);
            for (k, payload) in batch_payloads.iter_mut().enumerate() {
                let index = sent + k as u64;
                encode_payload(
                    payload,
                    plan.index,
                    index,
                    (now - origin).as_nanos() as u64,
                    &padding,
                );
                options.push(publish_options(&plan, index));
            }
            let entries: Vec<(&str, &PublishOptions)> = batch_payloads
                .iter()
                .map(String::as_str)
                .zip(&options)
                .collect();
            producer.send_batch(&entries);
            outcome.first_send.get_or_insert(now);
            awaiting.extend(sent..sent + count as u64);
            frames.push_back(count);
            sent += count as u64;
            if producer.queued_bytes() >= FLUSH_BYTES {
                producer.flush().await?;
            }
            continue;
        }
        if more && awaiting.len() < plan.window && due_at.is_none_or(|at| at <= now) {
            encode_payload(
                &mut payload,
                plan.index,
                sent,
                (now - origin).as_nanos() as u64,
                &padding,
            );
            producer.send_with(&payload, &publish_options(&plan, sent));
            outcome.first_send.get_or_insert(now);
            awaiting.push_back(sent);
            sent += 1;
            if producer.queued_bytes() >= FLUSH_BYTES {
                producer.flush().await?;
            }
            continue;
        }
        // Nothing to send now: take confirms, or wait for the next due time.
        if awaiting.is_empty() {
            producer.flush().await?;
            if let Some(at) = due_at {
                tokio::time::sleep_until(at).await;
            }
            continue;
        }
        let batched = plan.batch > 1;
        let first = match due_at.filter(|_| more && awaiting.len() < plan.window) {
            Some(at) => tokio::select! {
                confirm = next_confirm(&mut producer, batched) => Some(confirm),
                () = tokio::time::sleep_until(at) => None,
            },
            None => Some(next_confirm(&mut producer, batched).await),
        };
        let Some(first) = first else { continue };
        let mut confirmed_now = 0;
        // The first confirm, then every other one already read with it.
        let mut next = Some(first);
        while let Some(confirm) = next
            .take()
            .or_else(|| try_next_confirm(&mut producer, batched))
        {
            let count = if batched {
                frames.pop_front().expect("a confirm answers a sent batch")
            } else {
                1
            };
            let indices = awaiting.drain(..count);
            match confirm {
                Ok(()) => {
                    outcome.confirmed.extend(indices);
                    confirmed_now += count as u64;
                }
                Err(ClientError::Refused(refusal)) if !refusal.code.is_fatal() => {
                    outcome.refused += count as u64;
                }
                Err(fatal) => return Err(fatal),
            }
        }
        tally.confirmed(confirmed_now);
        outcome.last_confirm = Some(Instant::now());
    }
    tally.producer_finished();
    producer.close().await?;
    Ok(outcome)
}

/// The options of message `index` under `plan`.
fn publish_options(plan: &ProducerPlan, index: u64) -> PublishOptions {
    PublishOptions {
        priority: (index % u64::from(plan.priorities)) as u8,
        delay: plan.delay_span.map(|span| delay_of(index, span)),
        headers: None,
    }
}

/// The next confirm, of a publish or of a whole batch.
async fn next_confirm(producer: &mut Producer, batched: bool) -> Result<(), ClientError> {
    if batched {
        producer.confirm_batch().await.map(drop)
    } else {
        producer.confirm().await.map(drop)
    }
}

/// [`next_confirm`], if it has already been read.
fn try_next_confirm(producer: &mut Producer, batched: bool) -> Option<Result<(), ClientError>> {
    if batched {
        producer.try_confirm_batch().map(|c| c.map(drop))
    } else {
        producer.try_confirm().map(|c| c.map(drop))
    }
}

pub struct ConsumerOutcome {
    pub latency_ns: Histogram<u64>,
    pub received: u64,
    pub nacked: u64,
    pub last_ack: Option<Instant>,
}

/// Receives and acks until every confirmed message of the queue has arrived.
pub async fn consume(
    mut consumer: Consumer,
    plan: ConsumerPlan,
    tally: Arc<QueueTally>,
    origin: Instant,
) -> Result<ConsumerOutcome, ClientError> {
    let mut outcome = ConsumerOutcome {
        latency_ns: Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3)
            .expect("valid histogram bounds"),
        received: 0,
        nacked: 0,
        last_ack: None,
    };
    loop {
        // Completion is only checked before waiting: checking it per message would cost
        // as much as taking the message.
        let message = match consumer.try_recv() {
            Some(message) => message?,
            None => tokio::select! {
                biased;
                () = tally.complete.cancelled() => break,
                message = consumer.recv() => message?,
            },
        };
        let (producer, index, sent_ns) = decode_payload(&message.payload).ok_or_else(|| {
            ClientError::Protocol(format!("not a bench payload: {:.40}", message.payload))
        })?;
        if message.attempt == 1 && nacked_once(index, plan.nack_ratio) {
            consumer.queue_nack(message.id, None);
            outcome.nacked += 1;
            continue;
        }
        let now_ns = origin.elapsed().as_nanos() as u64;
        let due_ns = sent_ns
            + plan
                .delay_span
                .map_or(0, |span| delay_of(index, span).as_nanos() as u64);
        outcome
            .latency_ns
            .saturating_record(now_ns.saturating_sub(due_ns).max(1));
        outcome.received += 1;
        consumer.queue_ack(message.id);
        tally.received(producer, index);
    }
    consumer.flush().await?;
    outcome.last_ack = Some(Instant::now());
    consumer.close().await?;
    Ok(outcome)
}
