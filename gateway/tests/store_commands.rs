//! The downlink command queue of the store against real redb files: queued in order per
//! device, bounded (the oldest dropped), removed once, kept across a reopen, and every
//! change reported by a status row in the outbox's event lane of the same commit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use gateway::config::Config;
use gateway::reading::now_millis;
use gateway::store::{
    CommandState, Counter, Lane, OutboxRow, QueuedCommand, Store, StoreConfig, StoreHandle,
};

fn command(device: &str, id: &str) -> QueuedCommand {
    QueuedCommand {
        seq: 0,
        device: device.into(),
        command: "fan".into(),
        id: id.into(),
        status_topic: format!("commands/{device}/fan/status"),
        payload: format!("payload of {id}").into_bytes(),
        content_type: Some("text/plain".into()),
        user_properties: vec![("k".into(), "v".into())],
        queued_at: now_millis(),
        expires_at: now_millis() + 60_000,
    }
}

fn open(path: &std::path::Path, max_per_device: usize) -> StoreHandle {
    let mut config = Config::defaults();
    config.downlink.max_per_device = max_per_device;
    Store::open(path, StoreConfig::from_config(&config)).unwrap()
}

/// The (id, state) of every status row in the outbox, in seq order.
fn statuses(h: &StoreHandle) -> Vec<(String, String)> {
    let mut rows: Vec<OutboxRow> = Vec::new();
    h.read_outbox(Lane::Event, 0, usize::MAX, &mut rows)
        .unwrap();
    rows.iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(r.payload()).unwrap();
            assert_eq!(
                r.topic(),
                format!("commands/{}/fan/status", v["device"].as_str().unwrap())
            );
            (
                v["id"].as_str().unwrap().into(),
                v["state"].as_str().unwrap().into(),
            )
        })
        .collect()
}

fn ids(queue: &[QueuedCommand]) -> Vec<&str> {
    queue.iter().map(|c| c.id.as_str()).collect()
}

#[test]
fn commands_queue_in_order_are_bounded_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.redb");
    let h = open(&path, 2);
    let committed = Arc::new(AtomicUsize::new(0));
    for id in ["a1", "a2", "a3"] {
        let c = committed.clone();
        assert!(h.queue_command(
            command("a", id),
            Some(Box::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
            }))
        ));
    }
    h.queue_command(command("b", "b1"), None);
    h.flush_blocking().unwrap();
    assert_eq!(
        committed.load(Ordering::SeqCst),
        3,
        "on_commit ran after the commit"
    );

    let queue = h.pending_commands(Some("a"), 100).unwrap();
    assert_eq!(ids(&queue), ["a2", "a3"], "the oldest was dropped");
    assert_eq!(queue[0].payload, b"payload of a2");
    assert_eq!(queue[0].content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        queue[0].user_properties,
        [("k".to_string(), "v".to_string())]
    );
    assert!(queue[0].seq < queue[1].seq);
    assert_eq!(
        ids(&h.pending_commands(None, 100).unwrap()),
        ["a2", "a3", "b1"]
    );

    // Removed once: a second removal of the same command reports nothing.
    h.command_done("a", queue[0].seq, CommandState::Delivered);
    h.command_done("a", queue[0].seq, CommandState::Expired);
    h.flush_blocking().unwrap();
    assert_eq!(
        statuses(&h),
        [
            ("a1", "queued"),
            ("a2", "queued"),
            ("a3", "queued"),
            ("a1", "dropped"),
            ("b1", "queued"),
            ("a2", "delivered"),
        ]
        .map(|(i, s)| (i.to_string(), s.to_string()))
    );
    assert_eq!(h.counter(Counter::CommandsPending), 2);
    assert_eq!(h.counter(Counter::CommandsDropped), 1);
    assert_eq!(h.counter(Counter::CommandsDelivered), 1);
    let last_seq = queue[1].seq;
    h.shutdown().unwrap();
    drop(h);

    let h = open(&path, 2);
    let queue = h.pending_commands(Some("a"), 100).unwrap();
    assert_eq!(ids(&queue), ["a3"]);
    assert_eq!(queue[0].seq, last_seq);
    assert_eq!(h.counter(Counter::CommandsPending), 2);
    h.queue_command(command("a", "a4"), None);
    h.flush_blocking().unwrap();
    let queue = h.pending_commands(Some("a"), 100).unwrap();
    assert_eq!(
        ids(&queue),
        ["a3", "a4"],
        "new commands queue behind the old ones"
    );
    h.shutdown().unwrap();
}
