//! Consuming: [`Consumer::recv`] the next delivery, [`Consumer::ack`] it when done.

use std::fmt::Display;

use tokio::net::ToSocketAddrs;

use super::connection::ClientConnection;
use super::error::ClientError;
use crate::protocol::client_frame::ClientFrame;
use crate::protocol::server_frame::{Message, ReceivedFrame};
use crate::protocol::{DEFAULT_PREFETCH, MessageId, QueueName, Role};
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
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            queue: QueueName::default_queue().to_string(),
            prefetch: DEFAULT_PREFETCH,
            token: None,
            tls: None,
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
        let register = ClientFrame::Register {
            role: Role::Consumer,
            queue: queue.as_str(),
            prefetch: Some(options.prefetch),
            token: options.token.as_deref(),
            version: None,
            ack_timeout_ms: None,
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
        match self.connection.next_frame().await? {
            ReceivedFrame::Message(message) => Ok(message),
            ReceivedFrame::Error(refusal) => Err(ClientError::Refused(refusal)),
            other => Err(ClientError::Protocol(format!(
                "expected a delivery, got {other:?}"
            ))),
        }
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
