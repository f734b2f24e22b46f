//! The database epoch against real redb files: fixed when a file is created, kept across
//! reopens, new for a new file, and given to a file from before epochs when it is first
//! opened.

use std::path::Path;

use gateway::config::Config;
use gateway::reading::{now_millis, Format};
use gateway::store::{self, Lane, OutboxEntry, Store, StoreConfig, StoreHandle};

fn open(path: &Path) -> StoreHandle {
    Store::open(path, StoreConfig::from_config(&Config::defaults())).unwrap()
}

fn append_readings(h: &StoreHandle, n: u64) {
    for i in 0..n {
        assert!(h.append(OutboxEntry::reading(
            "devices/d/telemetry",
            "d",
            format!("{{\"n\":{i}}}").as_bytes(),
            Format::Json,
            now_millis(),
        )));
    }
    h.flush_blocking().unwrap();
}

/// The epoch committed in the file, read the way `gateway outbox stats` reads it.
fn epoch_in_file(path: &Path) -> Option<u64> {
    store::read_stats_file(path).unwrap().epoch
}

#[test]
fn the_epoch_is_kept_across_reopens_and_new_for_a_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.redb");
    let h = open(&path);
    let epoch = h.epoch();
    assert_ne!(epoch, 0);
    assert_eq!(h.stats().epoch, Some(epoch));
    append_readings(&h, 3);
    h.shutdown().unwrap();
    assert_eq!(epoch_in_file(&path), Some(epoch), "committed with the file");

    let h = open(&path);
    assert_eq!(h.epoch(), epoch, "a reopen keeps the epoch");
    h.shutdown().unwrap();

    std::fs::remove_file(&path).unwrap();
    let h = open(&path);
    assert_ne!(h.epoch(), epoch, "a new file gets a new epoch");
    assert_eq!(h.last_committed_seq(), 0, "and starts its sequence again");
}

#[test]
fn a_database_from_before_epochs_gets_one_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.redb");
    let h = open(&path);
    append_readings(&h, 3);
    h.shutdown().unwrap();
    drop(h);
    // An older gateway wrote the same tables without `META.epoch`.
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
            let mut meta = txn.open_table(meta).unwrap();
            assert!(meta.remove("epoch").unwrap().is_some());
        }
        txn.commit().unwrap();
    }
    assert_eq!(epoch_in_file(&path), None, "the file looks like an old one");

    let h = open(&path);
    let epoch = h.epoch();
    assert_ne!(epoch, 0, "an epoch is made on open");
    let mut rows = Vec::new();
    h.read_outbox(Lane::Reading, 0, 10, &mut rows).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [1, 2, 3],
        "the old rows keep their seqs"
    );
    assert_eq!(
        epoch_in_file(&path),
        Some(epoch),
        "committed at once, before any append"
    );
    h.shutdown().unwrap();
    assert_eq!(open(&path).epoch(), epoch, "and kept from then on");
}
