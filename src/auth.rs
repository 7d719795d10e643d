//! Bearer tokens with scopes, read from a file that is re-read when it
//! changes. Checking a token costs the same whatever it is: every known token
//! is compared, in constant time, against the SHA-256 of the one presented.
//!
//! File format, one token per line: `TOKEN SCOPE[,SCOPE...]`; a `#` at the
//! start of a line or after a space or tab starts a comment; blank lines are
//! ignored. A `#` anywhere else (inside a token or a scope list) makes the file
//! invalid: a token is never silently cut short. A token listed without
//! scopes authenticates but is allowed nothing.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Inference and the read-only RPCs (service info, health, monitoring).
    Infer,
    /// Training forwards and backwards.
    Train,
    /// Loading and unloading models (the repository extension).
    Repository,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Infer => "infer",
            Scope::Train => "train",
            Scope::Repository => "repository",
        }
    }

    fn parse(s: &str) -> Option<Scope> {
        match s {
            "infer" => Some(Scope::Infer),
            "train" => Some(Scope::Train),
            "repository" => Some(Scope::Repository),
            _ => None,
        }
    }
}

/// The scopes of the token a request carried, put into its extensions by the
/// authentication layer. Absent when authentication is off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Granted {
    pub infer: bool,
    pub train: bool,
    pub repository: bool,
    /// Who the token is, for state bound to a caller (KV sessions): the first
    /// 8 bytes of the token's SHA-256, never the token itself.
    pub identity: u64,
}

impl Granted {
    pub fn allows(self, scope: Scope) -> bool {
        match scope {
            Scope::Infer => self.infer,
            Scope::Train => self.train,
            Scope::Repository => self.repository,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("--auth-token-file {path}: {message}")]
    File { path: String, message: String },
}

/// Never printed with its digest; Debug shows the scopes only.
#[derive(Clone)]
struct Entry {
    digest: [u8; 32],
    granted: Granted,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `authorization: Bearer` header.
    Missing,
    /// A token this server does not know.
    Unknown,
}

/// The tokens in force; swapped whole when the file changes.
pub struct Tokens {
    path: PathBuf,
    current: RwLock<(Arc<Vec<Entry>>, [u8; 32])>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("granted", &self.granted)
            .finish_non_exhaustive()
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Parses the token file's text. Errors name the line, never the token.
fn parse(text: &str) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = strip_comment(line).trim();
        if line.is_empty() {
            continue;
        }
        if line.contains('#') {
            return Err(format!(
                "line {}: '#' inside a token or a scope list; a comment starts with '#' at the \
                 start of a line or after a space, and a token may not contain '#'",
                n + 1
            ));
        }
        let mut parts = line.split_whitespace();
        let token = parts.next().unwrap_or_default();
        if token.len() < 16 {
            return Err(format!(
                "line {}: a token must be at least 16 characters",
                n + 1
            ));
        }
        let mut granted = Granted::default();
        for scope in parts.flat_map(|p| p.split(',')).filter(|s| !s.is_empty()) {
            match Scope::parse(scope) {
                Some(Scope::Infer) => granted.infer = true,
                Some(Scope::Train) => granted.train = true,
                Some(Scope::Repository) => granted.repository = true,
                None => {
                    return Err(format!(
                        "line {}: unknown scope {:?} (known: infer, train, repository)",
                        n + 1,
                        crate::codec::clip(scope)
                    ));
                }
            }
        }
        let digest = digest(token.as_bytes());
        granted.identity = u64::from_le_bytes([
            digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
        ]);
        entries.push(Entry { digest, granted });
    }
    Ok(entries)
}

/// The line before its comment: from a `#` at the start or after whitespace.
fn strip_comment(line: &str) -> &str {
    let mut prev_blank = true;
    for (i, c) in line.char_indices() {
        if c == '#' && prev_blank {
            return &line[..i];
        }
        prev_blank = c.is_whitespace();
    }
    line
}

fn load(path: &Path) -> Result<(Vec<Entry>, [u8; 32]), AuthError> {
    let err = |message: String| AuthError::File {
        path: path.display().to_string(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let text = String::from_utf8(bytes).map_err(|_| err("not UTF-8 text".into()))?;
    let entries = parse(&text).map_err(err)?;
    Ok((entries, digest(text.as_bytes())))
}

impl Tokens {
    /// Reads the file; a failure here is a configuration error.
    pub fn load(path: PathBuf) -> Result<Arc<Tokens>, AuthError> {
        let (entries, file_digest) = load(&path)?;
        if entries.is_empty() {
            tracing::warn!(path = %path.display(), "the token file lists no token: every RPC but health is refused");
        }
        Ok(Arc::new(Tokens {
            path,
            current: RwLock::new((Arc::new(entries), file_digest)),
        }))
    }

    /// The scopes of a request's `authorization` header value.
    pub fn check(&self, header: Option<&[u8]>) -> Result<Granted, Refusal> {
        let presented = header
            .and_then(|h| {
                h.strip_prefix(b"Bearer ")
                    .or_else(|| h.strip_prefix(b"bearer "))
            })
            .map(|t| t.trim_ascii())
            .filter(|t| !t.is_empty())
            .ok_or(Refusal::Missing)?;
        let presented = digest(presented);
        let entries = self
            .current
            .read()
            .map(|c| c.0.clone())
            .unwrap_or_else(|p| p.into_inner().0.clone());
        // Compare against every entry, so the time taken does not say which matched.
        let mut found = None;
        for e in entries.iter() {
            if bool::from(e.digest.ct_eq(&presented)) {
                found = Some(e.granted);
            }
        }
        found.ok_or(Refusal::Unknown)
    }

    fn reload(&self, metrics: &Metrics) {
        let Ok(bytes) = std::fs::read(&self.path) else {
            return; // mid-rotation: try again next time
        };
        let unchanged = self
            .current
            .read()
            .map(|c| c.1 == digest(&bytes))
            .unwrap_or(false);
        if unchanged {
            return;
        }
        match load(&self.path) {
            Ok((entries, file_digest)) => {
                let count = entries.len();
                *self.current.write().unwrap_or_else(|p| p.into_inner()) =
                    (Arc::new(entries), file_digest);
                metrics
                    .credential_reloads
                    .with_label_values(&["tokens"])
                    .inc();
                tracing::info!(tokens = count, "auth tokens reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "the token file changed but does not parse; keeping the previous tokens");
            }
        }
    }

    /// Checks the file every `every` until `stop`.
    pub fn spawn_reloader(
        self: &Arc<Self>,
        every: Duration,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) {
        let tokens = self.clone();
        crate::listen::spawn_every(every, stop, move || tokens.reload(&metrics));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_format_gives_scopes_and_rejects_mistakes() {
        let entries = parse(
            "# reader\nreader-0123456789abcdef infer\n\ntrainer-0123456789abcdef infer,train  # both\nnobody-0123456789abcdef\n",
        )
        .unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(
            entries[0].granted,
            Granted {
                infer: true,
                train: false,
                repository: false,
                identity: entries[0].granted.identity,
            }
        );
        assert_ne!(entries[0].granted.identity, entries[1].granted.identity);
        assert!(entries[1].granted.train && entries[1].granted.infer);
        assert!(!entries[2].granted.infer && !entries[2].granted.train);
        let err = parse("short infer").unwrap_err();
        assert!(err.contains("line 1") && err.contains("16"), "{err}");
        // 16 characters is long enough; 15 is not.
        assert_eq!(parse("0123456789abcdef infer").unwrap().len(), 1);
        let err = parse("# a comment\n0123456789abcde infer").unwrap_err();
        assert!(err.contains("line 2") && err.contains("16"), "{err}");
        let err = parse("long-enough-token-123 admin").unwrap_err();
        assert!(err.contains("unknown scope"), "{err}");
        assert!(
            !err.contains("long-enough-token-123"),
            "never echo a token: {err}"
        );
    }

    #[test]
    fn a_hash_inside_a_token_is_refused_not_cut() {
        // Cut at '#', this token would silently be "abcdefgh-01234567".
        let err = parse("abcdefgh-01234567#89abcdef infer\n").unwrap_err();
        assert!(err.contains("line 1") && err.contains("'#'"), "{err}");
        assert!(!err.contains("abcdefgh"), "never echo a token: {err}");
        let err = parse("# ok\nreader-0123456789abcdef infer#x\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        // Comments: a whole line, or after a space or a tab.
        let entries = parse("#c\n  # c\nreader-0123456789abcdef infer\t# c\n").unwrap();
        assert_eq!(entries.len(), 1);
        assert!(entries[0].granted.infer);
    }

    #[test]
    fn tokens_are_checked_by_value() {
        let dir = std::env::temp_dir().join(format!("splitserve-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tokens");
        std::fs::write(&file, "reader-0123456789abcdef infer\n").unwrap();
        let tokens = Tokens::load(file).unwrap();
        assert!(
            tokens
                .check(Some(b"Bearer reader-0123456789abcdef"))
                .unwrap()
                .allows(Scope::Infer)
        );
        assert_eq!(
            tokens.check(Some(b"Bearer reader-0123456789abcdeX")),
            Err(Refusal::Unknown)
        );
        assert_eq!(tokens.check(None), Err(Refusal::Missing));
        assert_eq!(tokens.check(Some(b"Basic abc")), Err(Refusal::Missing));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_changed_file_replaces_the_tokens_and_a_broken_one_keeps_them() {
        let path = std::env::temp_dir().join(format!("splitserve-tokens-{}", std::process::id()));
        let bearer = |t: &str| format!("Bearer {t}").into_bytes();
        std::fs::write(&path, "first-0123456789abcdef infer\n").unwrap();
        let tokens = Tokens::load(path.clone()).unwrap();
        let metrics = Metrics::new("test").unwrap();
        let reloads = || {
            metrics
                .credential_reloads
                .with_label_values(&["tokens"])
                .get()
        };
        assert!(
            tokens
                .check(Some(&bearer("first-0123456789abcdef")))
                .is_ok()
        );
        // A file that stops parsing: the tokens in force stay, nothing counted.
        std::fs::write(&path, "second-0123456789abcdef infer\nshort infer\n").unwrap();
        tokens.reload(&metrics);
        assert!(
            tokens
                .check(Some(&bearer("first-0123456789abcdef")))
                .is_ok()
        );
        assert_eq!(
            tokens.check(Some(&bearer("second-0123456789abcdef"))),
            Err(Refusal::Unknown)
        );
        assert_eq!(reloads(), 0);
        // Fixed: the new set replaces the old one whole, counted once.
        std::fs::write(&path, "second-0123456789abcdef train\n").unwrap();
        tokens.reload(&metrics);
        tokens.reload(&metrics);
        assert_eq!(
            tokens.check(Some(&bearer("first-0123456789abcdef"))),
            Err(Refusal::Unknown)
        );
        assert!(
            tokens
                .check(Some(&bearer("second-0123456789abcdef")))
                .unwrap()
                .train
        );
        assert_eq!(reloads(), 1);
        std::fs::remove_file(&path).unwrap();
    }
}
