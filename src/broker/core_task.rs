//! The one task that owns the [`Gate`] (and so the core): the shell around it.
//! Connections send it batches of commands on a bounded channel; it applies them, ends
//! each turn (timeouts, deliveries, the log), sends each connection what the gate puts
//! out for it, sleeps until the next ack deadline, and runs the drain when shutdown
//! begins. No lock anywhere: the core has a single owner.
//!
//! The channel back to a connection is unbounded, yet what sits in it is bounded: replies
//! answer commands the connection sent (and its session stops reading while the replies
//! it is owed could pass its output bound), and deliveries are capped by the consumer's
//! prefetch and its pause. That way this task never waits for a slow connection, so one
//! cannot stall the others.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::commands::{ConnectionId, Request, ToConnection};
use super::core::{Core, CoreConfig, DrainReport, Restored};
use super::gate::Gate;
use super::metrics::BrokerMetrics;
use super::sleep_until;
use crate::storage::{Durability, Journal, Storage};

/// How the core task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    pub drain: DrainReport,
    /// False when the drain timeout cut the drain short.
    pub completed: bool,
}

/// Most requests taken from the channel per turn, so that a turn stays short.
const REQUESTS_PER_TURN: usize = 256;

/// The log stopped accepting writes: nothing more can be confirmed.
#[derive(Debug, thiserror::Error)]
#[error("the log failed ({0}); stopping, with nothing confirmed that is not durable")]
pub struct StorageFailed(pub String);

pub(crate) struct CoreTask {
    gate: Gate<Journal>,
    requests: mpsc::Receiver<Request>,
    /// Where each registered connection's messages go.
    routes: FxHashMap<ConnectionId, mpsc::UnboundedSender<ToConnection>>,
    /// How far the log is durable, with `--data-dir`.
    durability: Option<watch::Receiver<Durability>>,
    drain_timeout: Duration,
    metrics: Arc<BrokerMetrics>,
}

impl CoreTask {
    pub fn new(
        config: CoreConfig,
        drain_timeout: Duration,
        requests: mpsc::Receiver<Request>,
        metrics: Arc<BrokerMetrics>,
        storage: Option<Storage>,
    ) -> Self {
        let mut core = Core::new(config);
        let mut durability = None;
        let journal = storage.map(
            |Storage {
                 mut journal,
                 recovered,
                 ..
             }| {
                for message in recovered.messages {
                    core.restore(
                        &message.queue,
                        Restored {
                            id: message.id,
                            payload: message.payload,
                            deliveries: message.deliveries,
                            priority: message.priority,
                            published_at_ms: message.published_at_ms,
                            due_ms: message.due_ms,
                            attributes: message.attributes,
                            dead_letter: message.dead_letter,
                        },
                    );
                }
                core.end_restore();
                core.skip_ids_below(recovered.next_id);
                durability = Some(journal.durability().clone());
                journal
            },
        );
        let gate = Gate::new(core, journal);
        metrics.record_core(&gate.stats());
        CoreTask {
            gate,
            requests,
            routes: FxHashMap::default(),
            durability,
            drain_timeout,
            metrics,
        }
    }

    /// Runs until the drain that `shutdown` starts is complete or timed out; then makes
    /// everything submitted to the log durable and releases the last confirms.
    ///
    /// # Errors
    /// [`StorageFailed`] if the log cannot be written: the broker must stop.
    pub async fn run(
        mut self,
        shutdown: CancellationToken,
    ) -> Result<ShutdownReport, StorageFailed> {
        let mut batch = Vec::with_capacity(REQUESTS_PER_TURN);
        let mut drain_deadline: Option<Instant> = None;
        let report = loop {
            let ack_deadline = self.gate.poll_timeout();
            tokio::select! {
                biased;
                () = shutdown.cancelled(), if drain_deadline.is_none() => {
                    self.gate.begin_drain();
                    drain_deadline = Some(Instant::now() + self.drain_timeout);
                    let stats = self.gate.stats();
                    info!(ready = stats.ready, in_flight = stats.in_flight, consumers = stats.consumers,
                        timeout = %humantime::format_duration(self.drain_timeout), "draining");
                }
                () = sleep_until(drain_deadline) => {
                    let drain = self.gate.drain_report();
                    warn!(delivered = drain.delivered, left_ready = drain.left_ready,
                        left_in_flight = drain.left_in_flight, left_delayed = drain.left_delayed, "drain timeout passed");
                    break ShutdownReport { drain, completed: false };
                }
                durability = durability_change(&mut self.durability) => match durability {
                    Durability::Through(seq) => self.gate.handle_durable(seq),
                    Durability::Failed(reason) => return Err(StorageFailed(reason)),
                },
                received = self.requests.recv_many(&mut batch, REQUESTS_PER_TURN) => {
                    if received == 0 {
                        // Every sender is gone: the server ended without a drain.
                        break ShutdownReport { drain: self.gate.drain_report(), completed: false };
                    }
                    // A disconnect's dead letters are stamped with the core's time.
                    self.gate.advance_to(Instant::now());
                    for Request { conn, commands, route, budget } in batch.drain(..) {
                        if let Some(route) = route {
                            self.routes.insert(conn, route);
                        }
                        self.gate.apply(conn, commands);
                        // Its payloads are the core's now, counted by --max-memory.
                        drop(budget);
                    }
                }
                // Nothing to do here: every turn ends with the timeouts that are due.
                () = sleep_until(ack_deadline) => {}
            }
            self.end_turn();
            if drain_deadline.is_some() && self.gate.is_drained() {
                break ShutdownReport {
                    drain: self.gate.drain_report(),
                    completed: true,
                };
            }
        };
        self.close_log().await?;
        Ok(report)
    }

    /// Ends the gate's turn and sends what it put out. A connection whose task is gone
    /// ends in the gate, which may make more deliveries: the turn ends again then.
    fn end_turn(&mut self) {
        loop {
            self.gate.end_turn(Instant::now());
            if !self.send_outbound() {
                break;
            }
        }
        self.metrics.record_core(&self.gate.stats());
    }

    /// Sends the gate's output; says whether a connection turned out to be gone.
    fn send_outbound(&mut self) -> bool {
        let mut gone = false;
        while let Some((conn, message)) = self.gate.poll_outbound() {
            let delivered = self
                .routes
                .get(&conn)
                .is_none_or(|route| route.send(message).is_ok());
            if !delivered {
                // Its in-flight messages go back now rather than at their deadline.
                self.routes.remove(&conn);
                self.gate.handle_gone(conn);
                gone = true;
            }
        }
        while let Some(conn) = self.gate.poll_forgotten() {
            self.routes.remove(&conn);
        }
        gone
    }

    /// Makes everything submitted durable, releases the confirms waiting for it, and
    /// stops the writer.
    async fn close_log(&mut self) -> Result<(), StorageFailed> {
        let (Some(mut journal), Some(durability)) = (self.gate.take_log(), &mut self.durability)
        else {
            return Ok(());
        };
        journal.await_pending();
        let last = journal.submit().expect("an awaited batch is submitted");
        loop {
            let current = durability.borrow_and_update().clone();
            match current {
                Durability::Through(seq) if seq >= last => {
                    self.gate.handle_durable(seq);
                    self.send_outbound();
                    break;
                }
                Durability::Failed(reason) => return Err(StorageFailed(reason)),
                Durability::Through(_) => {
                    if durability.changed().await.is_err() {
                        return Err(StorageFailed("the log writer stopped".into()));
                    }
                }
            }
        }
        // Joining the writer thread blocks; it has nothing left to write.
        let _ = tokio::task::spawn_blocking(move || journal.close()).await;
        Ok(())
    }
}

/// The next change in how far the log is durable; never, without a log.
async fn durability_change(durability: &mut Option<watch::Receiver<Durability>>) -> Durability {
    let Some(durability) = durability else {
        return std::future::pending().await;
    };
    match durability.changed().await {
        Ok(()) => durability.borrow_and_update().clone(),
        Err(_) => Durability::Failed("the log writer stopped".into()),
    }
}
