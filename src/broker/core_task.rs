//! The one task that owns the [`Core`]. Connections send it batches of commands on a
//! bounded channel; it applies them in order, sends each connection its replies and
//! deliveries in one message per turn, sleeps until the core's next deadline, and runs
//! the drain when shutdown begins. No lock anywhere: the core has a single owner.
//!
//! The channel back to a connection is unbounded, yet what sits in it is bounded: replies
//! answer commands the connection sent (and it stops reading while too many are
//! unanswered), and deliveries are capped by the consumer's prefetch. That way this task
//! never waits for a slow connection, so one cannot stall the others.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::core::{ConsumerId, Core, CoreConfig, Delivery, DrainReport};
use super::held_replies::HeldReplies;
use super::metrics::BrokerMetrics;
use super::sleep_until;
use crate::protocol::{ErrorCode, MessageId, Payload, QueueName, Role};
use crate::storage::{Durability, Journal, LiveMessage, Storage, record};

/// Identifies a connection for the life of the broker; never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId(pub u64);

impl std::fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl ConnectionId {
    fn consumer(self) -> ConsumerId {
        ConsumerId(self.0)
    }
}

/// Commands from one connection, applied in order.
#[derive(Debug)]
pub(crate) struct Request {
    pub conn: ConnectionId,
    pub commands: Vec<Command>,
}

/// What a connection asks of the core. Every command but `Disconnect` gets exactly one
/// [`Reply`], in order.
#[derive(Debug)]
pub(crate) enum Command {
    Register {
        role: Role,
        queue: QueueName,
        prefetch: u16,
        outbound: mpsc::UnboundedSender<ToConnection>,
    },
    Publish(Payload),
    Ack(MessageId),
    Disconnect,
}

/// What the core task sends a connection.
#[derive(Debug)]
pub(crate) enum ToConnection {
    Replies(Vec<Reply>),
    Deliveries(Vec<Delivery>),
}

#[derive(Debug)]
pub(crate) enum Reply {
    Registered,
    Published(MessageId),
    /// An ack that took effect: nothing goes on the wire.
    Acked,
    Refused {
        code: ErrorCode,
        message: String,
        id: Option<MessageId>,
    },
}

/// How the core task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    pub drain: DrainReport,
    /// False when the drain timeout cut the drain short.
    pub completed: bool,
}

/// Most requests taken from the channel per turn, so timers and dispatch are not starved.
const REQUESTS_PER_TURN: usize = 256;

struct Session {
    role: Role,
    queue: QueueName,
    outbound: mpsc::UnboundedSender<ToConnection>,
}

pub(crate) struct CoreTask {
    core: Core,
    requests: mpsc::Receiver<Request>,
    sessions: FxHashMap<ConnectionId, Session>,
    /// Deliveries of the current turn, grouped so each consumer gets one message.
    outgoing: FxHashMap<ConnectionId, Vec<Delivery>>,
    drain_timeout: Duration,
    metrics: Arc<BrokerMetrics>,
    /// The log, with `--data-dir`.
    journal: Option<Journal>,
    held: HeldReplies,
    /// Ids acked and delivered this turn, logged together at its end, and the bytes the
    /// acked messages' publish records take.
    acked: Vec<MessageId>,
    acked_record_bytes: u64,
    delivered: Vec<MessageId>,
    /// The highest id published this turn.
    newest_published: Option<MessageId>,
    /// (batch, highest id published in it): when the batch is durable, messages up to
    /// that id may be delivered.
    publish_batches: VecDeque<(u64, MessageId)>,
}

/// The log stopped accepting writes: nothing more can be confirmed.
#[derive(Debug, thiserror::Error)]
#[error("the log failed ({0}); stopping, with nothing confirmed that is not durable")]
pub struct StorageFailed(pub String);

impl CoreTask {
    pub fn new(
        config: CoreConfig,
        drain_timeout: Duration,
        requests: mpsc::Receiver<Request>,
        metrics: Arc<BrokerMetrics>,
        storage: Option<Storage>,
    ) -> Self {
        let mut core = Core::new(config);
        let journal = storage.map(
            |Storage {
                 journal, recovered, ..
             }| {
                for message in recovered.messages {
                    core.restore(
                        &message.queue,
                        message.id,
                        message.payload,
                        message.deliveries,
                    );
                }
                core.skip_ids_below(recovered.next_id);
                // Everything recovered is durable; what comes next is delivered once it is.
                core.hold_new_messages();
                journal
            },
        );
        metrics.record_core(&core.stats());
        CoreTask {
            core,
            requests,
            sessions: FxHashMap::default(),
            outgoing: FxHashMap::default(),
            drain_timeout,
            metrics,
            journal,
            held: HeldReplies::default(),
            acked: Vec::new(),
            acked_record_bytes: 0,
            delivered: Vec::new(),
            newest_published: None,
            publish_batches: VecDeque::new(),
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
            let ack_deadline = self.core.poll_timeout();
            tokio::select! {
                biased;
                () = shutdown.cancelled(), if drain_deadline.is_none() => {
                    self.core.begin_drain();
                    drain_deadline = Some(Instant::now() + self.drain_timeout);
                    let stats = self.core.stats();
                    info!(ready = stats.ready, in_flight = stats.in_flight, consumers = stats.consumers,
                        timeout = %humantime::format_duration(self.drain_timeout), "draining");
                }
                () = sleep_until(drain_deadline) => {
                    let drain = self.core.drain_report();
                    warn!(delivered = drain.delivered, left_ready = drain.left_ready,
                        left_in_flight = drain.left_in_flight, "drain timeout passed");
                    break ShutdownReport { drain, completed: false };
                }
                durability = durability_change(&mut self.journal) => self.release_durable(durability)?,
                received = self.requests.recv_many(&mut batch, REQUESTS_PER_TURN) => {
                    if received == 0 {
                        // Every sender is gone: the server ended without a drain.
                        break ShutdownReport { drain: self.core.drain_report(), completed: false };
                    }
                    for request in batch.drain(..) {
                        self.apply(request);
                    }
                }
                () = sleep_until(ack_deadline) => {
                    self.core.handle_timeout(Instant::now());
                    // Connections write every delivery they get at once for now; what a
                    // timeout took back needs no telling them yet.
                    self.core.take_expired();
                }
            }
            self.end_turn(Instant::now());
            if drain_deadline.is_some() && self.core.is_drained() && self.held.is_empty() {
                break ShutdownReport {
                    drain: self.core.drain_report(),
                    completed: true,
                };
            }
        };
        self.close_log().await?;
        Ok(report)
    }

    /// Hands out deliveries, logs the turn, compacts the log when due, and submits it.
    fn end_turn(&mut self, now: Instant) {
        self.dispatch(now);
        if let Some(journal) = &mut self.journal {
            journal.log_acked(&self.acked, std::mem::take(&mut self.acked_record_bytes));
            journal.log_delivered(&self.delivered);
            if journal.wants_compaction() {
                let live = self
                    .core
                    .live_messages()
                    .map(|(id, deliveries, queue, payload)| LiveMessage {
                        id,
                        deliveries,
                        queue,
                        payload,
                    });
                let copied = journal.compact_oldest(live);
                debug!(
                    copied,
                    "compacting the log: live messages of its oldest segment copied forward"
                );
            }
            let seq = journal.submit();
            if let (Some(seq), Some(newest)) = (seq, self.newest_published.take()) {
                self.publish_batches.push_back((seq, newest));
            }
        }
        self.acked.clear();
        self.delivered.clear();
        self.metrics.record_core(&self.core.stats());
    }

    fn release_durable(&mut self, durability: Durability) -> Result<(), StorageFailed> {
        match durability {
            Durability::Through(seq) => {
                let mut newest_durable = None;
                while let Some(&(batch, newest)) = self.publish_batches.front() {
                    if batch > seq {
                        break;
                    }
                    self.publish_batches.pop_front();
                    newest_durable = Some(newest);
                }
                if let Some(newest) = newest_durable {
                    self.core.make_deliverable(MessageId(newest.0 + 1));
                }
                for (conn, replies) in self.held.release_through(seq) {
                    self.send(conn, ToConnection::Replies(replies));
                }
                Ok(())
            }
            Durability::Failed(reason) => Err(StorageFailed(reason)),
        }
    }

    /// Makes everything submitted durable, releases the confirms waiting for it, and
    /// stops the writer.
    async fn close_log(&mut self) -> Result<(), StorageFailed> {
        let Some(mut journal) = self.journal.take() else {
            return Ok(());
        };
        journal.await_pending();
        let last = journal.submit().expect("an awaited batch is submitted");
        loop {
            let durability = journal.durability().borrow_and_update().clone();
            match durability {
                Durability::Through(seq) if seq >= last => {
                    self.release_durable(durability)?;
                    break;
                }
                Durability::Failed(reason) => return Err(StorageFailed(reason)),
                Durability::Through(_) => {
                    if journal.durability().changed().await.is_err() {
                        return Err(StorageFailed("the log writer stopped".into()));
                    }
                }
            }
        }
        // Joining the writer thread blocks; it has nothing left to write.
        let _ = tokio::task::spawn_blocking(move || journal.close()).await;
        Ok(())
    }

    fn apply(&mut self, Request { conn, commands }: Request) {
        let mut replies = Vec::with_capacity(commands.len());
        for command in commands {
            let reply = match command {
                Command::Register {
                    role,
                    queue,
                    prefetch,
                    outbound,
                } => {
                    if role == Role::Consumer {
                        self.core
                            .subscribe(conn.consumer(), queue.clone(), prefetch);
                    }
                    self.sessions.insert(
                        conn,
                        Session {
                            role,
                            queue,
                            outbound,
                        },
                    );
                    Reply::Registered
                }
                Command::Publish(payload) => self.publish(conn, payload),
                Command::Ack(id) => match self.core.ack(conn.consumer(), id) {
                    Ok(payload) => {
                        if self.journal.is_some()
                            && let Some(session) = self.sessions.get(&conn)
                        {
                            self.acked.push(id);
                            self.acked_record_bytes +=
                                record::publish_record_bytes(&session.queue, &payload) as u64;
                        }
                        Reply::Acked
                    }
                    Err(refusal) => Reply::Refused {
                        code: ErrorCode::UnknownId,
                        message: refusal.to_string(),
                        id: Some(id),
                    },
                },
                Command::Disconnect => {
                    self.forget(conn);
                    continue;
                }
            };
            replies.push(reply);
        }
        if replies.is_empty() {
            return;
        }
        // A confirm waits until its record is durable, and a connection's later replies
        // wait behind its earlier ones. The batch is marked awaited because replies that
        // wait only for their turn (a refusal) log nothing, and a batch with nothing in it
        // would otherwise never be submitted, nor they released.
        let needs_log = self.journal.is_some()
            && (replies.iter().any(|r| matches!(r, Reply::Published(_)))
                || self.held.holds_for(conn));
        match &mut self.journal {
            Some(journal) if needs_log => self.held.hold(journal.await_pending(), conn, replies),
            _ => self.send(conn, ToConnection::Replies(replies)),
        }
    }

    fn publish(&mut self, conn: ConnectionId, payload: Payload) -> Reply {
        let Some(session) = self.sessions.get(&conn) else {
            debug_assert!(false, "publish from unregistered connection {conn}");
            return Reply::Refused {
                code: ErrorCode::NotRegistered,
                message: "register first".into(),
                id: None,
            };
        };
        debug_assert_eq!(session.role, Role::Producer);
        let logged = self.journal.is_some().then(|| payload.clone());
        match self.core.publish(&session.queue, payload) {
            Ok(id) => {
                if let (Some(journal), Some(payload)) = (&mut self.journal, logged) {
                    journal.log_publish(id, 0, &session.queue, &payload);
                    self.newest_published = Some(id);
                }
                Reply::Published(id)
            }
            Err(refusal) => {
                debug!(conn = %conn, queue = %session.queue, %refusal, "publish refused");
                Reply::Refused {
                    code: refusal.code(),
                    message: refusal.to_string(),
                    id: None,
                }
            }
        }
    }

    /// Hands out every delivery the core can make now, one channel message per consumer.
    fn dispatch(&mut self, now: Instant) {
        while let Some(delivery) = self.core.poll_delivery(now) {
            if self.journal.is_some() {
                self.delivered.push(delivery.id);
            }
            self.outgoing
                .entry(ConnectionId(delivery.consumer.0))
                .or_default()
                .push(delivery);
        }
        let mut gone = Vec::new();
        for (conn, deliveries) in self.outgoing.drain() {
            if !send_to(&self.sessions, conn, ToConnection::Deliveries(deliveries)) {
                gone.push(conn);
            }
        }
        for conn in gone {
            self.forget(conn);
        }
    }

    fn send(&mut self, conn: ConnectionId, message: ToConnection) {
        if !send_to(&self.sessions, conn, message) {
            self.forget(conn);
        }
    }

    fn forget(&mut self, conn: ConnectionId) {
        if let Some(session) = self.sessions.remove(&conn)
            && session.role == Role::Consumer
        {
            let returned = self.core.disconnect(conn.consumer());
            if returned > 0 {
                info!(conn = %conn, queue = %session.queue, returned, "consumer gone; its in-flight messages are ready again");
            }
        }
    }
}

/// Sends to a connection's task; false when that task is gone. A gone task is treated as
/// a disconnect, so its in-flight messages go back at once rather than at their deadline.
fn send_to(
    sessions: &FxHashMap<ConnectionId, Session>,
    conn: ConnectionId,
    message: ToConnection,
) -> bool {
    sessions
        .get(&conn)
        .is_none_or(|session| session.outbound.send(message).is_ok())
}

/// The next change in how far the log is durable; never, without a log.
async fn durability_change(journal: &mut Option<Journal>) -> Durability {
    let Some(journal) = journal else {
        return std::future::pending().await;
    };
    match journal.durability().changed().await {
        Ok(()) => journal.durability().borrow_and_update().clone(),
        Err(_) => Durability::Failed("the log writer stopped".into()),
    }
}
