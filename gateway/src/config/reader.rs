//! The reader: typed values out of the merged configuration (`config` crate), each
//! problem collected against its key instead of stopping at the first.
//!
//! Invariants:
//! - a value that cannot be read adds one problem naming its key and, when known, the
//!   file or environment variable it came from ([`Provenance`]); the read returns
//!   `None` and the caller carries on, so every problem is found in one pass;
//! - a key or section outside [`KEYS`] is a problem (with the closest known key as a
//!   hint), never silently ignored.
//!
//! The sections are built from these reads in `validate.rs` and `tls.rs`.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::ValueKind;
use serde::de::DeserializeOwned;

use super::{ENV_PREFIX, KEYS};

/// Where each key's value came from, so a problem can say which file or variable to fix.
#[derive(Default)]
pub(super) struct Provenance {
    file: Option<(PathBuf, toml::Table)>,
    pub(super) env_vars: BTreeSet<String>,
}

impl Provenance {
    pub(super) fn read_file(&mut self, path: &Path) {
        let table = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.parse::<toml::Table>().ok());
        self.file = table.map(|t| (path.to_path_buf(), t));
    }

    /// ` (from ...)` for a `section.key` or a `section`, empty when it is a default.
    fn of(&self, key: &str) -> String {
        let var = format!("{ENV_PREFIX}__{}", key.replace('.', "__").to_uppercase());
        if let Some(var) = self
            .env_vars
            .iter()
            .find(|v| v.to_uppercase() == var || v.to_uppercase().starts_with(&format!("{var}__")))
        {
            return format!(" (from environment variable {var})");
        }
        if let Some((path, table)) = &self.file {
            let mut parts = key.split('.');
            let section = parts.next().and_then(|s| table.get(s));
            let found = match parts.next() {
                Some(name) => section.and_then(|s| s.get(name)).is_some(),
                None => section.is_some(),
            };
            if found {
                return format!(" (from {})", path.display());
            }
        }
        String::new()
    }
}

/// Reads typed values out of the merged configuration, collecting every problem.
pub(super) struct Reader {
    pub(super) merged: config::Config,
    provenance: Provenance,
    pub(super) problems: Vec<String>,
}

impl Reader {
    pub(super) fn new(merged: config::Config, provenance: Provenance) -> Reader {
        Reader {
            merged,
            provenance,
            problems: Vec::new(),
        }
    }

    pub(super) fn problem(&mut self, key: &str, message: impl fmt::Display) {
        let origin = self.provenance.of(key);
        self.problems.push(format!("{key}: {message}{origin}"));
    }

    fn get<T: DeserializeOwned>(&mut self, key: &str, expected: &str) -> Option<T> {
        match self.merged.get::<T>(key) {
            Ok(v) => Some(v),
            Err(_) => {
                let found = match self.merged.get::<config::Value>(key) {
                    Ok(v) => format!("{}", v.kind),
                    Err(e) => e.to_string(),
                };
                self.problem(key, format!("expected {expected}, found '{found}'"));
                None
            }
        }
    }

    pub(super) fn string(&mut self, key: &str) -> Option<String> {
        self.get::<String>(key, "a string")
    }

    pub(super) fn uint(&mut self, key: &str, min: u64, max: u64) -> Option<u64> {
        let v = self.get::<i64>(key, "an integer")?;
        if v < min as i64 || v as u64 > max {
            self.problem(key, format!("{v} is out of range {min}..={max}"));
            return None;
        }
        Some(v as u64)
    }

    pub(super) fn boolean(&mut self, key: &str) -> Option<bool> {
        self.get::<bool>(key, "true or false")
    }

    pub(super) fn duration(&mut self, key: &str) -> Option<Duration> {
        let text = self.string(key)?;
        match humantime::parse_duration(&text) {
            Ok(d) => Some(d),
            Err(e) => {
                self.problem(
                    key,
                    format!("'{text}' is not a duration like \"500ms\", \"30s\" or \"7d\" ({e})"),
                );
                None
            }
        }
    }

    pub(super) fn addr(&mut self, key: &str) -> Option<SocketAddr> {
        let text = self.string(key)?;
        match text.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    key,
                    format!("'{text}' is not an address like \"0.0.0.0:1883\""),
                );
                None
            }
        }
    }

    pub(super) fn optional<T>(
        &mut self,
        key: &str,
        parse: impl FnOnce(&mut Self) -> Option<T>,
    ) -> Option<Option<T>> {
        match self.merged.get::<String>(key) {
            Ok(s) if s.trim().is_empty() => Some(None),
            _ => parse(self).map(Some),
        }
    }

    pub(super) fn unknown_keys(&mut self) {
        let known: BTreeSet<&str> = KEYS.iter().map(|(k, _)| *k).collect();
        let sections: BTreeSet<&str> = known.iter().filter_map(|k| k.split('.').next()).collect();
        let table = match self
            .merged
            .clone()
            .try_deserialize::<config::Map<String, config::Value>>()
        {
            Ok(t) => t,
            Err(e) => return self.problems.push(e.to_string()),
        };
        for (section, value) in table {
            if !sections.contains(section.as_str()) {
                self.problem(&section, "unknown section");
                continue;
            }
            let ValueKind::Table(keys) = value.kind else {
                self.problem(&section, "expected a table of keys");
                continue;
            };
            for key in keys.keys() {
                let full = format!("{section}.{key}");
                if !known.contains(full.as_str()) {
                    let hint = closest(&full, &known)
                        .map(|k| format!("; did you mean '{k}'?"))
                        .unwrap_or_default();
                    self.problem(&full, format!("unknown key{hint}"));
                }
            }
        }
    }

    pub(super) fn nonempty(&mut self, key: &str) -> Option<String> {
        let s = self.string(key)?;
        if s.trim().is_empty() {
            self.problem(key, "must not be empty");
            return None;
        }
        Some(s)
    }
}

/// The known key closest to a misspelt one, when one is close enough to suggest.
fn closest<'a>(key: &str, known: &BTreeSet<&'a str>) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::levenshtein(key, k), *k))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, k)| k)
}
