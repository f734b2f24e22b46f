//! The store's feed (`store/feed.rs`) against a real redb file and the real intake: the
//! owner thread wakes for the feed's input and timers, what the feed hands over joins the
//! group (never the bounded queue the thread itself empties), and ending the feed hands
//! out what waited at that moment, then finishes it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway::config::Config;
use gateway::ingest::{Ingested, Intake, Next};
use gateway::reading::{now_millis, Format};
use gateway::store::{Feed, Lane, OutboxEntry, OutboxRow, Store, StoreConfig, StoreHandle};
use test_support::wait_until;

/// Appends `per_message` outbox rows for every message of its input (the payload says
/// which message), and a row `finished` when it ends.
struct Appender {
    input: Intake,
    store: StoreHandle,
    per_message: usize,
    /// Its timer, and how many runs found it due.
    wake: Option<Instant>,
    woke: Arc<AtomicUsize>,
}

impl Feed for Appender {
    fn input(&self) -> Option<&flume::Receiver<Ingested>> {
        self.input.waiting_on()
    }
    fn hold(&mut self, message: Ingested) {
        self.input.hold(message);
    }
    fn queued(&self) -> usize {
        self.input.queued()
    }
    fn next_wake(&self) -> Option<Instant> {
        self.wake
    }
    fn run(&mut self, max: usize) -> bool {
        if self.wake.is_some_and(|t| t <= Instant::now()) {
            self.wake = None;
            self.woke.fetch_add(1, Ordering::SeqCst);
        }
        let mut batch = Vec::new();
        let next = self.input.take(&mut batch, max);
        for message in batch {
            let n = String::from_utf8_lossy(&message.payload).into_owned();
            for _ in 0..self.per_message {
                assert!(self.store.append(row(&n)));
            }
        }
        next != Next::Over
    }
    fn stop(&mut self) {
        self.input.stop();
    }
    fn finish(self: Box<Self>) {
        self.store.append(row("finished"));
    }
}

fn row(payload: &str) -> OutboxEntry {
    OutboxEntry::reading(
        "devices/d/telemetry",
        "d",
        payload.as_bytes(),
        Format::Json,
        now_millis(),
    )
}

fn message(n: usize) -> Ingested {
    Ingested {
        client_id: "c-1".into(),
        topic: Bytes::from_static(b"devices/d/telemetry"),
        payload: Bytes::from(n.to_string()),
        qos: 0,
        retain: false,
        properties: None,
        ack: None,
    }
}

/// The outbox's payloads, as of the last checkpoint.
fn payloads(h: &StoreHandle) -> Vec<String> {
    let mut rows: Vec<OutboxRow> = Vec::new();
    h.read_outbox(Lane::Reading, 0, usize::MAX, &mut rows)
        .unwrap();
    rows.iter()
        .map(|r| String::from_utf8_lossy(r.payload()).into_owned())
        .collect()
}

/// Opens a store on a fresh file with the feed `Appender` on `input`.
fn open_fed(
    dir: &tempfile::TempDir,
    cfg: StoreConfig,
    input: flume::Receiver<Ingested>,
    per_message: usize,
    wake: Option<Instant>,
) -> (StoreHandle, Arc<AtomicUsize>) {
    let h = Store::open(&dir.path().join("gw.redb"), cfg).unwrap();
    let woke = Arc::new(AtomicUsize::new(0));
    let feed = Appender {
        input: Intake::new(input),
        store: h.clone(),
        per_message,
        wake,
        woke: woke.clone(),
    };
    h.feed(Box::new(move || Box::new(feed)));
    (h, woke)
}

/// Waits for `end_feed` with a bound.
fn end_feed(h: &StoreHandle) {
    let ended = h.end_feed();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(ended.blocking_recv());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the feed ended in time")
        .expect("the store is open");
}

#[test]
fn what_the_feed_hands_over_joins_the_group_and_never_waits_on_the_full_queue() {
    // A queue of one command: had the feed's appends gone through it from the thread
    // that empties it, the first run would wait for itself forever.
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        channel_capacity: 1,
        ..StoreConfig::from_config(&Config::defaults())
    };
    let (tx, rx) = flume::bounded(64);
    let (h, _) = open_fed(&dir, cfg, rx, 50, None);
    for n in 0..20 {
        tx.send(message(n)).unwrap();
    }
    wait_until("1000 rows committed", Duration::from_secs(10), || {
        h.stats().lanes[Lane::Reading].messages == 20 * 50
    });
    // In the order the input held them, and in few groups.
    h.flush_blocking().unwrap();
    let got = payloads(&h);
    let want: Vec<String> = (0..20)
        .flat_map(|n| std::iter::repeat_n(n.to_string(), 50))
        .collect();
    assert_eq!(got, want);
    assert!(h.stats().commits < 20, "{} commits", h.stats().commits);
    h.shutdown().unwrap();
}

#[test]
fn an_idle_store_wakes_for_the_feed_s_input_and_for_its_timer() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = flume::bounded(64);
    let wake = Instant::now() + Duration::from_millis(300);
    let (h, woke) = open_fed(
        &dir,
        StoreConfig::from_config(&Config::defaults()),
        rx,
        1,
        Some(wake),
    );
    // The timer, well before the store's own housekeeping tick (1 s).
    wait_until("the timer ran", Duration::from_secs(5), || {
        woke.load(Ordering::SeqCst) == 1
    });
    assert!(Instant::now() - wake < Duration::from_millis(700));

    // A message after a quiet spell is committed at once, not at the next tick.
    std::thread::sleep(Duration::from_millis(50));
    let sent = Instant::now();
    tx.send(message(7)).unwrap();
    wait_until("the message committed", Duration::from_secs(5), || {
        h.stats().lanes[Lane::Reading].messages == 1
    });
    assert!(
        sent.elapsed() < Duration::from_millis(500),
        "{:?}",
        sent.elapsed()
    );
    h.shutdown().unwrap();
}

/// A store on a fresh file fed one row per message, with `n` messages sent to it.
fn fed_with(n: usize) -> (tempfile::TempDir, flume::Sender<Ingested>, StoreHandle) {
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = flume::bounded(64);
    let cfg = StoreConfig::from_config(&Config::defaults());
    let (h, _) = open_fed(&dir, cfg, rx, 1, None);
    for n in 0..n {
        tx.send(message(n)).unwrap();
    }
    (dir, tx, h)
}

#[test]
fn ending_the_feed_hands_out_what_waits_then_finishes_it() {
    let (_dir, tx, h) = fed_with(5);
    end_feed(&h);
    // After the end the input is dropped: nothing more is taken (a device would not be
    // acknowledged for it, and sends it again).
    assert!(tx.send(message(99)).is_err());
    h.flush_blocking().unwrap();
    assert_eq!(payloads(&h), ["0", "1", "2", "3", "4", "finished"]);

    // A shutdown without an end does the same: what waits, then the finish.
    let (dir, _tx, h) = fed_with(3);
    h.shutdown().unwrap();
    drop(h);
    let db = dir.path().join("gw.redb");
    let h = Store::open(&db, StoreConfig::from_config(&Config::defaults())).unwrap();
    assert_eq!(payloads(&h), ["0", "1", "2", "finished"]);
    h.shutdown().unwrap();
}
