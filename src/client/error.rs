//! Errors of the client library.

use std::io;

use thiserror::Error;

use crate::protocol::server_frame::BrokerError;
use crate::protocol::{ErrorCode, InvalidQueueName};

/// Why a client call failed.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to the broker at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("connection to the broker failed: {0}")]
    Io(#[from] io::Error),
    #[error("the broker closed the connection")]
    Closed,
    /// The broker answered with an `error` frame. After a fatal code (see
    /// [`ErrorCode::is_fatal`]) the connection is closed; otherwise it stays usable.
    #[error("the broker refused: {0}")]
    Refused(#[from] BrokerError),
    #[error("the broker sent something this client does not understand: {0}")]
    Protocol(String),
    #[error(transparent)]
    InvalidQueue(#[from] InvalidQueueName),
    /// The call does not fit the client's state (see its documentation).
    #[error("{0}")]
    Usage(&'static str),
}

impl ClientError {
    /// The broker's error code, when the broker refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused(refusal) => Some(refusal.code),
            _ => None,
        }
    }
}
