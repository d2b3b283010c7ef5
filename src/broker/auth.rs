//! Who may register: the `--auth-file` grants, or an open broker without one.
//!
//! The file is TOML, a list of grants, each a token, the roles it may take and the queues
//! it may use (exact names, or a prefix ending in `*`):
//! ```toml
//! [[grant]]
//! token = "a-long-random-secret"
//! roles = ["producer"]
//! queues = ["orders", "billing.*"]
//! ```
//! Tokens are never logged or echoed. A grant keeps only its token's SHA-256 digest, and
//! a presented token is digested once and compared with every grant's digest in constant
//! time: comparing the tokens themselves would take a time that depends on their lengths
//! (subtle's slice comparison returns early when they differ), telling an attacker how
//! long a grant's token is.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use subtle::ConstantTimeEq;
use thiserror::Error;
use toml::Spanned;

use super::queue_pattern::QueuePattern;
use crate::protocol::{QueueName, Role};

/// Whether a register is allowed.
#[derive(Debug, Clone, Default)]
pub enum Access {
    /// No authentication: every register is allowed, with or without a token.
    #[default]
    Open,
    /// Only registers whose token grants the role and queue.
    Grants(Vec<Grant>),
}

/// One `[[grant]]` of the auth file.
#[derive(Clone)]
pub struct Grant {
    token_digest: TokenDigest,
    roles: Vec<Role>,
    queues: Vec<QueuePattern>,
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grant")
            .field("token_digest", &"<redacted>")
            .field("roles", &self.roles)
            .field("queues", &self.queues)
            .finish()
    }
}

/// Longest token a grant may have: a register carrying it must fit the 8 KiB a first
/// frame may take.
pub const TOKEN_BYTES_MAX: usize = 1024;

/// The SHA-256 digest of a token: what grants keep and compare, in constant time.
type TokenDigest = [u8; 32];

fn token_digest(token: &str) -> TokenDigest {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest
        .as_ref()
        .try_into()
        .expect("a SHA-256 digest is 32 bytes")
}

/// Why a register was refused. The texts never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Denied {
    #[error("this broker requires a token; register with \"token\"")]
    MissingToken,
    #[error("the token is not valid for this broker")]
    UnknownToken,
    #[error("the token does not grant the {role} role on queue `{queue}`")]
    NotGranted { role: Role, queue: QueueName },
}

/// Why the auth file cannot be used. The broker refuses to start on any of these.
#[derive(Debug, Error)]
pub enum AuthFileError {
    #[error("cannot read auth file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("auth file {path}, line {line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    grant: Vec<Spanned<RawGrant>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    token: Spanned<String>,
    roles: Vec<Spanned<String>>,
    queues: Vec<Spanned<String>>,
}

impl Access {
    /// Loads grants from the TOML file at `path`.
    ///
    /// # Errors
    /// [`AuthFileError`] when the file cannot be read, is not valid TOML of this shape,
    /// holds no grant, or holds an empty token, an unknown role or a bad queue pattern;
    /// the error names the line.
    pub fn load(path: &Path) -> Result<Access, AuthFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|(span, message)| AuthFileError::Invalid {
            path: path.to_owned(),
            line: line_of(&text, span.start),
            message,
        })
    }

    fn parse(text: &str) -> Result<Access, (Range<usize>, String)> {
        let file: AuthFile =
            toml::from_str(text).map_err(|e| (e.span().unwrap_or(0..0), e.message().to_owned()))?;
        if file.grant.is_empty() {
            return Err((
                0..0,
                "no [[grant]] entries; an auth file must grant something".into(),
            ));
        }
        let mut grants = Vec::with_capacity(file.grant.len());
        for raw in file.grant {
            let span = raw.span();
            let raw = raw.into_inner();
            if raw.token.get_ref().is_empty() {
                return Err((raw.token.span(), "token is empty".into()));
            }
            let token_bytes = raw.token.get_ref().len();
            if token_bytes > TOKEN_BYTES_MAX {
                return Err((
                    raw.token.span(),
                    format!(
                        "token is {token_bytes} bytes; use at most {TOKEN_BYTES_MAX} (a register, token included, must fit a first frame)"
                    ),
                ));
            }
            if raw.roles.is_empty() {
                return Err((
                    span,
                    "roles is empty; use \"producer\", \"consumer\" or both".into(),
                ));
            }
            if raw.queues.is_empty() {
                return Err((
                    span,
                    "queues is empty; name queues, or use \"*\" for all".into(),
                ));
            }
            let roles = raw
                .roles
                .iter()
                .map(|role| match role.get_ref().as_str() {
                    "producer" => Ok(Role::Producer),
                    "consumer" => Ok(Role::Consumer),
                    other => Err((
                        role.span(),
                        format!("unknown role `{other}`; use \"producer\" or \"consumer\""),
                    )),
                })
                .collect::<Result<_, _>>()?;
            let queues = raw
                .queues
                .iter()
                .map(|pattern| {
                    QueuePattern::parse(pattern.get_ref()).map_err(|m| (pattern.span(), m))
                })
                .collect::<Result<_, _>>()?;
            grants.push(Grant {
                token_digest: token_digest(raw.token.get_ref()),
                roles,
                queues,
            });
        }
        Ok(Access::Grants(grants))
    }

    pub fn is_open(&self) -> bool {
        matches!(self, Access::Open)
    }

    /// Decides a register.
    ///
    /// # Errors
    /// [`Denied`] when grants are in force and none with this token covers `role` on
    /// `queue`.
    pub fn check(&self, token: Option<&str>, role: Role, queue: &QueueName) -> Result<(), Denied> {
        let Access::Grants(grants) = self else {
            return Ok(());
        };
        let presented = token_digest(token.ok_or(Denied::MissingToken)?);
        // Compare against every grant, so the time taken does not tell which matched.
        let mut known = false;
        let mut granted = false;
        for grant in grants {
            let same = bool::from(grant.token_digest.ct_eq(&presented));
            known |= same;
            granted |= same
                && grant.roles.contains(&role)
                && grant.queues.iter().any(|p| p.matches(queue));
        }
        match (known, granted) {
            (_, true) => Ok(()),
            (true, false) => Err(Denied::NotGranted {
                role,
                queue: queue.clone(),
            }),
            (false, _) => Err(Denied::UnknownToken),
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// True when the file's permissions let users other than its owner read it.
pub fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o044 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[grant]]
token = "producer-secret"
roles = ["producer"]
queues = ["orders", "billing.*"]

[[grant]]
token = "consumer-secret"
roles = ["consumer", "producer"]
queues = ["*"]
"#;

    fn q(name: &str) -> QueueName {
        QueueName::new(name).unwrap()
    }

    #[test]
    fn grants_cover_their_roles_and_queues_only() {
        let access = Access::parse(FILE).unwrap();
        let p = Some("producer-secret");
        assert_eq!(access.check(p, Role::Producer, &q("orders")), Ok(()));
        assert_eq!(access.check(p, Role::Producer, &q("billing.eu")), Ok(()));
        assert_eq!(
            access.check(p, Role::Producer, &q("orders2")),
            Err(Denied::NotGranted {
                role: Role::Producer,
                queue: q("orders2")
            })
        );
        assert!(matches!(
            access.check(p, Role::Consumer, &q("orders")),
            Err(Denied::NotGranted { .. })
        ));
        assert_eq!(
            access.check(Some("consumer-secret"), Role::Consumer, &q("anything")),
            Ok(())
        );
        assert_eq!(
            access.check(None, Role::Consumer, &q("orders")),
            Err(Denied::MissingToken)
        );
        assert_eq!(
            access.check(Some("producer-secre"), Role::Producer, &q("orders")),
            Err(Denied::UnknownToken)
        );
        assert_eq!(
            access.check(Some(""), Role::Producer, &q("orders")),
            Err(Denied::UnknownToken)
        );
    }

    #[test]
    fn an_open_broker_takes_anyone() {
        assert_eq!(Access::Open.check(None, Role::Consumer, &q("x")), Ok(()));
        assert_eq!(
            Access::Open.check(Some("whatever"), Role::Producer, &q("x")),
            Ok(())
        );
    }

    #[test]
    fn malformed_files_name_the_line() {
        let line_of_error = |text: &str| {
            let (span, message) = Access::parse(text).map(|_| ()).unwrap_err();
            (line_of(text, span.start), message)
        };
        let bad_role = "[[grant]]\ntoken = \"t\"\nroles = [\"admin\"]\nqueues = [\"q\"]\n";
        let (line, message) = line_of_error(bad_role);
        assert_eq!(line, 3);
        assert!(message.contains("unknown role `admin`"), "{message}");

        let bad_queue =
            "[[grant]]\ntoken = \"t\"\nroles = [\"producer\"]\nqueues = [\"ok\",\n \"a b\"]\n";
        let (line, message) = line_of_error(bad_queue);
        assert_eq!(line, 5);
        assert!(message.contains("has a space"), "{message}");

        let (line, message) =
            line_of_error("[[grant]]\ntoken = \"\"\nroles = [\"producer\"]\nqueues = [\"q\"]\n");
        assert_eq!((line, message.as_str()), (2, "token is empty"));

        let long = format!(
            "[[grant]]\ntoken = \"{}\"\nroles = [\"producer\"]\nqueues = [\"q\"]\n",
            "t".repeat(TOKEN_BYTES_MAX + 1)
        );
        let (line, message) = line_of_error(&long);
        assert_eq!(line, 2);
        assert!(message.contains("at most 1024"), "{message}");

        let (line, _) = line_of_error(
            "[[grant]]\ntoken = \"t\"\nroles = [\"producer\"]\nqueues = [\"q\"]\ncolour = 1\n",
        );
        assert_eq!(line, 5, "unknown keys are refused");

        let (line, _) = line_of_error("[[grant]]\ntoken = 'x'\nroles = [\"producer\"\n");
        assert!(line >= 3, "TOML syntax errors carry their line");

        assert!(
            Access::parse("").is_err(),
            "a file without grants locks everyone out by mistake"
        );
    }

    #[test]
    fn grants_keep_and_compare_fixed_length_digests_only() {
        let access = Access::parse(FILE).unwrap();
        let Access::Grants(grants) = &access else {
            panic!("grants expected")
        };
        assert_eq!(grants[0].token_digest, token_digest("producer-secret"));
        // Tokens of other lengths than a grant's, longer and shorter, are compared as
        // digests of one fixed length: refused the same way as one of the same length.
        for wrong in ["p", "producer-secreX", "producer-secret-and-more"] {
            assert_eq!(
                access.check(Some(wrong), Role::Producer, &q("orders")),
                Err(Denied::UnknownToken),
                "{wrong}"
            );
        }
    }

    #[test]
    fn debug_output_never_shows_a_token() {
        let access = Access::parse(FILE).unwrap();
        let shown = format!("{access:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn load_reports_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.toml");
        let err = Access::load(&path).unwrap_err();
        assert!(err.to_string().contains("auth.toml"), "{err}");
        std::fs::write(
            &path,
            "[[grant]]\ntoken = \"t\"\nroles = []\nqueues = [\"q\"]\n",
        )
        .unwrap();
        let err = Access::load(&path).unwrap_err();
        assert!(
            err.to_string().contains("line 1") && err.to_string().contains("roles is empty"),
            "{err}"
        );
    }
}
