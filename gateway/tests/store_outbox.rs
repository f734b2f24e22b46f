//! The store against real redb files: group commit, restart, retention, dead letters,
//! rule state, event log and the stats report.

use std::path::Path;
use std::time::{Duration, Instant};

use gateway::config::{Config, StorageSection};
use gateway::reading::{now_millis, Format};
use gateway::store::{
    self, Counter, DeadLetter, Lane, OutboxEntry, OutboxRow, OverflowPolicy, Store, StoreConfig,
    StoreHandle, COMMIT_EARLY_ROWS,
};
use test_support::wait_until;

fn reading(device: &str, n: u64, received_at: i64) -> OutboxEntry {
    OutboxEntry::reading(
        &format!("devices/{device}/telemetry"),
        device,
        format!("{{\"n\":{n}}}").as_bytes(),
        Format::Json,
        received_at,
    )
}

fn all_rows(h: &StoreHandle, lane: Lane) -> Vec<OutboxRow> {
    let mut out = Vec::new();
    h.read_outbox(lane, 0, usize::MAX, &mut out).unwrap();
    out
}

/// The store settings a user gets, with `[storage]` changed by `change`.
fn settings(change: impl FnOnce(&mut StorageSection)) -> StoreConfig {
    let mut config = Config::defaults();
    change(&mut config.storage);
    StoreConfig::from_config(&config)
}

fn open(path: &Path, cfg: StoreConfig) -> StoreHandle {
    Store::open(path, cfg).unwrap()
}

#[test]
fn group_commit_persists_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.redb");
    let h = open(&path, settings(|_| {}));
    let n = 5_000u64;
    for i in 0..n {
        assert!(h.append(reading(&format!("d{}", i % 7), i, now_millis())));
    }
    h.flush_blocking().unwrap();
    let stats = h.stats();
    assert_eq!(stats.lanes[Lane::Reading].messages, n);
    assert!(
        stats.commits < n / 10,
        "expected grouped commits, got {} commits for {n} appends",
        stats.commits
    );
    h.shutdown().unwrap();
    drop(h);

    let h = open(&path, settings(|_| {}));
    let rows = all_rows(&h, Lane::Reading);
    assert_eq!(rows.len() as u64, n);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.payload(), format!("{{\"n\":{i}}}").into_bytes());
        assert_eq!(row.device(), format!("d{}", i % 7));
    }
    assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(h.stats().lanes[Lane::Reading].messages, n);
}

/// Appends one reading and waits (up to 5 s) until it is committed; returns how long that
/// took. No flush: a flush request commits at once and would hide a wait.
fn append_and_time_commit(h: &StoreHandle, n: u64) -> Duration {
    let started = Instant::now();
    assert!(h.append(reading("a", n, now_millis())));
    wait_until("the append is committed", Duration::from_secs(5), || {
        h.last_committed_seq() == n
    });
    started.elapsed()
}

#[test]
fn group_commit_starts_at_once_after_a_quiet_spell_and_spaces_commits_by_flush_interval() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.redb");
    let interval = Duration::from_secs(1);
    let h = open(&path, settings(|s| s.flush_interval = interval));
    let first = Instant::now();
    let took = append_and_time_commit(&h, 1);
    assert!(
        took < interval / 2,
        "a lone append took {took:?} to commit: it must not wait for more"
    );
    append_and_time_commit(&h, 2);
    let spacing = first.elapsed();
    assert!(
        spacing >= interval,
        "the next commit started {spacing:?} after the previous one, before flush_interval"
    );
    // Quiet for longer than flush_interval: the next lone append commits at once again.
    std::thread::sleep(interval);
    let took = append_and_time_commit(&h, 3);
    assert!(
        took < interval / 2,
        "an append after a quiet spell took {took:?} to commit"
    );
}

/// A group of COMMIT_EARLY_ROWS appends need not wait out the spacing: the sender that
/// fills it wakes the writer, which commits at once (one device with many publishes in
/// flight is not held to one window per `flush_interval`).
#[test]
fn a_full_group_commits_without_waiting_out_the_spacing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.redb");
    let interval = Duration::from_secs(3);
    let h = open(&path, settings(|s| s.flush_interval = interval));
    append_and_time_commit(&h, 1);
    let started = Instant::now();
    let last = 1 + COMMIT_EARLY_ROWS as u64;
    for n in 2..=last {
        assert!(h.append(reading("a", n, now_millis())));
        if n == 2 {
            // The writer takes this one and sleeps through the spacing: the rest must
            // wake it.
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    wait_until("the full group is committed", interval * 2, || {
        h.last_committed_seq() == last
    });
    let took = started.elapsed();
    assert!(
        took < interval / 2,
        "{COMMIT_EARLY_ROWS} appends took {took:?} to commit: they waited for the spacing"
    );
    // Fewer than that inside the spacing wait for it, as before.
    let started = Instant::now();
    append_and_time_commit(&h, last + 1);
    assert!(
        started.elapsed() >= interval / 2,
        "a lone append inside the spacing committed at once"
    );
}

#[test]
fn seq_is_monotonic_across_restarts_and_lanes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.redb");
    let mut last = 0;
    for round in 0..3u64 {
        let h = open(&path, settings(|_| {}));
        h.append(reading("a", round, now_millis()));
        h.append(OutboxEntry::event(
            "Hot",
            "a",
            b"{\"type\":\"Hot\"}",
            now_millis(),
        ));
        h.flush_blocking().unwrap();
        // Ack everything so the next round cannot just see old rows.
        let r = all_rows(&h, Lane::Reading);
        let e = all_rows(&h, Lane::Event);
        assert_eq!((r.len(), e.len()), (1, 1));
        assert!(r[0].seq > last && e[0].seq > r[0].seq, "round {round}");
        last = e[0].seq;
        assert_eq!(h.last_committed_seq(), last);
        assert_eq!(e[0].topic(), "events/Hot/a");
        h.ack(Lane::Reading, vec![r[0].seq]);
        h.ack(Lane::Event, vec![e[0].seq]);
        h.flush_blocking().unwrap();
        assert_eq!(h.stats().depth(), 0);
        assert_eq!(h.counter(Counter::Acked), 2 * (round + 1));
        h.shutdown().unwrap();
    }
}

/// Queues `n` dead letters, the reason of the i-th being `bad {i}`.
fn dead_letters(h: &StoreHandle, n: i64) {
    for i in 0..n {
        assert!(h.dead_letter(
            DeadLetter {
                topic: "devices/x/telemetry".into(),
                payload: vec![i as u8],
                reason: format!("bad {i}"),
                received_at: i,
            },
            None
        ));
    }
}

#[test]
fn dead_letters_are_bounded_oldest_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.redb");
    let cfg = settings(|s| s.dead_letter_max = 50);
    let h = open(&path, cfg);
    dead_letters(&h, 120);
    h.flush_blocking().unwrap();
    let dls = h.read_dead_letters(1000).unwrap();
    assert_eq!(dls.len(), 50);
    assert_eq!(dls[0].reason, "bad 119");
    assert_eq!(dls[49].reason, "bad 70");
    assert_eq!(h.counter(Counter::DeadLettersEvicted), 70);
    // Readable from another handle on the file while the store is open.
    let from_file = store::read_dead_letters(&path, 3).unwrap();
    assert_eq!(from_file, dls[..3].to_vec());
}

/// Groups that add no dead letters leave that table closed, so a bound lowered while the
/// gateway was stopped is applied by the first group after the store opens.
#[test]
fn a_lower_dead_letter_bound_applies_after_a_restart_without_new_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.redb");
    let h = open(&path, settings(|s| s.dead_letter_max = 100));
    dead_letters(&h, 80);
    h.flush_blocking().unwrap();
    assert_eq!(h.counter(Counter::DeadLetterRows), 80);
    h.shutdown().unwrap();
    drop(h);

    let h = open(&path, settings(|s| s.dead_letter_max = 30));
    assert!(h.append(reading("d1", 1, now_millis())));
    h.flush_blocking().unwrap();
    let dls = h.read_dead_letters(1000).unwrap();
    assert_eq!(dls.len(), 30);
    assert_eq!(dls[0].reason, "bad 79");
    assert_eq!(h.counter(Counter::DeadLetterRows), 30);
    assert_eq!(h.counter(Counter::DeadLettersEvicted), 50);
    // Later groups with readings only keep the count.
    assert!(h.append(reading("d1", 2, now_millis())));
    h.flush_blocking().unwrap();
    assert_eq!(h.counter(Counter::DeadLetterRows), 30);
    h.shutdown().unwrap();
}

#[test]
fn a_full_queue_makes_the_caller_wait_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        channel_capacity: 4,
        ..settings(|s| s.flush_interval = Duration::from_millis(20))
    };
    let h = open(&dir.path().join("gw.redb"), cfg);
    let tries = 3_000u64;
    for i in 0..tries {
        assert!(h.dead_letter(
            DeadLetter {
                topic: "t".into(),
                payload: vec![],
                reason: format!("{i}"),
                received_at: 0,
            },
            None
        ));
    }
    h.flush_blocking().unwrap();
    assert_eq!(h.counter(Counter::DropDeadLetterOverflow), 0);
    assert_eq!(h.counter(Counter::DeadLetterRows), tries);
}

/// A device publish's acknowledgement (its receipt) leaves the store only after the
/// commit that holds what it became, and receipts are released in queue order.
#[test]
fn receipts_are_released_after_the_commit_in_order() {
    use rumqttd::ingest::HeldAcks;
    use rumqttd::protocol::{Packet, Publish};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.redb");
    let h = open(&path, settings(|_| {}));
    let (hook, _rx) = rumqttd::IngestHook::bounded(16);
    let mut held = HeldAcks::new(hook, None, "d");
    // Two QoS 1 publishes, packet ids 1 and 2, as the network parser yields them.
    let mut packets: Vec<Packet> = (1..=2u16)
        .map(|pkid| {
            let mut b = vec![0b0011_0010u8];
            b.extend_from_slice(&pkid.to_be_bytes());
            b.extend_from_slice(&1u16.to_be_bytes());
            b.extend_from_slice(b"t");
            Packet::Publish(Publish::deserialize(b.into()), None)
        })
        .collect();
    let mut taken = held.take(&mut packets);
    let first = taken[0].ack.take();
    let second = taken[1].ack.take().unwrap();
    assert!(h.dead_letter(
        DeadLetter {
            topic: "t".into(),
            payload: b"x".to_vec(),
            reason: "bad".into(),
            received_at: 1,
        },
        first,
    ));
    h.release(second);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let acks = loop {
        let acks = held.ready().expect("no receipt may be refused");
        if !acks.is_empty() {
            break acks;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "receipts never released"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    // Durable by the time the device may be acknowledged: the files as they are now, as
    // a crash would leave them, open with the dead letter in them.
    let crashed = tempfile::tempdir().unwrap();
    let copy = crashed.path().join("gw.redb");
    for suffix in ["", ".journal"] {
        std::fs::copy(
            format!("{}{suffix}", path.display()),
            format!("{}{suffix}", copy.display()),
        )
        .unwrap();
    }
    let reopened = open(&copy, settings(|_| {}));
    assert_eq!(reopened.read_dead_letters(10).unwrap().len(), 1);
    reopened.shutdown().unwrap();
    let pkids: Vec<u16> = acks
        .iter()
        .map(|p| match p {
            Packet::PubAck(a, _) => a.pkid,
            p => panic!("not a PUBACK: {p:?}"),
        })
        .collect();
    let rest: Vec<_> = held.ready().unwrap().into_iter().collect();
    assert_eq!(pkids.len() + rest.len(), 2);
    assert_eq!(pkids[0], 1, "in publish order");
}

#[test]
fn retention_by_bytes_drops_oldest_readings_keeps_events() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.redb");
    let max_bytes = 20_000;
    let cfg = settings(|s| s.max_bytes = max_bytes);
    let h = open(&path, cfg);
    let events = 20u64;
    for i in 0..events {
        h.append(OutboxEntry::event(
            "Hot",
            "d0",
            format!("{{\"i\":{i}}}").as_bytes(),
            now_millis(),
        ));
    }
    let n = 2_000u64;
    for i in 0..n {
        h.append(reading("d0", i, now_millis()));
    }
    h.flush_blocking().unwrap();
    let s = h.stats();
    assert!(s.bytes() <= max_bytes);
    assert_eq!(s.lanes[Lane::Event].messages, events, "events are kept");
    let dropped = s.get(Counter::DropMaxBytesReadings);
    assert!(dropped > 0);
    assert_eq!(
        dropped + s.lanes[Lane::Reading].messages,
        n,
        "every drop is counted"
    );
    let rows = all_rows(&h, Lane::Reading);
    // The survivors are the newest readings.
    assert_eq!(
        rows.last().unwrap().payload(),
        format!("{{\"n\":{}}}", n - 1).into_bytes()
    );
    assert_eq!(
        rows[0].payload(),
        format!("{{\"n\":{dropped}}}").into_bytes()
    );
    assert_eq!(s.get(Counter::DropMaxBytesEvents), 0);
    // The report shows the same figures, read from the file while the store is open.
    let mut report = Vec::new();
    store::stats_command(&path, &mut report).unwrap();
    let report = String::from_utf8(report).unwrap();
    let dropped_text = dropped.to_string();
    assert!(
        report
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["drop.max_bytes.readings", dropped_text.as_str()]),
        "{report}"
    );
    assert!(
        report.contains(&format!("depth: {} messages", s.depth())),
        "{report}"
    );
}

#[test]
fn retention_by_age_drops_old_rows() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = settings(|s| s.max_age = Duration::from_secs(60));
    let h = open(&dir.path().join("gw.redb"), cfg);
    let now = now_millis();
    for i in 0..10 {
        h.append(reading("d", i, now - 3_600_000));
    }
    for i in 10..15 {
        h.append(reading("d", i, now));
    }
    h.flush_blocking().unwrap();
    let s = h.stats();
    assert_eq!(s.get(Counter::DropMaxAgeReadings), 10);
    assert_eq!(s.lanes[Lane::Reading].messages, 5);
    assert!(s.lanes[Lane::Reading].oldest_age_ms.unwrap() < 60_000);
}

#[test]
fn reject_new_policy_keeps_old_rows() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        overflow_policy: OverflowPolicy::RejectNew,
        ..settings(|s| s.max_bytes = 5_000)
    };
    let h = open(&dir.path().join("gw.redb"), cfg);
    let n = 500;
    for i in 0..n {
        h.append(reading("d", i, now_millis()));
    }
    h.flush_blocking().unwrap();
    let s = h.stats();
    let rejected = s.get(Counter::DropRejectedFull);
    assert!(rejected > 0);
    assert_eq!(rejected + s.lanes[Lane::Reading].messages, n);
    assert_eq!(
        all_rows(&h, Lane::Reading)[0].payload(),
        b"{\"n\":0}".to_vec()
    );
}

#[test]
fn rule_state_and_event_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.redb");
    let cfg = StoreConfig {
        event_log_max: 100,
        ..settings(|_| {})
    };
    let h = open(&path, cfg.clone());
    h.put_state("rule/a/d1".into(), b"firing".to_vec());
    h.put_state("rule/a/d2".into(), b"ok".to_vec());
    h.put_state("rule/b/d1".into(), b"ok".to_vec());
    h.delete_state("rule/a/d2".into());
    for i in 0..150i64 {
        let (t, d) = if i % 2 == 0 {
            ("Hot", "d1")
        } else {
            ("Cold", "d2")
        };
        h.log_event(1_000 + i, t, d, format!("{{\"i\":{i}}}").into_bytes());
    }
    h.flush_blocking().unwrap();
    h.shutdown().unwrap();
    drop(h);

    let h = open(&path, cfg);
    assert_eq!(h.load_state("rule/a/d1").unwrap(), Some(b"firing".to_vec()));
    assert_eq!(h.load_state("rule/a/d2").unwrap(), None);
    let keys: Vec<String> = h
        .load_state_prefix("rule/a/")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, vec!["rule/a/d1".to_string()]);
    let all = h.query_events(0, None, None, 1000).unwrap();
    assert_eq!(all.len(), 100, "event log keeps the newest 100");
    assert_eq!(all[0].time, 1_050);
    let hot = h.query_events(1_100, Some("Hot"), Some("d1"), 10).unwrap();
    assert_eq!(hot.len(), 10);
    assert!(hot.iter().all(|e| e.event_type == "Hot" && e.time >= 1_100));
    assert_eq!(hot[0].json, b"{\"i\":100}".to_vec());
    assert_eq!(h.counter(Counter::EventLogEvicted), 50);
}

#[test]
fn stats_command_reads_a_closed_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.redb");
    let h = open(&path, settings(|_| {}));
    for i in 0..10 {
        h.append(reading("d", i, now_millis()));
    }
    h.shutdown().unwrap();
    drop(h);
    let s = store::read_stats_file(&path).unwrap();
    assert_eq!(s.lanes[Lane::Reading].messages, 10);
    assert_eq!(s.get(Counter::AppendedReadings), 10);
    assert!(s.lanes[Lane::Reading].oldest_age_ms.is_some());
}

#[test]
fn every_counter_survives_a_restart_when_commits_write_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.redb");
    let h = open(&path, settings(|_| {}));
    // Commits that each move a different set of counters: appends, a dead letter, acks.
    for i in 0..20 {
        assert!(h.append(reading("d", i, now_millis())));
    }
    h.flush_blocking().unwrap();
    let dl = DeadLetter {
        topic: "devices/d/telemetry".into(),
        payload: b"not json".to_vec(),
        reason: "test".into(),
        received_at: now_millis(),
    };
    assert!(h.dead_letter(dl, None));
    h.flush_blocking().unwrap();
    let seqs: Vec<u64> = all_rows(&h, Lane::Reading)
        .iter()
        .take(5)
        .map(|r| r.seq)
        .collect();
    h.ack(Lane::Reading, seqs);
    h.flush_blocking().unwrap();
    assert!(h.append(reading("d", 20, now_millis())));
    h.flush_blocking().unwrap();
    let before: Vec<(Counter, u64)> = Counter::ALL.iter().map(|&c| (c, h.counter(c))).collect();
    assert_eq!(h.counter(Counter::Acked), 5);
    h.shutdown().unwrap();
    drop(h);

    let from_file = store::read_stats_file(&path).unwrap();
    let h = open(&path, settings(|_| {}));
    for (c, v) in before {
        assert_eq!(from_file.get(c), v, "{c:?} as read from the closed file");
        assert_eq!(h.counter(c), v, "{c:?} after reopening");
    }
}

/// Appends `n` readings, commits them, and returns their seqs.
fn committed_rows(h: &StoreHandle, n: u64) -> Vec<u64> {
    for i in 0..n {
        assert!(h.append(reading("d", i, now_millis())));
    }
    h.flush_blocking().unwrap();
    all_rows(h, Lane::Reading).iter().map(|r| r.seq).collect()
}

#[test]
fn acks_arriving_one_by_one_are_deleted_together_within_the_ack_delay() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(&dir.path().join("gw.redb"), settings(|_| {}));
    let seqs = committed_rows(&h, 10);
    let commits = h.stats().commits;
    let started = Instant::now();
    for seq in seqs {
        h.ack(Lane::Reading, vec![seq]);
    }
    wait_until("acked rows deleted", store::ACK_DELAY * 5, || {
        h.stats().lanes[Lane::Reading].messages == 0
    });
    // Ten acks, one commit (not one per ack, as each would get on a quiet store).
    assert_eq!(h.stats().commits - commits, 1);
    assert!(
        started.elapsed() >= store::ACK_DELAY / 2,
        "deleted after {:?}: the acks did not wait for company",
        started.elapsed()
    );
    assert_eq!(h.counter(Counter::Acked), 10);
}

#[test]
fn pending_acks_join_the_next_commit_of_new_rows_without_waiting_for_the_ack_delay() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(&dir.path().join("gw.redb"), settings(|_| {}));
    let seqs = committed_rows(&h, 10);
    let started = Instant::now();
    h.ack(Lane::Reading, seqs[..3].to_vec());
    // Alone, the acks wait for company (see above); a new row commits them with it.
    std::thread::sleep(store::ACK_DELAY / 10);
    assert_eq!(h.stats().lanes[Lane::Reading].messages, 10);
    assert!(h.append(reading("d", 10, now_millis())));
    wait_until(
        "acks committed with the new row",
        store::ACK_DELAY / 2,
        || h.stats().lanes[Lane::Reading].messages == 8,
    );
    assert!(
        started.elapsed() < store::ACK_DELAY,
        "deleted after {:?}: the acks waited for the ack delay",
        started.elapsed()
    );
    assert_eq!(h.counter(Counter::Acked), 3);
}

#[test]
fn a_full_group_of_acks_and_a_flush_delete_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(&dir.path().join("gw.redb"), settings(|_| {}));
    let n = store::ACK_GROUP_ROWS as u64 + 10;
    let seqs = committed_rows(&h, n);
    // A flush commits pending acks with it, however few.
    h.ack(Lane::Reading, vec![seqs[0]]);
    h.flush_blocking().unwrap();
    assert_eq!(h.stats().lanes[Lane::Reading].messages, n - 1);
    // ACK_GROUP_ROWS pending acks are deleted by the next group, without a flush and
    // well before ACK_DELAY.
    h.ack(Lane::Reading, seqs[1..=store::ACK_GROUP_ROWS].to_vec());
    wait_until("a full group of acks deleted", store::ACK_DELAY / 2, || {
        h.stats().lanes[Lane::Reading].messages == n - 1 - store::ACK_GROUP_ROWS as u64
    });
}

/// Reads `lane` from `next` on as the forwarder does, until nothing is left; returns the
/// seqs handed over.
fn read_live(h: &StoreHandle, next: &mut u64) -> Vec<u64> {
    let mut got = Vec::new();
    let mut rows = Vec::new();
    loop {
        h.read_outbox_live(Lane::Reading, *next, 100, &mut rows)
            .unwrap();
        let Some(last) = rows.last() else {
            return got;
        };
        *next = last.seq + 1;
        got.extend(rows.iter().map(|r| r.seq));
    }
}

#[test]
fn the_live_reader_gets_every_committed_row_once_in_order_from_memory_or_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(&dir.path().join("gw.redb"), settings(|_| {}));
    let append = |n: u64| {
        for i in 0..n {
            assert!(h.append(reading("d", i, now_millis())));
        }
        h.flush_blocking().unwrap();
    };
    append(30); // before the reader's first read: in the file only
    let mut next = 0;
    let mut got = read_live(&h, &mut next);
    for _ in 0..5 {
        append(50);
        got.extend(read_live(&h, &mut next));
    }
    // The reader falls behind by more than the tail holds, then catches up.
    for _ in 0..3 {
        append(store::TAIL_ROWS as u64 / 2 + 10);
    }
    got.extend(read_live(&h, &mut next));
    append(20);
    got.extend(read_live(&h, &mut next));
    let all: Vec<u64> = all_rows(&h, Lane::Reading).iter().map(|r| r.seq).collect();
    assert_eq!(all.len(), 30 + 250 + 3 * (store::TAIL_ROWS / 2 + 10) + 20);
    assert_eq!(got, all);
    // A replay from the start (a reconnect) gets every row again, from the file.
    let mut from_start = 0;
    assert_eq!(read_live(&h, &mut from_start), all);
    // Rows the reader took are still in the file (only an ack deletes them).
    assert_eq!(all_rows(&h, Lane::Reading).len(), all.len());
}
