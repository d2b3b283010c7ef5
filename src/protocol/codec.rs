//! Framing: a 4-byte big-endian length `N`, then `N` bytes of JSON (contract §1).
//!
//! Decoding delegates to tokio-util's [`LengthDelimitedCodec`], after checking `N`
//! against the limit itself so that a frame of length 0 or over the limit is reported
//! with its declared length before a single body byte is buffered. Encoding writes the
//! body straight into the output buffer behind a length placeholder, so no frame is built
//! twice.

use bytes::{BufMut, BytesMut};
use thiserror::Error;
use tokio_util::codec::{Decoder, LengthDelimitedCodec};

/// Size of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Why the byte stream cannot be split into frames. All of these end the connection.
#[derive(Debug, Error)]
pub enum FrameError {
    #[error("frame length is 0; every frame holds one JSON object")]
    Empty,
    #[error("frame length {declared} is over the limit of {max} bytes")]
    TooLarge { declared: u64, max: usize },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Splits a byte stream into frame bodies, refusing lengths of 0 or over the limit.
#[derive(Debug)]
pub struct FrameDecoder {
    inner: LengthDelimitedCodec,
    max_frame_bytes: usize,
    /// The inner codec has consumed a checked length prefix and waits for the body, so
    /// the front of the buffer is body bytes, not a prefix to check.
    awaiting_body: bool,
}

impl FrameDecoder {
    /// A decoder that accepts bodies of `1..=max_frame_bytes` bytes.
    pub fn new(max_frame_bytes: usize) -> Self {
        let inner = LengthDelimitedCodec::builder()
            .big_endian()
            .length_field_length(LENGTH_PREFIX_BYTES)
            .max_frame_length(max_frame_bytes)
            .new_codec();
        FrameDecoder {
            inner,
            max_frame_bytes,
            awaiting_body: false,
        }
    }
}

impl Decoder for FrameDecoder {
    type Item = BytesMut;
    type Error = FrameError;

    /// `Ok(None)` means "not a whole frame yet".
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        if self.awaiting_body {
            let frame = self.inner.decode(src)?;
            self.awaiting_body = frame.is_none();
            return Ok(frame);
        }
        if let Some(prefix) = src.first_chunk::<LENGTH_PREFIX_BYTES>() {
            let declared = u32::from_be_bytes(*prefix);
            if declared == 0 {
                return Err(FrameError::Empty);
            }
            if declared as usize > self.max_frame_bytes {
                return Err(FrameError::TooLarge {
                    declared: declared.into(),
                    max: self.max_frame_bytes,
                });
            }
            let frame = self.inner.decode(src)?;
            self.awaiting_body = frame.is_none();
            return Ok(frame);
        }
        Ok(None)
    }
}

/// Appends one frame to `dst`: a length placeholder, whatever `write_body` writes, then the
/// real length patched in.
///
/// # Panics
/// If the body is 4 GiB or more, which no frame of this protocol can be.
pub fn write_frame(dst: &mut BytesMut, write_body: impl FnOnce(&mut BytesMut)) {
    let start = dst.len();
    dst.put_u32(0);
    write_body(dst);
    let body_len = dst.len() - start - LENGTH_PREFIX_BYTES;
    let body_len = u32::try_from(body_len).expect("frame body under 4 GiB");
    dst[start..start + LENGTH_PREFIX_BYTES].copy_from_slice(&body_len.to_be_bytes());
}

/// Appends one frame whose body is `value` serialised as JSON.
pub fn write_json_frame(dst: &mut BytesMut, value: &impl serde::Serialize) {
    write_frame(dst, |body| {
        // Writing to a BytesMut cannot fail, and our frame types always serialise.
        let _ = serde_json::to_writer(body.writer(), value);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(body: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        write_frame(&mut buf, |dst| dst.extend_from_slice(body));
        buf
    }

    #[test]
    fn splits_pipelined_frames_and_waits_for_partial_ones() {
        let mut decoder = FrameDecoder::new(64);
        let mut buf = framed(b"{\"a\":1}");
        buf.extend_from_slice(&framed(b"{}"));
        let whole = framed(b"{\"b\":2}");
        buf.extend_from_slice(&whole[..6]);

        assert_eq!(
            &decoder.decode(&mut buf).unwrap().unwrap()[..],
            b"{\"a\":1}"
        );
        assert_eq!(&decoder.decode(&mut buf).unwrap().unwrap()[..], b"{}");
        assert!(decoder.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&whole[6..]);
        assert_eq!(
            &decoder.decode(&mut buf).unwrap().unwrap()[..],
            b"{\"b\":2}"
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn a_body_that_arrives_byte_by_byte_is_not_mistaken_for_a_prefix() {
        let mut decoder = FrameDecoder::new(64);
        let whole = framed(b"{\"type\":\"publish\",\"payload\":\"x\"}");
        let mut buf = BytesMut::new();
        for (i, byte) in whole.iter().enumerate() {
            buf.extend_from_slice(&[*byte]);
            let frame = decoder.decode(&mut buf).unwrap();
            assert_eq!(frame.is_some(), i == whole.len() - 1, "after byte {i}");
        }
        let mut next = framed(b"{}");
        assert_eq!(&decoder.decode(&mut next).unwrap().unwrap()[..], b"{}");
    }

    #[test]
    fn partial_length_prefix_is_not_an_error() {
        let mut decoder = FrameDecoder::new(64);
        let mut buf = BytesMut::from(&[0u8, 0][..]);
        assert!(decoder.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn refuses_zero_and_oversized_lengths_before_the_body_arrives() {
        let mut decoder = FrameDecoder::new(64);
        let mut zero = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert!(matches!(decoder.decode(&mut zero), Err(FrameError::Empty)));

        let mut one_over = BytesMut::from(&65u32.to_be_bytes()[..]);
        assert!(matches!(
            decoder.decode(&mut one_over),
            Err(FrameError::TooLarge {
                declared: 65,
                max: 64
            })
        ));

        let mut huge = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        assert!(matches!(
            decoder.decode(&mut huge),
            Err(FrameError::TooLarge {
                declared: 0xFFFF_FFFF,
                ..
            })
        ));
        assert!(huge.capacity() < 1024, "nothing was reserved for the body");
    }

    #[test]
    fn exactly_the_limit_is_accepted() {
        let mut decoder = FrameDecoder::new(8);
        let mut buf = framed(b"12345678");
        assert_eq!(decoder.decode(&mut buf).unwrap().unwrap().len(), 8);
    }

    #[test]
    fn write_frame_prefixes_the_big_endian_length() {
        let buf = framed(b"{\"type\":\"ok\"}");
        assert_eq!(&buf[..4], &13u32.to_be_bytes());
        assert_eq!(&buf[4..], b"{\"type\":\"ok\"}");
    }
}
