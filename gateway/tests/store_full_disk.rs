//! The store on a real, full filesystem: a small tmpfs is filled with a filler file until
//! ENOSPC; the store degrades (refuses appends, counts them, stays alive, keeps committed
//! rows readable, keeps acks), and recovers by itself once the filler is deleted, with no
//! committed row lost.
//!
//! Needs `mount` (root). Skipped with a message when mounting is not permitted, unless
//! `GATEWAY_REQUIRE_MOUNT=1`, which makes that a failure (CI sets it).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gateway::backoff::Backoff;
use gateway::config::Config;
use gateway::reading::Format;
use gateway::store::{Counter, Lane, OutboxEntry, OutboxRow, Store, StoreConfig, StoreHandle};
use test_support::tmpfs::{fill, Tmpfs};
use test_support::wait_until;

/// Reopen retries while degraded: first and longest wait (the store's are 1 s and 5 s).
const RETRY: Backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(50));

fn entry(i: u64) -> OutboxEntry {
    let payload = format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(1500)).into_bytes();
    OutboxEntry::reading(
        &format!("devices/d-{}/telemetry", i % 7),
        &format!("d-{}", i % 7),
        &payload,
        Format::Json,
        gateway::reading::now_millis(),
    )
}

fn n_of(row: &OutboxRow) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(row.payload()).unwrap();
    v["n"].as_u64().unwrap()
}

/// Every committed reading, by seq.
fn all_rows(store: &StoreHandle) -> BTreeMap<u64, OutboxRow> {
    let mut out = BTreeMap::new();
    let mut buf = Vec::new();
    let mut from = 0;
    loop {
        store
            .read_outbox(Lane::Reading, from, 1000, &mut buf)
            .unwrap();
        let Some(last) = buf.last() else { break };
        from = last.seq + 1;
        out.extend(buf.drain(..).map(|r| (r.seq, r)));
    }
    out
}

#[test]
fn full_disk_degrades_refuses_and_recovers_without_losing_committed_rows() {
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let path = fs.path().join("gateway.redb");
    let mut config = Config::defaults();
    config.storage.flush_interval = Duration::from_millis(1);
    let cfg = StoreConfig {
        cache_size: 1024 * 1024,
        health_retry: RETRY,
        ..StoreConfig::from_config(&config)
    };
    let store = Store::open(&path, cfg.clone()).unwrap();

    // Some rows before the disk fills.
    let mut committed: Vec<u64> = Vec::new();
    let mut next = 0u64;
    for _ in 0..200 {
        assert!(store.append(entry(next)));
        committed.push(next);
        next += 1;
    }
    store.flush_blocking().unwrap();

    let filler = fill(fs.path());

    // Keep appending in batches until a commit fails; a batch whose flush succeeded is
    // committed in full.
    let mut failed = false;
    for _ in 0..2000 {
        let batch: Vec<u64> = (next..next + 50).collect();
        next += 50;
        // A group commit of this batch may fail before the batch is all queued; the
        // rest is then refused at once.
        let mut queued = true;
        for &i in &batch {
            queued &= store.append(entry(i));
        }
        if queued && store.flush_blocking().is_ok() {
            committed.extend(batch);
        } else {
            failed = true;
            break;
        }
    }
    assert!(failed, "no commit failed on a full filesystem");
    assert!(store.is_degraded());
    let stats = store.stats();
    assert_eq!(stats.storage_degraded(), 1);
    assert_eq!(stats.get(Counter::StorageErrors), 1);

    // Refused at once, counted per lane, without blocking.
    let refused_before = store.counter(Counter::DropRefusedReadings);
    let started = Instant::now();
    for i in 0..1000 {
        assert!(!store.append(entry(1_000_000 + i)));
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        store.counter(Counter::DropRefusedReadings) - refused_before,
        1000
    );
    assert!(!store.append(OutboxEntry::event("E", "d-1", b"{}", 1)));
    assert_eq!(store.counter(Counter::DropRefusedEvents), 1);
    assert!(!store.put_state("k".into(), b"v".to_vec()));
    assert_eq!(store.counter(Counter::RefusedState), 1);

    // The owner thread is alive: it answers a flush (with a failure) promptly.
    let started = Instant::now();
    assert!(store.flush_blocking().is_err());
    assert!(started.elapsed() < Duration::from_secs(5));

    // Committed rows stay readable while degraded (through a read-only handle).
    let rows = all_rows(&store);
    let present: Vec<u64> = rows.values().map(n_of).collect();
    for n in &committed {
        assert!(
            present.contains(n),
            "committed reading {n} not readable while degraded"
        );
    }

    // Still readable after failed retries (each finds the filesystem still full and waits
    // again). Nothing changes to wait for: let a few retries pass.
    std::thread::sleep(RETRY.max * 6);
    assert!(store.is_degraded());
    assert_eq!(all_rows(&store).len(), rows.len());
    // ... and from the file by another reader, as `gateway outbox stats` does.
    let from_file = gateway::store::read_stats_file(&path).unwrap();
    assert_eq!(from_file.lanes[Lane::Reading].messages, rows.len() as u64);
    assert_eq!(from_file.storage, None);

    // Acks while degraded are kept and applied after recovery.
    let acked: Vec<u64> = rows.keys().copied().take(20).collect();
    store.ack(Lane::Reading, acked.clone());

    // Space returns: the store recovers by itself.
    std::fs::remove_file(&filler).unwrap();
    wait_until("recovery", Duration::from_secs(15), || !store.is_degraded());
    assert_eq!(store.stats().storage_degraded(), 0);

    // New appends are accepted and committed again.
    for i in 0..100 {
        assert!(store.append(entry(2_000_000 + i)));
    }
    store.flush_blocking().unwrap();
    assert_eq!(store.acks_committed(), acked.len() as u64);

    let all_rows_before = rows;
    let check = |store: &StoreHandle| {
        let rows = all_rows(store);
        let present: Vec<u64> = rows.values().map(n_of).collect();
        for (seq, row) in &rows {
            assert!(!acked.contains(seq), "acked row {seq} still present");
            assert_eq!(row.payload(), entry(n_of(row)).row.payload());
        }
        let acked_ns: Vec<u64> = acked.iter().map(|s| n_of(&all_rows_before[s])).collect();
        for n in &committed {
            assert!(
                present.contains(n) || acked_ns.contains(n),
                "committed reading {n} was lost"
            );
        }
        for i in 0..100 {
            assert!(
                present.contains(&(2_000_000 + i)),
                "reading after recovery missing"
            );
        }
        assert!(!present.iter().any(|n| (1_000_000..2_000_000).contains(n)));
        let stats = store.stats();
        assert_eq!(stats.lanes[Lane::Reading].messages, rows.len() as u64);
    };
    check(&store);
    let stats = store.stats();
    assert_eq!(
        stats.get(Counter::DropRefusedReadings),
        refused_before + 1000
    );
    store.shutdown().unwrap();
    drop(store);

    // The file alone says the same after a restart, counters included.
    let store = Store::open(&path, cfg).unwrap();
    check(&store);
    let stats = store.stats();
    assert_eq!(stats.get(Counter::StorageErrors), 1);
    assert_eq!(
        stats.get(Counter::DropRefusedReadings),
        refused_before + 1000
    );
    // Every append is accounted for: committed, lost with the failed group, or refused.
    assert_eq!(stats.get(Counter::DropStoreOverflow), 0);
    assert_eq!(
        stats.get(Counter::AppendedReadings)
            + stats.get(Counter::DropCommitFailed)
            + stats.get(Counter::DropRefusedReadings),
        next + 1000 + 100
    );
    store.shutdown().unwrap();
}

#[test]
fn opening_on_a_full_disk_fails_with_the_path_then_works_once_space_returns() {
    let Some(fs) = Tmpfs::mount("2m") else { return };
    let filler = fill(fs.path());
    let path = fs.path().join("gateway.redb");
    let err = match Store::open(&path, StoreConfig::from_config(&Config::defaults())) {
        Ok(_) => panic!("the store opened on a full filesystem"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("No space left"), "{err}");

    std::fs::remove_file(&filler).unwrap();
    let store = Store::open(&path, StoreConfig::from_config(&Config::defaults())).unwrap();
    assert!(store.append(entry(1)));
    store.flush_blocking().unwrap();
    assert_eq!(all_rows(&store).len(), 1);
    store.shutdown().unwrap();
}
