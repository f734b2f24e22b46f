//! The credentials file: one `device-id:$argon2id$...` line per device (PHC strings, as
//! `mosquitto_passwd` files hold `user:$7$...`), `#` comments and blank lines allowed.
//!
//! Invariants:
//! - the file never holds a password, only its argon2 hash with its own random salt;
//! - it is written whole to a temporary file in the same directory and renamed over
//!   the old one, mode 0600, so a reader (the running gateway) sees the old or the new
//!   file, never half of one;
//! - device ids are valid single MQTT topic levels (they appear in device topics).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::Argon2;

use super::AuthError;

/// Longest device id accepted.
pub const MAX_DEVICE_ID_LEN: usize = 128;
/// Random bytes in a generated device password (128 bits, 32 hex characters).
const PASSWORD_BYTES: usize = 16;

/// Device id -> argon2 PHC hash string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    devices: BTreeMap<String, String>,
}

impl Credentials {
    /// Reads and parses a credentials file; every bad line is reported at once.
    pub fn load(path: &Path) -> Result<Credentials, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|e| AuthError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        Credentials::parse(&text).map_err(|problems| AuthError::Invalid {
            path: path.to_path_buf(),
            problems,
        })
    }

    /// Like [`Credentials::load`], a missing file being an empty set.
    pub fn load_or_empty(path: &Path) -> Result<Credentials, AuthError> {
        if path.exists() {
            Credentials::load(path)
        } else {
            Ok(Credentials::default())
        }
    }

    /// Parses the text of a credentials file; problems are `line N: ...`.
    pub fn parse(text: &str) -> Result<Credentials, Vec<String>> {
        let mut devices = BTreeMap::new();
        let mut problems = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let n = i + 1;
            let Some((id, hash)) = line.split_once(':') else {
                problems.push(format!("line {n}: expected 'device-id:$argon2id$...'"));
                continue;
            };
            if let Err(e) = validate_device_id(id) {
                problems.push(format!("line {n}: {e}"));
                continue;
            }
            if let Err(e) = PasswordHash::new(hash) {
                problems.push(format!(
                    "line {n}: device '{id}': not a PHC hash string ({e})"
                ));
                continue;
            }
            if devices.insert(id.to_string(), hash.to_string()).is_some() {
                problems.push(format!("line {n}: device '{id}' appears twice"));
            }
        }
        if problems.is_empty() {
            Ok(Credentials { devices })
        } else {
            Err(problems)
        }
    }

    /// The stored hash of a device.
    pub fn hash_of(&self, device: &str) -> Option<&str> {
        self.devices.get(device).map(String::as_str)
    }

    /// Device ids, sorted.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.devices.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Creates a credential for a new device and returns its password (the only time it
    /// exists anywhere).
    pub fn add(&mut self, device: &str) -> Result<String, AuthError> {
        validate_device_id(device)?;
        if self.devices.contains_key(device) {
            return Err(AuthError::Exists(device.to_string()));
        }
        let password = hex::encode(rand::random::<[u8; PASSWORD_BYTES]>());
        self.devices
            .insert(device.to_string(), hash_password(&password)?);
        Ok(password)
    }

    /// Removes a device; `false` when it was not there.
    pub fn remove(&mut self, device: &str) -> bool {
        self.devices.remove(device).is_some()
    }

    /// Writes the file atomically (temporary file + rename), readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<(), AuthError> {
        let write_err = |e: std::io::Error| AuthError::Write {
            path: path.to_path_buf(),
            source: e,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir).map_err(write_err)?;
        let mut text = String::from(
            "# Device credentials of the gateway: device-id:argon2 hash.\n\
             # Managed with `gateway devices add|remove|list`; reloaded by the running gateway.\n",
        );
        for (id, hash) in &self.devices {
            text.push_str(&format!("{id}:{hash}\n"));
        }
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            path.file_name()
                .map_or("credentials".into(), |n| n.to_string_lossy()),
            std::process::id()
        ));
        let result = (|| {
            let mut file = open_private(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(write_err)
    }
}

fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// The argon2id hash (default parameters, random salt) of a password, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| AuthError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// A device id is one MQTT topic level: no `/`, `+`, `#`, `:`, whitespace or control
/// characters, not starting with `$`, 1..=128 bytes.
pub fn validate_device_id(id: &str) -> Result<(), AuthError> {
    let bad = id.is_empty()
        || id.len() > MAX_DEVICE_ID_LEN
        || id.starts_with('$')
        || id
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#' | ':') || c.is_whitespace() || c.is_control());
    if bad {
        Err(AuthError::BadDeviceId(
            id.chars().take(MAX_DEVICE_ID_LEN).collect(),
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_saves_a_hash_that_verifies_and_never_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/devices.passwd");
        let mut creds = Credentials::default();
        let password = creds.add("t-1").unwrap();
        assert_eq!(password.len(), 2 * PASSWORD_BYTES);
        creds.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&password));
        assert!(text.contains("t-1:$argon2id$"));
        let loaded = Credentials::load(&path).unwrap();
        assert_eq!(loaded, creds);
        let hash = PasswordHash::new(loaded.hash_of("t-1").unwrap()).unwrap();
        use argon2::PasswordVerifier;
        assert!(Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok());
        assert!(Argon2::default().verify_password(b"wrong", &hash).is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn duplicates_and_bad_ids_are_refused() {
        let mut creds = Credentials::default();
        creds.add("a").unwrap();
        assert!(matches!(creds.add("a"), Err(AuthError::Exists(_))));
        for bad in ["", "a/b", "a+", "#", "a:b", "a b", "$SYS", &"x".repeat(129)] {
            assert!(creds.add(bad).is_err(), "{bad:?} accepted");
        }
        assert!(creds.remove("a"));
        assert!(!creds.remove("a"));
    }

    #[test]
    fn parse_reports_every_bad_line() {
        let hash = hash_password("pw").unwrap();
        let text =
            format!("# comment\n\nok:{hash}\nnocolon\nbad/id:{hash}\nplain:secret\nok:{hash}\n");
        let problems = Credentials::parse(&text).unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].starts_with("line 4:"));
        assert!(problems[2].contains("not a PHC hash"), "{problems:?}");
        assert!(problems[3].contains("twice"));
    }
}
