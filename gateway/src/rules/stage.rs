//! The rules stage: evaluates decoded readings against the loaded rule set, hands every
//! event it produces to the local broker, the event log and the outbox, and runs the
//! actions of the event's rule: publishes on the local broker (each recorded in the event
//! log) and webhook calls, handed to the webhook task (`crate::webhook`).
//!
//! Runs where the decode stage runs, on the store's thread ([`RulesLoop`],
//! `store/feed.rs`): the decode stage hands it each batch it decoded, and the store wakes
//! for its timers. A thread of its own cost a wake-up and a hand-off per batch, about 850
//! context switches a second at 1000 devices x 10/s (BENCHMARKS.md, "Rules on the decode
//! thread; one wake-up per commit"). What it hands to the store joins the group being
//! gathered; publishing on the broker's local link is a blocking send, which waits when
//! the broker is behind. Time
//! comes from the wall clock here and is passed into the pure [`Engine`]. Its 1 s tick,
//! which runs whether or not readings come, also drives the gateway's memory trim after
//! a burst ([`crate::memory::Trim`]), so that needs no timer of its own.
//!
//! Invariants:
//! - the engine state is saved per device (`rules/device/{id}`): a device whose instances
//!   changed state is saved with the events of the change, a device whose readings only
//!   moved windows once its oldest unsaved change is [`SAVE_INTERVAL`] old (at the next
//!   batch or tick after that); at start it is restored from those records, so a restart
//!   neither re-fires nor forgets a firing instance;
//! - those periodic saves are spread out, at most [`SAVE_CHUNK`] devices per pass: each
//!   device is due at its own time, so a fleet's state reaches the store a few records
//!   per group instead of all at once (1000 devices' windows are about 3 MB, which as one
//!   group held every reading behind it for about 30 ms);
//! - a rule-file edit that does not load keeps the running rules and logs every error;
//! - the stage ends when the decode stage's input is over, after saving what moved;
//! - an event's actions are published right after the event, in the order the rule
//!   declares them, whether or not upstream is connected; a QoS 1 action on a device's
//!   command topic goes to the durable command queue instead when the downlink runs;
//!   an action is recorded in the event log (type `ActionPublished`, with the event's
//!   id) only once the broker or the queue took it;
//! - a webhook action never makes this stage wait: it is handed to a bounded queue, or
//!   dropped and counted when that is full; the webhook task records its outcome;
//! - a rule removed or changed by a reload still runs its `resolved` actions for the
//!   instances the reload resolves (its actions are kept until then).
//! - readers see the rules, live instances and the last reload through [`SharedRules`],
//!   rebuilt at most [`SNAPSHOT_INTERVAL`] after a transition (not on every one: the
//!   rebuild walks every instance), on every reload and every [`SAVE_INTERVAL`], never
//!   by locking the engine.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::local::LinkTx;

use super::action::{messages, Action, ActionMessage, Rendered, ACTION_EVENT_TYPE};
use super::snapshot::{ReloadView, SharedRules};
use super::{Diagnostics, Engine, EngineState, InstanceRecord, RuleSet, Watcher, STATE_VERSION};
use crate::counters::Counters;
use crate::downlink::ActionQueue;
use crate::events::Event;
use crate::memory::Trim;
use crate::reading::{now_millis, Millis, Reading};
use crate::store::StoreHandle;
use crate::webhook::WebhookQueue;

/// How often timers (`for`, `keep_firing_for`, absence) are evaluated and the rules
/// directory is checked for edits.
pub const TICK: Duration = Duration::from_secs(1);
/// How long engine state changed by readings alone stays unsaved (the read model is also
/// rebuilt this often).
pub const SAVE_INTERVAL: Duration = Duration::from_secs(5);
/// Most devices saved in one pass of the loop; more that are due wait [`SAVE_PACE`].
pub const SAVE_CHUNK: usize = 32;
/// The wait before the next pass when more devices are due than one pass saves.
const SAVE_PACE: Duration = Duration::from_millis(10);
/// Least time between two rebuilds of the read model after events (it walks every
/// instance); the API and status page see a transition at most this late.
const SNAPSHOT_INTERVAL: Duration = Duration::from_millis(200);
/// Prefix of the per-device engine state in the store.
pub const STATE_PREFIX: &str = "rules/device/";

/// The rules stage.
pub struct RulesStage {
    pub gateway_id: String,
    pub dir: PathBuf,
    pub store: StoreHandle,
    /// Where events are published on the embedded broker.
    pub publish: LinkTx,
    /// Topic pattern of local events (`{type}`, `{device}`, `{rule}`, `{state}`).
    pub event_topic: String,
    /// Hand events to the outbox (forwarding on).
    pub forward: bool,
    /// Where rule evaluations are counted.
    pub counters: Arc<Counters>,
    /// Published for readers (the HTTP API).
    pub snapshot: SharedRules,
    /// Returns free memory to the OS once a burst is over; this stage's tick is the
    /// gateway's one timer that always runs, so it drives it (see `memory.rs`).
    pub trim: Trim,
    /// The durable command queue, when the downlink runs: QoS 1 actions on a device's
    /// command topic are queued there instead of published.
    pub commands: Option<ActionQueue>,
    /// Where webhook actions are handed over.
    pub webhooks: WebhookQueue,
}

/// An event and what its rule's actions do for it.
type Emitted = (Event, Vec<Rendered>);

/// Pairs each event with the actions of its rule in `rules` (none when the rule is gone or
/// now announces another event type).
fn with_actions(rules: &RuleSet, events: impl IntoIterator<Item = Event>) -> Vec<Emitted> {
    events
        .into_iter()
        .map(|e| {
            let actions = rules
                .get(&e.data.rule)
                .filter(|r| r.event == e.event_type)
                .map(|r| messages(&r.actions, &e))
                .unwrap_or_default();
            (e, actions)
        })
        .collect()
}

fn reload_view(result: Result<usize, &Diagnostics>) -> ReloadView {
    ReloadView {
        at: now_millis(),
        ok: result.is_ok(),
        rules: *result.as_ref().unwrap_or(&0),
        errors: result
            .err()
            .map(|d| d.0.iter().map(ToString::to_string).collect())
            .unwrap_or_default(),
    }
}

/// Loads the rules directory for the running gateway: a missing directory is an empty
/// rule set; an invalid one too, with every error logged.
pub fn load_for_start(dir: &std::path::Path) -> RuleSet {
    load_with_report(dir).0
}

/// [`load_for_start`], also saying how the load went.
fn load_with_report(dir: &std::path::Path) -> (RuleSet, ReloadView) {
    if !dir.exists() {
        tracing::info!(dir = %dir.display(), "No rules directory; running without rules until it appears.");
        return (RuleSet::empty(), reload_view(Ok(0)));
    }
    match RuleSet::load_dir(dir) {
        Ok(set) => {
            tracing::info!(dir = %dir.display(), rules = set.len(), "Rules loaded.");
            let view = reload_view(Ok(set.len()));
            (set, view)
        }
        Err(diagnostics) => {
            for d in &diagnostics.0 {
                tracing::error!("{d}");
            }
            tracing::error!(dir = %dir.display(), errors = diagnostics.0.len(), "Rule files are invalid; running without rules until they are fixed.");
            (RuleSet::empty(), reload_view(Err(&diagnostics)))
        }
    }
}

/// The rules stage once started: the engine and the stage's timers. Runs on the thread
/// of its caller (the decode stage, on the store's thread), which hands it each batch of readings it decoded
/// ([`step`](Self::step)) and otherwise calls [`step`](Self::step) with none at
/// [`next_wake`](Self::next_wake).
pub struct RulesLoop {
    stage: RulesStage,
    engine: Engine,
    watcher: Watcher,
    span: tracing::Span,
    evaluations: u64,
    next_tick: Instant,
    next_refresh: Instant,
    /// More devices are due for saving than the last pass saved.
    saves_behind: bool,
    /// Events emitted since the start: with the readings ingested, what the memory trim
    /// watches for bursts.
    emitted: u64,
    /// Set when events changed instances the read model does not show yet.
    snapshot_due: Option<Instant>,
    last_snapshot: Instant,
    /// The events of one reading, kept empty between readings (an event is large: a
    /// vector of them allocated per reading that has one cost more than the rest of its
    /// evaluation).
    produced: Vec<Event>,
}

impl RulesStage {
    /// Loads the rules and the saved engine state (emitting what the restore resolves),
    /// ready to evaluate readings on the caller's thread.
    pub fn start(mut self) -> RulesLoop {
        // A root span, as when the rules had a thread of their own: log lines read the same.
        let span = tracing::info_span!(parent: None, "rules");
        let _enter = span.enter();
        let (rules, loaded) = load_with_report(&self.dir);
        self.snapshot.update(|s| s.last_reload = Some(loaded));
        let watcher = Watcher::from_current(&self.dir);
        let engine = match self.saved_state() {
            Some(state) => {
                let (engine, events) =
                    Engine::restore(rules, &self.gateway_id, state, now_millis());
                self.emit(&with_actions(engine.rules(), events));
                engine
            }
            None => Engine::new(rules, &self.gateway_id),
        };
        self.snapshot.update(|s| s.refresh(&engine));
        let evaluations = engine.stats().evaluations;
        drop(_enter);
        RulesLoop {
            stage: self,
            engine,
            watcher,
            span,
            evaluations,
            next_tick: Instant::now() + TICK,
            next_refresh: Instant::now() + SAVE_INTERVAL,
            saves_behind: false,
            emitted: 0,
            snapshot_due: None,
            last_snapshot: Instant::now(),
            produced: Vec::new(),
        }
    }
}

impl RulesLoop {
    /// When [`step`](Self::step) is due without readings: the next tick, a pending
    /// refresh of the read model, or the next pass of saves when some are behind.
    pub fn next_wake(&self) -> Instant {
        let mut wake = self
            .snapshot_due
            .map_or(self.next_tick, |t| t.min(self.next_tick));
        if self.saves_behind {
            wake = wake.min(Instant::now() + SAVE_PACE);
        }
        wake
    }

    /// Evaluates `readings` (in order; none when only the timers are due), emits the
    /// events and runs what is due: the tick, the read model, the paced saves.
    pub fn step(&mut self, readings: &[Reading]) {
        let _enter = self.span.enter();
        let (stage, engine) = (&mut self.stage, &mut self.engine);
        let mut events = Vec::new();
        if !readings.is_empty() {
            let now = now_millis();
            for reading in readings {
                engine.on_reading_into(reading, now, &mut self.produced);
                if !self.produced.is_empty() {
                    events.extend(with_actions(engine.rules(), self.produced.drain(..)));
                }
            }
            let now_evaluated = engine.stats().evaluations;
            Counters::add(
                &stage.counters.rule_evaluations,
                now_evaluated - self.evaluations,
            );
            self.evaluations = now_evaluated;
        }
        if Instant::now() >= self.next_tick {
            self.next_tick = Instant::now() + TICK;
            let due = engine.tick(now_millis());
            events.extend(with_actions(engine.rules(), due));
            events.extend(stage.reload(&mut self.watcher, engine));
            stage
                .trim
                .on_tick(Counters::get(&stage.counters.ingested) + self.emitted);
        }
        if !events.is_empty() {
            self.emitted += events.len() as u64;
            stage.emit(&events);
            let changed: HashSet<&str> = events.iter().map(|(e, _)| e.subject.as_str()).collect();
            for device in changed {
                stage.save(engine, device);
                engine.saved(device);
            }
            self.snapshot_due
                .get_or_insert(self.last_snapshot + SNAPSHOT_INTERVAL);
        }
        if self.snapshot_due.is_some_and(|t| Instant::now() >= t) {
            self.snapshot_due = None;
            self.last_snapshot = Instant::now();
            stage.snapshot.update(|s| s.refresh(engine));
        }
        if Instant::now() >= self.next_refresh {
            self.next_refresh = Instant::now() + SAVE_INTERVAL;
            self.snapshot_due = None;
            self.last_snapshot = Instant::now();
            stage.snapshot.update(|s| s.refresh(engine));
        }
        let cutoff = now_millis() - SAVE_INTERVAL.as_millis() as Millis;
        let due = engine.take_moved_before(cutoff, SAVE_CHUNK);
        self.saves_behind = due.len() == SAVE_CHUNK;
        for device in &due {
            stage.save(engine, device);
        }
    }

    /// Saves the state of every device whose readings moved it (the input is over).
    pub fn finish(mut self) {
        let _enter = self.span.enter();
        for device in self.engine.take_moved() {
            self.stage.save(&self.engine, &device);
        }
        tracing::debug!("Rules stopped.");
    }
}

impl RulesStage {
    fn reload(&self, watcher: &mut Watcher, engine: &mut Engine) -> Vec<Emitted> {
        match watcher.poll() {
            None => Vec::new(),
            Some(Ok(set)) => {
                tracing::info!(rules = set.len(), "Rule files changed; new rules in force.");
                let view = reload_view(Ok(set.len()));
                // The instances a reload resolves belong to the rules it replaces: their
                // actions come from those rules.
                let old: Vec<(String, String, Arc<[Action]>)> = (engine.rules().rules().iter())
                    .map(|r| (r.name.clone(), r.event.clone(), r.actions.clone()))
                    .collect();
                let events = engine.replace(set, now_millis());
                let events = events
                    .into_iter()
                    .map(|e| {
                        let actions = old
                            .iter()
                            .find(|(name, event, _)| *name == e.data.rule && *event == e.event_type)
                            .map(|(_, _, actions)| messages(actions, &e))
                            .unwrap_or_default();
                        (e, actions)
                    })
                    .collect();
                self.snapshot.update(|s| {
                    s.last_reload = Some(view);
                    s.refresh(engine);
                });
                events
            }
            Some(Err(diagnostics)) => {
                for d in &diagnostics.0 {
                    tracing::error!("{d}");
                }
                tracing::error!(
                    errors = diagnostics.0.len(),
                    "Rule files changed but do not load; the previous rules stay in force."
                );
                let view = reload_view(Err(&diagnostics));
                self.snapshot.update(|s| s.last_reload = Some(view));
                Vec::new()
            }
        }
    }

    fn saved_state(&self) -> Option<EngineState> {
        let rows = match self.store.load_state_prefix(STATE_PREFIX) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "Cannot read the saved rule state; starting fresh.");
                return None;
            }
        };
        let mut instances = Vec::new();
        for (key, bytes) in rows {
            match serde_json::from_slice::<Vec<InstanceRecord>>(&bytes) {
                Ok(records) => instances.extend(records),
                Err(e) => {
                    tracing::error!(key = %key, error = %e, "Saved rule state of a device is unreadable; that device starts fresh.")
                }
            }
        }
        Some(EngineState {
            version: STATE_VERSION,
            instances,
        })
    }

    fn save(&self, engine: &Engine, device: &str) {
        let key = format!("{STATE_PREFIX}{device}");
        let records = engine.device_records(device);
        if records.is_empty() {
            self.store.delete_state(key);
            return;
        }
        match serde_json::to_vec(&records) {
            Ok(bytes) => {
                self.store.put_state(key, bytes);
            }
            Err(e) => tracing::error!(error = %e, "Cannot encode the rule state."),
        }
    }

    fn emit(&mut self, events: &[Emitted]) {
        self.snapshot
            .update(|s| s.count_events(events.iter().map(|(e, _)| e)));
        for (event, actions) in events {
            crate::events::emit(
                event,
                &mut self.publish,
                &self.store,
                &self.event_topic,
                self.forward,
            );
            tracing::info!(event = %event.event_type, device = %event.subject, rule = %event.data.rule, state = %event.data.state, "Event.");
            for action in actions {
                match action {
                    Rendered::Publish(message) => self.act(event, message),
                    Rendered::Webhook(call) => self.webhooks.submit(call.clone()),
                }
            }
        }
    }

    /// Publishes one action on the local broker, or queues it for its device (a QoS 1
    /// action on a device's command topic while the downlink runs), and records it in
    /// the event log.
    fn act(&mut self, event: &Event, action: &ActionMessage) {
        let queued = action.qos > 0
            && self
                .commands
                .as_ref()
                .is_some_and(|q| q.queue(&action.topic, &action.payload, action.id(event)));
        let (topic, payload) = (action.topic.clone(), action.payload.clone());
        let sent = match action.qos {
            _ if queued => Ok(()),
            0 => self.publish.publish(topic, payload).map(|_| ()),
            _ => self
                .publish
                .publish_at_least_once(topic, payload)
                .map(|_| ()),
        };
        let ok = sent.is_ok();
        self.snapshot
            .update(|s| s.count_action(&event.data.rule, action.on, ok));
        match sent {
            Ok(_) => {
                let at = now_millis();
                let record = action.record(&self.gateway_id, event, at);
                self.store
                    .log_event(at, ACTION_EVENT_TYPE, &event.subject, record);
                let how = if queued {
                    "Action queued for its device."
                } else {
                    "Action published."
                };
                tracing::info!(rule = %event.data.rule, device = %event.subject, on = %action.on, topic = %action.topic, "{how}");
            }
            Err(e) => {
                tracing::error!(rule = %event.data.rule, device = %event.subject, topic = %action.topic, error = %e, "Cannot publish an action on the local broker.");
            }
        }
    }
}
