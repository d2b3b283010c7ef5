//! Consuming: [`Consumer::recv`] the next delivery, then [`Consumer::ack`] it when done,
//! or (protocol 1.1) give it back with [`Consumer::nack`] / [`Consumer::nack_after`],
//! reject it with [`Consumer::dead_letter`], or keep a long job's lease alive with
//! [`Consumer::touch`].

use std::fmt::Display;
use std::time::Duration;

use tokio::net::ToSocketAddrs;

use super::connection::ClientConnection;
use super::error::ClientError;
use crate::protocol::client_frame::ClientFrame;
use crate::protocol::server_frame::{Message, ReceivedFrame};
use crate::protocol::{DEFAULT_PREFETCH, MessageId, QueueName, Role, Version, whole_millis};
use crate::transport::ClientTls;

/// How a consumer registers.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    pub queue: String,
    /// Most unacked deliveries the broker sends this consumer at once (1–65535).
    pub prefetch: u16,
    pub token: Option<String>,
    /// TLS settings when the broker serves TLS.
    pub tls: Option<ClientTls>,
    /// The protocol version to ask for: 1.1 (the default) for nack, touch, consumer
    /// leases and delivery details; `None` registers as version 1.0 clients do.
    pub version: Option<Version>,
    /// This consumer's own lease (1.1), at most its queue's `max_lease`; the queue's
    /// `ack_timeout` without one.
    pub ack_timeout: Option<Duration>,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            queue: QueueName::default_queue().to_string(),
            prefetch: DEFAULT_PREFETCH,
            token: None,
            tls: None,
            version: Some(Version::V1_1),
            ack_timeout: None,
        }
    }
}

/// A consumer connection to one queue.
pub struct Consumer {
    connection: ClientConnection,
}

impl Consumer {
    /// Connects and registers as a consumer on `queue` with the default prefetch.
    ///
    /// # Errors
    /// [`ClientError::InvalidQueue`] for a bad name; a connection error; or
    /// [`ClientError::Refused`] when the broker refuses the register.
    pub async fn connect<A: ToSocketAddrs + Display>(
        addr: A,
        queue: &str,
    ) -> Result<Self, ClientError> {
        let options = ConsumerOptions {
            queue: queue.to_owned(),
            ..ConsumerOptions::default()
        };
        Self::connect_with(addr, &options).await
    }

    /// Connects and registers with explicit options.
    ///
    /// # Errors
    /// As [`Consumer::connect`]; a prefetch of 0 is refused by the broker.
    pub async fn connect_with<A: ToSocketAddrs + Display>(
        addr: A,
        options: &ConsumerOptions,
    ) -> Result<Self, ClientError> {
        let queue = QueueName::new(&options.queue)?;
        let version = options.version.map(|v| v.to_string());
        let register = ClientFrame::Register {
            role: Role::Consumer,
            queue: queue.as_str(),
            prefetch: Some(options.prefetch),
            token: options.token.as_deref(),
            version: version.as_deref(),
            ack_timeout_ms: options.ack_timeout.map(millis),
        };
        let connection = ClientConnection::open(addr, options.tls.as_ref(), &register).await?;
        Ok(Consumer { connection })
    }

    /// Waits for the next delivery, sending queued acks first.
    ///
    /// # Errors
    /// [`ClientError::Refused`] for an error frame, such as `unknown_id` for an earlier
    /// ack (the connection stays usable unless the code is fatal); connection errors.
    pub async fn recv(&mut self) -> Result<Message, ClientError> {
        delivery_of(self.connection.next_frame().await?)
    }

    /// The next delivery if it has already been received; never waits and sends
    /// nothing. After a [`Consumer::recv`] read many deliveries at once, this takes the
    /// rest of them without touching the socket.
    pub fn try_recv(&mut self) -> Option<Result<Message, ClientError>> {
        self.connection.next_received().map(delivery_of)
    }

    /// Acks a delivery and sends the ack now. Success means it was written, not that the
    /// broker knew the id: an `unknown_id` refusal arrives through a later
    /// [`Consumer::recv`].
    ///
    /// # Errors
    /// Connection errors.
    pub async fn ack(&mut self, id: MessageId) -> Result<(), ClientError> {
        self.queue_ack(id);
        self.connection.flush().await
    }

    /// Queues an ack, to be sent with the next [`Consumer::recv`] or
    /// [`Consumer::flush`]: many acks then share one write.
    pub fn queue_ack(&mut self, id: MessageId) {
        self.connection.queue(&ClientFrame::Ack { id });
    }

    /// Gives a delivery back (1.1, rule 12): after its queue's backoff (none by
    /// default, and then to the back of the queue), or dead-lettered at its queue's
    /// `max_deliveries`. Sent now; an `unknown_id` comes through a later `recv`.
    ///
    /// # Errors
    /// Connection errors.
    pub async fn nack(&mut self, id: MessageId) -> Result<(), ClientError> {
        self.queue_nack(id, None);
        self.connection.flush().await
    }

    /// Gives a delivery back to be delivered again no sooner than `delay` from now (at
    /// most its queue's `max_delay`; `Duration::ZERO` skips the backoff).
    ///
    /// # Errors
    /// Connection errors.
    pub async fn nack_after(&mut self, id: MessageId, delay: Duration) -> Result<(), ClientError> {
        self.queue_nack(id, Some(delay));
        self.connection.flush().await
    }

    /// Queues a nack (with a delay, or after the queue's backoff) to be sent with the
    /// next [`Consumer::recv`] or [`Consumer::flush`].
    pub fn queue_nack(&mut self, id: MessageId, delay: Option<Duration>) {
        self.connection.queue(&ClientFrame::Nack {
            id,
            delay_ms: delay.map(millis),
            dead_letter: false,
        });
    }

    /// Rejects a delivery for good: it moves to its queue's dead-letter queue with
    /// reason `rejected` (dropped, without one).
    ///
    /// # Errors
    /// Connection errors.
    pub async fn dead_letter(&mut self, id: MessageId) -> Result<(), ClientError> {
        self.connection.queue(&ClientFrame::Nack {
            id,
            delay_ms: None,
            dead_letter: true,
        });
        self.connection.flush().await
    }

    /// Restarts a delivery's lease from now (rule 16): for `lease`, or this consumer's
    /// lease without one, never past its queue's `max_lease` from the delivery.
    ///
    /// # Errors
    /// Connection errors.
    pub async fn touch(
        &mut self,
        id: MessageId,
        lease: Option<Duration>,
    ) -> Result<(), ClientError> {
        self.connection.queue(&ClientFrame::Touch {
            id,
            ack_timeout_ms: lease.map(millis),
        });
        self.connection.flush().await
    }

    /// Sends queued acks.
    ///
    /// # Errors
    /// Connection errors.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.connection.flush().await
    }

    /// Sends queued acks and closes the connection cleanly. Deliveries not acked return
    /// to the queue.
    ///
    /// # Errors
    /// Connection errors while flushing.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.connection.shutdown().await
    }
}

/// A received frame as what [`Consumer::recv`] returns.
fn delivery_of(frame: ReceivedFrame) -> Result<Message, ClientError> {
    match frame {
        ReceivedFrame::Message(message) => Ok(message),
        ReceivedFrame::Error(refusal) => Err(ClientError::Refused(refusal)),
        other => Err(ClientError::Protocol(format!(
            "expected a delivery, got {other:?}"
        ))),
    }
}

/// A duration in whole milliseconds, as the protocol counts them (at least 1 for any
/// duration that is not zero, so that a short lease is not sent as the invalid 0).
pub(crate) fn millis(duration: Duration) -> u64 {
    let millis = whole_millis(duration);
    if millis == 0 && !duration.is_zero() {
        1
    } else {
        millis
    }
}
