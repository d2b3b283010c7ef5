//! The properties the fuzz targets in `fuzz/` check, one function per target, each on
//! raw bytes: libFuzzer drives them there, and `tests/fuzz_corpora.rs` replays the
//! committed corpora through them on every `cargo test`, so CI exercises every input the
//! fuzzers found interesting. Each panics when its property fails.

use std::sync::Arc;

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::protocol::client_frame::{FrameType, InboundFrame};
use crate::protocol::codec::FrameDecoder;
use crate::protocol::server_frame::{
    DeliveryDetails, LeaseField, PublishedAtField, ReceivedFrame, ServerFrame,
};
use crate::protocol::{Attributes, DeadLetter, DeadLetterReason, Headers, Payload, QueueName};
use crate::storage::backend::SimFs;
use crate::storage::record::{self, Decoded, SegmentHeader};
use crate::storage::recovery::recover;
use crate::storage::segments::{Segments, segment_file_name};

/// The frame decoder's limit in [`frame_decoder`].
const FRAME_LIMIT: usize = 4096;

/// The frame decoder over arbitrary bytes arriving in arbitrary pieces: it never panics,
/// never returns a body empty or over the limit, and splits the same stream the same way
/// however it is cut. The first byte says how many of the next bytes give piece sizes.
pub fn frame_decoder(input: &[u8]) {
    let (pieces, data) = match input.split_first() {
        Some((&count, rest)) => rest.split_at(usize::from(count).min(rest.len())),
        None => return,
    };
    let whole = split_frames(data, &[255]);
    let cut = split_frames(data, if pieces.is_empty() { &[0] } else { pieces });
    assert_eq!(
        whole, cut,
        "the same bytes cut differently decoded differently"
    );
}

/// Feeds `data` in pieces of the given sizes; returns the frames, and whether it ended in
/// an error.
fn split_frames(data: &[u8], piece_sizes: &[u8]) -> (Vec<Vec<u8>>, bool) {
    let mut decoder = FrameDecoder::new(FRAME_LIMIT);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut sizes = piece_sizes.iter().cycle();
    let mut rest = data;
    while !rest.is_empty() {
        let size = (usize::from(*sizes.next().unwrap_or(&255)) + 1).min(rest.len());
        buf.extend_from_slice(&rest[..size]);
        rest = &rest[size..];
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(!frame.is_empty() && frame.len() <= FRAME_LIMIT);
                    frames.push(frame.to_vec());
                }
                Ok(None) => break,
                Err(_) => return (frames, true),
            }
        }
    }
    (frames, false)
}

/// The broker's parser of client frames on an arbitrary body: it never panics, and its
/// canonical fast path agrees with the general JSON parser on everything it accepts.
pub fn client_frame(body: &[u8]) {
    let publish = |frame: &InboundFrame<'_>| {
        format!(
            "{:?} {:?} {:?}",
            frame.publish_payload().map_err(|e| e.to_string()),
            frame.publish_priority().map_err(|e| e.to_string()),
            frame.publish_attributes().map_err(|e| e.to_string())
        )
    };
    let summary = |frame: &InboundFrame<'_>| {
        let detail = match frame.frame_type() {
            FrameType::Register => format!("{:?}", frame.register()),
            FrameType::Publish => publish(frame),
            FrameType::PublishBatch => format!(
                "{:?}",
                frame
                    .publish_batch_entries()
                    .map(|entries| entries.iter().map(publish).collect::<Vec<_>>())
                    .map_err(|e| e.to_string())
            ),
            FrameType::Ack => format!("{:?}", frame.target_ids(true).map_err(|e| e.to_string())),
            FrameType::Nack => format!("{:?}", frame.nack().map_err(|e| e.to_string())),
            FrameType::Touch => format!("{:?}", frame.touch().map_err(|e| e.to_string())),
        };
        (frame.frame_type(), detail)
    };
    let fast = InboundFrame::parse(body);
    let general = InboundFrame::parse_general(body);
    match (&fast, &general) {
        (Ok(fast), Ok(general)) => {
            let (fast, general) = (summary(fast), summary(general));
            // The fast path takes only valid frames; their meaning must match.
            if !fast.1.contains("Err") {
                assert_eq!(fast, general);
            }
        }
        (Ok(fast), Err(e)) => panic!(
            "fast path accepted {:?}, the parser said {e}",
            summary(fast)
        ),
        (Err(_), _) => {}
    }
}

/// The client library's parser of broker frames on an arbitrary body: it never panics,
/// and what it decodes from a delivery (1.0, or 1.1 with its details and headers)
/// survives being encoded again the way the broker encodes it.
pub fn server_frame(body: &[u8]) {
    let Ok(ReceivedFrame::Message(message)) = ReceivedFrame::decode(body) else {
        return;
    };
    let details = message.details.as_ref();
    // A dead-letter record the broker could not have written (an invalid queue name, a
    // reason it does not know) has no encoding to compare with.
    let dead_letter = match details.and_then(|d| d.dead_letter.as_ref()) {
        None => None,
        Some(received) => {
            let reason = DeadLetterReason::from_name(&received.reason);
            match (QueueName::new(&received.queue), reason) {
                (Ok(queue), Some(reason)) => Some(DeadLetter {
                    queue,
                    reason,
                    attempts: received.attempts,
                    at_ms: received.at,
                }),
                _ => return,
            }
        }
    };
    // Headers the broker could not have accepted have no encoding either.
    let attributes = match details.map(|d| &d.headers).filter(|h| !h.is_empty()) {
        None => None,
        Some(received) => match Headers::new(received) {
            Ok(headers) => Some(Attributes { headers }),
            Err(_) => return,
        },
    };
    let lease = details.map(|d| LeaseField::new(d.ack_timeout_ms));
    let mut published_at = PublishedAtField::default();
    let payload = Payload::from_text(&message.payload);
    let mut buf = BytesMut::new();
    ServerFrame::Delivery {
        id: message.id,
        payload: &payload,
        attempt: message.attempt,
        details: details
            .zip(lease.as_ref())
            .map(|(d, lease)| DeliveryDetails {
                published_at: published_at.render(d.priority, d.published_at),
                lease,
                attributes: attributes.as_ref(),
                dead_letter: dead_letter.as_ref(),
            }),
    }
    .encode(&mut buf);
    assert_eq!(
        ReceivedFrame::decode(&buf[4..]).unwrap(),
        ReceivedFrame::Message(message)
    );
}

/// The storage record decoder and recovery on arbitrary bytes: decoding never panics or
/// claims more bytes than it was given, and recovering a segment of arbitrary content
/// (when the first byte is odd) ends in messages in id order or a clear refusal, never a
/// panic.
pub fn storage_record(input: &[u8]) {
    let Some((&flags, bytes)) = input.split_first() else {
        return;
    };
    for version in record::OLDEST_READABLE_VERSION..=record::FORMAT_VERSION {
        let header = SegmentHeader {
            version,
            ..SegmentHeader::new(1, 1)
        };
        if let Decoded::Record(_, used) = record::decode_record(bytes, &header) {
            assert!(used <= bytes.len());
        }
    }
    if flags & 1 == 1 {
        let disk = SimFs::default();
        let mut segment = SegmentHeader::new(1, 1).encode().to_vec();
        segment.extend_from_slice(bytes);
        disk.put(&segment_file_name(1), &segment);
        for repair in [false, true] {
            let segments = Segments::new(Arc::new(disk.after_crash()), 1 << 20);
            if let Ok(recovered) = recover(&segments, repair) {
                let ids: Vec<_> = recovered.messages.iter().map(|m| m.id).collect();
                assert!(
                    ids.windows(2).all(|w| w[0] < w[1]),
                    "recovered out of order"
                );
                assert!(ids.iter().all(|id| id.0 < recovered.next_id));
            }
        }
    }
}
