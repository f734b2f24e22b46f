//! Change detection for the rules directory, for hot reload.
//!
//! Owns [`Watcher`]: it fingerprints the rule files of a directory (names and contents of
//! `*.toml`, not `*.test.toml`) and, when the fingerprint changes, loads the directory again.
//! Input: the directory, polled by the caller (e.g. once a second from a timer).
//! Output: `Some(Ok(RuleSet))` to swap in, or `Some(Err(Diagnostics))` to log while the old
//! rules keep running; `None` when nothing changed.
//!
//! Invariants:
//! - Polling by content, not mtime: robust on every filesystem (coarse mtimes, network
//!   mounts, editors that replace files) at the cost of reading a few small files per poll.
//! - A change is reported once; an invalid edit is not reported again until the files change.
//! - A file caught half-written shows up as an error and is loaded again when the write
//!   completes (its content changes once more).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use super::diagnostics::Diagnostics;
use super::ruleset::{rule_files, RuleSet};

/// Watches one rules directory by polling.
#[derive(Debug)]
pub struct Watcher {
    dir: PathBuf,
    last: Option<u64>,
}

impl Watcher {
    /// A watcher whose first `poll` reports the directory as it is then.
    pub fn new(dir: &Path) -> Watcher {
        Watcher {
            dir: dir.to_path_buf(),
            last: None,
        }
    }

    /// A watcher that treats the directory's current content as already loaded: the first
    /// `poll` reports only a later change. Use it right after `RuleSet::load_dir`.
    pub fn from_current(dir: &Path) -> Watcher {
        Watcher {
            dir: dir.to_path_buf(),
            last: Some(fingerprint(dir)),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Loads the directory again if its rule files changed since the last poll.
    pub fn poll(&mut self) -> Option<Result<RuleSet, Diagnostics>> {
        let now = fingerprint(&self.dir);
        if self.last == Some(now) {
            return None;
        }
        self.last = Some(now);
        Some(RuleSet::load_dir(&self.dir))
    }
}

/// A hash of the rule files' names and contents (a missing dir hashes as such).
fn fingerprint(dir: &Path) -> u64 {
    let mut h = DefaultHasher::new();
    match rule_files(dir) {
        Ok(paths) => {
            for path in paths {
                path.hash(&mut h);
                match std::fs::read(&path) {
                    Ok(bytes) => bytes.hash(&mut h),
                    Err(e) => e.kind().to_string().hash(&mut h),
                }
            }
        }
        Err(e) => e.message.hash(&mut h),
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: &str = "[[rule]]\nname = \"a\"\nevent = \"A\"\ncondition = \"x > 1.0\"\n";

    #[test]
    fn reports_changes_once_and_errors_without_losing_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.toml");
        std::fs::write(&file, RULE).unwrap();
        let mut w = Watcher::from_current(dir.path());
        assert!(w.poll().is_none());

        std::fs::write(&file, RULE.replace("x > 1.0", "x >")).unwrap();
        let err = w.poll().unwrap().unwrap_err();
        assert!(err.to_string().contains("a.toml:4:"), "{err}");
        assert!(
            w.poll().is_none(),
            "an unchanged broken dir is reported once"
        );

        std::fs::write(&file, RULE.replace("\"a\"", "\"b\"")).unwrap();
        let set = w.poll().unwrap().unwrap();
        assert!(set.get("b").is_some());

        // A test file is not a rule file: editing it is no change.
        std::fs::write(dir.path().join("a.test.toml"), "x").unwrap();
        assert!(w.poll().is_none());
    }
}
