//! Frames a client sends: `register`, `publish` and `ack` (contract §2), and in version
//! 1.1 `nack`, `touch` and their new fields (§9).
//!
//! Clients encode them with [`ClientFrame`]. The broker decodes in two steps, because
//! which error a bad frame earns depends on the connection's state (contract §5): first
//! [`InboundFrame::parse`] finds the `type` and keeps every known field as raw JSON; then
//! the handler for that type validates only the fields it uses, so unknown fields and
//! fields of other types are ignored, as the contract requires.

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use thiserror::Error;

use super::canonical;
use super::codec::{write_frame, write_json_frame};
use super::payload::validate_json_string;
use std::time::Duration;

use super::{
    Attributes, DEFAULT_PREFETCH, Due, Headers, IDS_MAX, Ids, MessageId, PRIORITY_MAX,
    PUBLISH_BATCH_MAX, QueueName, Role, Version,
};

/// A frame as a client encodes it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientFrame<'a> {
    Register {
        role: Role,
        queue: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        prefetch: Option<u16>,
        #[serde(skip_serializing_if = "Option::is_none")]
        token: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        version: Option<&'a str>,
        /// A consumer's own lease (1.1).
        #[serde(skip_serializing_if = "Option::is_none")]
        ack_timeout_ms: Option<u64>,
    },
    Publish {
        payload: &'a str,
    },
    /// A publish with 1.1 fields.
    #[serde(rename = "publish")]
    PublishWith(PublishFields<'a>),
    /// Several publishes, all or none (1.1).
    #[serde(rename = "publish_batch")]
    PublishBatch {
        messages: Vec<PublishFields<'a>>,
    },
    Ack {
        id: MessageId,
    },
    Nack {
        id: MessageId,
        #[serde(skip_serializing_if = "Option::is_none")]
        delay_ms: Option<u64>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        dead_letter: bool,
    },
    Touch {
        id: MessageId,
        #[serde(skip_serializing_if = "Option::is_none")]
        ack_timeout_ms: Option<u64>,
    },
}

/// A publish's fields (1.1): a priority, headers, and at most one of the two delays.
#[derive(Debug, Clone, Serialize)]
pub struct PublishFields<'a> {
    pub payload: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<&'a Headers>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_before: Option<u64>,
}

impl ClientFrame<'_> {
    /// Appends this frame, length prefix included, to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            // The hot path of every producer, with or without a priority.
            ClientFrame::Publish { payload } => self.encode_publish(dst, payload, None),
            ClientFrame::PublishWith(PublishFields {
                payload,
                priority,
                headers: None,
                delay_ms: None,
                not_before: None,
            }) => self.encode_publish(dst, payload, *priority),
            // A consumer's hot frames: an ack, and a nack without options.
            ClientFrame::Ack { id }
            | ClientFrame::Nack {
                id,
                delay_ms: None,
                dead_letter: false,
            } => {
                let prefix = match self {
                    ClientFrame::Ack { .. } => canonical::ACK_PREFIX,
                    _ => canonical::NACK_PREFIX,
                };
                write_frame(dst, |body| {
                    body.put_slice(prefix);
                    body.put_slice(itoa::Buffer::new().format(id.0).as_bytes());
                    body.put_u8(b'}');
                })
            }
            frame => write_json_frame(dst, frame),
        }
    }
}

impl ClientFrame<'_> {
    /// A publish of `payload` and perhaps `priority`: a payload with nothing to escape is
    /// copied as is, byte for byte what serde_json would write (the canonical layout the
    /// broker reads without a JSON parser).
    fn encode_publish(&self, dst: &mut BytesMut, payload: &str, priority: Option<u8>) {
        if canonical::needs_json_escape(payload.as_bytes()) {
            return write_json_frame(dst, self);
        }
        write_frame(dst, |body| {
            body.reserve(payload.len() + 48);
            body.put_slice(canonical::PUBLISH_PREFIX);
            body.put_slice(payload.as_bytes());
            body.put_u8(b'"');
            if let Some(priority) = priority {
                body.put_slice(canonical::PRIORITY_FIELD);
                body.put_slice(itoa::Buffer::new().format(priority).as_bytes());
            }
            body.put_u8(b'}');
        })
    }
}

/// The `type` of a client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameType {
    Register,
    Publish,
    Ack,
    /// Version 1.1: an unknown type to a 1.0 connection.
    Nack,
    /// Version 1.1: an unknown type to a 1.0 connection.
    Touch,
    /// Version 1.1: an unknown type to a 1.0 connection.
    PublishBatch,
}

impl FrameType {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameType::Register => "register",
            FrameType::Publish => "publish",
            FrameType::Ack => "ack",
            FrameType::Nack => "nack",
            FrameType::Touch => "touch",
            FrameType::PublishBatch => "publish_batch",
        }
    }

    /// Whether only a version 1.1 connection has it.
    pub fn is_1_1(self) -> bool {
        matches!(
            self,
            FrameType::Nack | FrameType::Touch | FrameType::PublishBatch
        )
    }

    fn from_name(name: &str) -> Option<FrameType> {
        [
            FrameType::Register,
            FrameType::Publish,
            FrameType::Ack,
            FrameType::Nack,
            FrameType::Touch,
            FrameType::PublishBatch,
        ]
        .into_iter()
        .find(|t| t.as_str() == name)
    }
}

/// Why a frame body is not a usable client frame. The broker answers with
/// `invalid_frame` (or `not_registered` before registration) and this text as `message`.
#[derive(Debug, Error)]
pub enum InvalidFrame {
    #[error("frame body is not valid JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("frame body is JSON but not an object; send {{\"type\": ...}}")]
    NotObject,
    #[error(
        "frame has no string field `type`; expected register, publish, publish_batch, ack, nack or touch"
    )]
    MissingType,
    #[error(
        "unknown frame type `{0}`; expected register, publish, publish_batch, ack, nack or touch (case-sensitive; publish_batch, nack and touch need version 1.1)"
    )]
    UnknownType(String),
    /// One entry of a `publish_batch` is wrong: the whole batch is refused.
    #[error("entry {index} of `messages` (counting from 0): {source}")]
    InEntry {
        index: usize,
        #[source]
        source: Box<InvalidFrame>,
    },
    #[error("field `{field}` {problem}")]
    BadField {
        field: &'static str,
        problem: String,
    },
}

impl InvalidFrame {
    pub(crate) fn bad_field(field: &'static str, problem: impl Into<String>) -> Self {
        InvalidFrame::BadField {
            field,
            problem: problem.into(),
        }
    }
}

/// The fields of every client frame type, kept as raw JSON until the type is known.
#[derive(Deserialize)]
struct RawFields<'a> {
    #[serde(rename = "type", borrow)]
    frame_type: Option<&'a RawValue>,
    #[serde(borrow)]
    role: Option<&'a RawValue>,
    #[serde(borrow)]
    queue: Option<&'a RawValue>,
    #[serde(borrow)]
    prefetch: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<&'a RawValue>,
    #[serde(borrow)]
    version: Option<&'a RawValue>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    ids: Option<&'a RawValue>,
    #[serde(borrow)]
    delay_ms: Option<&'a RawValue>,
    #[serde(borrow)]
    not_before: Option<&'a RawValue>,
    #[serde(borrow)]
    dead_letter: Option<&'a RawValue>,
    #[serde(borrow)]
    ack_timeout_ms: Option<&'a RawValue>,
    #[serde(borrow)]
    priority: Option<&'a RawValue>,
    #[serde(borrow)]
    headers: Option<&'a RawValue>,
    #[serde(borrow)]
    dedup_key: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
}

impl RawFields<'_> {
    const NONE: RawFields<'static> = RawFields {
        frame_type: None,
        role: None,
        queue: None,
        prefetch: None,
        token: None,
        version: None,
        payload: None,
        id: None,
        ids: None,
        delay_ms: None,
        not_before: None,
        dead_letter: None,
        ack_timeout_ms: None,
        priority: None,
        headers: None,
        dedup_key: None,
        messages: None,
    };
}

/// A parsed client frame whose type-specific fields are not validated yet.
pub struct InboundFrame<'a> {
    frame_type: FrameType,
    fields: Fields<'a>,
}

enum Fields<'a> {
    /// A publish in the canonical layout: its payload literal, already validated, and
    /// its priority (0 in the layout without one).
    CanonicalPublish { literal: &'a [u8], priority: u8 },
    /// An ack or a nack (without options) in the canonical layout: its id.
    CanonicalAck(u64),
    /// Any other frame, its fields as raw JSON. Boxed: the hot frames (canonical publish
    /// and ack) are moved around by value, and a dozen raw fields would make every one of
    /// them a few hundred bytes to copy.
    Raw(Box<RawFields<'a>>),
}

/// A validated `register`.
#[derive(Clone, PartialEq, Eq)]
pub struct Register {
    pub role: Role,
    pub queue: QueueName,
    /// Consumers only; producers get the default, which nothing reads.
    pub prefetch: u16,
    pub token: Option<String>,
    /// The version asked for, if any (contract §8).
    pub version: Option<Version>,
    /// A consumer's own lease, `ack_timeout_ms` (1.1; the caller checks it against the
    /// queue's `max_lease`).
    pub lease: Option<Duration>,
}

/// What a `nack` asks (1.1, rule 12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NackFields {
    pub ids: Ids,
    /// `delay_ms`; the caller checks it against the queue's `max_delay`.
    pub delay: Option<Duration>,
    pub dead_letter: bool,
}

impl std::fmt::Debug for Register {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Register")
            .field("role", &self.role)
            .field("queue", &self.queue)
            .field("prefetch", &self.prefetch)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("version", &self.version)
            .field("lease", &self.lease)
            .finish()
    }
}

/// The entries of a `publish_batch`'s `messages`, as raw JSON, at most
/// [`PUBLISH_BATCH_MAX`].
struct BatchEntries<'a>(Vec<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for BatchEntries<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for EntriesVisitor<'a> {
            type Value = BatchEntries<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "an array of at most {PUBLISH_BATCH_MAX} entries")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = seq.next_element::<&'de RawValue>()? {
                    if entries.len() == PUBLISH_BATCH_MAX {
                        return Err(serde::de::Error::invalid_length(entries.len() + 1, &self));
                    }
                    entries.push(entry);
                }
                Ok(BatchEntries(entries))
            }
        }
        deserializer.deserialize_seq(EntriesVisitor(std::marker::PhantomData))
    }
}

/// Longest unknown `type` echoed back in an error message.
const ECHOED_TYPE_CHARS_MAX: usize = 64;

impl<'a> InboundFrame<'a> {
    /// Parses a frame body far enough to know its type.
    ///
    /// # Errors
    /// [`InvalidFrame`] when the body is not a JSON object with a known string `type`.
    pub fn parse(body: &'a [u8]) -> Result<Self, InvalidFrame> {
        if let Some((literal, priority)) = canonical::publish(body) {
            return Ok(InboundFrame {
                frame_type: FrameType::Publish,
                fields: Fields::CanonicalPublish { literal, priority },
            });
        }
        if let Some(id) = canonical::ack_id(body) {
            return Ok(InboundFrame {
                frame_type: FrameType::Ack,
                fields: Fields::CanonicalAck(id),
            });
        }
        if let Some(id) = canonical::nack_id(body) {
            return Ok(InboundFrame {
                frame_type: FrameType::Nack,
                fields: Fields::CanonicalAck(id),
            });
        }
        Self::parse_json(body)
    }

    /// The general (serde) path alone, without the canonical fast path: for the tests and
    /// fuzz targets that hold the fast path to it. Not for other use.
    #[doc(hidden)]
    pub fn parse_general(body: &'a [u8]) -> Result<Self, InvalidFrame> {
        Self::parse_json(body)
    }

    /// The general path: any JSON spelling of a frame.
    fn parse_json(body: &'a [u8]) -> Result<Self, InvalidFrame> {
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            // Report broken JSON as such; only valid non-objects are "not an object".
            return match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Ok(_) => Err(InvalidFrame::NotObject),
                Err(e) => Err(InvalidFrame::NotJson(e)),
            };
        }
        let fields: RawFields<'a> = serde_json::from_slice(body).map_err(InvalidFrame::NotJson)?;
        let raw_type = fields.frame_type.ok_or(InvalidFrame::MissingType)?;
        let frame_type = match raw_type.get() {
            // The common spellings need no unescaping.
            r#""register""# => FrameType::Register,
            r#""publish""# => FrameType::Publish,
            r#""ack""# => FrameType::Ack,
            other => {
                let name =
                    serde_json::from_str::<String>(other).map_err(|_| InvalidFrame::MissingType)?;
                FrameType::from_name(&name).ok_or_else(|| {
                    InvalidFrame::UnknownType(name.chars().take(ECHOED_TYPE_CHARS_MAX).collect())
                })?
            }
        };
        Ok(InboundFrame {
            frame_type,
            fields: Fields::Raw(Box::new(fields)),
        })
    }

    /// The raw fields; canonical frames have only the fields of their type, so for any
    /// other field they present an empty set, exactly as a parsed frame without it would.
    fn raw(&self) -> &RawFields<'a> {
        static NONE: RawFields<'static> = RawFields::NONE;
        match &self.fields {
            Fields::Raw(fields) => fields,
            Fields::CanonicalPublish { .. } | Fields::CanonicalAck(_) => &NONE,
        }
    }

    pub fn frame_type(&self) -> FrameType {
        self.frame_type
    }

    /// The fields of a `register`.
    ///
    /// # Errors
    /// [`InvalidFrame::BadField`] for a missing or unknown role, a bad queue name, a
    /// consumer's prefetch outside 1–65535, a token that is not a string, or a version
    /// that is not a string `"1.N"` or `"1"`.
    pub fn register(&self) -> Result<Register, InvalidFrame> {
        let role_text: String =
            parse_field("role", self.raw().role, "a string")?.ok_or_else(|| {
                InvalidFrame::bad_field("role", "is missing; use \"producer\" or \"consumer\"")
            })?;
        let role = match role_text.as_str() {
            "producer" => Role::Producer,
            "consumer" => Role::Consumer,
            other => {
                let echoed: String = other.chars().take(ECHOED_TYPE_CHARS_MAX).collect();
                return Err(InvalidFrame::bad_field(
                    "role",
                    format!("is `{echoed}`; use \"producer\" or \"consumer\""),
                ));
            }
        };
        let queue = match parse_field::<String>("queue", self.raw().queue, "a string")? {
            Some(name) => QueueName::new(&name)
                .map_err(|e| InvalidFrame::bad_field("queue", e.to_string()))?,
            None => QueueName::default_queue(),
        };
        let prefetch = match role {
            Role::Consumer => {
                const RANGE: &str = "an integer from 1 to 65535";
                match parse_field::<u64>("prefetch", self.raw().prefetch, RANGE)? {
                    Some(n) => u16::try_from(n).ok().filter(|&n| n > 0).ok_or_else(|| {
                        InvalidFrame::bad_field("prefetch", format!("must be {RANGE}"))
                    })?,
                    None => DEFAULT_PREFETCH,
                }
            }
            Role::Producer => DEFAULT_PREFETCH,
        };
        // Never echoed, whatever its type: a secret sent as a number is still a secret.
        let token = self
            .raw()
            .token
            .map(|raw| {
                serde_json::from_str(raw.get())
                    .map_err(|_| InvalidFrame::bad_field("token", "must be a string"))
            })
            .transpose()?;
        const VERSION: &str = "a string \"1.N\" (or \"1\")";
        let version = match parse_field::<String>("version", self.raw().version, VERSION)? {
            Some(text) => Some(Version::parse(&text).ok_or_else(|| {
                let echoed: String = text.chars().take(ECHOED_TYPE_CHARS_MAX).collect();
                InvalidFrame::bad_field("version", format!("is `{echoed}`; use {VERSION}"))
            })?),
            None => None,
        };
        // A 1.1 field: a register that speaks 1.0 ignores it, whatever its value.
        let speaks_1_1 = version.is_some_and(|v| v.negotiate() >= Version::V1_1);
        let lease = match role {
            Role::Consumer if speaks_1_1 => {
                self.positive_millis("ack_timeout_ms", self.raw().ack_timeout_ms)?
            }
            _ => None,
        };
        Ok(Register {
            role,
            queue,
            prefetch,
            token,
            version,
            lease,
        })
    }

    /// The payload of a `publish`, as the raw JSON string literal (quotes included).
    ///
    /// # Errors
    /// [`InvalidFrame::BadField`] when `payload` is missing or not a string.
    pub fn publish_payload(&self) -> Result<&'a [u8], InvalidFrame> {
        if let Fields::CanonicalPublish { literal, .. } = self.fields {
            return Ok(literal);
        }
        let raw = self.raw().payload.ok_or_else(|| {
            InvalidFrame::bad_field("payload", "is missing; publish needs a string payload")
        })?;
        let literal = raw.get();
        if !literal.starts_with('"') {
            let shown: String = literal.chars().take(ECHOED_TYPE_CHARS_MAX).collect();
            return Err(InvalidFrame::bad_field(
                "payload",
                format!("must be a string, not {shown}"),
            ));
        }
        // Capturing the raw value already checked the string's syntax, control characters
        // and UTF-8; only what escapes stand for (a lone surrogate, say) is left to check,
        // so the common payload without a backslash is not scanned a second time.
        if literal.as_bytes().contains(&b'\\') {
            let mut de = serde_json::Deserializer::from_str(literal);
            validate_json_string(&mut de).map_err(|e| {
                InvalidFrame::bad_field("payload", format!("must be a valid string ({e})"))
            })?;
        }
        Ok(literal.as_bytes())
    }

    /// The `id` of an `ack`.
    ///
    /// # Errors
    /// [`InvalidFrame::BadField`] when `id` is missing or not an unsigned 64-bit integer.
    pub fn ack_id(&self) -> Result<MessageId, InvalidFrame> {
        const EXPECTED: &str = "an unsigned 64-bit integer";
        if let Fields::CanonicalAck(id) = self.fields {
            return Ok(MessageId(id));
        }
        parse_field::<u64>("id", self.raw().id, EXPECTED)?
            .map(MessageId)
            .ok_or_else(|| {
                InvalidFrame::bad_field("id", format!("is missing; ack needs {EXPECTED}"))
            })
    }
}

impl<'a> InboundFrame<'a> {
    /// The messages an `ack`, `nack` or `touch` names: exactly one of `id` and `ids`
    /// (1.1); a 1.0 connection passes `version_1_1 = false`, and `ids` is ignored.
    ///
    /// # Errors
    /// [`InvalidFrame::BadField`] for both or neither, an empty or overlong array, or an
    /// id that is not an unsigned 64-bit integer.
    pub fn target_ids(&self, version_1_1: bool) -> Result<Ids, InvalidFrame> {
        if !version_1_1 {
            return self.ack_id().map(Ids::One);
        }
        const EXPECTED: &str = "an array of 1 to 65535 unsigned 64-bit integers";
        let raw = self.raw();
        match (raw.id, raw.ids) {
            (Some(_), Some(_)) => Err(InvalidFrame::bad_field(
                "ids",
                "comes with `id`; send one of them",
            )),
            (None, Some(ids)) => {
                let ids: Vec<MessageId> =
                    parse_field("ids", Some(ids), EXPECTED)?.unwrap_or_default();
                if ids.is_empty() || ids.len() > IDS_MAX {
                    return Err(InvalidFrame::bad_field(
                        "ids",
                        format!("has {} ids; send {EXPECTED}", ids.len()),
                    ));
                }
                Ok(Ids::Many(ids.into_boxed_slice()))
            }
            _ => self.ack_id().map(Ids::One),
        }
    }

    /// The entries of a `publish_batch` (1.1), each a publish without its `type`, for
    /// the caller to check one by one.
    ///
    /// # Errors
    /// [`InvalidFrame::BadField`] when `messages` is not an array of 1 to
    /// [`PUBLISH_BATCH_MAX`] entries; [`InvalidFrame::InEntry`] for an entry that is not
    /// a JSON object.
    pub fn publish_batch_entries(&self) -> Result<Vec<InboundFrame<'a>>, InvalidFrame> {
        let expected = format!("an array of 1 to {PUBLISH_BATCH_MAX} publishes");
        let Some(raw) = self.raw().messages else {
            return Err(InvalidFrame::bad_field(
                "messages",
                format!("is missing; send {expected}"),
            ));
        };
        // Borrowed, each entry as its raw text; a long array is refused as it is read.
        let entries: BatchEntries<'a> = serde_json::from_str(raw.get()).map_err(|_| {
            let shown: String = raw.get().chars().take(ECHOED_TYPE_CHARS_MAX).collect();
            InvalidFrame::bad_field("messages", format!("must be {expected}, not {shown}"))
        })?;
        if entries.0.is_empty() {
            return Err(InvalidFrame::bad_field(
                "messages",
                format!("is empty; send {expected}"),
            ));
        }
        entries
            .0
            .into_iter()
            .enumerate()
            .map(|(index, entry)| {
                let in_entry = |source| InvalidFrame::InEntry {
                    index,
                    source: Box::new(source),
                };
                if !entry.get().starts_with('{') {
                    return Err(in_entry(InvalidFrame::NotObject));
                }
                let fields: RawFields<'a> = serde_json::from_str(entry.get())
                    .map_err(|e| in_entry(InvalidFrame::NotJson(e)))?;
                Ok(InboundFrame {
                    frame_type: FrameType::Publish,
                    fields: Fields::Raw(Box::new(fields)),
                })
            })
            .collect()
    }

    /// The priority of a publish in a canonical layout (a payload, and perhaps a
    /// priority already checked): no other 1.1 field to check.
    pub fn canonical_publish_priority(&self) -> Option<u8> {
        match self.fields {
            Fields::CanonicalPublish { priority, .. } => Some(priority),
            _ => None,
        }
    }

    /// When a `publish` may be delivered (1.1): `delay_ms` or `not_before`, at most one.
    /// The caller checks it against the queue's `max_delay`.
    ///
    /// # Errors
    /// [`InvalidFrame::BadField`] for both, or a value that is not an unsigned integer.
    pub fn publish_due(&self) -> Result<Due, InvalidFrame> {
        const EXPECTED: &str = "an unsigned integer (milliseconds)";
        let raw = self.raw();
        let delay = parse_field::<u64>("delay_ms", raw.delay_ms, EXPECTED)?;
        let not_before = parse_field::<u64>("not_before", raw.not_before, EXPECTED)?;
        match (delay, not_before) {
            (Some(_), Some(_)) => Err(InvalidFrame::bad_field(
                "not_before",
                "comes with `delay_ms`; send at most one of them",
            )),
            (Some(0), None) | (None, None) => Ok(Due::Now),
            (Some(delay), None) => Ok(Due::After(Duration::from_millis(delay))),
            (None, Some(at)) => Ok(Due::At(at)),
        }
    }

    /// What a publish attaches to its message (1.1): its `headers`; `None` when it
    /// attaches nothing. A `dedup_key` is refused: this build does not serve dedup yet,
    /// and ignoring one would enqueue the duplicates the client means to prevent.
    ///
    /// # Errors
    /// [`InvalidFrame::BadField`] naming the field and what is wrong with it.
    pub fn publish_attributes(&self) -> Result<Option<Attributes>, InvalidFrame> {
        let raw = self.raw();
        if raw.dedup_key.is_some() {
            return Err(InvalidFrame::bad_field(
                "dedup_key",
                "is not served by this build yet (dedup keys come with the rest of protocol 1.1); leave it out",
            ));
        }
        let Some(headers) = raw.headers else {
            return Ok(None);
        };
        let headers = Headers::from_json(headers.get())
            .map_err(|problem| InvalidFrame::bad_field("headers", problem))?;
        Ok(headers.map(|headers| Attributes { headers }))
    }

    /// A publish's `priority` (1.1, rule 10): 0 to 9, 0 when absent.
    ///
    /// # Errors
    /// [`InvalidFrame::BadField`] for anything else.
    pub fn publish_priority(&self) -> Result<u8, InvalidFrame> {
        const EXPECTED: &str = "an integer from 0 to 9";
        if let Some(priority) = self.canonical_publish_priority() {
            return Ok(priority);
        }
        match parse_field::<u64>("priority", self.raw().priority, EXPECTED)? {
            None => Ok(0),
            Some(priority) if priority <= u64::from(PRIORITY_MAX) => Ok(priority as u8),
            Some(other) => Err(InvalidFrame::bad_field(
                "priority",
                format!("is {other}; use {EXPECTED}"),
            )),
        }
    }

    /// The fields of a `nack` (1.1).
    ///
    /// # Errors
    /// [`InvalidFrame::BadField`] for bad ids, a `delay_ms` that is not an unsigned
    /// integer, a `dead_letter` that is not a boolean, or both a delay and
    /// `"dead_letter":true`.
    pub fn nack(&self) -> Result<NackFields, InvalidFrame> {
        let ids = self.target_ids(true)?;
        let raw = self.raw();
        let delay = parse_field::<u64>(
            "delay_ms",
            raw.delay_ms,
            "an unsigned integer (milliseconds)",
        )?
        .map(Duration::from_millis);
        let dead_letter =
            parse_field::<bool>("dead_letter", raw.dead_letter, "true or false")?.unwrap_or(false);
        if dead_letter && delay.is_some() {
            return Err(InvalidFrame::bad_field(
                "delay_ms",
                "comes with \"dead_letter\":true; a dead letter is not retried, so it has no delay",
            ));
        }
        Ok(NackFields {
            ids,
            delay,
            dead_letter,
        })
    }

    /// The fields of a `touch` (1.1): its ids, and its `ack_timeout_ms` if any. The caller
    /// checks that against the queue's `max_lease`.
    ///
    /// # Errors
    /// [`InvalidFrame::BadField`] for bad ids or an `ack_timeout_ms` that is not a
    /// positive integer.
    pub fn touch(&self) -> Result<(Ids, Option<Duration>), InvalidFrame> {
        let ids = self.target_ids(true)?;
        let lease = self.positive_millis("ack_timeout_ms", self.raw().ack_timeout_ms)?;
        Ok((ids, lease))
    }

    /// An optional field of milliseconds that must be at least 1.
    fn positive_millis(
        &self,
        name: &'static str,
        raw: Option<&RawValue>,
    ) -> Result<Option<Duration>, InvalidFrame> {
        const EXPECTED: &str = "a positive integer (milliseconds)";
        match parse_field::<u64>(name, raw, EXPECTED)? {
            Some(0) => Err(InvalidFrame::bad_field(
                name,
                format!("is 0; use {EXPECTED}"),
            )),
            millis => Ok(millis.map(Duration::from_millis)),
        }
    }
}

/// Parses an optional raw field; absent (or `null`) is `None`.
fn parse_field<T: serde::de::DeserializeOwned>(
    name: &'static str,
    raw: Option<&RawValue>,
    expected: &str,
) -> Result<Option<T>, InvalidFrame> {
    raw.map(|raw| {
        serde_json::from_str(raw.get()).map_err(|_| {
            let shown: String = raw.get().chars().take(ECHOED_TYPE_CHARS_MAX).collect();
            InvalidFrame::bad_field(name, format!("must be {expected}, not {shown}"))
        })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<InboundFrame<'_>, InvalidFrame> {
        InboundFrame::parse(json.as_bytes())
    }

    #[test]
    fn client_frames_encode_as_the_contract_shows() {
        let register = ClientFrame::Register {
            role: Role::Consumer,
            queue: "orders",
            prefetch: Some(100),
            token: Some("s3cret"),
            version: None,
            ack_timeout_ms: None,
        };
        assert_eq!(
            serde_json::to_string(&register).unwrap(),
            r#"{"type":"register","role":"consumer","queue":"orders","prefetch":100,"token":"s3cret"}"#
        );
        let publish = ClientFrame::Publish { payload: "a \"b\"" };
        assert_eq!(
            serde_json::to_string(&publish).unwrap(),
            r#"{"type":"publish","payload":"a \"b\""}"#
        );
        let ack = ClientFrame::Ack { id: MessageId(42) };
        assert_eq!(
            serde_json::to_string(&ack).unwrap(),
            r#"{"type":"ack","id":42}"#
        );
    }

    #[test]
    fn the_publish_fast_path_writes_exactly_what_serde_json_writes() {
        for payload in [
            "",
            "plain text",
            "ünïcødé ✓",
            "quote \"",
            "back\\slash",
            "tab\t",
            "\u{1}",
            "\u{7f}",
        ] {
            let prioritized = |priority| {
                ClientFrame::PublishWith(PublishFields {
                    payload,
                    priority,
                    headers: None,
                    delay_ms: None,
                    not_before: None,
                })
            };
            for frame in [
                ClientFrame::Publish { payload },
                prioritized(None),
                prioritized(Some(0)),
                prioritized(Some(9)),
                prioritized(Some(200)),
            ] {
                let mut fast = BytesMut::new();
                frame.encode(&mut fast);
                let mut general = BytesMut::new();
                write_json_frame(&mut general, &frame);
                assert_eq!(fast, general, "{frame:?}");
            }
        }
    }

    #[test]
    fn the_ack_and_nack_fast_paths_write_exactly_what_serde_json_writes() {
        for id in [0, 7, u64::MAX].map(MessageId) {
            for frame in [
                ClientFrame::Ack { id },
                ClientFrame::Nack {
                    id,
                    delay_ms: None,
                    dead_letter: false,
                },
            ] {
                let mut fast = BytesMut::new();
                frame.encode(&mut fast);
                let mut general = BytesMut::new();
                write_json_frame(&mut general, &frame);
                assert_eq!(fast, general, "{frame:?}");
                let parsed = InboundFrame::parse(&fast[4..]).unwrap();
                assert_eq!(parsed.target_ids(true).unwrap(), Ids::One(id));
            }
        }
    }

    #[test]
    fn every_client_frame_round_trips_through_the_broker_parser() {
        let register = ClientFrame::Register {
            role: Role::Consumer,
            queue: "q.1",
            prefetch: Some(7),
            token: None,
            version: Some("1.1"),
            ack_timeout_ms: Some(60_000),
        };
        let json = serde_json::to_vec(&register).unwrap();
        let parsed = InboundFrame::parse(&json).unwrap().register().unwrap();
        assert_eq!(parsed.role, Role::Consumer);
        assert_eq!(parsed.queue.as_str(), "q.1");
        assert_eq!(parsed.prefetch, 7);
        assert_eq!(parsed.version, Version::parse("1.1"));
        assert_eq!(parsed.lease, Some(Duration::from_secs(60)));

        let json = serde_json::to_vec(&ClientFrame::Publish { payload: "ünï\n" }).unwrap();
        let frame = InboundFrame::parse(&json).unwrap();
        assert_eq!(frame.frame_type(), FrameType::Publish);
        assert_eq!(frame.publish_payload().unwrap(), r#""ünï\n""#.as_bytes());

        let json = serde_json::to_vec(&ClientFrame::Ack {
            id: MessageId(u64::MAX),
        })
        .unwrap();
        assert_eq!(
            InboundFrame::parse(&json).unwrap().ack_id().unwrap(),
            MessageId(u64::MAX)
        );
    }

    #[test]
    fn register_defaults_and_ignores_unknown_fields() {
        let reg = parse(r#"{"type":"register","role":"consumer","extra":[1,{"x":2}]}"#)
            .unwrap()
            .register()
            .unwrap();
        assert_eq!(reg.queue.as_str(), "default");
        assert_eq!(reg.prefetch, DEFAULT_PREFETCH);
        assert_eq!(reg.token, None);
        // A producer's prefetch is not its business, whatever its type.
        let reg = parse(r#"{"type":"register","role":"producer","prefetch":"lots"}"#)
            .unwrap()
            .register()
            .unwrap();
        assert_eq!(reg.role, Role::Producer);
    }

    #[test]
    fn fields_of_other_frame_types_are_ignored() {
        let frame = parse(r#"{"type":"ack","id":3,"payload":7,"role":1}"#).unwrap();
        assert_eq!(frame.ack_id().unwrap(), MessageId(3));
        let frame = parse(r#"{"payload":"x","id":"nope","type":"publish"}"#).unwrap();
        assert_eq!(frame.publish_payload().unwrap(), br#""x""#);
    }

    #[test]
    fn escaped_type_names_are_understood() {
        let frame = parse(r#"{"type":"pub\u006cish","payload":""}"#).unwrap();
        assert_eq!(frame.frame_type(), FrameType::Publish);
    }

    #[test]
    fn bodies_that_are_not_client_frames() {
        assert!(matches!(parse("not json"), Err(InvalidFrame::NotJson(_))));
        assert!(matches!(parse("{\"type\":"), Err(InvalidFrame::NotJson(_))));
        assert!(matches!(parse("[1,2]"), Err(InvalidFrame::NotObject)));
        assert!(matches!(
            parse("\"register\""),
            Err(InvalidFrame::NotObject)
        ));
        assert!(matches!(parse("42"), Err(InvalidFrame::NotObject)));
        assert!(matches!(parse("{}"), Err(InvalidFrame::MissingType)));
        assert!(matches!(
            parse(r#"{"type":5}"#),
            Err(InvalidFrame::MissingType)
        ));
        assert!(
            matches!(parse(r#"{"type":"Publish"}"#), Err(InvalidFrame::UnknownType(t)) if t == "Publish")
        );
        assert!(matches!(
            parse(r#"{"type":"ack"} {}"#),
            Err(InvalidFrame::NotJson(_))
        ));
        assert!(matches!(
            parse(r#"{"type":"ack","type":"ack"}"#),
            Err(InvalidFrame::NotJson(_))
        ));
        let mut invalid_utf8 = br#"{"type":"publish","payload":""#.to_vec();
        invalid_utf8.extend_from_slice(&[0xff, b'"', b'}']);
        assert!(matches!(
            InboundFrame::parse(&invalid_utf8),
            Err(InvalidFrame::NotJson(_))
        ));
    }

    #[test]
    fn bad_fields_name_the_field() {
        let field_of =
            |json: &str, check: fn(&InboundFrame<'_>) -> Result<(), InvalidFrame>| match check(
                &parse(json).unwrap(),
            ) {
                Err(InvalidFrame::BadField { field, .. }) => field,
                other => panic!("{json}: expected a bad field, got {other:?}"),
            };
        let register = |f: &InboundFrame<'_>| f.register().map(|_| ());
        let publish = |f: &InboundFrame<'_>| f.publish_payload().map(|_| ());
        let ack = |f: &InboundFrame<'_>| f.ack_id().map(|_| ());

        assert_eq!(field_of(r#"{"type":"register"}"#, register), "role");
        assert_eq!(
            field_of(r#"{"type":"register","role":"admin"}"#, register),
            "role"
        );
        assert_eq!(
            field_of(r#"{"type":"register","role":7}"#, register),
            "role"
        );
        assert_eq!(
            field_of(
                r#"{"type":"register","role":"producer","queue":"a b"}"#,
                register
            ),
            "queue"
        );
        assert_eq!(
            field_of(
                r#"{"type":"register","role":"producer","queue":""}"#,
                register
            ),
            "queue"
        );
        assert_eq!(
            field_of(
                r#"{"type":"register","role":"producer","queue":1}"#,
                register
            ),
            "queue"
        );
        for prefetch in ["0", "65536", "-1", "1.5", "\"10\"", "true"] {
            let json = format!(r#"{{"type":"register","role":"consumer","prefetch":{prefetch}}}"#);
            assert_eq!(field_of(&json, register), "prefetch", "{json}");
        }
        assert_eq!(
            field_of(
                r#"{"type":"register","role":"consumer","token":1}"#,
                register
            ),
            "token"
        );
        assert_eq!(field_of(r#"{"type":"publish"}"#, publish), "payload");
        assert_eq!(
            field_of(r#"{"type":"publish","payload":42}"#, publish),
            "payload"
        );
        assert_eq!(
            field_of(r#"{"type":"publish","payload":{"a":1}}"#, publish),
            "payload"
        );
        assert_eq!(
            field_of(r#"{"type":"publish","payload":"\ud800"}"#, publish),
            "payload"
        );
        for id in ["-1", "1.5", "\"42\"", "18446744073709551616", "[]"] {
            let json = format!(r#"{{"type":"ack","id":{id}}}"#);
            assert_eq!(field_of(&json, ack), "id", "{json}");
        }
        assert_eq!(field_of(r#"{"type":"ack"}"#, ack), "id");
    }

    #[test]
    fn prefetch_bounds_are_inclusive() {
        for (prefetch, expected) in [(1, 1), (65535, 65535)] {
            let json = format!(r#"{{"type":"register","role":"consumer","prefetch":{prefetch}}}"#);
            assert_eq!(parse(&json).unwrap().register().unwrap().prefetch, expected);
        }
    }
}
