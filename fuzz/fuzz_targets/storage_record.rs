//! The storage record decoder and recovery on arbitrary bytes: decoding must never panic
//! or claim more bytes than it was given, and recovering a segment of arbitrary content
//! must end in messages or a clear refusal, never a panic.
#![no_main]

use ferry::storage::backend::SimBackend;
use ferry::storage::record::{self, Decoded, SegmentHeader};
use ferry::storage::recovery::recover;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (bool, Vec<u8>)| {
    let (as_segment, bytes) = input;
    for version in [1, record::FORMAT_VERSION] {
        let header = SegmentHeader {
            version,
            ..SegmentHeader::new(1, 1)
        };
        if let Decoded::Record(_, used) = record::decode_record(&bytes, &header) {
            assert!(used <= bytes.len());
        }
    }
    if as_segment {
        let backend = SimBackend::default();
        let mut segment = SegmentHeader::new(1, 1).encode().to_vec();
        segment.extend_from_slice(&bytes);
        backend.put_segment(1, &segment);
        for repair in [false, true] {
            if let Ok(recovered) = recover(&backend.after_crash(), repair) {
                let ids: Vec<_> = recovered.messages.iter().map(|m| m.id).collect();
                assert!(ids.windows(2).all(|w| w[0] < w[1]), "recovered out of order");
                assert!(ids.iter().all(|id| id.0 < recovered.next_id));
            }
        }
    }
});
