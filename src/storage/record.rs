//! The on-disk format: a segment header, then records. docs/STORAGE.md describes it for
//! people; this module is the only code that writes or reads it.
//!
//! ```text
//! segment header (32 bytes): magic "FERRYLOG" | version u32 | segment number u64
//!                            | next id u64 | crc32c of the previous 28 bytes u32
//! record:                    length u32 | crc32c u32 | kind u8 | body (length - 1 bytes)
//!   kind 1 publish:   id u64 | deliveries u32 | queue length u8 | queue | payload literal
//!   kind 2 delivered: id u64, repeated
//!   kind 3 acked:     id u64, repeated
//! ```
//! Integers are little-endian. A record's CRC covers its length field, kind and body, so
//! a torn length is caught like a torn body. A record is checked when encoded and again
//! when decoded: a reader never trusts what it did not verify.

use thiserror::Error;

use crate::protocol::{MessageId, Payload, QueueName};

pub const MAGIC: &[u8; 8] = b"FERRYLOG";
/// The version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 32;
/// Length and CRC in front of every record.
pub const RECORD_PREFIX_BYTES: usize = 8;
/// The length, first in the prefix; never zero in a valid record.
pub const RECORD_LENGTH_BYTES: usize = 4;
/// Largest record body a reader accepts: more than any payload can need (frames are
/// limited to 4 GiB), small enough that a corrupt length cannot make it allocate wildly.
pub const RECORD_BYTES_MAX: usize = 1 << 30;

const KIND_PUBLISH: u8 = 1;
const KIND_DELIVERED: u8 = 2;
const KIND_ACKED: u8 = 3;
/// id, deliveries, queue length.
const PUBLISH_FIXED_BYTES: usize = 8 + 4 + 1;

/// The header that opens every segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub number: u64,
    /// The id the broker would have given the next message when the segment was created:
    /// ids go on from here even if every record before it is gone.
    pub next_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HeaderError {
    #[error("only {0} bytes, a segment header needs 32")]
    Short(usize),
    #[error("not a Ferry segment (magic bytes {0:?})")]
    BadMagic([u8; 8]),
    #[error(
        "format version {found}; this build reads version {FORMAT_VERSION} (a newer Ferry wrote it?)"
    )]
    UnknownVersion { found: u32 },
    #[error("header checksum mismatch")]
    BadChecksum,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut bytes = [0u8; HEADER_BYTES];
        bytes[..8].copy_from_slice(MAGIC);
        bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
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
        if found != FORMAT_VERSION {
            return Err(HeaderError::UnknownVersion { found });
        }
        let crc = u32::from_le_bytes(bytes[28..32].try_into().expect("4 bytes"));
        if crc != crc32c::crc32c(&bytes[..28]) {
            return Err(HeaderError::BadChecksum);
        }
        Ok(SegmentHeader {
            number: u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes")),
            next_id: u64::from_le_bytes(bytes[20..28].try_into().expect("8 bytes")),
        })
    }
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Publish {
        id: MessageId,
        /// Deliveries so far (compaction carries the count forward).
        deliveries: u32,
        queue: QueueName,
        payload: Payload,
    },
    Delivered(Vec<MessageId>),
    Acked(Vec<MessageId>),
}

/// Appends a publish record to `dst`.
pub fn encode_publish(
    dst: &mut Vec<u8>,
    id: MessageId,
    deliveries: u32,
    queue: &QueueName,
    payload: &Payload,
) {
    let queue = queue.as_str().as_bytes();
    let queue_len = u8::try_from(queue.len()).expect("queue names are at most 255 bytes");
    encode_record(
        dst,
        KIND_PUBLISH,
        PUBLISH_FIXED_BYTES + queue.len() + payload.len(),
        |body| {
            body.extend_from_slice(&id.0.to_le_bytes());
            body.extend_from_slice(&deliveries.to_le_bytes());
            body.push(queue_len);
            body.extend_from_slice(queue);
            body.extend_from_slice(payload.as_json());
        },
    );
}

/// Appends a record listing ids that were delivered once more.
pub fn encode_delivered(dst: &mut Vec<u8>, ids: &[MessageId]) {
    encode_ids(dst, KIND_DELIVERED, ids);
}

/// Appends a record listing ids that were acked.
pub fn encode_acked(dst: &mut Vec<u8>, ids: &[MessageId]) {
    encode_ids(dst, KIND_ACKED, ids);
}

/// Bytes a publish record of this queue and payload takes on disk.
pub fn publish_record_bytes(queue: &QueueName, payload: &Payload) -> usize {
    RECORD_PREFIX_BYTES + 1 + PUBLISH_FIXED_BYTES + queue.as_str().len() + payload.len()
}

fn encode_ids(dst: &mut Vec<u8>, kind: u8, ids: &[MessageId]) {
    encode_record(dst, kind, ids.len() * 8, |body| {
        for id in ids {
            body.extend_from_slice(&id.0.to_le_bytes());
        }
    });
}

fn encode_record(
    dst: &mut Vec<u8>,
    kind: u8,
    body_len: usize,
    write_body: impl FnOnce(&mut Vec<u8>),
) {
    let start = dst.len();
    let len = u32::try_from(1 + body_len).expect("records are under 4 GiB");
    dst.reserve(RECORD_PREFIX_BYTES + 1 + body_len);
    dst.extend_from_slice(&len.to_le_bytes());
    dst.extend_from_slice(&[0; 4]);
    dst.push(kind);
    write_body(dst);
    debug_assert_eq!(dst.len() - start, RECORD_PREFIX_BYTES + 1 + body_len);
    let mut crc = crc32c::crc32c(&dst[start..start + 4]);
    crc = crc32c::crc32c_append(crc, &dst[start + RECORD_PREFIX_BYTES..]);
    dst[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
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

/// Decodes the record at the front of `bytes`.
pub fn decode_record(bytes: &[u8]) -> Decoded {
    let Some(prefix) = bytes.first_chunk::<RECORD_PREFIX_BYTES>() else {
        return Decoded::Incomplete;
    };
    let len =
        u32::from_le_bytes(prefix[..RECORD_LENGTH_BYTES].try_into().expect("4 bytes")) as usize;
    if len == 0 || len > RECORD_BYTES_MAX {
        return Decoded::Corrupt("record length out of range");
    }
    let Some(rest) = bytes.get(RECORD_PREFIX_BYTES..RECORD_PREFIX_BYTES + len) else {
        return Decoded::Incomplete;
    };
    let stored_crc = u32::from_le_bytes(prefix[RECORD_LENGTH_BYTES..].try_into().expect("4 bytes"));
    let crc = crc32c::crc32c_append(crc32c::crc32c(&prefix[..RECORD_LENGTH_BYTES]), rest);
    if crc != stored_crc {
        return Decoded::Corrupt("record checksum mismatch");
    }
    let (kind, body) = (rest[0], &rest[1..]);
    let record = match kind {
        KIND_PUBLISH => match decode_publish(body) {
            Ok(record) => record,
            Err(reason) => return Decoded::Corrupt(reason),
        },
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
        _ => return Decoded::Corrupt("unknown record kind"),
    };
    Decoded::Record(record, RECORD_PREFIX_BYTES + len)
}

fn decode_publish(body: &[u8]) -> Result<Record, &'static str> {
    if body.len() < PUBLISH_FIXED_BYTES {
        return Err("publish record too short");
    }
    let id = MessageId(u64::from_le_bytes(body[..8].try_into().expect("8 bytes")));
    let deliveries = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes"));
    let queue_len = usize::from(body[12]);
    let rest = &body[PUBLISH_FIXED_BYTES..];
    if rest.len() < queue_len {
        return Err("publish record shorter than its queue name");
    }
    let queue = std::str::from_utf8(&rest[..queue_len])
        .ok()
        .and_then(|name| QueueName::new(name).ok())
        .ok_or("publish record with an invalid queue name")?;
    let payload = Payload::from_json_literal(&rest[queue_len..])
        .map_err(|_| "publish record with an invalid payload")?;
    Ok(Record::Publish {
        id,
        deliveries,
        queue,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(name: &str) -> QueueName {
        QueueName::new(name).unwrap()
    }

    fn sample_log() -> (Vec<u8>, Vec<Record>) {
        let records = vec![
            Record::Publish {
                id: MessageId(1),
                deliveries: 0,
                queue: q("orders"),
                payload: Payload::from_text("first ✓"),
            },
            Record::Delivered(vec![MessageId(1)]),
            Record::Publish {
                id: MessageId(u64::MAX),
                deliveries: 7,
                queue: q(&"x".repeat(255)),
                payload: Payload::from_text(""),
            },
            Record::Acked(vec![MessageId(1), MessageId(u64::MAX)]),
            Record::Acked(vec![]),
        ];
        let mut bytes = Vec::new();
        for record in &records {
            match record {
                Record::Publish {
                    id,
                    deliveries,
                    queue,
                    payload,
                } => encode_publish(&mut bytes, *id, *deliveries, queue, payload),
                Record::Delivered(ids) => encode_delivered(&mut bytes, ids),
                Record::Acked(ids) => encode_acked(&mut bytes, ids),
            }
        }
        (bytes, records)
    }

    fn decode_all(mut bytes: &[u8]) -> (Vec<Record>, Decoded) {
        let mut records = Vec::new();
        loop {
            match decode_record(bytes) {
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
        assert_eq!(decode_all(&bytes), (records, Decoded::Incomplete));
        let first_len = publish_record_bytes(&q("orders"), &Payload::from_text("first ✓"));
        assert!(matches!(decode_record(&bytes), Decoded::Record(_, used) if used == first_len));
    }

    #[test]
    fn every_truncation_is_incomplete_never_a_wrong_record() {
        let (bytes, records) = sample_log();
        for cut in 0..bytes.len() {
            let (decoded, end) = decode_all(&bytes[..cut]);
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
                let (decoded, end) = decode_all(&damaged);
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
        let header = SegmentHeader {
            number: 42,
            next_id: 1_000_001,
        };
        let bytes = header.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Ok(header));
        assert_eq!(
            SegmentHeader::decode(&bytes[..31]),
            Err(HeaderError::Short(31))
        );
        let mut future = bytes;
        future[8..12].copy_from_slice(&2u32.to_le_bytes());
        let err = SegmentHeader::decode(&future).unwrap_err();
        assert_eq!(err, HeaderError::UnknownVersion { found: 2 });
        assert!(err.to_string().contains("this build reads version 1"));
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
        assert_eq!(
            decode_record(&bytes),
            Decoded::Corrupt("record length out of range")
        );
        assert_eq!(
            decode_record(&[0; 8]),
            Decoded::Corrupt("record length out of range")
        );
    }
}
