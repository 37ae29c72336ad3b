//! API keys: who may call the server, on every protocol it speaks.
//!
//! Keys come from `--api-key` (repeatable) and `--api-keys-file` (one key per line, `#`
//! comments, re-read on SIGHUP so keys rotate without a restart). A client presents one as
//! `Authorization: Bearer <key>` or `x-api-key: <key>` (HTTP headers or gRPC metadata).
//!
//! Only SHA-256 digests of the keys are kept, and a presented key is compared with every digest
//! in constant time (`subtle`), so neither the time an answer takes nor its length tells an
//! attacker how much of a key was right. Keys are never logged: configuration prints them as
//! `***` and the server logs only how many keys it holds.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use subtle::ConstantTimeEq;

/// A key given on the command line: parsed like a string, printed as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let key = s.trim();
        if key.is_empty() {
            return Err("an API key cannot be empty".into());
        }
        Ok(Secret(key.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Why a request was refused (HTTP 401, gRPC UNAUTHENTICATED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("an API key is required: send `Authorization: Bearer <key>` or `x-api-key: <key>`")]
    Missing,
    #[error("the API key is not valid")]
    Invalid,
}

impl AuthError {
    pub fn error_type(&self) -> &'static str {
        "unauthorized"
    }

    /// The `WWW-Authenticate` challenge (RFC 6750: `invalid_token` when a key was sent).
    pub fn challenge(&self) -> &'static str {
        match self {
            AuthError::Missing => "Bearer realm=\"visionserve\"",
            AuthError::Invalid => "Bearer realm=\"visionserve\", error=\"invalid_token\"",
        }
    }
}

type KeyDigest = [u8; 32];

fn digest(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

/// The keys the server accepts; empty means authentication is off.
pub struct ApiKeys {
    given: Vec<KeyDigest>,
    file: Option<PathBuf>,
    current: RwLock<Arc<Vec<KeyDigest>>>,
}

impl ApiKeys {
    /// Authentication off: every request is let through.
    pub fn none() -> Self {
        Self::new(&[], None).expect("no file to read")
    }

    /// The keys given on the command line plus those in `file`, if any. A file that cannot be
    /// read, or that holds no key while no key was given either, is an error: a server that was
    /// asked to check keys must not start open.
    pub fn new(given: &[Secret], file: Option<&Path>) -> Result<Self, String> {
        let keys = Self {
            given: given.iter().map(|k| digest(k.expose())).collect(),
            file: file.map(Path::to_path_buf),
            current: RwLock::new(Arc::default()),
        };
        keys.reload()?;
        Ok(keys)
    }

    /// Re-read `--api-keys-file` (SIGHUP). On error the keys in force stay as they were.
    /// Returns how many keys are now accepted.
    pub fn reload(&self) -> Result<usize, String> {
        let mut keys = self.given.clone();
        if let Some(path) = &self.file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--api-keys-file {}: {e}", path.display()))?;
            let from_file: Vec<KeyDigest> = parse_keys_file(&text).map(digest).collect();
            if from_file.is_empty() && keys.is_empty() {
                return Err(format!(
                    "--api-keys-file {} holds no key (one per line, # for comments)",
                    path.display()
                ));
            }
            keys.extend(from_file);
        }
        let count = keys.len();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(count)
    }

    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    pub fn enabled(&self) -> bool {
        self.count() > 0
    }

    /// How many keys are accepted now.
    pub fn count(&self) -> usize {
        self.snapshot().len()
    }

    fn snapshot(&self) -> Arc<Vec<KeyDigest>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Let a request through when authentication is off or it presents an accepted key, given
    /// its `Authorization` and `x-api-key` values.
    pub fn check(
        &self,
        authorization: Option<&[u8]>,
        x_api_key: Option<&[u8]>,
    ) -> Result<(), AuthError> {
        let keys = self.snapshot();
        if keys.is_empty() {
            return Ok(());
        }
        let presented = presented_key(authorization, x_api_key).ok_or(AuthError::Missing)?;
        let presented = Sha256::digest(presented);
        // Compare with every key, without stopping at a match.
        let matched = keys.iter().fold(subtle::Choice::from(0), |found, key| {
            found | key.as_slice().ct_eq(presented.as_slice())
        });
        if bool::from(matched) {
            Ok(())
        } else {
            Err(AuthError::Invalid)
        }
    }
}

/// The keys of a keys file: one per line, surrounding blanks ignored, `#` starts a comment line.
fn parse_keys_file(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
}

/// The key a request presents: the `Bearer` credentials of `Authorization` (scheme matched
/// without regard to case), else `x-api-key`.
fn presented_key<'a>(
    authorization: Option<&'a [u8]>,
    x_api_key: Option<&'a [u8]>,
) -> Option<&'a [u8]> {
    let bearer = authorization.and_then(|value| {
        let (scheme, credentials) = value.split_at_checked(7)?;
        scheme
            .eq_ignore_ascii_case(b"bearer ")
            .then(|| credentials.trim_ascii())
    });
    bearer
        .or(x_api_key.map(<[u8]>::trim_ascii))
        .filter(|key| !key.is_empty())
}

/// Re-read the keys file on every SIGHUP, for as long as the server runs.
#[cfg(unix)]
pub async fn reload_on_sighup(keys: Arc<ApiKeys>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Some(path) = keys.file().map(Path::to_path_buf) else {
        return;
    };
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: --api-keys-file is read once");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        match keys.reload() {
            Ok(count) => tracing::info!(file = %path.display(), keys = count, "API keys reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "API keys not reloaded; the previous keys stay in force")
            }
        }
    }
}

#[cfg(not(unix))]
pub async fn reload_on_sighup(_keys: Arc<ApiKeys>) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(given: &[&str]) -> ApiKeys {
        let given: Vec<Secret> = given.iter().map(|k| k.parse().unwrap()).collect();
        ApiKeys::new(&given, None).unwrap()
    }

    #[test]
    fn off_without_keys() {
        let keys = ApiKeys::none();
        assert!(!keys.enabled());
        assert_eq!(keys.check(None, None), Ok(()));
    }

    #[test]
    fn accepts_bearer_and_x_api_key() {
        let keys = keys(&["alpha", "beta"]);
        assert_eq!(keys.check(Some(b"Bearer alpha"), None), Ok(()));
        assert_eq!(keys.check(Some(b"bearer  beta "), None), Ok(()));
        assert_eq!(keys.check(None, Some(b"beta")), Ok(()));
        // A Basic header does not hide a valid x-api-key.
        assert_eq!(keys.check(Some(b"Basic Zm9v"), Some(b"alpha")), Ok(()));
    }

    #[test]
    fn refuses_missing_and_wrong_keys() {
        let keys = keys(&["alpha"]);
        assert_eq!(keys.check(None, None), Err(AuthError::Missing));
        assert_eq!(keys.check(Some(b"Bearer "), None), Err(AuthError::Missing));
        assert_eq!(
            keys.check(Some(b"Bearer alph"), None),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            keys.check(Some(b"Bearer alphaa"), None),
            Err(AuthError::Invalid)
        );
        assert_eq!(keys.check(Some(b"alpha"), None), Err(AuthError::Missing));
        assert_eq!(keys.check(None, Some(b"ALPHA")), Err(AuthError::Invalid));
    }

    #[test]
    fn keys_file_is_reread_and_a_bad_reload_keeps_the_old_keys() {
        let dir = std::env::temp_dir().join(format!("visionserve-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys");
        std::fs::write(&path, "# team a\n  one  \n\ntwo\n").unwrap();
        let keys = ApiKeys::new(&[], Some(&path)).unwrap();
        assert_eq!(keys.check(None, Some(b"one")), Ok(()));
        assert_eq!(keys.check(None, Some(b"two")), Ok(()));
        assert_eq!(keys.check(None, Some(b"# team a")), Err(AuthError::Invalid));

        std::fs::write(&path, "three\n").unwrap();
        assert_eq!(keys.reload(), Ok(1));
        assert_eq!(keys.check(None, Some(b"one")), Err(AuthError::Invalid));
        assert_eq!(keys.check(None, Some(b"three")), Ok(()));

        std::fs::write(&path, "# nothing left\n").unwrap();
        assert!(keys.reload().unwrap_err().contains("holds no key"));
        assert_eq!(keys.check(None, Some(b"three")), Ok(()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secrets_do_not_print() {
        let secret: Secret = "hunter2".parse().unwrap();
        assert_eq!(format!("{secret:?}"), "***");
        assert!("  ".parse::<Secret>().is_err());
    }
}
