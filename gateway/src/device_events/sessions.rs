//! Which connection of each client is its current one, from the broker's reports; what
//! to announce for each report.
//!
//! Input: `rumqttd::PresenceEvent`s in the order the channel delivers them. Output: the
//! [`Change`]s to announce. Pure: time is passed in.
//!
//! Invariants:
//! - per client, the announced changes alternate: connected, disconnected, connected, ..
//!   and the last one announced is the state of its newest connection;
//! - generations grow with every connection of the process, so a report of an older
//!   generation than the current one is about a replaced connection: it is ignored
//!   and never announced as the client going offline;
//! - a takeover is announced as the old connection's `taken_over` disconnect followed by
//!   the new connection, whichever of the two reports came first.

use std::collections::HashMap;
use std::sync::Arc;

use rumqttd::{DisconnectReason, PresenceEvent};

use crate::reading::Millis;

/// One connection of a client, as its `Connected` report told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub generation: u64,
    /// When its report arrived (Unix ms).
    pub since: Millis,
    pub mqtt5: bool,
    pub keep_alive: u16,
    pub clean_session: bool,
}

/// What to announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Connected {
        client_id: Arc<str>,
        session: Session,
    },
    Disconnected {
        client_id: Arc<str>,
        session: Session,
        reason: DisconnectReason,
    },
}

/// The current connection of every connected client.
#[derive(Debug, Default)]
pub struct Sessions {
    live: HashMap<Arc<str>, Session>,
}

impl Sessions {
    /// The changes `report` makes (none for a stale one), in the order to announce them.
    pub fn on_report(&mut self, report: PresenceEvent, now: Millis) -> Vec<Change> {
        match report {
            PresenceEvent::Connected {
                client_id,
                generation,
                mqtt5,
                keep_alive,
                clean_session,
            } => {
                let session = Session {
                    generation,
                    since: now,
                    mqtt5,
                    keep_alive,
                    clean_session,
                };
                let mut changes = Vec::with_capacity(2);
                match self.live.get(&client_id) {
                    Some(current) if current.generation > generation => return changes,
                    // Replaced before its own end was reported: that report is stale now.
                    Some(current) => changes.push(Change::Disconnected {
                        client_id: client_id.clone(),
                        session: current.clone(),
                        reason: DisconnectReason::TakenOver,
                    }),
                    None => {}
                }
                self.live.insert(client_id.clone(), session.clone());
                changes.push(Change::Connected { client_id, session });
                changes
            }
            PresenceEvent::Disconnected {
                client_id,
                generation,
                reason,
            } => match self.live.get(&client_id) {
                // The current connection, or a newer one whose `Connected` was dropped.
                Some(current) if current.generation <= generation => {
                    let session = self.live.remove(&client_id).expect("present");
                    vec![Change::Disconnected {
                        client_id,
                        session,
                        reason,
                    }]
                }
                _ => Vec::new(),
            },
        }
    }

    /// The current connection of `client_id`.
    pub fn get(&self, client_id: &str) -> Option<&Session> {
        self.live.get(client_id)
    }

    /// Connected clients.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connected(client: &str, generation: u64) -> PresenceEvent {
        PresenceEvent::Connected {
            client_id: client.into(),
            generation,
            mqtt5: true,
            keep_alive: 30,
            clean_session: true,
        }
    }

    fn disconnected(client: &str, generation: u64, reason: DisconnectReason) -> PresenceEvent {
        PresenceEvent::Disconnected {
            client_id: client.into(),
            generation,
            reason,
        }
    }

    /// (client, generation, what) of each change.
    fn summary(changes: Vec<Change>) -> Vec<(String, u64, &'static str)> {
        changes
            .into_iter()
            .map(|c| match c {
                Change::Connected { client_id, session } => {
                    (client_id.to_string(), session.generation, "connected")
                }
                Change::Disconnected {
                    client_id,
                    session,
                    reason,
                } => (client_id.to_string(), session.generation, reason.as_str()),
            })
            .collect()
    }

    #[test]
    fn a_connection_is_announced_up_then_down_with_its_reason_and_start() {
        let mut s = Sessions::default();
        assert_eq!(
            summary(s.on_report(connected("d", 1), 100)),
            [("d".into(), 1, "connected")]
        );
        assert_eq!(s.get("d").map(|x| x.since), Some(100));
        let down = s.on_report(disconnected("d", 1, DisconnectReason::Lost), 200);
        assert!(
            matches!(&down[..], [Change::Disconnected { session, .. }] if session.since == 100)
        );
        assert_eq!(summary(down), [("d".into(), 1, "lost")]);
        assert!(s.is_empty());
    }

    #[test]
    fn a_takeover_reported_after_the_new_connection_is_not_an_offline() {
        let mut s = Sessions::default();
        s.on_report(connected("d", 1), 0);
        assert_eq!(
            summary(s.on_report(connected("d", 2), 10)),
            [("d".into(), 1, "taken_over"), ("d".into(), 2, "connected")]
        );
        // The old connection's own end arrives late: stale, nothing announced.
        let late = disconnected("d", 1, DisconnectReason::TakenOver);
        assert!(s.on_report(late, 20).is_empty());
        assert_eq!(s.get("d").map(|x| x.generation), Some(2));
        // Even a late "lost" of the old one (its socket failed after the takeover).
        assert!(s
            .on_report(disconnected("d", 1, DisconnectReason::Lost), 30)
            .is_empty());
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_takeover_reported_before_the_new_connection_reads_the_same() {
        let mut s = Sessions::default();
        s.on_report(connected("d", 1), 0);
        let old = disconnected("d", 1, DisconnectReason::TakenOver);
        assert_eq!(
            summary(s.on_report(old, 10)),
            [("d".into(), 1, "taken_over")]
        );
        assert_eq!(
            summary(s.on_report(connected("d", 2), 11)),
            [("d".into(), 2, "connected")]
        );
    }

    #[test]
    fn a_replaced_connections_late_start_is_ignored() {
        let mut s = Sessions::default();
        s.on_report(connected("d", 2), 0);
        assert!(s.on_report(connected("d", 1), 5).is_empty());
        assert!(s
            .on_report(disconnected("d", 1, DisconnectReason::TakenOver), 6)
            .is_empty());
        assert_eq!(s.get("d").map(|x| x.generation), Some(2));
    }

    #[test]
    fn an_end_without_a_known_start_is_not_announced() {
        let mut s = Sessions::default();
        assert!(s
            .on_report(disconnected("d", 3, DisconnectReason::Clean), 0)
            .is_empty());
    }

    #[test]
    fn the_end_of_a_newer_connection_whose_start_was_dropped_ends_the_client() {
        let mut s = Sessions::default();
        s.on_report(connected("d", 1), 0);
        // generation 2's `Connected` and generation 1's end were dropped (channel full).
        let end = disconnected("d", 2, DisconnectReason::Clean);
        assert_eq!(summary(s.on_report(end, 10)), [("d".into(), 1, "clean")]);
        assert!(s.is_empty());
    }

    #[test]
    fn clients_are_independent() {
        let mut s = Sessions::default();
        s.on_report(connected("a", 1), 0);
        s.on_report(connected("b", 2), 0);
        let down = s.on_report(disconnected("a", 1, DisconnectReason::Clean), 1);
        assert_eq!(summary(down), [("a".into(), 1, "clean")]);
        assert_eq!(s.get("b").map(|x| x.generation), Some(2));
    }
}
