//! The on-disk format: a segment header, then records. docs/STORAGE.md describes it for
//! people; this module is the only code that writes or reads it.
//!
//! ```text
//! segment header (32 bytes): magic "FERRYLOG" | version u32 | segment number u64
//!                            | next id u64 | crc32c of the previous 28 bytes u32
//! record (version 2):        length u32 | crc32c u32 | segment u32 | kind u8
//!                            | body (length - 1 bytes)
//!   kind 1 publish:   id u64 | deliveries u32 | [published at u64 | due u64 (version 5)]
//!                     | [priority u8 (version 6)] | [attributes (version 8)]
//!                     | queue length u8 | queue | payload literal
//!   kind 2 delivered: id u64, repeated
//!   kind 3 acked:     id u64, repeated
//!   kind 4 sealed:    (no body) the segment ends here; what follows is not part of it
//!   kind 5 synced:    offset u64 (version 3): every byte of this segment before that
//!                     offset was on stable storage before this record was written
//!   kind 6 dead-lettered publish (version 4): id u64 | deliveries u32
//!                     | [published at u64 | due u64 (version 5)]
//!                     | [priority u8 (version 6)] | [attributes (version 8)] | reason u8
//!                     | attempts u32 | at (ms since the epoch) u64 | source queue length u8
//!                     | source queue | queue length u8 | queue | payload literal
//!   attributes:       count u8, then per attribute: tag u8 | length u32 | bytes
//!                     (tag 1: headers, the JSON object the broker rendered)
//! ```
//! Integers are little-endian. A record's CRC covers its length field, segment, kind and
//! body, so a torn length is caught like a torn body. A record is checked when encoded
//! and again when decoded: a reader never trusts what it did not verify.
//!
//! The segment field (the low 32 bits of the segment's number) is there because segment
//! files are reused: after the last record written to a reused file come the intact,
//! checksummed records of the segment it held before, and the field is what tells them
//! apart, whatever their alignment (RocksDB's recyclable log records carry their log
//! number for the same reason). A segment that ends cleanly (at a rotation or a clean
//! stop) ends with a sealed record, so that a reused file need not be cut to its records,
//! and keeps all its blocks for its next reuse. Version 1 records, without the segment
//! field, are still read.
//!
//! Synced records (version 3) tell recovery how far the segment was known durable: after
//! a power loss, the bytes written since the last sync may reach the disk in any order,
//! so damage followed by valid records is a torn tail when no synced record after the
//! damage vouches for the bytes at the damage, and corruption of stable data when one
//! does. Version 2 segments, without them, are read as before.
//!
//! Dead-lettered publishes (version 4): a message dead-lettered into another queue is
//! logged as a publish record of the same id in that queue (which replaces the earlier
//! one, as a compaction copy does) that also carries its dead-letter record: one record,
//! so that a torn write cannot keep the move without the record.
//!
//! Times (version 5): a publish record says when the message was published and when it
//! is due (0: not delayed), both in milliseconds since the Unix epoch, so that a delay
//! keeps its time of day across a restart. A nack that delays a message logs it again,
//! as a move does, with its due time and its deliveries; records of version 4 and
//! before read as published at an unknown time (0) and not delayed.
//!
//! Priorities (version 6): a publish record carries its message's priority, 0-9;
//! records of version 5 and before read as priority 0, the only one they could have.
//!
//! Overflow (version 7): a dead-letter record may have reason 3, `overflow` (a message
//! dropped from the head of a full queue, rule 17); the layout is version 6's.
//!
//! Attributes (version 8): a publish record carries what its publish attached, as
//! tagged, length-prefixed blocks after the priority: one byte (a count of 0) for a
//! message with none. A reader checks each block as a publish is checked (headers
//! against the contract's limits); an unknown tag or a repeated one is corruption.

use thiserror::Error;

use super::journal::LiveMessage;
use crate::protocol::{
    Attributes, DeadLetter, DeadLetterReason, Headers, MessageId, PRIORITY_MAX, Payload, QueueName,
};

pub const MAGIC: &[u8; 8] = b"FERRYLOG";
/// The version this build writes.
pub const FORMAT_VERSION: u32 = 8;
/// The first version with synced records.
pub const SYNCED_RECORDS_VERSION: u32 = 3;
/// The first version with dead-letter records.
pub const DEAD_LETTER_RECORDS_VERSION: u32 = 4;
/// The first version whose publish records carry times.
pub const TIMED_RECORDS_VERSION: u32 = 5;
/// The first version whose publish records carry priorities.
pub const PRIORITY_RECORDS_VERSION: u32 = 6;
/// The first version whose dead-letter records may have reason `overflow`.
pub const OVERFLOW_REASON_VERSION: u32 = 7;
/// The first version whose publish records carry attributes.
pub const ATTRIBUTE_RECORDS_VERSION: u32 = 8;
/// The oldest version this build reads: version 1 records have no segment field.
pub const OLDEST_READABLE_VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 32;
/// Length, CRC and segment in front of every record this build writes.
pub const RECORD_PREFIX_BYTES: usize = 12;
/// Where in a record its segment field is.
pub const RECORD_TAG_OFFSET: usize = 8;
/// Length and CRC: the prefix of a version 1 record.
const VERSION_1_PREFIX_BYTES: usize = 8;
/// The length, first in the prefix; never zero in a valid record.
pub const RECORD_LENGTH_BYTES: usize = 4;
/// Largest record body a reader accepts: more than any payload can need (frames are
/// limited to 4 GiB), small enough that a corrupt length cannot make it allocate wildly.
pub const RECORD_BYTES_MAX: usize = 1 << 30;

const KIND_PUBLISH: u8 = 1;
const KIND_DELIVERED: u8 = 2;
const KIND_ACKED: u8 = 3;
const KIND_SEALED: u8 = 4;
const KIND_SYNCED: u8 = 5;
const KIND_DEAD_LETTERED_PUBLISH: u8 = 6;

/// What a dead-letter record adds to a publish record: reason, attempts, at, and the
/// source queue's length (its name comes on top).
const DEAD_LETTER_FIXED_BYTES: usize = 1 + 4 + 8 + 1;
/// id, deliveries, published at, due, priority, attribute count, queue length.
const PUBLISH_FIXED_BYTES: usize = 8 + 4 + 8 + 8 + 1 + 1 + 1;
/// What version 5 added to a publish record: published at, due.
const TIMES_BYTES: usize = 8 + 8;
/// What version 6 added to a publish record: priority.
const PRIORITY_BYTES: usize = 1;
/// What version 8 added to a publish record without attributes: their count.
const ATTRIBUTE_COUNT_BYTES: usize = 1;
/// An attribute's tag and length.
const ATTRIBUTE_PREFIX_BYTES: usize = 1 + 4;
const ATTRIBUTE_HEADERS: u8 = 1;

/// The header that opens every segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub number: u64,
    /// The id the broker would have given the next message when the segment was created:
    /// ids go on from here even if every record before it is gone.
    pub next_id: u64,
    /// The format its records are in.
    pub version: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HeaderError {
    #[error("only {0} bytes, a segment header needs 32")]
    Short(usize),
    #[error("not a Ferry segment (magic bytes {0:?})")]
    BadMagic([u8; 8]),
    #[error(
        "format version {found}; this build reads versions {OLDEST_READABLE_VERSION} to {FORMAT_VERSION} (a newer Ferry wrote it?)"
    )]
    UnknownVersion { found: u32 },
    #[error("header checksum mismatch")]
    BadChecksum,
}

impl SegmentHeader {
    /// The header of a segment this build writes.
    pub fn new(number: u64, next_id: u64) -> SegmentHeader {
        SegmentHeader {
            number,
            next_id,
            version: FORMAT_VERSION,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut bytes = [0u8; HEADER_BYTES];
        bytes[..8].copy_from_slice(MAGIC);
        bytes[8..12].copy_from_slice(&self.version.to_le_bytes());
        bytes[12..20].copy_from_slice(&self.number.to_le_bytes());
        bytes[20..28].copy_from_slice(&self.next_id.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..28]);
        bytes[28..32].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Reads a header from the start of `bytes`.
    ///
    /// # Errors
    /// [`HeaderError`] for a short, foreign, future-version or damaged header.
    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, HeaderError> {
        if bytes.len() < HEADER_BYTES {
            return Err(HeaderError::Short(bytes.len()));
        }
        let magic: [u8; 8] = bytes[..8].try_into().expect("8 bytes");
        if &magic != MAGIC {
            return Err(HeaderError::BadMagic(magic));
        }
        let found = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&found) {
            return Err(HeaderError::UnknownVersion { found });
        }
        let crc = u32::from_le_bytes(bytes[28..32].try_into().expect("4 bytes"));
        if crc != crc32c::crc32c(&bytes[..28]) {
            return Err(HeaderError::BadChecksum);
        }
        Ok(SegmentHeader {
            number: u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes")),
            next_id: u64::from_le_bytes(bytes[20..28].try_into().expect("8 bytes")),
            version: found,
        })
    }

    /// The segment field its records carry, if its format has one.
    pub fn record_tag(&self) -> Option<[u8; 4]> {
        (self.version >= 2).then(|| segment_tag(self.number))
    }
}

/// A record's segment field: the low 32 bits of the segment's number. Two segments
/// 2^32 apart would share it; a log never reuses a file across that many.
fn segment_tag(number: u64) -> [u8; 4] {
    (number as u32).to_le_bytes()
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Publish {
        id: MessageId,
        /// Deliveries so far (compaction carries the count forward).
        deliveries: u32,
        /// When it was published, in milliseconds since the Unix epoch; 0 if unknown.
        published_at_ms: u64,
        /// When it is due, if it is delayed.
        due_ms: Option<u64>,
        priority: u8,
        queue: QueueName,
        payload: Payload,
        attributes: Option<Attributes>,
        /// Its dead-letter record, when it was dead-lettered into `queue`.
        dead_letter: Option<DeadLetter>,
    },
    Delivered(Vec<MessageId>),
    Acked(Vec<MessageId>),
    /// The end of the segment.
    Sealed,
    /// Every byte of the segment before this offset was durable when it was written.
    Synced(u64),
}

/// Appends a publish record of `message` for segment `segment` to `dst`: a dead-lettered
/// one when the message carries a dead-letter record.
pub fn encode_publish(dst: &mut Vec<u8>, segment: u64, message: &LiveMessage<'_>) {
    let LiveMessage {
        id,
        deliveries,
        published_at_ms,
        due_ms,
        priority,
        queue,
        payload,
        attributes,
        dead_letter,
    } = *message;
    let queue = queue.as_str().as_bytes();
    let (kind, extra) = match dead_letter {
        None => (KIND_PUBLISH, 0),
        Some(record) => (KIND_DEAD_LETTERED_PUBLISH, dead_letter_bytes(record)),
    };
    encode_record(
        dst,
        segment,
        kind,
        PUBLISH_FIXED_BYTES + attributes_bytes(attributes) + extra + queue.len() + payload.len(),
        |body| {
            body.extend_from_slice(&id.0.to_le_bytes());
            body.extend_from_slice(&deliveries.to_le_bytes());
            body.extend_from_slice(&published_at_ms.to_le_bytes());
            body.extend_from_slice(&due_ms.unwrap_or(0).to_le_bytes());
            body.push(priority);
            match attributes {
                None => body.push(0),
                Some(Attributes { headers }) => {
                    body.push(1);
                    body.push(ATTRIBUTE_HEADERS);
                    let json = headers.as_json();
                    let len = u32::try_from(json.len()).expect("headers are far below 4 GiB");
                    body.extend_from_slice(&len.to_le_bytes());
                    body.extend_from_slice(json);
                }
            }
            if let Some(record) = dead_letter {
                body.push(record.reason.code());
                body.extend_from_slice(&record.attempts.to_le_bytes());
                body.extend_from_slice(&record.at_ms.to_le_bytes());
                put_queue_name(body, record.queue.as_str().as_bytes());
            }
            put_queue_name(body, queue);
            body.extend_from_slice(payload.as_json());
        },
    );
}

fn put_queue_name(body: &mut Vec<u8>, name: &[u8]) {
    body.push(u8::try_from(name.len()).expect("queue names are at most 255 bytes"));
    body.extend_from_slice(name);
}

/// Bytes a dead-letter record adds to a publish record.
fn dead_letter_bytes(record: &DeadLetter) -> usize {
    DEAD_LETTER_FIXED_BYTES + record.queue.as_str().len()
}

/// Bytes attributes add to a publish record, beyond their count.
fn attributes_bytes(attributes: Option<&Attributes>) -> usize {
    attributes.map_or(0, |a| ATTRIBUTE_PREFIX_BYTES + a.headers.as_json().len())
}

/// Bytes a live message's publish record takes, its dead-letter record included. The
/// journal counts live messages this way, so that what compaction writes is what it
/// expected to write.
pub fn live_record_bytes(
    queue: &QueueName,
    payload: &Payload,
    attributes: Option<&Attributes>,
    dead_letter: Option<&DeadLetter>,
) -> u64 {
    let publish =
        RECORD_PREFIX_BYTES + 1 + PUBLISH_FIXED_BYTES + queue.as_str().len() + payload.len();
    (publish + attributes_bytes(attributes) + dead_letter.map_or(0, dead_letter_bytes)) as u64
}

/// Appends a record listing ids that were delivered once more.
pub fn encode_delivered(dst: &mut Vec<u8>, segment: u64, ids: &[MessageId]) {
    encode_ids(dst, segment, KIND_DELIVERED, ids);
}

/// Appends a record listing ids that were acked.
pub fn encode_acked(dst: &mut Vec<u8>, segment: u64, ids: &[MessageId]) {
    encode_ids(dst, segment, KIND_ACKED, ids);
}

/// Appends the record that ends a segment.
pub fn encode_sealed(dst: &mut Vec<u8>, segment: u64) {
    encode_record(dst, segment, KIND_SEALED, 0, |_| {});
}

/// Bytes the record that ends a segment takes.
pub const SEALED_RECORD_BYTES: usize = RECORD_PREFIX_BYTES + 1;

/// Appends a record saying that the segment's bytes before `offset` are durable.
pub fn encode_synced(dst: &mut Vec<u8>, segment: u64, offset: u64) {
    encode_record(dst, segment, KIND_SYNCED, 8, |body| {
        body.extend_from_slice(&offset.to_le_bytes());
    });
}

/// Bytes a synced record takes.
pub const SYNCED_RECORD_BYTES: usize = RECORD_PREFIX_BYTES + 1 + 8;

/// Bytes a delivered or acked record of `count` ids takes on disk.
pub fn ids_record_bytes(count: usize) -> usize {
    RECORD_PREFIX_BYTES + 1 + count * 8
}

fn encode_ids(dst: &mut Vec<u8>, segment: u64, kind: u8, ids: &[MessageId]) {
    encode_record(dst, segment, kind, ids.len() * 8, |body| {
        for id in ids {
            body.extend_from_slice(&id.0.to_le_bytes());
        }
    });
}

fn encode_record(
    dst: &mut Vec<u8>,
    segment: u64,
    kind: u8,
    body_len: usize,
    write_body: impl FnOnce(&mut Vec<u8>),
) {
    let start = dst.len();
    let len = u32::try_from(1 + body_len).expect("records are under 4 GiB");
    dst.reserve(RECORD_PREFIX_BYTES + 1 + body_len);
    dst.extend_from_slice(&len.to_le_bytes());
    dst.extend_from_slice(&[0; 4]);
    dst.extend_from_slice(&segment_tag(segment));
    dst.push(kind);
    write_body(dst);
    debug_assert_eq!(dst.len() - start, RECORD_PREFIX_BYTES + 1 + body_len);
    let crc = record_crc(&dst[start..]);
    dst[start + RECORD_LENGTH_BYTES..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The CRC of a whole record: everything but the CRC field itself.
fn record_crc(record: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&record[..RECORD_LENGTH_BYTES]);
    crc32c::crc32c_append(crc, &record[RECORD_LENGTH_BYTES + 4..])
}

/// What is at the front of a byte slice.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A valid record, and the bytes it took.
    Record(Record, usize),
    /// The bytes end inside a record (a torn write, if it is the end of the log).
    Incomplete,
    /// The bytes are not a valid record.
    Corrupt(&'static str),
}

/// Decodes the record at the front of `bytes`, which are in the segment `header` opens.
pub fn decode_record(bytes: &[u8], header: &SegmentHeader) -> Decoded {
    let tag = header.record_tag();
    let prefix_bytes = if tag.is_some() {
        RECORD_PREFIX_BYTES
    } else {
        VERSION_1_PREFIX_BYTES
    };
    let Some(prefix) = bytes.get(..prefix_bytes) else {
        return Decoded::Incomplete;
    };
    let len =
        u32::from_le_bytes(prefix[..RECORD_LENGTH_BYTES].try_into().expect("4 bytes")) as usize;
    if len == 0 || len > RECORD_BYTES_MAX {
        return Decoded::Corrupt("record length out of range");
    }
    // Checked before the body is even complete: in a reused file, this is what ends the
    // segment's records at the old contents after them.
    if tag.is_some_and(|tag| prefix[RECORD_TAG_OFFSET..] != tag) {
        return Decoded::Corrupt(
            "record of another segment (a reused file's old contents, or a flipped bit)",
        );
    }
    let Some(record) = bytes.get(..prefix_bytes + len) else {
        return Decoded::Incomplete;
    };
    let stored_crc =
        u32::from_le_bytes(prefix[RECORD_LENGTH_BYTES..8].try_into().expect("4 bytes"));
    if record_crc(record) != stored_crc {
        return Decoded::Corrupt("record checksum mismatch");
    }
    let (kind, body) = (record[prefix_bytes], &record[prefix_bytes + 1..]);
    let record = match kind {
        KIND_PUBLISH => match decode_publish(body, header.version, false) {
            Ok(record) => record,
            Err(reason) => return Decoded::Corrupt(reason),
        },
        KIND_DEAD_LETTERED_PUBLISH if header.version >= DEAD_LETTER_RECORDS_VERSION => {
            match decode_publish(body, header.version, true) {
                Ok(record) => record,
                Err(reason) => return Decoded::Corrupt(reason),
            }
        }
        KIND_DELIVERED | KIND_ACKED => {
            if body.len() % 8 != 0 {
                return Decoded::Corrupt("id list is not a whole number of ids");
            }
            let ids = body
                .chunks_exact(8)
                .map(|id| MessageId(u64::from_le_bytes(id.try_into().expect("8 bytes"))))
                .collect();
            if kind == KIND_DELIVERED {
                Record::Delivered(ids)
            } else {
                Record::Acked(ids)
            }
        }
        KIND_SEALED if body.is_empty() => Record::Sealed,
        KIND_SEALED => return Decoded::Corrupt("sealed record with a body"),
        KIND_SYNCED if header.version >= SYNCED_RECORDS_VERSION => match body.try_into() {
            Ok(offset) => Record::Synced(u64::from_le_bytes(offset)),
            Err(_) => return Decoded::Corrupt("synced record of the wrong length"),
        },
        _ => return Decoded::Corrupt("unknown record kind"),
    };
    Decoded::Record(record, prefix_bytes + len)
}

fn decode_publish(body: &[u8], version: u32, dead_lettered: bool) -> Result<Record, &'static str> {
    let timed = version >= TIMED_RECORDS_VERSION;
    let prioritized = version >= PRIORITY_RECORDS_VERSION;
    let attributed = version >= ATTRIBUTE_RECORDS_VERSION;
    let fixed_bytes = PUBLISH_FIXED_BYTES
        - if timed { 0 } else { TIMES_BYTES }
        - if prioritized { 0 } else { PRIORITY_BYTES }
        - if attributed { 0 } else { ATTRIBUTE_COUNT_BYTES };
    if body.len() < fixed_bytes {
        return Err("publish record too short");
    }
    let id = MessageId(u64::from_le_bytes(body[..8].try_into().expect("8 bytes")));
    let deliveries = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes"));
    let mut rest = &body[12..];
    let (published_at_ms, due_ms) = if timed {
        let published_at_ms = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        let due_ms = u64::from_le_bytes(rest[8..16].try_into().expect("8 bytes"));
        rest = &rest[16..];
        (published_at_ms, (due_ms != 0).then_some(due_ms))
    } else {
        (0, None)
    };
    let priority = match rest.split_first() {
        Some((&priority, after)) if prioritized => {
            rest = after;
            if priority > PRIORITY_MAX {
                return Err("publish record with a priority above 9");
            }
            priority
        }
        _ => 0,
    };
    let attributes = if attributed {
        let (attributes, after) = take_attributes(rest)?;
        rest = after;
        attributes
    } else {
        None
    };
    let dead_letter = if dead_lettered {
        if rest.len() < DEAD_LETTER_FIXED_BYTES {
            return Err("dead-lettered publish record too short");
        }
        let reason = DeadLetterReason::from_code(rest[0])
            .filter(|&reason| {
                reason != DeadLetterReason::Overflow || version >= OVERFLOW_REASON_VERSION
            })
            .ok_or("dead-lettered publish record of an unknown reason")?;
        let attempts = u32::from_le_bytes(rest[1..5].try_into().expect("4 bytes"));
        let at_ms = u64::from_le_bytes(rest[5..13].try_into().expect("8 bytes"));
        let (queue, after) = take_queue_name(&rest[13..])?;
        rest = after;
        Some(DeadLetter {
            queue,
            reason,
            attempts,
            at_ms,
        })
    } else {
        None
    };
    let (queue, payload) = take_queue_name(rest)?;
    let payload = Payload::from_json_literal(payload)
        .map_err(|_| "publish record with an invalid payload")?;
    Ok(Record::Publish {
        id,
        deliveries,
        published_at_ms,
        due_ms,
        priority,
        queue,
        payload,
        attributes,
        dead_letter,
    })
}

/// A publish record's attributes (version 8), checked as a publish's are, and what
/// follows them.
fn take_attributes(bytes: &[u8]) -> Result<(Option<Attributes>, &[u8]), &'static str> {
    let (&count, mut rest) = bytes
        .split_first()
        .ok_or("publish record shorter than its attributes")?;
    let mut headers = None;
    for _ in 0..count {
        if rest.len() < ATTRIBUTE_PREFIX_BYTES {
            return Err("publish record shorter than its attributes");
        }
        let tag = rest[0];
        let len = u32::from_le_bytes(rest[1..5].try_into().expect("4 bytes")) as usize;
        let (block, after) = rest[ATTRIBUTE_PREFIX_BYTES..]
            .split_at_checked(len)
            .ok_or("publish record shorter than its attributes")?;
        rest = after;
        match tag {
            ATTRIBUTE_HEADERS if headers.is_none() => {
                let json = std::str::from_utf8(block)
                    .map_err(|_| "publish record with headers that are not UTF-8")?;
                headers = Some(
                    Headers::from_json(json)
                        .ok()
                        .flatten()
                        .ok_or("publish record with invalid headers")?,
                );
            }
            _ => return Err("publish record with an unknown or repeated attribute"),
        }
    }
    Ok((headers.map(|headers| Attributes { headers }), rest))
}

/// A queue name written as its length (one byte) and its bytes, and what follows it.
fn take_queue_name(bytes: &[u8]) -> Result<(QueueName, &[u8]), &'static str> {
    let (&len, rest) = bytes
        .split_first()
        .ok_or("record shorter than its queue name")?;
    let len = usize::from(len);
    if rest.len() < len {
        return Err("record shorter than its queue name");
    }
    let name = std::str::from_utf8(&rest[..len])
        .ok()
        .and_then(|name| QueueName::new(name).ok())
        .ok_or("record with an invalid queue name")?;
    Ok((name, &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(name: &str) -> QueueName {
        QueueName::new(name).unwrap()
    }

    /// The segment the sample records are written for.
    const SEGMENT: u64 = 7;

    fn segment_header(number: u64) -> SegmentHeader {
        SegmentHeader::new(number, 1)
    }

    fn headers(entries: &[(&str, &str)]) -> Attributes {
        Attributes {
            headers: Headers::new(entries.iter().copied()).unwrap(),
        }
    }

    fn sample_log() -> (Vec<u8>, Vec<Record>) {
        let records = vec![
            Record::Publish {
                id: MessageId(1),
                deliveries: 0,
                published_at_ms: 1_767_225_600_123,
                due_ms: None,
                priority: 0,
                queue: q("orders"),
                payload: Payload::from_text("first ✓"),
                attributes: None,
                dead_letter: None,
            },
            Record::Delivered(vec![MessageId(1)]),
            Record::Publish {
                id: MessageId(u64::MAX),
                deliveries: 7,
                published_at_ms: u64::MAX,
                due_ms: Some(u64::MAX),
                priority: 9,
                queue: q(&"x".repeat(255)),
                payload: Payload::from_text(""),
                attributes: Some(headers(&[("trace", "ab12"), ("note", "\"✓\"\n")])),
                dead_letter: None,
            },
            Record::Acked(vec![MessageId(1), MessageId(u64::MAX)]),
            Record::Acked(vec![]),
            Record::Synced(4096),
            Record::Publish {
                id: MessageId(1),
                deliveries: 0,
                published_at_ms: 1_767_225_600_123,
                due_ms: None,
                priority: 3,
                queue: q("orders.dlq"),
                payload: Payload::from_text("dead ✗"),
                attributes: Some(headers(&[("k", "v")])),
                dead_letter: Some(DeadLetter {
                    queue: q("orders"),
                    reason: DeadLetterReason::MaxDeliveries,
                    attempts: 5,
                    at_ms: 1_767_225_700_000,
                }),
            },
            Record::Publish {
                id: MessageId(u64::MAX),
                deliveries: u32::MAX,
                published_at_ms: 1,
                due_ms: Some(1_767_225_800_000),
                priority: 9,
                queue: q(&"e".repeat(255)),
                payload: Payload::from_text(""),
                attributes: None,
                dead_letter: Some(DeadLetter {
                    queue: q(&"d".repeat(255)),
                    reason: DeadLetterReason::MaxDeliveries,
                    attempts: u32::MAX,
                    at_ms: u64::MAX,
                }),
            },
            Record::Sealed,
        ];
        let mut bytes = Vec::new();
        for record in &records {
            match record {
                Record::Publish {
                    id,
                    deliveries,
                    published_at_ms,
                    due_ms,
                    priority,
                    queue,
                    payload,
                    attributes,
                    dead_letter,
                } => encode_publish(
                    &mut bytes,
                    SEGMENT,
                    &LiveMessage {
                        id: *id,
                        deliveries: *deliveries,
                        published_at_ms: *published_at_ms,
                        due_ms: *due_ms,
                        priority: *priority,
                        queue,
                        payload,
                        attributes: attributes.as_ref(),
                        dead_letter: dead_letter.as_ref(),
                    },
                ),
                Record::Delivered(ids) => encode_delivered(&mut bytes, SEGMENT, ids),
                Record::Acked(ids) => encode_acked(&mut bytes, SEGMENT, ids),
                Record::Sealed => encode_sealed(&mut bytes, SEGMENT),
                Record::Synced(offset) => encode_synced(&mut bytes, SEGMENT, *offset),
            }
        }
        (bytes, records)
    }

    fn decode_all(mut bytes: &[u8], header: &SegmentHeader) -> (Vec<Record>, Decoded) {
        let mut records = Vec::new();
        loop {
            match decode_record(bytes, header) {
                Decoded::Record(record, used) => {
                    records.push(record);
                    bytes = &bytes[used..];
                }
                end => return (records, end),
            }
        }
    }

    #[test]
    fn records_round_trip() {
        let (bytes, records) = sample_log();
        assert_eq!(
            decode_all(&bytes, &segment_header(SEGMENT)),
            (records, Decoded::Incomplete)
        );
        let first_len =
            live_record_bytes(&q("orders"), &Payload::from_text("first ✓"), None, None) as usize;
        assert!(
            matches!(decode_record(&bytes, &segment_header(SEGMENT)), Decoded::Record(_, used) if used == first_len)
        );
        let mut acked = Vec::new();
        encode_acked(
            &mut acked,
            SEGMENT,
            &[MessageId(1), MessageId(2), MessageId(3)],
        );
        assert_eq!(acked.len(), ids_record_bytes(3));
        let mut sealed = Vec::new();
        encode_sealed(&mut sealed, SEGMENT);
        assert_eq!(sealed.len(), SEALED_RECORD_BYTES);
        let mut synced = Vec::new();
        encode_synced(&mut synced, SEGMENT, 1);
        assert_eq!(synced.len(), SYNCED_RECORD_BYTES);
        let version_2 = SegmentHeader {
            version: 2,
            ..segment_header(SEGMENT)
        };
        assert!(
            matches!(decode_record(&synced, &version_2), Decoded::Corrupt(_)),
            "a version 2 segment has no synced records"
        );
        let record = DeadLetter {
            queue: q("orders"),
            reason: DeadLetterReason::MaxDeliveries,
            attempts: 3,
            at_ms: 1,
        };
        let payload = Payload::from_text("x");
        let mut dead_letter = Vec::new();
        let queue = q("orders.dlq");
        encode_publish(
            &mut dead_letter,
            SEGMENT,
            &LiveMessage::new(MessageId(9), 0, &queue, &payload, Some(&record)),
        );
        assert_eq!(
            dead_letter.len() as u64,
            live_record_bytes(&queue, &payload, None, Some(&record))
        );
        let mut plain = Vec::new();
        encode_publish(
            &mut plain,
            SEGMENT,
            &LiveMessage::new(MessageId(9), 0, &queue, &payload, None),
        );
        assert_eq!(
            plain.len() as u64,
            live_record_bytes(&queue, &payload, None, None)
        );
        let attributes = headers(&[("trace", "ab12")]);
        let mut with_headers = Vec::new();
        encode_publish(
            &mut with_headers,
            SEGMENT,
            &LiveMessage {
                attributes: Some(&attributes),
                ..LiveMessage::new(MessageId(9), 0, &queue, &payload, Some(&record))
            },
        );
        assert_eq!(
            with_headers.len() as u64,
            live_record_bytes(&queue, &payload, Some(&attributes), Some(&record))
        );
        let version_7 = SegmentHeader {
            version: 7,
            ..segment_header(SEGMENT)
        };
        assert!(
            !matches!(
                decode_record(&with_headers, &version_7),
                Decoded::Record(..)
            ),
            "a version 7 segment has no attributes"
        );
        let version_3 = SegmentHeader {
            version: 3,
            ..segment_header(SEGMENT)
        };
        assert!(
            matches!(decode_record(&dead_letter, &version_3), Decoded::Corrupt(_)),
            "a version 3 segment has no dead-letter records"
        );
    }

    /// Reason `overflow` reads back from version 7 on; before, it is corruption.
    #[test]
    fn overflow_dead_letters_need_version_7() {
        let record = DeadLetter {
            queue: q("feed"),
            reason: DeadLetterReason::Overflow,
            attempts: 0,
            at_ms: 1_767_225_600_000,
        };
        let (queue, payload) = (q("feed.dlq"), Payload::from_text("dropped"));
        let mut bytes = Vec::new();
        encode_publish(
            &mut bytes,
            SEGMENT,
            &LiveMessage::new(MessageId(3), 0, &queue, &payload, Some(&record)),
        );
        let Decoded::Record(Record::Publish { dead_letter, .. }, _) =
            decode_record(&bytes, &segment_header(SEGMENT))
        else {
            panic!("an overflow dead letter is not read");
        };
        assert_eq!(dead_letter, Some(record));
        let version_6 = SegmentHeader {
            version: 6,
            ..segment_header(SEGMENT)
        };
        assert!(matches!(
            decode_record(&bytes, &version_6),
            Decoded::Corrupt("dead-lettered publish record of an unknown reason")
        ));
    }

    #[test]
    fn every_truncation_is_incomplete_never_a_wrong_record() {
        let (bytes, records) = sample_log();
        for cut in 0..bytes.len() {
            let (decoded, end) = decode_all(&bytes[..cut], &segment_header(SEGMENT));
            assert_eq!(end, Decoded::Incomplete, "cut at {cut}");
            assert_eq!(decoded[..], records[..decoded.len()], "cut at {cut}");
        }
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let (bytes, records) = sample_log();
        for byte in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[byte] ^= 1 << bit;
                let (decoded, end) = decode_all(&damaged, &segment_header(SEGMENT));
                assert!(
                    decoded.len() < records.len(),
                    "flip at {byte}.{bit} went unnoticed"
                );
                assert_eq!(
                    decoded[..],
                    records[..decoded.len()],
                    "records before the flip survive"
                );
                assert!(end != Decoded::Record(records[0].clone(), 0));
            }
        }
    }

    #[test]
    fn headers_round_trip_and_refuse_what_they_cannot_read() {
        let header = SegmentHeader::new(42, 1_000_001);
        let bytes = header.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Ok(header));
        assert_eq!(
            SegmentHeader::decode(&bytes[..31]),
            Err(HeaderError::Short(31))
        );
        let version_1 = SegmentHeader {
            version: 1,
            ..header
        };
        assert_eq!(SegmentHeader::decode(&version_1.encode()), Ok(version_1));
        let future = SegmentHeader {
            version: FORMAT_VERSION + 1,
            ..header
        };
        let err = SegmentHeader::decode(&future.encode()).unwrap_err();
        assert_eq!(
            err,
            HeaderError::UnknownVersion {
                found: FORMAT_VERSION + 1
            }
        );
        assert!(
            err.to_string()
                .contains(&format!("this build reads versions 1 to {FORMAT_VERSION}"))
        );
        let mut foreign = bytes;
        foreign[0] = b'X';
        assert!(matches!(
            SegmentHeader::decode(&foreign),
            Err(HeaderError::BadMagic(_))
        ));
        let mut damaged = bytes;
        damaged[15] ^= 4;
        assert_eq!(
            SegmentHeader::decode(&damaged),
            Err(HeaderError::BadChecksum)
        );
    }

    #[test]
    fn implausible_lengths_are_corrupt_without_allocating() {
        let mut bytes = vec![0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        bytes.extend_from_slice(&[1; 16]);
        let header = segment_header(SEGMENT);
        assert_eq!(
            decode_record(&bytes, &header),
            Decoded::Corrupt("record length out of range")
        );
        assert_eq!(
            decode_record(&[0; 12], &header),
            Decoded::Corrupt("record length out of range")
        );
    }

    #[test]
    fn records_of_another_segment_are_refused_whole_or_torn() {
        let (bytes, _) = sample_log();
        for other in [SEGMENT - 1, SEGMENT + 1, SEGMENT + (1 << 33) + 1] {
            let header = segment_header(other);
            assert_eq!(
                decode_record(&bytes, &header),
                Decoded::Corrupt(
                    "record of another segment (a reused file's old contents, or a flipped bit)"
                ),
                "a record of segment {SEGMENT} read in segment {other}"
            );
            // Known from the prefix alone: nothing waits for the rest of a stale record.
            assert!(matches!(
                decode_record(&bytes[..RECORD_PREFIX_BYTES], &header),
                Decoded::Corrupt(_)
            ));
        }
    }

    /// A publish record body of version 5 (times, no priority) or 6 (`priority` after
    /// the times), with its prefix.
    fn timed_publish_record(priority: Option<u8>) -> Vec<u8> {
        let mut body = vec![KIND_PUBLISH];
        body.extend_from_slice(&9u64.to_le_bytes());
        body.extend_from_slice(&2u32.to_le_bytes());
        body.extend_from_slice(&1_767_225_600_123u64.to_le_bytes());
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend(priority);
        body.push(4);
        body.extend_from_slice(b"jobs");
        body.extend_from_slice(Payload::from_text("old").as_json());
        let len = u32::try_from(body.len()).unwrap().to_le_bytes();
        let tag = segment_tag(SEGMENT);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&len), &[&tag[..], &body].concat());
        [&len[..], &crc.to_le_bytes(), &tag, &body].concat()
    }

    /// Version 5 publish records (no priority) read as priority 0; in version 6 a
    /// priority above 9 is corruption, not a message.
    #[test]
    fn version_5_publish_records_read_as_priority_0() {
        let version_5 = SegmentHeader {
            version: 5,
            ..segment_header(SEGMENT)
        };
        let old = timed_publish_record(None);
        let Decoded::Record(Record::Publish { priority, .. }, len) =
            decode_record(&old, &version_5)
        else {
            panic!("a version 5 publish record is not read");
        };
        assert_eq!((priority, len), (0, old.len()));
        let version_6 = SegmentHeader {
            version: 6,
            ..segment_header(SEGMENT)
        };
        let Decoded::Record(Record::Publish { priority, .. }, _) =
            decode_record(&timed_publish_record(Some(7)), &version_6)
        else {
            panic!("a version 6 publish record is not read");
        };
        assert_eq!(priority, 7);
        assert!(matches!(
            decode_record(&timed_publish_record(Some(10)), &version_6),
            Decoded::Corrupt(_)
        ));
    }

    /// A version 1 record, as earlier builds wrote it: no segment field.
    fn version_1_acked(ids: &[u64]) -> Vec<u8> {
        let mut body = vec![KIND_ACKED];
        for id in ids {
            body.extend_from_slice(&id.to_le_bytes());
        }
        let len = u32::try_from(body.len()).unwrap().to_le_bytes();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&len), &body);
        [&len[..], &crc.to_le_bytes(), &body].concat()
    }

    /// Records of version 4 (no times in publish records) are still read: published at
    /// an unknown time, not delayed; and a version 5 body read as version 4 is refused,
    /// not misread.
    #[test]
    fn version_4_publish_records_are_still_read() {
        let queue = q("jobs");
        let payload = Payload::from_text("old");
        let mut body = vec![KIND_PUBLISH];
        body.extend_from_slice(&9u64.to_le_bytes());
        body.extend_from_slice(&2u32.to_le_bytes());
        body.push(4);
        body.extend_from_slice(b"jobs");
        body.extend_from_slice(payload.as_json());
        let len = u32::try_from(body.len()).unwrap().to_le_bytes();
        let tag = segment_tag(SEGMENT);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&len), &[&tag[..], &body].concat());
        let bytes = [&len[..], &crc.to_le_bytes(), &tag, &body].concat();
        let version_4 = SegmentHeader {
            version: 4,
            ..segment_header(SEGMENT)
        };
        assert_eq!(
            decode_record(&bytes, &version_4),
            Decoded::Record(
                Record::Publish {
                    id: MessageId(9),
                    deliveries: 2,
                    published_at_ms: 0,
                    due_ms: None,
                    priority: 0,
                    queue,
                    payload,
                    attributes: None,
                    dead_letter: None,
                },
                bytes.len()
            )
        );
        assert!(matches!(
            decode_record(&bytes, &segment_header(SEGMENT)),
            Decoded::Corrupt(_)
        ));
    }

    #[test]
    fn version_1_records_are_still_read_in_version_1_segments() {
        let bytes = version_1_acked(&[3, 4]);
        let version_1 = SegmentHeader {
            version: 1,
            ..segment_header(SEGMENT)
        };
        assert_eq!(
            decode_record(&bytes, &version_1),
            Decoded::Record(Record::Acked(vec![MessageId(3), MessageId(4)]), bytes.len())
        );
        assert!(matches!(
            decode_record(&bytes, &segment_header(SEGMENT)),
            Decoded::Corrupt(_)
        ));
    }
}
