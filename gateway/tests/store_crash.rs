//! `kill -9` of a process that is appending: everything it saw committed is there after
//! a restart, in order, and sequence numbers continue without reuse.
//!
//! The test re-runs this test binary as the child (`crash_child`, ignored in normal runs).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gateway::config::Config;
use gateway::reading::{now_millis, Format};
use gateway::store::{Lane, OutboxEntry, Store, StoreConfig};

const CHILD_ENV: &str = "OUTBOX_CRASH_CHILD_DB";

/// The child: appends numbered readings forever, printing the last number known committed.
#[test]
#[ignore = "run as a child process by kill_9_while_appending_loses_nothing_committed"]
fn crash_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = Store::open(path.as_ref(), StoreConfig::from_config(&Config::defaults())).unwrap();
    let start: u64 = std::env::var("OUTBOX_CRASH_START")
        .unwrap()
        .parse()
        .unwrap();
    let mut out = std::io::stdout().lock();
    for i in start.. {
        let entry = OutboxEntry::reading(
            "devices/d/telemetry",
            "d",
            i.to_string().as_bytes(),
            Format::Json,
            now_millis(),
        );
        while !store.append(entry.clone()) {
            std::thread::sleep(Duration::from_millis(1));
        }
        if i % 500 == 499 {
            store.flush_blocking().unwrap();
            writeln!(out, "committed {i}").unwrap();
            out.flush().unwrap();
        }
    }
}

#[test]
fn kill_9_while_appending_loses_nothing_committed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.redb");
    let mut expected_next = 0u64;
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .env("OUTBOX_CRASH_START", expected_next.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut committed = None;
        // Let it run through a few commits, then kill it mid-stream.
        while let Some(Ok(line)) = lines.next() {
            if let Some(n) = line.strip_prefix("committed ") {
                let n: u64 = n.parse().unwrap();
                committed = Some(n);
                if n >= expected_next + 5_000 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "child too slow");
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let committed = committed.expect("child reported no commit");

        let store = Store::open(&path, StoreConfig::from_config(&Config::defaults())).unwrap();
        let mut rows = Vec::new();
        store
            .read_outbox(Lane::Reading, 0, usize::MAX, &mut rows)
            .unwrap();
        let numbers: Vec<u64> = rows
            .iter()
            .map(|r| std::str::from_utf8(r.payload()).unwrap().parse().unwrap())
            .collect();
        // Everything reported committed is there, in order, no gaps, no repeats.
        assert!(numbers.len() as u64 > committed, "round {round}");
        assert!(
            numbers.iter().enumerate().all(|(i, n)| *n == i as u64),
            "round {round}: rows out of order or missing"
        );
        assert!(rows.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        assert_eq!(
            store.stats().lanes[Lane::Reading].messages,
            numbers.len() as u64
        );
        expected_next = numbers.len() as u64;
        eprintln!(
            "round {round}: reported committed up to {committed}, found {} rows",
            numbers.len()
        );
        store.shutdown().unwrap();
    }
}
