//! Device authentication on the embedded broker.
//!
//! Owns the device credentials (a file of argon2 hashes, see [`credentials`]), the
//! threads that verify passwords, and the handler rumqttd calls for every CONNECT
//! (`ConnectionSettings::external_auth`). Input: (client id, username, password) of a
//! CONNECT; output: accept or refuse (rumqttd then closes the socket without CONNACK).
//!
//! Invariants:
//! - the client id must equal the username, and the username must be a device in the
//!   credentials file whose hash the password matches; there is no other way in;
//! - argon2 runs only on the verifier threads (at most [`VERIFIER_THREADS`] at once,
//!   each holding one ~19 MiB block for its lifetime), never on rumqttd's listener thread, which serves every connection
//!   of its listener: a slow check never stalls other clients. When [`VERIFY_QUEUE`]
//!   checks are already waiting, a new one is refused at once (counted as `busy`), so
//!   a flood of bad passwords costs bounded memory and CPU;
//! - a successful verification is cached as a keyed SHA-256 digest of the password
//!   (key random per process) next to the hash it was checked against, so a reconnect
//!   costs one SHA-256, not one argon2; a changed or removed credential invalidates it;
//! - the credentials file is reloaded when it changes (checked every
//!   [`RELOAD_INTERVAL`]) and on SIGHUP; a broken file keeps the previous credentials
//!   and says why;
//! - failures are counted by reason and logged at most once per [`FAILURE_LOG_INTERVAL`].

pub mod credentials;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use argon2::password_hash::PasswordHash;
use argon2::{Algorithm, Argon2, Block, Params, Version};
use sha2::{Digest, Sha256};

pub use credentials::{hash_password, validate_device_id, Credentials};

use crate::decode::TopicPatterns;
use crate::downlink::CommandTopic;

/// Threads running argon2 verifications.
pub const VERIFIER_THREADS: usize = 2;
/// Verifications waiting for a thread; beyond it a CONNECT is refused as `busy`.
pub const VERIFY_QUEUE: usize = 64;
/// How often the credentials file is checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest time between two log lines about failed attempts.
pub const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the credentials file {path}: {source} (create it with `gateway devices add ID`)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the credentials file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("credentials file {path} is invalid:\n  {}", problems.join("\n  "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error("device '{0}' already has a credential (remove it first to issue a new one)")]
    Exists(String),
    #[error("'{0}' is not a device id: 1 to 128 characters, no '/', '+', '#', ':', spaces, not starting with '$'")]
    BadDeviceId(String),
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error("cannot start an authentication thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Why a CONNECT was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The client id differs from the username.
    ClientId,
    /// The username is not a known device.
    UnknownDevice,
    /// The password does not match the device's hash.
    Password,
    /// Too many verifications already waiting.
    Busy,
}

impl Denied {
    fn as_str(self) -> &'static str {
        match self {
            Denied::ClientId => "client id differs from username",
            Denied::UnknownDevice => "unknown device",
            Denied::Password => "wrong password",
            Denied::Busy => "too many checks waiting",
        }
    }
}

/// Outcomes of CONNECT checks since start.
#[derive(Debug, Default)]
pub struct AuthStats {
    pub accepted: AtomicU64,
    /// Accepted from the cache, without argon2.
    pub cached: AtomicU64,
    pub refused_client_id: AtomicU64,
    pub refused_unknown: AtomicU64,
    pub refused_password: AtomicU64,
    pub refused_busy: AtomicU64,
    pub reloads: AtomicU64,
}

impl AuthStats {
    pub fn refused(&self) -> u64 {
        [
            &self.refused_client_id,
            &self.refused_unknown,
            &self.refused_password,
            &self.refused_busy,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// Checks device credentials for the broker; cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    credentials: RwLock<Arc<Credentials>>,
    /// device -> (hash the password was verified against, keyed digest of the password).
    cache: Mutex<HashMap<String, (String, [u8; 32])>>,
    cache_key: [u8; 32],
    verify: crossbeam_channel::Sender<Job>,
    stats: AuthStats,
    failures: Mutex<FailureLog>,
}

struct Job {
    hash: String,
    password: String,
    reply: tokio::sync::oneshot::Sender<bool>,
}

#[derive(Default)]
struct FailureLog {
    last: Option<Instant>,
    since_last: u64,
}

impl Authenticator {
    /// Loads the credentials file (it must exist and be valid), starts the verifier
    /// threads, the file watcher and, inside a tokio runtime, the SIGHUP listener.
    pub fn start(path: &Path) -> Result<Authenticator, AuthError> {
        let credentials = Credentials::load(path)?;
        let (verify, jobs) = crossbeam_channel::bounded::<Job>(VERIFY_QUEUE);
        let inner = Arc::new(Inner {
            path: path.to_path_buf(),
            credentials: RwLock::new(Arc::new(credentials)),
            cache: Mutex::default(),
            cache_key: rand::random(),
            verify,
            stats: AuthStats::default(),
            failures: Mutex::default(),
        });
        for i in 0..VERIFIER_THREADS {
            let jobs = jobs.clone();
            std::thread::Builder::new()
                .name(format!("auth-verify-{i}"))
                .spawn(move || {
                    // Ends when the authenticator (the only sender) is dropped.
                    let mut memory = Vec::new();
                    for job in jobs {
                        let ok = verify_password(&job.hash, &job.password, &mut memory);
                        let _ = job.reply.send(ok);
                    }
                })?;
        }
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("auth-watch".into())
            .spawn(move || watch_file(weak))?;
        let auth = Authenticator { inner };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&auth.inner);
            handle.spawn(reload_on_sighup(weak));
        }
        tracing::info!(
            devices = auth.device_count(),
            file = %path.display(),
            "Device authentication is on."
        );
        Ok(auth)
    }

    /// Devices currently known.
    pub fn device_count(&self) -> usize {
        self.inner.credentials.read().unwrap().len()
    }

    pub fn stats(&self) -> &AuthStats {
        &self.inner.stats
    }

    /// Re-reads the credentials file; on error the previous credentials stay in force.
    pub fn reload(&self) -> Result<usize, AuthError> {
        self.inner.reload()
    }

    /// Checks one CONNECT. Never runs argon2 on the calling thread.
    pub async fn check(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Result<(), Denied> {
        let result = self.inner.check(client_id, username, password).await;
        let stats = &self.inner.stats;
        let counter = match result {
            Ok(()) => &stats.accepted,
            Err(Denied::ClientId) => &stats.refused_client_id,
            Err(Denied::UnknownDevice) => &stats.refused_unknown,
            Err(Denied::Password) => &stats.refused_password,
            Err(Denied::Busy) => &stats.refused_busy,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Err(reason) = result {
            self.inner.log_failure(reason, username);
        }
        result
    }

    /// The handler to put in rumqttd's `ConnectionSettings::external_auth`.
    pub fn handler(&self) -> rumqttd::AuthHandler {
        let auth = self.clone();
        Arc::new(move |client_id, username, password| {
            let auth = auth.clone();
            Box::pin(async move { auth.check(&client_id, &username, &password).await.is_ok() })
        })
    }
}

impl Inner {
    async fn check(&self, client_id: &str, username: &str, password: &str) -> Result<(), Denied> {
        if client_id != username {
            return Err(Denied::ClientId);
        }
        let hash = {
            let credentials = self.credentials.read().unwrap();
            credentials
                .hash_of(username)
                .ok_or(Denied::UnknownDevice)?
                .to_string()
        };
        let digest = self.digest(password);
        let cached = self
            .cache
            .lock()
            .unwrap()
            .get(username)
            .is_some_and(|(h, d)| *h == hash && constant_time_eq(d, &digest));
        if cached {
            self.stats.cached.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let (reply, verdict) = tokio::sync::oneshot::channel();
        let job = Job {
            hash: hash.clone(),
            password: password.to_string(),
            reply,
        };
        if self.verify.try_send(job).is_err() {
            return Err(Denied::Busy);
        }
        if verdict.await.unwrap_or(false) {
            self.cache
                .lock()
                .unwrap()
                .insert(username.to_string(), (hash, digest));
            Ok(())
        } else {
            Err(Denied::Password)
        }
    }

    fn digest(&self, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.cache_key);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    fn reload(&self) -> Result<usize, AuthError> {
        let credentials = Credentials::load(&self.path)?;
        let count = credentials.len();
        *self.credentials.write().unwrap() = Arc::new(credentials);
        // Entries whose device is gone or whose hash changed no longer match anyway;
        // dropping them all keeps the cache from outliving a revoked device.
        self.cache.lock().unwrap().clear();
        self.stats.reloads.fetch_add(1, Ordering::Relaxed);
        Ok(count)
    }

    fn reload_logged(&self, why: &str) {
        match self.reload() {
            Ok(devices) => {
                tracing::info!(devices, file = %self.path.display(), trigger = why, "Device credentials reloaded.")
            }
            Err(e) => {
                tracing::error!(error = %e, "Device credentials not reloaded; the previous ones stay in force.")
            }
        }
    }

    fn log_failure(&self, reason: Denied, username: &str) {
        let mut log = self.failures.lock().unwrap();
        log.since_last += 1;
        let due = log.last.is_none_or(|t| t.elapsed() >= FAILURE_LOG_INTERVAL);
        if !due {
            return;
        }
        let device: String = username
            .chars()
            .take(credentials::MAX_DEVICE_ID_LEN)
            .filter(|c| !c.is_control())
            .collect();
        tracing::warn!(
            failed = log.since_last,
            refused_total = self.stats.refused(),
            last_reason = reason.as_str(),
            last_device = %device,
            "Devices failed to authenticate (logged at most every {}s).",
            FAILURE_LOG_INTERVAL.as_secs()
        );
        log.last = Some(Instant::now());
        log.since_last = 0;
    }
}

/// Topic authorization of authenticated devices (rumqttd's `Authorizer`, a patch of the
/// vendored rumqttd): a device may publish only on ingest topics (of any of the patterns)
/// whose `{device}` is its own id, and subscribe only to its own events (`event_topic` with `{device}` = its id
/// and every other placeholder `+`) and its own commands (`commands`, the downlink's device
/// topic, with its id and one command or `+`). Anything else disconnects it.
pub fn topic_authorizer(
    patterns: TopicPatterns,
    event_topic: &str,
    commands: CommandTopic,
) -> rumqttd::Authorizer {
    let event_topic = event_topic.to_string();
    Arc::new(move |client_id, access, topic| match access {
        rumqttd::Access::Publish => patterns
            .iter()
            .any(|p| p.matches(topic).is_some_and(|m| m.device == client_id)),
        rumqttd::Access::Subscribe => {
            let own_events = event_topic
                .split('/')
                .map(|level| match level {
                    "{device}" => client_id,
                    l if l.starts_with('{') => "+",
                    l => l,
                })
                .collect::<Vec<_>>()
                .join("/");
            topic == own_events || commands.is_device_filter(topic, client_id)
        }
    })
}

/// What identifies a version of the file: modification time, length and inode (a
/// rename over it changes the inode even within one mtime tick).
fn file_stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

fn watch_file(inner: Weak<Inner>) {
    let mut stamp = inner.upgrade().and_then(|i| file_stamp(&i.path));
    loop {
        std::thread::sleep(RELOAD_INTERVAL);
        let Some(inner) = inner.upgrade() else { return };
        let now = file_stamp(&inner.path);
        if now != stamp {
            stamp = now;
            inner.reload_logged("file changed");
        }
    }
}

async fn reload_on_sighup(inner: Weak<Inner>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("Cannot listen for SIGHUP; credentials still reload when the file changes.");
        return;
    };
    while hup.recv().await.is_some() {
        let Some(inner) = inner.upgrade() else { return };
        inner.reload_logged("SIGHUP");
    }
}

/// Checks a password against a PHC hash, reusing the thread's argon2 memory: each
/// verifier thread holds one block of `m_cost` KiB for its lifetime instead of
/// allocating and freeing ~19 MiB per check, which the allocator keeps around in
/// per-thread arenas (RSS grew by 200 MiB under a flood of bad passwords without it).
fn verify_password(phc: &str, password: &str, memory: &mut Vec<Block>) -> bool {
    let mut check = || -> Option<bool> {
        let hash = PasswordHash::new(phc).ok()?;
        let algorithm = Algorithm::try_from(hash.algorithm).ok()?;
        let version = hash
            .version
            .map_or(Ok(Version::default()), Version::try_from)
            .ok()?;
        let params = Params::try_from(&hash).ok()?;
        let expected = hash.hash?;
        let mut salt = [0u8; 64];
        let salt = hash.salt?.decode_b64(&mut salt).ok()?;
        let blocks = params.block_count();
        if memory.len() < blocks {
            memory.resize(blocks, Block::default());
        }
        let mut out = vec![0u8; expected.len()];
        Argon2::new(algorithm, version, params)
            .hash_password_into_with_memory(
                password.as_bytes(),
                salt,
                &mut out,
                &mut memory[..blocks],
            )
            .ok()?;
        Some(constant_time_eq(&out, expected.as_bytes()))
    };
    check().unwrap_or(false)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests;
