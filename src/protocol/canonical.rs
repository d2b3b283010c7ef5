//! The canonical byte layouts of the three hot frames, written by Ferry's encoders and
//! recognised by its decoders without a JSON parser:
//!
//! - `{"type":"publish","payload":"…"}`, what producers send, and on a 1.1 connection the
//!   same with `,"priority":P` (0-9) before the closing brace,
//! - `{"type":"ack","id":N}` and `{"type":"nack","id":N}`, what consumers send,
//! - `{"type":"ok","id":N}`, the broker's confirm of a publish,
//! - `{"type":"message","id":N,"payload":"…","attempt":A}`, what the broker delivers, and
//!   on a 1.1 connection the same with `,"priority":P,"published_at":T,"ack_timeout_ms":L`
//!   before the closing brace.
//!
//! Recognition is deliberately narrow: exactly these bytes, a payload with nothing to
//! unescape, valid UTF-8, plain decimal numbers. Anything else (other field orders,
//! whitespace, escapes, errors) falls back to serde_json, so the fast path can only ever
//! agree with the full parser; the tests check that it does.

use super::PRIORITY_MAX;

pub(crate) const PUBLISH_PREFIX: &[u8] = br#"{"type":"publish","payload":""#;
pub(crate) const ACK_PREFIX: &[u8] = br#"{"type":"ack","id":"#;
pub(crate) const NACK_PREFIX: &[u8] = br#"{"type":"nack","id":"#;
/// The priority field, as a 1.1 publish and a 1.1 message frame both carry it.
pub(crate) const PRIORITY_FIELD: &[u8] = br#","priority":"#;
pub(crate) const MESSAGE_PUBLISHED_AT: &[u8] = br#","published_at":"#;
pub(crate) const MESSAGE_ACK_TIMEOUT: &[u8] = br#","ack_timeout_ms":"#;
pub(crate) const CONFIRM_PREFIX: &[u8] = br#"{"type":"ok","id":"#;
pub(crate) const MESSAGE_PREFIX: &[u8] = br#"{"type":"message","id":"#;
pub(crate) const MESSAGE_PAYLOAD: &[u8] = br#","payload":"#;
pub(crate) const MESSAGE_ATTEMPT: &[u8] = br#","attempt":"#;

/// Whether JSON needs an escape anywhere in `bytes`: a control character, a quote or a
/// backslash. Written without an early exit so the compiler vectorises it.
pub(crate) fn needs_json_escape(bytes: &[u8]) -> bool {
    bytes.iter().fold(false, |found, &b| {
        found | (b < 0x20) | (b == b'"') | (b == b'\\')
    })
}

/// The payload literal (quotes included) and the priority of a canonical publish frame:
/// 0 in the layout without one, else 0-9 (a priority out of range is for serde's path to
/// refuse).
#[inline]
pub(crate) fn publish(body: &[u8]) -> Option<(&[u8], u8)> {
    let content = body.strip_prefix(PUBLISH_PREFIX)?;
    let (close, priority) = match content.strip_suffix(b"\"}") {
        // Without a priority the payload's closing quote is the one before the brace.
        Some(text) => (text.len(), 0),
        None => publish_priority(content)?,
    };
    if !is_plain_json_text(&content[..close]) {
        return None;
    }
    // The literal runs from the opening quote (the prefix's last byte) to the closing one.
    let start = PUBLISH_PREFIX.len() - 1;
    Some((&body[start..start + close + 2], priority))
}

/// Where the payload of a canonical publish with a priority closes, and the priority.
fn publish_priority(content: &[u8]) -> Option<(usize, u8)> {
    // A plain payload holds no quote, so the first one closes it.
    let close = memchr::memchr(b'"', content)?;
    match leading_decimal(content[close + 1..].strip_prefix(PRIORITY_FIELD)?)? {
        (priority, b"}") if priority <= u64::from(PRIORITY_MAX) => Some((close, priority as u8)),
        _ => None,
    }
}

/// The id of a canonical ack frame.
#[inline]
pub(crate) fn ack_id(body: &[u8]) -> Option<u64> {
    decimal(body.strip_prefix(ACK_PREFIX)?.strip_suffix(b"}")?)
}

/// The id of a canonical nack frame (no delay, not a dead letter).
pub(crate) fn nack_id(body: &[u8]) -> Option<u64> {
    decimal(body.strip_prefix(NACK_PREFIX)?.strip_suffix(b"}")?)
}

/// The id of a canonical publish confirm.
pub(crate) fn confirm_id(body: &[u8]) -> Option<u64> {
    decimal(body.strip_prefix(CONFIRM_PREFIX)?.strip_suffix(b"}")?)
}

/// A canonical message frame: 1.0's, or 1.1's without headers or a dead letter.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct CanonicalMessage<'a> {
    pub id: u64,
    pub text: &'a str,
    pub attempt: u32,
    /// (priority, published_at, ack_timeout_ms) of a 1.1 frame.
    pub details: Option<(u8, u64, u64)>,
}

/// The fields of a canonical message frame, read in one forward pass.
pub(crate) fn message(body: &[u8]) -> Option<CanonicalMessage<'_>> {
    let (id, rest) = leading_decimal(body.strip_prefix(MESSAGE_PREFIX)?)?;
    let rest = rest.strip_prefix(MESSAGE_PAYLOAD)?.strip_prefix(b"\"")?;
    // A plain payload holds no quote, so the first one closes it (an escaped quote
    // leaves a backslash before it, which sends the frame to serde).
    let close = memchr::memchr(b'"', rest)?;
    let text = plain_json_text(&rest[..close])?;
    let (attempt, rest) = leading_decimal(rest[close + 1..].strip_prefix(MESSAGE_ATTEMPT)?)?;
    let attempt = u32::try_from(attempt).ok()?;
    let details = if rest == b"}" {
        None
    } else {
        let (priority, rest) = leading_decimal(rest.strip_prefix(PRIORITY_FIELD)?)?;
        let (published_at, rest) = leading_decimal(rest.strip_prefix(MESSAGE_PUBLISHED_AT)?)?;
        let (ack_timeout_ms, rest) = leading_decimal(rest.strip_prefix(MESSAGE_ACK_TIMEOUT)?)?;
        if rest != b"}" {
            return None;
        }
        Some((u8::try_from(priority).ok()?, published_at, ack_timeout_ms))
    };
    Some(CanonicalMessage {
        id,
        text,
        attempt,
        details,
    })
}

/// The JSON unsigned integer at the start of `bytes` (decimal digits, no leading zero,
/// fitting a u64), and what follows it; read in one pass.
fn leading_decimal(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut number = 0u64;
    let mut len = 0;
    for &byte in bytes {
        if !byte.is_ascii_digit() {
            break;
        }
        number = number
            .checked_mul(10)?
            .checked_add(u64::from(byte - b'0'))?;
        len += 1;
    }
    if len == 0 || (len > 1 && bytes[0] == b'0') {
        return None;
    }
    Some((number, &bytes[len..]))
}

/// Whether `content` is valid UTF-8 that a JSON string holds as is, read in one pass
/// when it is ASCII (most payloads): the UTF-8 check runs only past a byte above 0x7f.
fn is_plain_json_text(content: &[u8]) -> bool {
    const ESCAPE: u8 = 1;
    const NON_ASCII: u8 = 2;
    let found = content.iter().fold(0u8, |found, &b| {
        found
            | (u8::from((b < 0x20) | (b == b'"') | (b == b'\\')) * ESCAPE)
            | (u8::from(b >= 0x80) * NON_ASCII)
    });
    found & ESCAPE == 0 && (found & NON_ASCII == 0 || std::str::from_utf8(content).is_ok())
}

/// `content` as text, if it is valid UTF-8 that a JSON string holds as is.
fn plain_json_text(content: &[u8]) -> Option<&str> {
    if needs_json_escape(content) {
        return None;
    }
    std::str::from_utf8(content).ok()
}

/// A JSON unsigned integer: decimal digits, no leading zero, fitting a u64.
fn decimal(digits: &[u8]) -> Option<u64> {
    match leading_decimal(digits)? {
        (number, []) => Some(number),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The payload literal of a canonical publish of priority 0.
    fn publish_literal(body: &[u8]) -> Option<&[u8]> {
        publish(body).map(|(literal, priority)| {
            assert_eq!(priority, 0);
            literal
        })
    }

    #[test]
    fn recognises_exactly_the_canonical_forms() {
        assert_eq!(
            publish_literal(br#"{"type":"publish","payload":"hi"}"#),
            Some(&br#""hi""#[..])
        );
        assert_eq!(
            publish_literal(br#"{"type":"publish","payload":""}"#),
            Some(&br#""""#[..])
        );
        assert_eq!(
            publish_literal(br#"{"type":"publish","payload":"a\"b"}"#),
            None,
            "escapes go to serde"
        );
        assert_eq!(
            publish_literal(br#"{"type":"publish","payload":"a"b"}"#),
            None
        );
        assert_eq!(
            publish_literal(br#"{"type":"publish", "payload":"hi"}"#),
            None,
            "whitespace goes to serde"
        );
        assert_eq!(
            publish_literal(b"{\"type\":\"publish\",\"payload\":\"\xff\"}"),
            None,
            "invalid UTF-8"
        );
        assert_eq!(
            publish_literal(br#"{"type":"publish","payload":""#),
            None,
            "too short to hold both ends"
        );

        assert_eq!(ack_id(br#"{"type":"ack","id":0}"#), Some(0));
        assert_eq!(
            ack_id(br#"{"type":"ack","id":18446744073709551615}"#),
            Some(u64::MAX)
        );
        for bad in [
            "18446744073709551616",
            "007",
            "-1",
            "1.0",
            "1e3",
            "",
            " 1",
            "\"1\"",
        ] {
            let body = format!(r#"{{"type":"ack","id":{bad}}}"#);
            assert_eq!(ack_id(body.as_bytes()), None, "{body}");
        }

        let plain = |id, text, attempt| {
            Some(CanonicalMessage {
                id,
                text,
                attempt,
                details: None,
            })
        };
        assert_eq!(
            message(br#"{"type":"message","id":42,"payload":"x:y,z","attempt":3}"#),
            plain(42, "x:y,z", 3)
        );
        assert_eq!(
            message(br#"{"type":"message","id":42,"payload":"","attempt":1}"#),
            plain(42, "", 1)
        );
        assert_eq!(
            message(
                br#"{"type":"message","id":7,"payload":"p","attempt":2,"priority":0,"published_at":1700000000000,"ack_timeout_ms":30000}"#
            ),
            Some(CanonicalMessage {
                id: 7,
                text: "p",
                attempt: 2,
                details: Some((0, 1_700_000_000_000, 30_000)),
            })
        );
        for bad in [
            &br#"{"type":"message","id":7,"payload":"p","attempt":2,"priority":0,"published_at":1}"#[..],
            br#"{"type":"message","id":7,"payload":"p","attempt":2,"priority":256,"published_at":1,"ack_timeout_ms":1}"#,
            br#"{"type":"message","id":7,"payload":"p","attempt":2,"priority":0,"published_at":1,"ack_timeout_ms":1,"dead_letter":{}}"#,
            br#"{"type":"message","id":7,"payload":"p","attempt":2}}"#,
            br#"{"type":"message","id":7,"payload":"p","attempt":2,}"#,
        ] {
            assert_eq!(message(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            message(br#"{"type":"message","id":42,"payload":"q\"","attempt":1}"#),
            None
        );
        assert_eq!(
            message(br#"{"type":"message","id":42,"payload":"x","attempt":4294967296}"#),
            None
        );
    }

    mod agrees_with_serde {
        use proptest::prelude::*;

        use super::super::*;
        use crate::protocol::client_frame::{FrameType, InboundFrame};
        use crate::protocol::server_frame::{ReceivedFrame, ServerFrame};
        use crate::protocol::{MessageId, Payload};

        /// Bytes that stress a JSON string: plain text, quotes, backslashes and escape
        /// letters, control bytes, multi-byte UTF-8, and bytes that are not UTF-8.
        fn tricky_bytes() -> impl Strategy<Value = Vec<u8>> {
            let piece = prop_oneof![
                4 => "[a-z0-9 :,]{0,8}".prop_map(String::into_bytes),
                1 => Just(b"\"".to_vec()),
                1 => Just(b"\\".to_vec()),
                1 => prop::sample::select(vec![b"\\n".to_vec(), b"\\u00e9".to_vec(), b"\\ud800".to_vec(), b"\\q".to_vec()]),
                1 => (0u8..0x20).prop_map(|b| vec![b]),
                1 => Just("é✓".as_bytes().to_vec()),
                1 => prop::sample::select(vec![vec![0xff], vec![0xc3], vec![0xed, 0xa0, 0x80]]),
                1 => Just(b"}".to_vec()),
            ];
            prop::collection::vec(piece, 0..6).prop_map(|pieces| pieces.concat())
        }

        fn digits() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                any::<u64>().prop_map(|n| n.to_string().into_bytes()),
                "[0-9.e+ -]{0,22}".prop_map(String::into_bytes),
                Just(b"18446744073709551616".to_vec()),
                Just(b"00".to_vec()),
            ]
        }

        proptest! {
            #[test]
            fn publish_fast_path_never_disagrees(content in tricky_bytes()) {
                let body = [PUBLISH_PREFIX, &content, b"\"}"].concat();
                if let Some((fast, _)) = publish(&body) {
                    let slow = InboundFrame::parse_general(&body).expect("serde accepts what the fast path accepts");
                    prop_assert_eq!(slow.frame_type(), FrameType::Publish);
                    prop_assert_eq!(slow.publish_payload().unwrap(), fast);
                }
                let general = InboundFrame::parse(&body).map(|f| f.publish_payload().map(<[u8]>::to_vec).ok());
                let slow = InboundFrame::parse_general(&body).map(|f| f.publish_payload().map(<[u8]>::to_vec).ok());
                prop_assert_eq!(general.ok(), slow.ok());
            }

            #[test]
            fn publish_with_priority_never_disagrees(content in tricky_bytes(), priority in digits()) {
                let body = [PUBLISH_PREFIX, &content, b"\"", PRIORITY_FIELD, &priority, b"}"].concat();
                let fields = |frame: InboundFrame<'_>| {
                    (frame.publish_payload().map(<[u8]>::to_vec).ok(), frame.publish_priority().ok())
                };
                if let Some((literal, fast_priority)) = publish(&body) {
                    let slow = InboundFrame::parse_general(&body).expect("serde accepts what the fast path accepts");
                    prop_assert_eq!(fields(slow), (Some(literal.to_vec()), Some(fast_priority)));
                }
                let general = InboundFrame::parse(&body).map(fields);
                let slow = InboundFrame::parse_general(&body).map(fields);
                prop_assert_eq!(general.ok(), slow.ok());
            }

            #[test]
            fn ack_fast_path_never_disagrees(id in digits()) {
                let body = [ACK_PREFIX, &id, b"}"].concat();
                let general = InboundFrame::parse(&body).ok().map(|f| f.ack_id().ok());
                let slow = InboundFrame::parse_general(&body).ok().map(|f| f.ack_id().ok());
                prop_assert_eq!(general, slow);
            }

            #[test]
            fn message_fast_path_never_disagrees(id in digits(), content in tricky_bytes(), attempt in digits()) {
                let body = [MESSAGE_PREFIX, &id, MESSAGE_PAYLOAD, b"\"", &content, b"\"", MESSAGE_ATTEMPT, &attempt, b"}"].concat();
                let slow: Option<ReceivedFrame> = serde_json::from_slice(&body).ok();
                if let Some(fast) = message(&body) {
                    let Some(ReceivedFrame::Message(slow)) = slow else {
                        return Err(TestCaseError::fail("serde refused what the fast path accepted"));
                    };
                    prop_assert_eq!((slow.id.0, slow.payload.as_str(), slow.attempt), (fast.id, fast.text, fast.attempt));
                } else {
                    prop_assert_eq!(ReceivedFrame::decode(&body).ok(), slow);
                }
            }

            #[test]
            fn message_1_1_fast_path_never_disagrees(
                content in tricky_bytes(),
                priority in digits(),
                published_at in digits(),
                ack_timeout_ms in digits(),
            ) {
                let body = [
                    MESSAGE_PREFIX, b"9", MESSAGE_PAYLOAD, b"\"", &content, b"\"", MESSAGE_ATTEMPT, b"1",
                    PRIORITY_FIELD, &priority, MESSAGE_PUBLISHED_AT, &published_at,
                    MESSAGE_ACK_TIMEOUT, &ack_timeout_ms, b"}",
                ].concat();
                let slow: Option<ReceivedFrame> = serde_json::from_slice(&body).ok();
                if message(&body).is_some() {
                    prop_assert!(slow.is_some(), "serde refused what the fast path accepted");
                }
                prop_assert_eq!(ReceivedFrame::decode(&body).ok(), slow);
            }

            #[test]
            fn confirm_fast_path_never_disagrees(id in digits()) {
                let body = [CONFIRM_PREFIX, &id, b"}"].concat();
                let slow: Option<ReceivedFrame> = serde_json::from_slice(&body).ok();
                if let Some(fast) = confirm_id(&body) {
                    prop_assert_eq!(slow, Some(ReceivedFrame::Ok { id: Some(MessageId(fast)) }));
                } else {
                    prop_assert_eq!(ReceivedFrame::decode(&body).ok(), slow);
                }
            }

            #[test]
            fn every_delivery_decodes_to_what_was_sent(id in any::<u64>(), text in any::<String>(), attempt in any::<u32>()) {
                let payload = Payload::from_text(&text);
                let mut buf = bytes::BytesMut::new();
                ServerFrame::Delivery { id: MessageId(id), payload: &payload, attempt, details: None }.encode(&mut buf);
                let decoded = ReceivedFrame::decode(&buf[4..]).unwrap();
                let ReceivedFrame::Message(message) = decoded else { panic!("not a message") };
                prop_assert_eq!((message.id.0, message.payload, message.attempt), (id, text, attempt));
            }
        }
    }
}
