use std::collections::{HashMap, HashSet, VecDeque};

use super::{
    scheduler::{PauseReason, Tracker},
    ConnectionEvents,
};

pub struct Graveyard {
    connections: HashMap<String, SavedState>,
    /// PATCH(gateway): per filter, the saved sessions subscribed to it (those whose state
    /// is kept, not those with metrics only).
    subscribed: HashMap<String, usize>,
}

impl Graveyard {
    pub fn new() -> Graveyard {
        Graveyard {
            connections: HashMap::new(),
            subscribed: HashMap::new(),
        }
    }

    /// Add a new connection.
    /// Return tracker of previous connection if connection id already exists
    pub fn retrieve(&mut self, id: &str) -> Option<SavedState> {
        let saved = self.connections.remove(id);
        self.forget(saved.as_ref());
        saved
    }

    /// PATCH(gateway): whether a saved session is subscribed to `filter`, and so will
    /// read its log when it resumes.
    pub fn subscribes(&self, filter: &str) -> bool {
        self.subscribed.contains_key(filter)
    }

    /// PATCH(gateway): counts a session state's subscriptions in [`Self::subscribed`].
    fn remember(&mut self, state: &SessionState) {
        for filter in &state.subscriptions {
            *self
                .subscribed
                .entry(log_filter(filter).to_owned())
                .or_default() += 1;
        }
    }

    /// PATCH(gateway): uncounts a saved session that leaves the graveyard.
    fn forget(&mut self, saved: Option<&SavedState>) {
        let state = saved.and_then(|s| s.session_state.as_ref());
        for filter in state.iter().flat_map(|s| &s.subscriptions) {
            let filter = log_filter(filter);
            if let Some(n) = self.subscribed.get_mut(filter) {
                *n -= 1;
                if *n == 0 {
                    self.subscribed.remove(filter);
                }
            }
        }
    }

    /// PATCH(gateway): drops the session saved by the connection of `generation`, metrics
    /// and all; `false` when there is none, or a newer connection's.
    pub fn expire(&mut self, id: &str, generation: u64) -> bool {
        match self.connections.get(id) {
            Some(saved) if saved.generation == generation && saved.session_state.is_some() => {
                self.retrieve(id);
                true
            }
            _ => false,
        }
    }

    /// Save connection tracker. PATCH(gateway): with the generation of the connection.
    pub fn save_state(
        &mut self,
        generation: u64,
        mut tracker: Tracker,
        subscriptions: HashSet<String>,
        metrics: ConnectionEvents,
        unacked_pubrels: VecDeque<u16>,
    ) {
        tracker.pause(PauseReason::Busy);
        let id = tracker.id.clone();

        let session_state = SessionState {
            tracker,
            subscriptions,
            unacked_pubrels,
        };

        self.remember(&session_state);
        let old = self.connections.insert(
            id,
            SavedState {
                session_state: Some(session_state),
                metrics,
                generation,
            },
        );
        self.forget(old.as_ref());
    }
}

/// PATCH(gateway): the filter whose log a subscription reads: `$share/GROUP/FILTER`
/// reads the log of `FILTER`.
fn log_filter(subscription: &str) -> &str {
    subscription
        .strip_prefix("$share/")
        .and_then(|s| s.split_once('/'))
        .map_or(subscription, |(_, filter)| filter)
}

#[derive(Debug)]
pub struct SavedState {
    pub session_state: Option<SessionState>,
    pub metrics: ConnectionEvents,
    /// PATCH(gateway): `Connection::generation` of the connection that saved it.
    pub generation: u64,
}

#[derive(Debug)]
pub struct SessionState {
    pub tracker: Tracker,
    pub subscriptions: HashSet<String>,
    // used for pubrel in qos2
    pub unacked_pubrels: VecDeque<u16>,
}

// PATCH(gateway)
#[cfg(test)]
mod tests {
    use super::*;

    fn save(graveyard: &mut Graveyard, id: &str, generation: u64, filters: &[&str]) {
        graveyard.save_state(
            generation,
            Tracker::new(id.to_string()),
            filters.iter().map(|f| f.to_string()).collect(),
            ConnectionEvents::default(),
            VecDeque::new(),
        );
    }

    #[test]
    fn a_saved_session_counts_for_its_filters_until_it_resumes_or_expires() {
        let mut graveyard = Graveyard::new();
        save(&mut graveyard, "a", 1, &["events/#", "$share/g/cmd/+"]);
        save(&mut graveyard, "b", 2, &["events/#"]);
        assert!(graveyard.subscribes("events/#"));
        assert!(
            graveyard.subscribes("cmd/+"),
            "a shared subscription reads its filter's log"
        );
        assert!(!graveyard.subscribes("$share/g/cmd/+"));

        assert!(graveyard.retrieve("a").is_some());
        assert!(!graveyard.subscribes("cmd/+"));
        assert!(graveyard.subscribes("events/#"), "b still subscribes");

        assert!(!graveyard.expire("b", 1), "another connection's session");
        assert!(graveyard.expire("b", 2));
        assert!(!graveyard.subscribes("events/#"));
        assert!(graveyard.retrieve("b").is_none(), "nothing left behind");
    }
}
