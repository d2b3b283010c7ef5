//! What connections and the core task say to each other: a connection sends [`Request`]s
//! (its commands, in order) and receives [`ToConnection`] messages (replies in the order
//! of its commands, deliveries, and deliveries taken back).

use tokio::sync::{OwnedSemaphorePermit, mpsc};

use std::time::Duration;

use super::core::{ConsumerId, Delivery, NackAction, NewMessage};
use crate::protocol::{ErrorCode, Ids, MessageId, QueueName, Role};

/// Identifies a connection for the life of the broker; never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

impl std::fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl ConnectionId {
    /// The consumer a consumer connection is to the core.
    pub fn consumer(self) -> ConsumerId {
        ConsumerId(self.0)
    }
}

/// Commands from one connection, applied in order.
#[derive(Debug)]
pub(crate) struct Request {
    pub conn: ConnectionId,
    pub commands: Vec<Command>,
    /// With a register: where the core task sends this connection its replies and
    /// deliveries from then on.
    pub route: Option<mpsc::UnboundedSender<ToConnection>>,
    /// The share of the bytes requests may hold on their way to the core that this one
    /// holds (its payloads): given back once it is applied.
    pub budget: Option<OwnedSemaphorePermit>,
}

/// Message bytes (payloads and headers) that requests on their way to the core task may
/// hold in all: past it,
/// connections wait to send. The channel's count of requests alone would let a thousand
/// requests of a megabyte each wait there, uncounted by `--max-memory`.
pub const REQUEST_BYTES_MAX: usize = 64 << 20;

impl Command {
    /// Message bytes the command carries: payloads, and headers (a frame of an empty
    /// payload may carry most of a megabyte of them).
    pub fn payload_bytes(&self) -> usize {
        match self {
            Command::Publish(message) => message_bytes(message),
            Command::PublishBatch(messages) => messages.iter().map(message_bytes).sum(),
            _ => 0,
        }
    }
}

fn message_bytes(message: &NewMessage) -> usize {
    message.payload.len() + message.attributes.as_ref().map_or(0, |a| a.byte_len())
}

/// What a connection asks of the core. Each command for which [`Command::is_answered`]
/// holds gets exactly one [`Reply`], in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    Register {
        role: Role,
        queue: QueueName,
        prefetch: u16,
        /// A consumer's own lease, checked against its queue's `max_lease`.
        lease: Option<Duration>,
    },
    Publish(NewMessage),
    /// 1 to `PUBLISH_BATCH_MAX` messages, all or none (rule 19).
    PublishBatch(Vec<NewMessage>),
    Ack(Ids),
    /// Checked against the queue's `max_delay`.
    Nack {
        ids: Ids,
        action: NackAction,
    },
    /// Checked against the queue's `max_lease`.
    Touch {
        ids: Ids,
        lease: Option<Duration>,
    },
    /// The connection holds all the output it may: deliver nothing more to it until
    /// [`Command::Resume`].
    Pause,
    Resume,
    /// The connection is ending: its consumer's messages go back at once. Replies to
    /// the commands before it still come.
    Disconnect,
}

impl Command {
    /// Whether the core answers this command with a [`Reply`].
    pub fn is_answered(&self) -> bool {
        matches!(
            self,
            Command::Register { .. }
                | Command::Publish(_)
                | Command::PublishBatch(_)
                | Command::Ack(_)
                | Command::Nack { .. }
                | Command::Touch { .. }
        )
    }
}

/// What the core task sends a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToConnection {
    /// Replies to the connection's next answered commands, in order.
    Replies(Vec<Reply>),
    Deliveries(Vec<Delivery>),
    /// Deliveries whose lease ran out (their messages are ready again): any not written
    /// yet need not be.
    Revoked(Vec<MessageId>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Registered,
    Published(MessageId),
    /// A publish_batch accepted: its messages' ids, in order.
    PublishedBatch(Vec<MessageId>),
    /// An ack, nack or touch that took effect for every id: nothing goes on the wire.
    Settled,
    /// An ack, nack or touch some of whose ids are not in flight to the consumer: one
    /// `unknown_id` error each, in order (the others took effect).
    UnknownIds(Vec<MessageId>),
    Refused {
        code: ErrorCode,
        message: String,
        id: Option<MessageId>,
    },
}
