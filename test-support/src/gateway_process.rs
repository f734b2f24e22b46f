//! The real `gateway` binary as a child process: its own temp dir (database, rules),
//! loopback ports chosen at run time, its log captured, and helpers to read what it says
//! (log lines, the summary's counters, HTTP responses).
//!
//! Invariants:
//! - The binary is the one `cargo test --workspace` built next to the test binary
//!   ([`workspace_bin`]); a missing one is a failure that says how to build it.
//! - Every wait on the process (start, log line, exit) has a timeout and panics with
//!   the log; the process is killed when the [`Gateway`] is dropped, and its log is
//!   printed when that happens because the test panicked.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ports::free_port;

/// Path of a binary of this workspace, built by `cargo test --workspace`.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test-binary> -> target/<profile>/<name>
    let path = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (which builds it) or `cargo build -p {name}` first",
        path.display()
    );
    path
}

/// A running gateway process with its own data directory; killed when dropped.
pub struct Gateway {
    pub child: Option<Child>,
    pub port: u16,
    /// Port of the HTTP server (metrics, API, status page).
    pub http_port: u16,
    pub dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    /// Starts `gateway run` on a free port with `extra` environment overrides and waits
    /// until it logs that it is up.
    pub fn start(extra: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, extra)
    }

    pub fn start_in(dir: tempfile::TempDir, extra: &[(&str, &str)]) -> Gateway {
        let port = free_port();
        let http_port = free_port();
        let mut env: Vec<(String, String)> = vec![
            (
                "GATEWAY__HTTP__LISTEN".into(),
                format!("127.0.0.1:{http_port}"),
            ),
            (
                "GATEWAY__BROKER__LISTEN".into(),
                format!("127.0.0.1:{port}"),
            ),
            (
                "GATEWAY__STORAGE__PATH".into(),
                dir.path().join("gateway.redb").display().to_string(),
            ),
            (
                "GATEWAY__RULES__DIR".into(),
                dir.path().join("rules").display().to_string(),
            ),
            ("GATEWAY__LOG__LEVEL".into(), "info".into()),
        ];
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push((k.to_string(), v.to_string()));
        }
        let mut gw = Gateway {
            child: None,
            port,
            http_port,
            dir,
            env,
            log: Default::default(),
        };
        gw.spawn();
        gw
    }

    /// (Re)starts the process with the same environment and waits for "Gateway is up.".
    pub fn spawn(&mut self) {
        let mut cmd = Command::new(workspace_bin("gateway"));
        cmd.arg("run")
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start gateway");
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        log.lock().unwrap().clear();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().unwrap().push(line);
            }
        });
        self.child = Some(child);
        self.wait_log("Gateway is up.", Duration::from_secs(20));
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT` of the HTTP server.
    pub fn http_addr(&self) -> String {
        format!("127.0.0.1:{}", self.http_port)
    }

    /// `GET path` on the HTTP server: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(&self.http_addr(), path)
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("gateway.redb")
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until a log line contains `needle`; panics with the log on timeout.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "gateway did not log '{needle}' within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("gateway is running");
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                // Let the log reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "gateway did not exit within {timeout:?} after signal {signal}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Graceful stop (SIGTERM); returns the final summary line.
    pub fn stop(&mut self) -> String {
        let status = self.signal_and_wait(libc::SIGTERM, Duration::from_secs(20));
        assert!(
            status.success(),
            "gateway exited with {status}; log:\n{}",
            self.log()
        );
        self.wait_log("Gateway stopped.", Duration::from_secs(1))
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        self.signal_and_wait(libc::SIGKILL, Duration::from_secs(10));
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The test failed: its gateway's log is the first thing to read.
            eprintln!(
                "--- gateway log ---\n{}\n--- end of gateway log ---",
                self.log()
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `GET path` over HTTP/1.0 (so the body is never chunked): (status code, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the HTTP server");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the HTTP response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP header end in {response:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_string())
}

/// The value of one sample (`name` or `name{labels}`) in a Prometheus scrape (`/metrics`).
pub fn metric(scrape: &str, sample: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no sample {sample} in the scrape"))
}

/// The value of `key=N` in a summary log line.
pub fn counter(summary: &str, key: &str) -> u64 {
    let needle = format!("{key}=");
    let start = summary
        .find(&needle)
        .unwrap_or_else(|| panic!("no {key} in '{summary}'"))
        + needle.len();
    summary[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}
