//! A small real filesystem for full-disk tests: a tmpfs mounted on a temp dir, and a
//! filler file that fills it (gateway's `store_full_disk` and the end-to-end `full_disk`).
//!
//! Needs `mount` (root). `Tmpfs::mount` returns `None` with a message when mounting is
//! not permitted, unless `GATEWAY_REQUIRE_MOUNT=1` (CI), which makes that a failure.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a temp dir; unmounted (lazily, so it never fails) when dropped.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "8m"); `None` when not permitted and not required.
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        let error = match out {
            Ok(o) if o.status.success() => return Some(Tmpfs { dir }),
            Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
            Err(e) => e.to_string(),
        };
        if std::env::var("GATEWAY_REQUIRE_MOUNT").as_deref() == Ok("1") {
            panic!("GATEWAY_REQUIRE_MOUNT=1 but mounting a tmpfs failed: {error}");
        }
        eprintln!("SKIPPED: cannot mount a tmpfs ({error}); run as root or set GATEWAY_REQUIRE_MOUNT=1 to make this a failure");
        None
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes a filler file until the filesystem is full; returns its path.
pub fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xA5u8; 64 * 1024];
    for _ in 0..100_000 {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return path,
            Err(e) => panic!("filler: unexpected error {e}"),
        }
    }
    panic!("the filesystem never filled up");
}
