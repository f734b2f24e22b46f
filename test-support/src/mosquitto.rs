//! Mosquitto as a child process on loopback ports, with its config and persistence in a
//! temp dir of its own.
//!
//! Invariants:
//! - The binary is [`MOSQUITTO`]. When it is missing, [`Mosquitto::start`] and
//!   [`Mosquitto::start_tls`] return `None` after printing that the test is skipped;
//!   with `GATEWAY_REQUIRE_MOSQUITTO=1` (CI) a missing binary is a failure instead.
//! - Queues are unbounded (`max_queued_messages 0`), so a slow test subscriber never
//!   loses messages to a broker limit.
//! - The plain broker persists sessions: a graceful [`Mosquitto::restart`] keeps the
//!   queued messages of persistent sessions.
//! - The process is killed when the value is dropped.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ports::{free_port, wait_port};
use crate::tls::TestCa;

/// Where the tests expect the Mosquitto binary.
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// A running Mosquitto; killed when dropped.
pub struct Mosquitto {
    /// The plaintext listener.
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Mosquitto {
    /// Mosquitto with one plaintext listener; `None` when the test should be skipped.
    pub fn start() -> Option<Mosquitto> {
        Mosquitto::start_with("")
    }

    /// [`Mosquitto::start`] with `extra` lines of configuration after the usual ones
    /// (a setting given twice takes its last value), e.g. `"max_inflight_messages 7\n"`
    /// for a broker that announces a Receive Maximum of 7 to MQTT 5 clients.
    pub fn start_with(extra: &str) -> Option<Mosquitto> {
        if !available() {
            return None;
        }
        let dir = broker_dir();
        let port = free_port();
        std::fs::write(
            dir.path().join("mosquitto.conf"),
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {}/\nmax_queued_messages 0\nmax_inflight_messages 0\n\
                 log_dest none\n{extra}",
                dir.path().display()
            ),
        )
        .unwrap();
        Some(Mosquitto::spawn_in(dir, port))
    }

    /// Mosquitto with a plaintext listener (`port`, for collectors) and a TLS listener
    /// (the returned port) whose server certificate for 127.0.0.1 is issued by `ca`;
    /// with `require_certificate`, TLS clients must present a certificate from `ca`.
    /// `None` when the test should be skipped.
    pub fn start_tls(ca: &TestCa, require_certificate: bool) -> Option<(Mosquitto, u16)> {
        if !available() {
            return None;
        }
        let dir = broker_dir();
        let (port, tls_port) = (free_port(), free_port());
        let ca_file = ca.write(dir.path(), "mosquitto-ca");
        let server = ca.issue(dir.path(), "mosquitto-server", &["127.0.0.1"]);
        std::fs::write(
            dir.path().join("mosquitto.conf"),
            format!(
                "allow_anonymous true\npersistence false\nmax_queued_messages 0\n\
                 max_inflight_messages 0\nlog_dest none\n\
                 listener {port} 127.0.0.1\n\
                 listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
                 require_certificate {require_certificate}\n",
                ca_file.display(),
                server.cert.display(),
                server.key.display()
            ),
        )
        .unwrap();
        let m = Mosquitto::spawn_in(dir, port);
        wait_port(tls_port, Duration::from_secs(5));
        Some((m, tls_port))
    }

    fn spawn_in(dir: tempfile::TempDir, port: u16) -> Mosquitto {
        let mut m = Mosquitto {
            port,
            dir,
            child: None,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(5));
    }

    /// `127.0.0.1:PORT` of the plaintext listener.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The process id (while running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("mosquitto is running").id()
    }

    /// Graceful stop (SIGTERM: mosquitto saves its persistence file); waits up to 5 s
    /// for the exit, then kills it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on the pid of a child this value owns and has not reaped.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `kill -9`: the broker dies at once, with what it had in memory; waits for the exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Graceful stop, then a start with the same config and ports (also after [`Mosquitto::kill`]).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// True when Mosquitto tests should run; panics when they are required but impossible.
fn available() -> bool {
    let present = Path::new(MOSQUITTO).exists();
    if !present && std::env::var("GATEWAY_REQUIRE_MOSQUITTO").as_deref() == Ok("1") {
        panic!("GATEWAY_REQUIRE_MOSQUITTO=1 but {MOSQUITTO} is missing");
    }
    if !present {
        eprintln!("skipping: {MOSQUITTO} not found");
    }
    present
}

/// A temp dir the broker can write to: started as root, mosquitto drops to its own user.
fn broker_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}
