//! API keys: who may call the server, on every protocol it speaks, and how much each may use.
//!
//! Keys come from `--api-key` (repeatable) and `--api-keys-file` (one key per line, `#`
//! comments, re-read on SIGHUP so keys rotate without a restart). A client presents one as
//! `Authorization: Bearer <key>` or `x-api-key: <key>` (HTTP headers or gRPC metadata).
//!
//! A line of the file may give the key a name and limits after it, as `name=value` words:
//!
//! ```text
//! # key                      options (all optional)
//! 3f6c0b8a9d1e4c27b5a0e8f2   name=batch-team rate=50/s burst=100 concurrency=8 priority=2
//! 9a2d7e4b1c8f3a6d0e5b7c91   name=web
//! ```
//!
//! - `name`: how metrics and error messages name the key (`[A-Za-z0-9._-]`, at most 64); without one, a
//!   key is named by the start of its SHA-256 digest (`sha256:1a2b3c4d`), never by the key;
//! - `rate`: images per second, minute or hour (`50/s`, `600/m`, `10000/h`), counted with the
//!   GCRA of the `governor` crate; `burst`: images that may arrive at once (default: one
//!   second's worth of the rate, at least 1). Over it, 429 with `Retry-After` and the IETF
//!   `RateLimit`/`RateLimit-Policy` headers;
//! - `concurrency`: requests in flight at once (429 beyond);
//! - `priority`: the key's priority level (1 = the highest): its requests' default, and the
//!   highest they may ask for.
//!
//! Limits are enforced by the inference service (`infer`), behind the one service call, for
//! every protocol alike. A reload keeps the state of a key whose line did not change, so a
//! SIGHUP does not refill its bucket.
//!
//! Only SHA-256 digests of the keys are kept, and a presented key is compared with every digest
//! in constant time (`subtle`), so neither the time an answer takes nor its length tells an
//! attacker how much of a key was right. Keys are never logged: configuration prints them as
//! `***` and the server logs only how many keys it holds.

use crate::priority::Level;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use subtle::{ConditionallySelectable, ConstantTimeEq};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

/// A key's limits, as its line gives them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub name: Option<String>,
    /// Images per `per`.
    pub rate: Option<(NonZeroU32, Duration)>,
    pub burst: Option<NonZeroU32>,
    pub concurrency: Option<usize>,
    pub priority: Option<Level>,
}

impl KeyLimits {
    /// The options after a key on its line: `name=value` words.
    fn parse(words: &[&str]) -> Result<Self, String> {
        let mut limits = KeyLimits::default();
        for word in words {
            let (option, value) = word.split_once('=').ok_or_else(|| {
                format!(
                    "{word:?} is not an option: after the key, a line takes name=, rate=,                      burst=, concurrency= and priority= (a key itself holds no blanks)"
                )
            })?;
            match option {
                "name" => limits.name = Some(parse_name(value)?),
                "rate" => limits.rate = Some(parse_rate(value)?),
                "burst" => limits.burst = Some(parse_count(option, value)?),
                "concurrency" => {
                    limits.concurrency = Some(parse_count(option, value)?.get() as usize)
                }
                "priority" => {
                    let number = value.parse::<u64>().ok();
                    limits.priority = Some(number.and_then(Level::from_number).ok_or_else(|| {
                        format!("priority={value}: a priority level is a number from 1 (the highest) to {}", crate::priority::MAX_LEVELS)
                    })?)
                }
                _ => {
                    return Err(format!(
                    "unknown option {option:?}; accepted: name, rate, burst, concurrency, priority"
                ))
                }
            }
        }
        if limits.burst.is_some() && limits.rate.is_none() {
            return Err("burst= needs a rate= to refill it".into());
        }
        Ok(limits)
    }

    /// The GCRA quota: `rate` refilled evenly, up to `burst` at once (default: one second's
    /// worth of the rate, at least 1).
    fn quota(&self) -> Option<Quota> {
        let (count, per) = self.rate?;
        let per_image = per / count.get();
        let one_second = (count.get() as f64 / per.as_secs_f64()).ceil() as u32;
        let burst = self
            .burst
            .unwrap_or(NonZeroU32::new(one_second.max(1)).expect("at least 1"));
        Some(Quota::with_period(per_image.max(Duration::from_nanos(1)))?.allow_burst(burst))
    }
}

fn parse_name(value: &str) -> Result<String, String> {
    let valid = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "name={value:?}: a name is 1 to 64 letters, digits, '.', '_' or '-'"
        ))
    }
}

fn parse_count(option: &str, value: &str) -> Result<NonZeroU32, String> {
    value
        .parse::<NonZeroU32>()
        .map_err(|_| format!("{option}={value}: a whole number of at least 1"))
}

/// `50/s`, `600/m` or `10000/h`: images per second, minute or hour.
fn parse_rate(value: &str) -> Result<(NonZeroU32, Duration), String> {
    let bad = || format!("rate={value}: a rate is images per s, m or h, e.g. 50/s or 600/m");
    let (count, unit) = value.split_once('/').ok_or_else(bad)?;
    let count = count.parse::<NonZeroU32>().map_err(|_| bad())?;
    let per = match unit {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    Ok((count, per))
}

/// One accepted key: its name, its limits and their state (the rate limiter's bucket, the
/// requests in flight).
pub struct KeyPolicy {
    name: String,
    limits: KeyLimits,
    /// The rate limiter, and its quota as `RateLimit-Policy` states it.
    rate: Option<(DefaultDirectRateLimiter, RatePolicy)>,
    concurrency: Option<Arc<Semaphore>>,
}

impl std::fmt::Debug for KeyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPolicy")
            .field("name", &self.name)
            .field("limits", &self.limits)
            .finish()
    }
}

/// Why a key's own limits refused a request (HTTP 429, gRPC RESOURCE_EXHAUSTED).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRefusal {
    /// Over `rate`: `images` did not fit; a retry after `retry_after` may.
    Rate {
        images: u32,
        retry_after: Duration,
        policy: RatePolicy,
    },
    /// More images than the key's burst: never accepted in one request.
    OverBurst { images: u32, burst: u32 },
    /// `concurrency` requests already in flight.
    Concurrency { limit: usize },
}

/// A rate limit as the IETF `RateLimit-Policy` header states it: `quota` images per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RatePolicy {
    pub quota: u32,
    pub window: Duration,
}

impl KeyPolicy {
    fn new(name: String, limits: KeyLimits) -> Self {
        let rate = limits.quota().map(|quota| {
            let policy = RatePolicy {
                quota: quota.burst_size().get(),
                window: quota.replenish_interval() * quota.burst_size().get(),
            };
            (RateLimiter::direct(quota), policy)
        });
        let concurrency = limits.concurrency.map(|n| Arc::new(Semaphore::new(n)));
        Self {
            name,
            limits,
            rate,
            concurrency,
        }
    }

    /// How metrics and error messages name the key.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key's priority level, which caps its requests' (`None`: no cap).
    pub fn priority(&self) -> Option<Level> {
        self.limits.priority
    }

    /// A hold on one of the key's `concurrency` slots (`None` when it has no such limit),
    /// for as long as a request runs.
    pub fn enter(&self) -> Result<Option<OwnedSemaphorePermit>, KeyRefusal> {
        let Some(slots) = &self.concurrency else {
            return Ok(None);
        };
        slots
            .clone()
            .try_acquire_owned()
            .map(Some)
            .map_err(|_| KeyRefusal::Concurrency {
                limit: self.limits.concurrency.unwrap_or_default(),
            })
    }

    /// Count `images` against the key's rate.
    pub fn charge(&self, images: usize) -> Result<(), KeyRefusal> {
        let (Some((limiter, policy)), Some(images)) = (&self.rate, NonZeroU32::new(images as u32))
        else {
            return Ok(());
        };
        let policy = *policy;
        match limiter.check_n(images) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(KeyRefusal::Rate {
                images: images.get(),
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
                policy,
            }),
            Err(_) => Err(KeyRefusal::OverBurst {
                images: images.get(),
                burst: policy.quota,
            }),
        }
    }

    /// The key's rate as `quota` images per `window`: its burst, and the time the burst
    /// takes to refill.
    pub fn rate_policy(&self) -> Option<RatePolicy> {
        self.rate.as_ref().map(|(_, policy)| *policy)
    }
}

/// A key's name when its line gives none: the start of its digest.
fn fingerprint(digest: &KeyDigest) -> String {
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The accepted keys, each with its policy.
type KeyTable = Vec<(KeyDigest, Arc<KeyPolicy>)>;

/// The keys the server accepts; empty means authentication is off.
pub struct ApiKeys {
    given: Vec<KeyDigest>,
    file: Option<PathBuf>,
    current: RwLock<Arc<KeyTable>>,
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
        let mut lines: Vec<(KeyDigest, KeyLimits)> = self
            .given
            .iter()
            .map(|digest| (*digest, KeyLimits::default()))
            .collect();
        if let Some(path) = &self.file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--api-keys-file {}: {e}", path.display()))?;
            let from_file = parse_keys_file(&text)
                .map_err(|e| format!("--api-keys-file {}:{e}", path.display()))?;
            if from_file.is_empty() && lines.is_empty() {
                return Err(format!(
                    "--api-keys-file {} holds no key (one per line, # for comments)",
                    path.display()
                ));
            }
            lines.extend(from_file);
        }
        let previous = self.snapshot();
        let table: KeyTable = lines
            .into_iter()
            .map(|(digest, limits)| {
                // A key whose line is unchanged keeps its state (its bucket, its slots).
                let kept = previous
                    .iter()
                    .find(|(d, policy)| *d == digest && policy.limits == limits);
                let policy = match kept {
                    Some((_, policy)) => policy.clone(),
                    None => {
                        let name = limits.name.clone().unwrap_or_else(|| fingerprint(&digest));
                        Arc::new(KeyPolicy::new(name, limits))
                    }
                };
                (digest, policy)
            })
            .collect();
        let count = table.len();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
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

    fn snapshot(&self) -> Arc<KeyTable> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Let a request through when authentication is off (`Ok(None)`) or it presents an
    /// accepted key (`Ok(Some(its policy))`), given its `Authorization` and `x-api-key` values.
    pub fn check(
        &self,
        authorization: Option<&[u8]>,
        x_api_key: Option<&[u8]>,
    ) -> Result<Option<Arc<KeyPolicy>>, AuthError> {
        let keys = self.snapshot();
        if keys.is_empty() {
            return Ok(None);
        }
        let presented = presented_key(authorization, x_api_key).ok_or(AuthError::Missing)?;
        let presented = Sha256::digest(presented);
        // Compare with every key, without stopping at a match, and pick the match's index
        // without a branch on it.
        let (mut matched, mut index) = (subtle::Choice::from(0), 0u64);
        for (i, (key, _)) in keys.iter().enumerate() {
            let equal = key.as_slice().ct_eq(presented.as_slice());
            index = u64::conditional_select(&index, &(i as u64), equal);
            matched |= equal;
        }
        if bool::from(matched) {
            Ok(Some(keys[index as usize].1.clone()))
        } else {
            Err(AuthError::Invalid)
        }
    }
}

/// The keys of a keys file, with their limits: one per line, surrounding blanks ignored, `#`
/// starts a comment line. An error names its line (`LINE: what`), never the key.
fn parse_keys_file(text: &str) -> Result<Vec<(KeyDigest, KeyLimits)>, String> {
    let mut keys = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let limits = KeyLimits::parse(&words[1..]).map_err(|e| format!("{}: {e}", number + 1))?;
        keys.push((digest(words[0]), limits));
    }
    Ok(keys)
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
        assert!(keys.check(None, None).is_ok());
    }

    #[test]
    fn accepts_bearer_and_x_api_key() {
        let keys = keys(&["alpha", "beta"]);
        assert!(keys.check(Some(b"Bearer alpha"), None).is_ok());
        assert!(keys.check(Some(b"bearer  beta "), None).is_ok());
        assert!(keys.check(None, Some(b"beta")).is_ok());
        // A Basic header does not hide a valid x-api-key.
        assert!(keys.check(Some(b"Basic Zm9v"), Some(b"alpha")).is_ok());
    }

    #[test]
    fn refuses_missing_and_wrong_keys() {
        let keys = keys(&["alpha"]);
        assert_eq!(keys.check(None, None).err(), Some(AuthError::Missing));
        assert_eq!(
            keys.check(Some(b"Bearer "), None).err(),
            Some(AuthError::Missing)
        );
        assert_eq!(
            keys.check(Some(b"Bearer alph"), None).err(),
            Some(AuthError::Invalid)
        );
        assert_eq!(
            keys.check(Some(b"Bearer alphaa"), None).err(),
            Some(AuthError::Invalid)
        );
        assert_eq!(
            keys.check(Some(b"alpha"), None).err(),
            Some(AuthError::Missing)
        );
        assert_eq!(
            keys.check(None, Some(b"ALPHA")).err(),
            Some(AuthError::Invalid)
        );
    }

    #[test]
    fn keys_file_is_reread_and_a_bad_reload_keeps_the_old_keys() {
        let dir = std::env::temp_dir().join(format!("visionserve-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys");
        std::fs::write(&path, "# team a\n  one  \n\ntwo\n").unwrap();
        let keys = ApiKeys::new(&[], Some(&path)).unwrap();
        assert!(keys.check(None, Some(b"one")).is_ok());
        assert!(keys.check(None, Some(b"two")).is_ok());
        assert_eq!(
            keys.check(None, Some(b"# team a")).err(),
            Some(AuthError::Invalid)
        );

        std::fs::write(&path, "three\n").unwrap();
        assert_eq!(keys.reload(), Ok(1));
        assert_eq!(
            keys.check(None, Some(b"one")).err(),
            Some(AuthError::Invalid)
        );
        assert!(keys.check(None, Some(b"three")).is_ok());

        std::fs::write(&path, "# nothing left\n").unwrap();
        assert!(keys.reload().unwrap_err().contains("holds no key"));
        assert!(keys.check(None, Some(b"three")).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn key_lines_give_names_and_limits() {
        let text = "# team\nalpha name=batch rate=50/s burst=100 concurrency=8 priority=2\nbeta\n";
        let keys = parse_keys_file(text).unwrap();
        assert_eq!(keys.len(), 2);
        let (digest_alpha, limits) = &keys[0];
        assert_eq!(*digest_alpha, digest("alpha"));
        assert_eq!(limits.name.as_deref(), Some("batch"));
        assert_eq!(limits.concurrency, Some(8));
        assert_eq!(limits.priority, Level::from_number(2));
        let policy = KeyPolicy::new("batch".into(), limits.clone());
        assert_eq!(
            policy.rate_policy(),
            Some(RatePolicy {
                quota: 100,
                window: Duration::from_secs(2)
            })
        );
        assert_eq!(keys[1].1, KeyLimits::default());
        for (line, expected) in [
            ("k rate=5", "a rate is images per s, m or h"),
            ("k rate=5/d", "a rate is images per s, m or h"),
            ("k burst=3", "burst= needs a rate="),
            ("k concurrency=0", "at least 1"),
            ("k priority=9", "priority level is a number from 1"),
            ("k name=a/b", "a name is 1 to 64"),
            ("k colour=red", "accepted: name, rate, burst"),
            ("key with blanks", "is not an option"),
        ] {
            let err = parse_keys_file(&format!("\n{line}\n")).unwrap_err();
            assert!(err.starts_with("2: "), "{err}");
            assert!(err.contains(expected), "{line}: {err}");
            assert!(!err.contains("\"k\""), "the key is never echoed: {err}");
        }
    }

    #[test]
    fn a_key_is_named_and_limited_and_a_reload_keeps_its_bucket() {
        let dir = std::env::temp_dir().join(format!("visionserve-quota-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys");
        std::fs::write(&path, "alpha name=a rate=2/s concurrency=1\nbeta\n").unwrap();
        let keys = ApiKeys::new(&[], Some(&path)).unwrap();
        let alpha = keys.check(None, Some(b"alpha")).unwrap().unwrap();
        assert_eq!(alpha.name(), "a");
        let beta = keys.check(None, Some(b"beta")).unwrap().unwrap();
        assert_eq!(beta.name(), fingerprint(&digest("beta")));
        assert!(!beta.name().contains("beta"));

        let slot = alpha.enter().unwrap();
        assert_eq!(
            alpha.enter().unwrap_err(),
            KeyRefusal::Concurrency { limit: 1 }
        );
        drop(slot);
        assert!(alpha.enter().is_ok());

        assert_eq!(alpha.charge(2), Ok(()));
        match alpha.charge(1) {
            Err(KeyRefusal::Rate {
                retry_after,
                policy,
                ..
            }) => {
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_millis(500));
                assert_eq!(
                    policy,
                    RatePolicy {
                        quota: 2,
                        window: Duration::from_secs(1)
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            alpha.charge(3),
            Err(KeyRefusal::OverBurst {
                images: 3,
                burst: 2
            })
        ));

        // Unchanged line: same state, still empty. Changed line: a fresh bucket.
        keys.reload().unwrap();
        let again = keys.check(None, Some(b"alpha")).unwrap().unwrap();
        assert!(Arc::ptr_eq(&alpha, &again));
        std::fs::write(&path, "alpha name=a rate=3/s\n").unwrap();
        keys.reload().unwrap();
        let changed = keys.check(None, Some(b"alpha")).unwrap().unwrap();
        assert_eq!(changed.charge(3), Ok(()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secrets_do_not_print() {
        let secret: Secret = "hunter2".parse().unwrap();
        assert_eq!(format!("{secret:?}"), "***");
        assert!("  ".parse::<Secret>().is_err());
    }
}
