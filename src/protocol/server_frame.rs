//! Frames the broker sends: `ok`, `message` and `error` (contract §3).
//!
//! The broker encodes them with [`ServerFrame::encode`], which writes `ok` and `message`
//! frames by hand (they are the hot path, and a delivery splices the payload's JSON
//! literal in without re-escaping it). Clients decode them into [`ReceivedFrame`].

use std::collections::BTreeMap;

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};

use super::canonical;
use super::codec::{write_frame, write_json_frame};
use super::{Attributes, DeadLetter, ErrorCode, MessageId, Payload, Version};

/// A frame as the broker encodes it.
#[derive(Debug, Clone, Copy)]
pub enum ServerFrame<'a> {
    /// `{"type":"ok"}` after a register, or `{"type":"ok","version":"1.N"}` after one
    /// that asked for a version (contract §8).
    Registered { version: Option<Version> },
    /// `{"type":"ok","id":42}` after a publish.
    Published(MessageId),
    /// `{"type":"ok","ids":[41,42]}` after a publish_batch (1.1).
    PublishedBatch { ids: &'a [MessageId] },
    /// `{"type":"message","id":42,"payload":"…","attempt":1}`, and on a 1.1 connection
    /// its details after that.
    Delivery {
        id: MessageId,
        payload: &'a Payload,
        attempt: u32,
        details: Option<DeliveryDetails<'a>>,
    },
    /// `{"type":"error","code":"…","message":"…"}`, with `id` where one applies.
    Error {
        code: ErrorCode,
        message: &'a str,
        id: Option<MessageId>,
    },
}

/// What a 1.1 message frame adds (contract §10): `priority`, `published_at`,
/// `ack_timeout_ms`, and `headers` and `dead_letter` when it has them.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryDetails<'a> {
    /// `,"priority":P,"published_at":N`, as [`PublishedAtField::render`] renders it.
    pub published_at: &'a [u8],
    pub lease: &'a LeaseField,
    pub attributes: Option<&'a Attributes>,
    pub dead_letter: Option<&'a DeadLetter>,
}

/// A delivery's lease as its message frame writes it, `,"ack_timeout_ms":N`: rendered
/// once per connection, since every delivery to a consumer has its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseField(Box<[u8]>);

/// The `priority` and `published_at` fields of a message frame, kept rendered for the
/// last pair written: deliveries in a row mostly share their priority and their
/// publish's millisecond, so most frames copy them rather than format a 13-digit number.
#[derive(Debug, Clone, Default)]
pub struct PublishedAtField {
    rendered: Option<(u8, u64)>,
    text: Vec<u8>,
}

impl PublishedAtField {
    /// The fields for a message of `priority` published at `published_at_ms`.
    pub fn render(&mut self, priority: u8, published_at_ms: u64) -> &[u8] {
        if self.rendered != Some((priority, published_at_ms)) {
            self.rendered = Some((priority, published_at_ms));
            self.text.clear();
            self.text.extend_from_slice(canonical::PRIORITY_FIELD);
            self.text
                .extend_from_slice(itoa::Buffer::new().format(priority).as_bytes());
            self.text.extend_from_slice(canonical::MESSAGE_PUBLISHED_AT);
            self.text
                .extend_from_slice(itoa::Buffer::new().format(published_at_ms).as_bytes());
        }
        &self.text
    }
}

impl LeaseField {
    pub fn new(ack_timeout_ms: u64) -> LeaseField {
        let mut field = canonical::MESSAGE_ACK_TIMEOUT.to_vec();
        field.extend_from_slice(itoa::Buffer::new().format(ack_timeout_ms).as_bytes());
        LeaseField(field.into_boxed_slice())
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "type")]
    frame_type: &'static str,
    code: ErrorCode,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<MessageId>,
}

impl ServerFrame<'_> {
    /// Appends this frame, length prefix included, to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        match *self {
            ServerFrame::Registered { version: None } => {
                write_frame(dst, |b| b.put_slice(br#"{"type":"ok"}"#))
            }
            ServerFrame::Registered {
                version: Some(version),
            } => write_frame(dst, |b| {
                b.put_slice(br#"{"type":"ok","version":""#);
                b.put_slice(version.to_string().as_bytes());
                b.put_slice(br#""}"#);
            }),
            ServerFrame::Published(id) => write_frame(dst, |b| {
                b.put_slice(canonical::CONFIRM_PREFIX);
                put_decimal(b, id.0);
                b.put_u8(b'}');
            }),
            ServerFrame::PublishedBatch { ids } => write_frame(dst, |b| {
                b.put_slice(br#"{"type":"ok","ids":["#);
                for (index, id) in ids.iter().enumerate() {
                    if index > 0 {
                        b.put_u8(b',');
                    }
                    put_decimal(b, id.0);
                }
                b.put_slice(b"]}");
            }),
            ServerFrame::Delivery {
                id,
                payload,
                attempt,
                details,
            } => write_frame(dst, |b| {
                // Room for the envelope, and a 1.1 frame's details (dead letters aside).
                let details_bytes = details.map_or(0, |d| {
                    96 + d
                        .attributes
                        .map_or(0, |a| HEADERS_FIELD.len() + a.byte_len())
                });
                b.reserve(payload.len() + 64 + details_bytes);
                b.put_slice(canonical::MESSAGE_PREFIX);
                put_decimal(b, id.0);
                b.put_slice(canonical::MESSAGE_PAYLOAD);
                b.put_slice(payload.as_json());
                b.put_slice(canonical::MESSAGE_ATTEMPT);
                put_decimal(b, u64::from(attempt));
                if let Some(details) = details {
                    put_details(b, &details);
                }
                b.put_u8(b'}');
            }),
            ServerFrame::Error { code, message, id } => write_json_frame(
                dst,
                &ErrorBody {
                    frame_type: "error",
                    code,
                    message,
                    id,
                },
            ),
        }
    }
}

/// The 1.1 fields of a message frame. Queue names and reasons need no escaping: queue
/// names are `[A-Za-z0-9._-]`.
fn put_details(b: &mut BytesMut, details: &DeliveryDetails<'_>) {
    b.put_slice(details.published_at);
    b.put_slice(&details.lease.0);
    if let Some(attributes) = details.attributes {
        b.put_slice(HEADERS_FIELD);
        b.put_slice(attributes.headers.as_json());
    }
    if let Some(record) = details.dead_letter {
        b.put_slice(br#","dead_letter":{"queue":""#);
        b.put_slice(record.queue.as_str().as_bytes());
        b.put_slice(br#"","reason":""#);
        b.put_slice(record.reason.as_str().as_bytes());
        b.put_slice(br#"","attempts":"#);
        put_decimal(b, u64::from(record.attempts));
        b.put_slice(br#","at":"#);
        put_decimal(b, record.at_ms);
        b.put_u8(b'}');
    }
}

const HEADERS_FIELD: &[u8] = br#","headers":"#;

fn put_decimal(dst: &mut BytesMut, n: u64) {
    dst.put_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A frame as a client decodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceivedFrame {
    /// A register's `ok` (no id) or a publish's `ok` (with the message's id).
    Ok { id: Option<MessageId> },
    /// A publish_batch's `ok`: its messages' ids, in order.
    OkBatch { ids: Vec<MessageId> },
    /// A delivery.
    Message(Message),
    /// A refusal.
    Error(BrokerError),
}

/// A delivered message, as a consumer receives it. Serialized, it is the message frame
/// (what `ferry consumer --json` prints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename = "message")]
pub struct Message {
    pub id: MessageId,
    pub payload: String,
    /// 1 on the first delivery, one more on each redelivery.
    pub attempt: u32,
    /// What a 1.1 connection's message frame adds; `None` on a 1.0 connection.
    #[serde(flatten)]
    pub details: Option<MessageDetails>,
}

/// The fields of a version 1.1 message frame (contract §10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageDetails {
    pub priority: u8,
    /// When the broker accepted the publish, in milliseconds since the Unix epoch.
    pub published_at: u64,
    /// This delivery's lease, in milliseconds.
    pub ack_timeout_ms: u64,
    /// Its publish's headers; empty when it had none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<ReceivedDeadLetter>,
}

/// A dead letter's record as a consumer receives it: where the message was dead-lettered
/// from, why (`max_deliveries`, `rejected`, or a reason a later broker adds), after how
/// many deliveries, and when (ms since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceivedDeadLetter {
    pub queue: String,
    pub reason: String,
    pub attempts: u32,
    pub at: u64,
}

/// A refusal from the broker: the content of an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct BrokerError {
    pub code: ErrorCode,
    pub message: String,
    pub id: Option<MessageId>,
}

/// Decodes a frame in one pass over its fields, whatever their order (serde's derive for
/// an internally tagged enum would first buffer the whole object into a tree, and every
/// delivery pays for that).
impl<'de> Deserialize<'de> for ReceivedFrame {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ReceivedFrameVisitor)
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Field {
    Type,
    Id,
    Ids,
    Payload,
    Attempt,
    Code,
    Message,
    Priority,
    #[serde(rename = "published_at")]
    PublishedAt,
    #[serde(rename = "ack_timeout_ms")]
    AckTimeoutMs,
    #[serde(rename = "dead_letter")]
    DeadLetter,
    Headers,
    #[serde(other)]
    Unknown,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum FrameType {
    Ok,
    Message,
    Error,
}

struct ReceivedFrameVisitor;

impl<'de> serde::de::Visitor<'de> for ReceivedFrameVisitor {
    type Value = ReceivedFrame;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an ok, message or error frame")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> Result<ReceivedFrame, A::Error> {
        use serde::de::Error;
        let mut frame_type = None;
        let (mut id, mut payload, mut attempt, mut code, mut message) =
            (None, None, None, None, None);
        let mut ids = None;
        let (mut priority, mut published_at, mut ack_timeout_ms, mut dead_letter) =
            (None, None, None, None);
        let mut headers = BTreeMap::new();
        while let Some(field) = map.next_key()? {
            match field {
                Field::Type => frame_type = Some(map.next_value::<FrameType>()?),
                Field::Id => id = map.next_value::<Option<MessageId>>()?,
                Field::Ids => ids = map.next_value::<Option<Vec<MessageId>>>()?,
                Field::Payload => payload = Some(map.next_value::<String>()?),
                Field::Attempt => attempt = Some(map.next_value::<u32>()?),
                Field::Code => code = Some(map.next_value::<ErrorCode>()?),
                Field::Message => message = Some(map.next_value::<String>()?),
                Field::Priority => priority = Some(map.next_value::<u8>()?),
                Field::PublishedAt => published_at = Some(map.next_value::<u64>()?),
                Field::AckTimeoutMs => ack_timeout_ms = Some(map.next_value::<u64>()?),
                Field::DeadLetter => dead_letter = map.next_value()?,
                Field::Headers => {
                    headers = map
                        .next_value::<Option<BTreeMap<String, String>>>()?
                        .unwrap_or_default();
                }
                Field::Unknown => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        match frame_type.ok_or_else(|| A::Error::missing_field("type"))? {
            FrameType::Ok => Ok(match ids {
                Some(ids) => ReceivedFrame::OkBatch { ids },
                None => ReceivedFrame::Ok { id },
            }),
            FrameType::Message => Ok(ReceivedFrame::Message(Message {
                id: id.ok_or_else(|| A::Error::missing_field("id"))?,
                payload: payload.ok_or_else(|| A::Error::missing_field("payload"))?,
                attempt: attempt.ok_or_else(|| A::Error::missing_field("attempt"))?,
                // A 1.1 frame has all three; a 1.0 frame none.
                details: match (priority, published_at, ack_timeout_ms) {
                    (Some(priority), Some(published_at), Some(ack_timeout_ms)) => {
                        Some(MessageDetails {
                            priority,
                            published_at,
                            ack_timeout_ms,
                            headers,
                            dead_letter,
                        })
                    }
                    _ => None,
                },
            })),
            FrameType::Error => Ok(ReceivedFrame::Error(BrokerError {
                code: code.ok_or_else(|| A::Error::missing_field("code"))?,
                message: message.ok_or_else(|| A::Error::missing_field("message"))?,
                id,
            })),
        }
    }
}

impl ReceivedFrame {
    /// Decodes one frame body.
    ///
    /// # Errors
    /// serde_json's error when the body is not a frame of this protocol.
    pub fn decode(body: &[u8]) -> Result<Self, serde_json::Error> {
        if let Some(id) = canonical::confirm_id(body) {
            return Ok(ReceivedFrame::Ok {
                id: Some(MessageId(id)),
            });
        }
        if let Some(message) = canonical::message(body) {
            return Ok(ReceivedFrame::Message(Message {
                id: MessageId(message.id),
                payload: message.text.to_owned(),
                attempt: message.attempt,
                details: message
                    .details
                    .map(|(priority, published_at, ack_timeout_ms)| MessageDetails {
                        priority,
                        published_at,
                        ack_timeout_ms,
                        headers: BTreeMap::new(),
                        dead_letter: None,
                    }),
            }));
        }
        serde_json::from_slice(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(frame: ServerFrame<'_>) -> (Vec<u8>, ReceivedFrame) {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len() - 4);
        let body = buf[4..].to_vec();
        let decoded = ReceivedFrame::decode(&body).unwrap();
        (body, decoded)
    }

    #[test]
    fn ok_frames_are_exactly_the_contract_bytes() {
        let (body, decoded) = encoded(ServerFrame::Registered { version: None });
        assert_eq!(body, br#"{"type":"ok"}"#);
        assert_eq!(decoded, ReceivedFrame::Ok { id: None });
        let (body, decoded) = encoded(ServerFrame::Registered {
            version: Version::parse("1"),
        });
        assert_eq!(body, br#"{"type":"ok","version":"1.0"}"#);
        assert_eq!(decoded, ReceivedFrame::Ok { id: None });
        let (body, decoded) = encoded(ServerFrame::Published(MessageId(42)));
        assert_eq!(body, br#"{"type":"ok","id":42}"#);
        assert_eq!(
            decoded,
            ReceivedFrame::Ok {
                id: Some(MessageId(42))
            }
        );
    }

    #[test]
    fn deliveries_splice_the_payload_literal() {
        let payload = Payload::from_text("line \"one\"\nünï");
        let (body, decoded) = encoded(ServerFrame::Delivery {
            id: MessageId(u64::MAX),
            payload: &payload,
            attempt: 3,
            details: None,
        });
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["type"], "message");
        assert_eq!(
            decoded,
            ReceivedFrame::Message(Message {
                id: MessageId(u64::MAX),
                payload: "line \"one\"\nünï".into(),
                attempt: 3,
                details: None,
            })
        );
    }

    /// A 1.1 delivery's details survive the client's decoding, and the decoded message
    /// serializes back to the frame the broker wrote (what `ferry consumer --json`
    /// prints).
    #[test]
    fn a_1_1_delivery_round_trips_with_its_details() {
        let payload = Payload::from_text("job");
        let record = DeadLetter {
            queue: crate::protocol::QueueName::new("jobs").unwrap(),
            reason: crate::protocol::DeadLetterReason::Rejected,
            attempts: 3,
            at_ms: 1_767_225_700_000,
        };
        for dead_letter in [None, Some(&record)] {
            let (body, decoded) = encoded(ServerFrame::Delivery {
                id: MessageId(42),
                payload: &payload,
                attempt: 2,
                details: Some(DeliveryDetails {
                    published_at: PublishedAtField::default().render(0, 1_767_225_600_123),
                    lease: &LeaseField::new(5000),
                    attributes: None,
                    dead_letter,
                }),
            });
            let ReceivedFrame::Message(message) = decoded else {
                panic!("{decoded:?}");
            };
            let details = message.details.clone().expect("1.1 details");
            assert_eq!(
                (
                    details.priority,
                    details.published_at,
                    details.ack_timeout_ms
                ),
                (0, 1_767_225_600_123, 5000)
            );
            assert_eq!(
                details
                    .dead_letter
                    .map(|r| (r.queue, r.reason, r.attempts, r.at)),
                dead_letter.map(|_| (
                    "jobs".to_owned(),
                    "rejected".to_owned(),
                    3,
                    1_767_225_700_000
                ))
            );
            let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(serde_json::to_value(&message).unwrap(), sent);
        }
    }

    #[test]
    fn decoding_ignores_field_order_and_unknown_fields_and_names_missing_ones() {
        let frame = ReceivedFrame::decode(
            br#"{"attempt":2,"extra":[1,{"a":null}],"payload":"p","id":9,"type":"message"}"#,
        )
        .unwrap();
        assert_eq!(
            frame,
            ReceivedFrame::Message(Message {
                id: MessageId(9),
                payload: "p".into(),
                attempt: 2,
                details: None,
            })
        );
        let missing = ReceivedFrame::decode(br#"{"type":"message","id":1,"payload":"x"}"#);
        assert!(missing.unwrap_err().to_string().contains("attempt"));
        assert!(ReceivedFrame::decode(br#"{"id":1}"#).is_err(), "no type");
        assert!(ReceivedFrame::decode(br#"{"type":"bogus"}"#).is_err());
        assert!(
            ReceivedFrame::decode(br#"{"type":"error","code":"no_such_code","message":"m"}"#)
                .is_err()
        );
    }

    #[test]
    fn errors_escape_their_message_and_carry_an_optional_id() {
        let (body, decoded) = encoded(ServerFrame::Error {
            code: ErrorCode::UnknownId,
            message: "id 7 is \"not\" in flight",
            id: Some(MessageId(7)),
        });
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["type"], "error");
        assert_eq!(value["code"], "unknown_id");
        assert_eq!(value["id"], 7);
        assert!(matches!(
            decoded,
            ReceivedFrame::Error(BrokerError {
                code: ErrorCode::UnknownId,
                id: Some(MessageId(7)),
                ..
            })
        ));

        let (body, _) = encoded(ServerFrame::Error {
            code: ErrorCode::InvalidFrame,
            message: "bad",
            id: None,
        });
        assert_eq!(
            body,
            br#"{"type":"error","code":"invalid_frame","message":"bad"}"#
        );
    }
}
