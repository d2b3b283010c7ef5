//! Publishing: one at a time ([`Producer::publish`]) or pipelined, with many publishes
//! awaiting their confirms at once ([`Producer::send`] + [`Producer::confirm`], or
//! [`Producer::publish_all`] with a window).

use std::fmt::Display;
use std::time::Duration;

use tokio::net::ToSocketAddrs;

use super::connection::ClientConnection;
use super::consumer::millis;
use super::error::ClientError;
use crate::protocol::client_frame::{ClientFrame, PublishFields};
use crate::protocol::server_frame::{BrokerError, ReceivedFrame};
use crate::protocol::{Headers, MessageId, QueueName, Role, Version};
use crate::transport::ClientTls;

/// Queued publish bytes beyond which [`Producer::send`] callers should flush; used by
/// [`Producer::publish_all`].
const SEND_BUFFER_BYTES: usize = 64 * 1024;

/// How a producer registers.
#[derive(Debug, Clone)]
pub struct ProducerOptions {
    pub queue: String,
    pub token: Option<String>,
    /// TLS settings when the broker serves TLS.
    pub tls: Option<ClientTls>,
    /// The protocol version to ask for: 1.1 (the default) for delayed publishes; `None`
    /// registers as version 1.0 clients do (a delay is then ignored by the broker).
    pub version: Option<Version>,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        ProducerOptions {
            queue: QueueName::default_queue().to_string(),
            token: None,
            tls: None,
            version: Some(Version::V1_1),
        }
    }
}

/// What a 1.1 publish may ask for besides its payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishOptions {
    /// 0 (the default) to 9: higher is delivered first (rule 10).
    pub priority: u8,
    /// Not delivered before this long after the broker accepts it.
    pub delay: Option<Duration>,
    /// Kept with the message and shown to 1.1 consumers ([`Headers::new`] checks them).
    pub headers: Option<Headers>,
}

impl PublishOptions {
    /// A publish not delivered before `delay` from its acceptance.
    pub fn delayed(delay: Duration) -> PublishOptions {
        PublishOptions {
            delay: Some(delay),
            ..PublishOptions::default()
        }
    }
}

/// A producer connection to one queue.
pub struct Producer {
    connection: ClientConnection,
    unconfirmed: usize,
}

impl Producer {
    /// Connects and registers as a producer on `queue`.
    ///
    /// # Errors
    /// [`ClientError::InvalidQueue`] for a bad name; a connection error; or
    /// [`ClientError::Refused`] when the broker refuses the register.
    pub async fn connect<A: ToSocketAddrs + Display>(
        addr: A,
        queue: &str,
    ) -> Result<Self, ClientError> {
        let options = ProducerOptions {
            queue: queue.to_owned(),
            ..ProducerOptions::default()
        };
        Self::connect_with(addr, &options).await
    }

    /// Connects and registers with explicit options.
    ///
    /// # Errors
    /// As [`Producer::connect`].
    pub async fn connect_with<A: ToSocketAddrs + Display>(
        addr: A,
        options: &ProducerOptions,
    ) -> Result<Self, ClientError> {
        let queue = QueueName::new(&options.queue)?;
        let version = options.version.map(|v| v.to_string());
        let register = ClientFrame::Register {
            role: Role::Producer,
            queue: queue.as_str(),
            prefetch: None,
            token: options.token.as_deref(),
            version: version.as_deref(),
            ack_timeout_ms: None,
        };
        let connection = ClientConnection::open(addr, options.tls.as_ref(), &register).await?;
        Ok(Producer {
            connection,
            unconfirmed: 0,
        })
    }

    /// Publishes one message and waits for its confirm.
    ///
    /// # Errors
    /// [`ClientError::Usage`] while pipelined publishes await their confirms;
    /// [`ClientError::Refused`] with `queue_full` or `shutting_down` (the connection
    /// stays usable); connection errors.
    pub async fn publish(&mut self, payload: &str) -> Result<MessageId, ClientError> {
        if self.unconfirmed > 0 {
            return Err(ClientError::Usage(
                "publish while pipelined publishes await confirms; call confirm() for them first",
            ));
        }
        self.send(payload);
        self.confirm().await
    }

    /// Publishes one message with 1.1 options and waits for its confirm.
    ///
    /// # Errors
    /// As [`Producer::publish`]; `invalid_frame` for a priority above 9 or a delay past
    /// the queue's `max_delay`.
    pub async fn publish_with(
        &mut self,
        payload: &str,
        options: &PublishOptions,
    ) -> Result<MessageId, ClientError> {
        if self.unconfirmed > 0 {
            return Err(ClientError::Usage(
                "publish while pipelined publishes await confirms; call confirm() for them first",
            ));
        }
        self.send_with(payload, options);
        self.confirm().await
    }

    /// Queues a publish without waiting for anything; its confirm comes from a later
    /// [`Producer::confirm`], in send order. Nothing is written until `confirm` or
    /// [`Producer::flush`].
    pub fn send(&mut self, payload: &str) {
        self.connection.queue(&ClientFrame::Publish { payload });
        self.unconfirmed += 1;
    }

    /// [`Producer::send`] with 1.1 options (the connection must have asked for 1.1, unless
    /// they are the defaults: then the frame is a 1.0 publish).
    pub fn send_with(&mut self, payload: &str, options: &PublishOptions) {
        self.connection
            .queue(&ClientFrame::PublishWith(publish_fields(payload, options)));
        self.unconfirmed += 1;
    }

    /// Publishes 1 to [`PUBLISH_BATCH_MAX`](crate::protocol::PUBLISH_BATCH_MAX) messages in one frame, all or none (1.1),
    /// and waits for its one confirm: their ids, in order.
    ///
    /// # Errors
    /// As [`Producer::publish_with`], for the batch as a whole: `invalid_frame` (naming
    /// the entry), `queue_full` when it does not fit, and then nothing is queued.
    pub async fn publish_batch(
        &mut self,
        messages: &[(&str, &PublishOptions)],
    ) -> Result<Vec<MessageId>, ClientError> {
        if self.unconfirmed > 0 {
            return Err(ClientError::Usage(
                "publish_batch while pipelined publishes await confirms; call confirm() for them first",
            ));
        }
        self.send_batch(messages);
        self.confirm_batch().await
    }

    /// Queues a publish_batch without waiting; its confirm comes from a later
    /// [`Producer::confirm_batch`], in send order.
    pub fn send_batch(&mut self, messages: &[(&str, &PublishOptions)]) {
        let messages = messages
            .iter()
            .map(|(payload, options)| publish_fields(payload, options))
            .collect();
        self.connection
            .queue(&ClientFrame::PublishBatch { messages });
        self.unconfirmed += 1;
    }

    /// Writes every queued publish.
    ///
    /// # Errors
    /// Connection errors.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.connection.flush().await
    }

    /// Bytes of queued publishes not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.connection.queued_bytes()
    }

    /// Publishes sent whose confirm has not been read yet.
    pub fn unconfirmed(&self) -> usize {
        self.unconfirmed
    }

    /// Waits for the confirm of the oldest unconfirmed publish (flushing first).
    ///
    /// # Errors
    /// [`ClientError::Usage`] when nothing awaits a confirm; [`ClientError::Refused`]
    /// when the broker refused that publish; connection errors.
    pub async fn confirm(&mut self) -> Result<MessageId, ClientError> {
        confirm_of(self.next_reply().await?)
    }

    /// Waits for the confirm of the oldest unconfirmed send, a publish_batch.
    ///
    /// # Errors
    /// As [`Producer::confirm`].
    pub async fn confirm_batch(&mut self) -> Result<Vec<MessageId>, ClientError> {
        batch_confirm_of(self.next_reply().await?)
    }

    /// [`Producer::try_confirm`] for a publish_batch.
    pub fn try_confirm_batch(&mut self) -> Option<Result<Vec<MessageId>, ClientError>> {
        self.try_next_reply().map(batch_confirm_of)
    }

    async fn next_reply(&mut self) -> Result<ReceivedFrame, ClientError> {
        if self.unconfirmed == 0 {
            return Err(ClientError::Usage(
                "confirm() with no publish awaiting a confirm",
            ));
        }
        let frame = self.connection.next_frame().await?;
        self.unconfirmed -= 1;
        Ok(frame)
    }

    fn try_next_reply(&mut self) -> Option<ReceivedFrame> {
        if self.unconfirmed == 0 {
            return None;
        }
        let frame = self.connection.next_received()?;
        self.unconfirmed -= 1;
        Some(frame)
    }

    /// The confirm of the oldest unconfirmed publish if it has already been received;
    /// never waits. After a [`Producer::confirm`] read many replies at once, this takes
    /// the rest of them without a system call each.
    pub fn try_confirm(&mut self) -> Option<Result<MessageId, ClientError>> {
        self.try_next_reply().map(confirm_of)
    }

    /// Publishes every payload, keeping up to `window` unconfirmed at once, and returns
    /// each one's outcome in order: its id, or the broker's non-fatal refusal.
    ///
    /// # Errors
    /// Connection errors and fatal refusals, which end the connection.
    pub async fn publish_all<'p>(
        &mut self,
        payloads: impl IntoIterator<Item = &'p str>,
        window: usize,
    ) -> Result<Vec<Result<MessageId, BrokerError>>, ClientError> {
        let window = window.max(1);
        let mut outcomes = Vec::new();
        for payload in payloads {
            if self.unconfirmed >= window {
                outcomes.push(self.next_outcome().await?);
            }
            self.send(payload);
            if self.queued_bytes() >= SEND_BUFFER_BYTES {
                self.flush().await?;
            }
        }
        while self.unconfirmed > 0 {
            outcomes.push(self.next_outcome().await?);
        }
        Ok(outcomes)
    }

    async fn next_outcome(&mut self) -> Result<Result<MessageId, BrokerError>, ClientError> {
        match self.confirm().await {
            Ok(id) => Ok(Ok(id)),
            Err(ClientError::Refused(refusal)) if !refusal.code.is_fatal() => Ok(Err(refusal)),
            Err(other) => Err(other),
        }
    }

    /// Flushes and closes the connection cleanly.
    ///
    /// # Errors
    /// Connection errors while flushing.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.connection.shutdown().await
    }
}

/// A publish's fields as 1.1 writes them (defaults left out).
fn publish_fields<'a>(payload: &'a str, options: &'a PublishOptions) -> PublishFields<'a> {
    PublishFields {
        payload,
        priority: (options.priority != 0).then_some(options.priority),
        headers: options.headers.as_ref(),
        delay_ms: options.delay.map(millis),
        not_before: None,
    }
}

fn batch_confirm_of(frame: ReceivedFrame) -> Result<Vec<MessageId>, ClientError> {
    match frame {
        ReceivedFrame::OkBatch { ids } => Ok(ids),
        ReceivedFrame::Error(refusal) => Err(ClientError::Refused(refusal)),
        other => Err(ClientError::Protocol(format!(
            "expected a publish_batch confirm, got {other:?}"
        ))),
    }
}

fn confirm_of(frame: ReceivedFrame) -> Result<MessageId, ClientError> {
    match frame {
        ReceivedFrame::Ok { id: Some(id) } => Ok(id),
        ReceivedFrame::Error(refusal) => Err(ClientError::Refused(refusal)),
        other => Err(ClientError::Protocol(format!(
            "expected a publish confirm, got {other:?}"
        ))),
    }
}
