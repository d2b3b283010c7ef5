//! The error codes of contract §5, with the fatal/non-fatal split that decides whether
//! the broker closes the connection after sending one.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The `code` of an `error` frame: stable, for programs (the `message` is for humans).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Frame length 0 or over `--max-frame-bytes`. Fatal.
    FrameTooLarge,
    /// The first frame was not a valid `register`. Fatal.
    NotRegistered,
    /// Token missing or wrong, or not granted this role or queue. Fatal.
    Unauthorized,
    /// No `register` within 10 s of connecting. Fatal.
    RegisterTimeout,
    /// The broker already holds `--max-connections` connections. Fatal.
    TooManyConnections,
    /// Not JSON, not an object, unknown `type`, or a bad field.
    InvalidFrame,
    /// A producer acked or a consumer published.
    WrongRole,
    /// A second `register` on one connection.
    AlreadyRegistered,
    /// An ack for an id that is not in flight to this consumer.
    UnknownId,
    /// The broker's memory limit for queued payloads is reached.
    QueueFull,
    /// A publish during graceful shutdown.
    ShuttingDown,
}

impl ErrorCode {
    /// Every code.
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::FrameTooLarge,
        ErrorCode::NotRegistered,
        ErrorCode::Unauthorized,
        ErrorCode::RegisterTimeout,
        ErrorCode::TooManyConnections,
        ErrorCode::InvalidFrame,
        ErrorCode::WrongRole,
        ErrorCode::AlreadyRegistered,
        ErrorCode::UnknownId,
        ErrorCode::QueueFull,
        ErrorCode::ShuttingDown,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::NotRegistered => "not_registered",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::RegisterTimeout => "register_timeout",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::InvalidFrame => "invalid_frame",
            ErrorCode::WrongRole => "wrong_role",
            ErrorCode::AlreadyRegistered => "already_registered",
            ErrorCode::UnknownId => "unknown_id",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::ShuttingDown => "shutting_down",
        }
    }

    /// Whether the broker closes the connection right after sending this error: the one
    /// place that decides it (contract §5's table).
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            ErrorCode::FrameTooLarge
                | ErrorCode::NotRegistered
                | ErrorCode::Unauthorized
                | ErrorCode::RegisterTimeout
                | ErrorCode::TooManyConnections
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_match_serde_names() {
        let all = ErrorCode::ALL;
        for code in all {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
        let fatal: Vec<_> = all
            .iter()
            .filter(|c| c.is_fatal())
            .map(|c| c.as_str())
            .collect();
        assert_eq!(
            fatal,
            [
                "frame_too_large",
                "not_registered",
                "unauthorized",
                "register_timeout",
                "too_many_connections"
            ]
        );
    }
}
