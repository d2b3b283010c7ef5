//! The frame decoder over arbitrary bytes arriving in arbitrary pieces: it must never
//! panic, never return a body longer than the limit or empty, and split the same stream
//! the same way however it is cut.
#![no_main]

use bytes::BytesMut;
use ferry::protocol::codec::FrameDecoder;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

const LIMIT: usize = 4096;

/// Feeds `data` in pieces of the given sizes; returns the frames, and whether it ended in
/// an error.
fn split(data: &[u8], piece_sizes: &[u8]) -> (Vec<Vec<u8>>, bool) {
    let mut decoder = FrameDecoder::new(LIMIT);
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
                    assert!(!frame.is_empty() && frame.len() <= LIMIT);
                    frames.push(frame.to_vec());
                }
                Ok(None) => break,
                Err(_) => return (frames, true),
            }
        }
    }
    (frames, false)
}

fuzz_target!(|input: (Vec<u8>, Vec<u8>)| {
    let (data, pieces) = input;
    let whole = split(&data, &[255]);
    let cut = split(&data, if pieces.is_empty() { &[0] } else { &pieces });
    assert_eq!(whole, cut, "the same bytes cut differently decoded differently");
});
