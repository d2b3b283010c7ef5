//! A dead letter's record (contract §12, rule 15): where a message was dead-lettered
//! from, why, after how many deliveries, and when. It travels with the message in its
//! dead-letter queue, is kept by the log, and is shown on version 1.1 message frames.

use std::fmt;

use super::QueueName;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The queue it was dead-lettered from.
    pub queue: QueueName,
    pub reason: DeadLetterReason,
    /// Its deliveries from that queue.
    pub attempts: u32,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Returned (by a timeout, a disconnect or a nack) with `attempt >= max_deliveries`.
    MaxDeliveries,
    /// Nacked with `"dead_letter":true`.
    Rejected,
    /// Dropped from the head of a queue at its `max_length` under `drop-head` (rule 17).
    Overflow,
}

impl DeadLetterReason {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::MaxDeliveries => "max_deliveries",
            DeadLetterReason::Rejected => "rejected",
            DeadLetterReason::Overflow => "overflow",
        }
    }

    /// The number the log stores it as.
    pub fn code(self) -> u8 {
        match self {
            DeadLetterReason::MaxDeliveries => 1,
            DeadLetterReason::Rejected => 2,
            DeadLetterReason::Overflow => 3,
        }
    }

    /// The reason named `name` on the wire.
    pub fn from_name(name: &str) -> Option<DeadLetterReason> {
        Self::ALL.into_iter().find(|reason| reason.as_str() == name)
    }

    /// The reason the log stores as `code`.
    pub fn from_code(code: u8) -> Option<DeadLetterReason> {
        Self::ALL.into_iter().find(|reason| reason.code() == code)
    }

    const ALL: [DeadLetterReason; 3] = [
        DeadLetterReason::MaxDeliveries,
        DeadLetterReason::Rejected,
        DeadLetterReason::Overflow,
    ];
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
