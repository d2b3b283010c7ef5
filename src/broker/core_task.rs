//! The one task that owns the [`Core`]. Connections send it batches of commands on a
//! bounded channel; it applies them in order, sends each connection its replies and
//! deliveries in one message per turn, sleeps until the core's next deadline, and runs
//! the drain when shutdown begins. No lock anywhere: the core has a single owner.
//!
//! The channel back to a connection is unbounded, yet what sits in it is bounded: replies
//! answer commands the connection sent (and it stops reading while too many are
//! unanswered), and deliveries are capped by the consumer's prefetch. That way this task
//! never waits for a slow connection, so one cannot stall the others.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::core::{ConsumerId, Core, CoreConfig, Delivery, DrainReport};
use super::metrics::BrokerMetrics;
use super::sleep_until;
use crate::protocol::{ErrorCode, MessageId, Payload, QueueName, Role};

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
}

impl CoreTask {
    pub fn new(
        config: CoreConfig,
        drain_timeout: Duration,
        requests: mpsc::Receiver<Request>,
        metrics: Arc<BrokerMetrics>,
    ) -> Self {
        CoreTask {
            core: Core::new(config),
            requests,
            sessions: FxHashMap::default(),
            outgoing: FxHashMap::default(),
            drain_timeout,
            metrics,
        }
    }

    /// Runs until the drain that `shutdown` starts is complete or timed out.
    pub async fn run(mut self, shutdown: CancellationToken) -> ShutdownReport {
        let mut batch = Vec::with_capacity(REQUESTS_PER_TURN);
        let mut drain_deadline: Option<Instant> = None;
        loop {
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
                    return ShutdownReport { drain, completed: false };
                }
                received = self.requests.recv_many(&mut batch, REQUESTS_PER_TURN) => {
                    if received == 0 {
                        // Every sender is gone: the server ended without a drain.
                        return ShutdownReport { drain: self.core.drain_report(), completed: false };
                    }
                    for request in batch.drain(..) {
                        self.apply(request);
                    }
                }
                () = sleep_until(ack_deadline) => self.core.handle_timeout(Instant::now()),
            }
            self.dispatch(Instant::now());
            self.metrics.record_core(&self.core.stats());
            if drain_deadline.is_some() && self.core.is_drained() {
                return ShutdownReport {
                    drain: self.core.drain_report(),
                    completed: true,
                };
            }
        }
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
                    Ok(()) => Reply::Acked,
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
        if !replies.is_empty() {
            self.send(conn, ToConnection::Replies(replies));
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
        match self.core.publish(&session.queue, payload) {
            Ok(id) => Reply::Published(id),
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
