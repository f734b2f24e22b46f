//! The rule engine: one state machine per (rule, device), driven by readings and by time.
//!
//! Owns [`Engine`] and the persisted form of its state, [`EngineState`].
//! Input: decoded [`Reading`]s and the current time, always passed in (`now`, Unix ms);
//! the engine never reads a clock, so every timing rule is testable with controlled time.
//! Output: [`Event`]s, one per transition to firing and one per transition to resolved.
//!
//! States: inactive -> pending (condition holds, waiting `for`) -> firing -> (clear holds,
//! waiting `keep_firing_for`) -> resolved, which leaves the instance inactive again.
//!
//! Invariants:
//! - Events only on transitions, never one per matching reading.
//! - Timers that fell due before `now` are applied before a reading at `now`, and an event
//!   carries the exact time its transition fell due (`since + for`, `clearing + keep_firing_for`,
//!   `last reading + absent_for`), so results do not depend on how often `tick` runs.
//! - A reading whose condition cannot be evaluated (missing field, wrong type) changes no
//!   state: it is counted in [`EngineStats::eval_errors`].
//! - After a rule resolves, it does not fire again before `cooldown` has passed since the
//!   resolution; a condition still holding then fires at that moment.
//! - `snapshot` / `restore` carry every instance, so a restart neither re-fires nor forgets
//!   a firing instance.

use std::collections::{BTreeMap, HashMap, VecDeque};

use compact_str::CompactString;

use super::eval::{eval, set_values, update_windows, Vars};
use super::rule::{Rule, RuleKind};
use super::ruleset::RuleSet;
use super::state::{
    EngineState, EngineStats, Instance, InstanceRecord, InstanceRecordRef, InstanceState,
    InstanceStatus, REASON_RULE_REMOVED, STATE_VERSION,
};
use super::window::Window;
use crate::events::{Event, EventState, Transition};
use crate::hashing::FastHashMap;
use crate::reading::{Millis, Reading};

/// The instances of one device, sorted by rule index (parallel arrays). One hash lookup per
/// reading finds them; the applicable rules then walk one contiguous array.
#[derive(Debug, Clone, Default)]
struct DeviceInstances {
    rules: Vec<u32>,
    instances: Vec<Instance>,
    /// When a reading first moved its instances since the owner last saved them: the
    /// time of its live entry in [`Engine::moved`].
    moved: Option<Millis>,
}

impl DeviceInstances {
    fn get_or_insert(&mut self, rule: usize, make: impl FnOnce() -> Instance) -> &mut Instance {
        let k = match self.rules.binary_search(&(rule as u32)) {
            Ok(k) => k,
            Err(k) => {
                self.rules.insert(k, rule as u32);
                self.instances.insert(k, make());
                k
            }
        };
        &mut self.instances[k]
    }

    fn iter(&self) -> impl Iterator<Item = (usize, &Instance)> {
        self.rules.iter().map(|&r| r as usize).zip(&self.instances)
    }
}

/// The rule engine. Not shared: one task owns it and feeds it readings and ticks.
pub struct Engine {
    rules: RuleSet,
    gateway_id: String,
    /// Instances by device, then rule index. Ids of up to 24 bytes are kept inline in the
    /// map's slots (`CompactString`), so that a reading's lookup does not wait for a
    /// key's heap block to come from memory.
    devices: FastHashMap<CompactString, DeviceInstances>,
    stats: EngineStats,
    scratch: Vec<usize>,
    /// Devices whose instances readings moved since they were last saved, with the time
    /// they first moved, oldest first. An entry whose time is not its device's `moved`
    /// is stale (the device was saved meanwhile, and may have moved again since).
    moved: VecDeque<(Millis, CompactString)>,
}

impl Engine {
    pub fn new(rules: RuleSet, gateway_id: &str) -> Engine {
        Engine {
            rules,
            gateway_id: gateway_id.to_string(),
            devices: FastHashMap::default(),
            stats: EngineStats::default(),
            scratch: Vec::new(),
            moved: VecDeque::new(),
        }
    }

    /// Rebuilds an engine from a snapshot. Instances of rules that no longer exist (or whose
    /// event type or kind changed) are dropped; those that were firing come back as
    /// `resolved` events at `now` with `data.reason = "rule-removed"`.
    pub fn restore(
        rules: RuleSet,
        gateway_id: &str,
        state: EngineState,
        now: Millis,
    ) -> (Engine, Vec<Event>) {
        let mut engine = Engine::new(rules, gateway_id);
        let mut events = Vec::new();
        let by_name: HashMap<&str, usize> = (engine.rules.rules().iter().enumerate())
            .map(|(i, r)| (r.name.as_str(), i))
            .collect();
        let mut restored: Vec<(usize, String, Instance)> = Vec::new();
        for rec in state.instances {
            let index = by_name.get(rec.rule.as_str()).copied().filter(|&i| {
                let r = &engine.rules.rules()[i];
                r.event == rec.event && r.kind.name() == rec.kind
            });
            match index {
                Some(i) => {
                    let mut inst = rec.instance;
                    let aggregates = &engine.rules.rules()[i].aggregates;
                    if inst.windows.len() == aggregates.len() {
                        for (window, agg) in inst.windows.iter_mut().zip(aggregates) {
                            window.adopt(agg.func);
                        }
                    } else {
                        inst.windows = vec![Window::default(); aggregates.len()];
                    }
                    restored.push((i, rec.device, inst));
                }
                None => {
                    if let InstanceState::Firing { since, .. } = rec.instance.state {
                        events.push(Event::new(Transition {
                            gateway_id,
                            rule: &rec.rule,
                            event_type: &rec.event,
                            device: &rec.device,
                            state: EventState::Resolved,
                            at: now,
                            firing_since: since,
                            severity: &rec.severity,
                            values: rec.instance.values.into_map(),
                            labels: BTreeMap::new(),
                            annotations: BTreeMap::new(),
                            reason: Some(REASON_RULE_REMOVED.to_string()),
                        }));
                    }
                }
            }
        }
        drop(by_name);
        for (i, device, inst) in restored {
            let dev = engine.devices.entry(device.into()).or_default();
            let mut fresh = Some(inst);
            let slot = dev.get_or_insert(i, || fresh.take().expect("taken once"));
            // A duplicate record for the same instance: the later one wins.
            if let Some(inst) = fresh {
                *slot = inst;
            }
        }
        engine.stats.events += events.len() as u64;
        (engine, events)
    }

    /// Every instance as (rule index, device, instance), in rule order then device order.
    fn sorted(&self, keep: impl Fn(&Instance) -> bool) -> Vec<(usize, &str, &Instance)> {
        let mut all: Vec<(usize, &str, &Instance)> = self
            .devices
            .iter()
            .flat_map(|(device, dev)| dev.iter().map(move |(i, inst)| (i, device.as_str(), inst)))
            .filter(|(_, _, inst)| keep(inst))
            .collect();
        all.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        all
    }

    /// The records of one device's instances, for saving that device's state alone
    /// (borrowed: they are written as they are, [`InstanceRecord`]s when read back).
    pub fn device_records(&self, device: &str) -> Vec<InstanceRecordRef<'_>> {
        let Some((device, dev)) = self.devices.get_key_value(device) else {
            return Vec::new();
        };
        let mut records: Vec<InstanceRecordRef> = dev
            .iter()
            .map(|(i, instance)| {
                let rule = &self.rules.rules()[i];
                InstanceRecordRef {
                    rule: &rule.name,
                    event: &rule.event,
                    kind: rule.kind.name(),
                    severity: &rule.severity,
                    device,
                    instance,
                }
            })
            .collect();
        records.sort_by(|a, b| a.rule.cmp(b.rule));
        records
    }

    fn record(&self, i: usize, device: &str, inst: &Instance) -> InstanceRecord {
        let rule = &self.rules.rules()[i];
        InstanceRecord {
            rule: rule.name.clone(),
            event: rule.event.clone(),
            kind: rule.kind.name().to_string(),
            severity: rule.severity.clone(),
            device: device.to_string(),
            instance: inst.clone(),
        }
    }

    /// Everything needed to restore this engine later.
    pub fn snapshot(&self) -> EngineState {
        let instances = self
            .sorted(|_| true)
            .into_iter()
            .map(|(i, device, inst)| self.record(i, device, inst))
            .collect();
        EngineState {
            version: STATE_VERSION,
            instances,
        }
    }

    /// Swaps in a new rule set (hot reload). Instances of rules kept under the same name,
    /// event type and kind keep their state (windows are reset if the aggregates changed).
    /// Instances of removed or changed rules are dropped; firing ones are resolved at `now`
    /// with `data.reason = "rule-removed"`, so no consumer is left with a dangling alert.
    pub fn replace(&mut self, rules: RuleSet, now: Millis) -> Vec<Event> {
        let by_name: HashMap<&str, usize> = (rules.rules().iter().enumerate())
            .map(|(i, r)| (r.name.as_str(), i))
            .collect();
        // Old rule index -> (new index, reset the windows to this many).
        let mapping: Vec<Option<(usize, Option<usize>)>> = (self.rules.rules().iter())
            .map(|old| {
                let i = by_name
                    .get(old.name.as_str())
                    .copied()
                    .filter(|&i| rules.rules()[i].same_identity(old))?;
                let new = &rules.rules()[i];
                let same = new.aggregates.len() == old.aggregates.len()
                    && (new.aggregates.iter().zip(&old.aggregates)).all(|(n, o)| n.same_window(o));
                let reset = (!same).then_some(new.aggregates.len());
                Some((i, reset))
            })
            .collect();
        drop(by_name);
        let mut removed: Vec<(usize, String, Event)> = Vec::new();
        for (device, dev) in self.devices.iter_mut() {
            let old = std::mem::take(dev);
            let mut kept: Vec<(u32, Instance)> = Vec::with_capacity(old.rules.len());
            for (old_i, mut inst) in old.rules.into_iter().zip(old.instances) {
                match mapping[old_i as usize] {
                    Some((new_i, reset)) => {
                        if let Some(n) = reset {
                            inst.windows = vec![Window::default(); n];
                        }
                        kept.push((new_i as u32, inst));
                    }
                    None => {
                        if let InstanceState::Firing { since, .. } = inst.state {
                            let rule = &self.rules.rules()[old_i as usize];
                            let reason = Some(REASON_RULE_REMOVED.to_string());
                            let event = transition_event(
                                &self.gateway_id,
                                rule,
                                device,
                                &inst,
                                EventState::Resolved,
                                now,
                                since,
                                reason,
                            );
                            removed.push((old_i as usize, device.to_string(), event));
                        }
                    }
                }
            }
            kept.sort_by_key(|(i, _)| *i);
            (dev.rules, dev.instances) = kept.into_iter().unzip();
        }
        self.devices.retain(|_, dev| !dev.rules.is_empty());
        removed.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let events: Vec<Event> = removed.into_iter().map(|(_, _, e)| e).collect();
        self.rules = rules;
        self.stats.events += events.len() as u64;
        events
    }

    /// Evaluates every rule that applies to `reading`, at time `now`.
    pub fn on_reading(&mut self, reading: &Reading, now: Millis) -> Vec<Event> {
        let mut out = Vec::new();
        self.on_reading_into(reading, now, &mut out);
        out
    }

    /// [`Engine::on_reading`], appending the events to `out`.
    pub fn on_reading_into(&mut self, reading: &Reading, now: Millis, out: &mut Vec<Event>) {
        let before = out.len();
        self.stats.readings += 1;
        let mut applicable = std::mem::take(&mut self.scratch);
        self.rules.applicable(reading, &mut applicable);
        if applicable.is_empty() {
            self.scratch = applicable;
            return;
        }
        let dev = match self.devices.get_mut(reading.device.as_str()) {
            Some(dev) => dev,
            None => {
                let id = CompactString::from(reading.device.as_str());
                let dev = self.devices.entry(id).or_default();
                // Room for the rules that apply to its first reading, usually all it will
                // have: 5 instances in 5 slots, not in the 8 that growth by doubling makes.
                dev.rules.reserve_exact(applicable.len());
                dev.instances.reserve_exact(applicable.len());
                dev
            }
        };
        if dev.moved.is_none() {
            dev.moved = Some(now);
            self.moved
                .push_back((now, CompactString::from(reading.device.as_str())));
        }
        for &i in &applicable {
            let rule = &self.rules.rules()[i];
            let inst = dev.get_or_insert(i, || Instance::new(rule, now));
            let cx = Cx {
                gateway_id: &self.gateway_id,
                rule,
                device: &reading.device,
            };
            cx.advance(inst, now, out);
            inst.last_seen = now;
            let aggs = update_windows(rule, inst, reading, now);
            let observed = match &rule.kind {
                RuleKind::Absence { .. } => {
                    // The last values a device sent are what its offline event shows.
                    set_values(&mut inst.values, reading, &aggs);
                    Some((false, true))
                }
                RuleKind::Condition { condition, clear } => {
                    let vars = Vars {
                        reading,
                        aggs: &aggs,
                    };
                    let firing = matches!(inst.state, InstanceState::Firing { .. });
                    let result = match (firing, clear) {
                        (true, Some(clear)) => {
                            eval(self.rules.env(), clear, &vars).map(|c| (true, c))
                        }
                        _ => eval(self.rules.env(), condition, &vars).map(|h| (h, !h)),
                    };
                    self.stats.evaluations += 1;
                    if result.is_none() {
                        self.stats.eval_errors += 1;
                    }
                    result
                }
            };
            if let Some((holds, cleared)) = observed {
                let before = inst.state;
                cx.observe(inst, holds, cleared, now);
                // The reading that started a transition (pending, clearing) is the one whose
                // values the coming event shows; copying only then keeps the hot path cheap.
                if inst.state != before {
                    set_values(&mut inst.values, reading, &aggs);
                }
                cx.advance(inst, now, out);
            }
        }
        self.scratch = applicable;
        self.stats.events += (out.len() - before) as u64;
    }

    /// The devices whose instances readings moved since they were last saved (or since
    /// the engine started), once each, and clears that mark: what the owner saves
    /// periodically. Includes devices whose instances have gone since (their saved state
    /// goes too).
    pub fn take_moved(&mut self) -> Vec<String> {
        self.take_moved_before(Millis::MAX, usize::MAX)
    }

    /// [`Engine::take_moved`] for the devices that first moved at or before `cutoff`,
    /// oldest first, at most `max` of them: what the owner saves once a device's oldest
    /// unsaved change is old enough, a few at a time.
    pub fn take_moved_before(&mut self, cutoff: Millis, max: usize) -> Vec<String> {
        let mut taken = Vec::new();
        while taken.len() < max {
            match self.moved.front() {
                Some((first, _)) if *first <= cutoff => {}
                _ => break,
            }
            let (first, device) = self.moved.pop_front().expect("front exists");
            let listed = match self.devices.get_mut(device.as_str()) {
                Some(dev) if dev.moved == Some(first) => {
                    dev.moved = None;
                    true
                }
                Some(_) => false,
                None => true,
            };
            if listed {
                taken.push(device.into_string());
            }
        }
        taken
    }

    /// When the oldest device still listed by [`Engine::take_moved`] first moved (the
    /// owner does not need it: it asks [`Engine::take_moved_before`] on every pass).
    #[cfg(test)]
    pub fn oldest_moved(&self) -> Option<Millis> {
        self.moved.front().map(|(first, _)| *first)
    }

    /// The owner saved `device`'s instances: it is not listed by [`Engine::take_moved`]
    /// until a reading moves them again.
    pub fn saved(&mut self, device: &str) {
        if let Some(dev) = self.devices.get_mut(device) {
            dev.moved = None;
        }
    }

    /// Applies every timer due at or before `now`: `for`, `keep_firing_for`, cooldown, absence.
    /// Events come ordered by time, then rule, then device. Also drops the window samples
    /// that have aged out, as the next reading would: a silent device's windows give
    /// their memory back once their length has passed.
    pub fn tick(&mut self, now: Millis) -> Vec<Event> {
        let mut out: Vec<(usize, Event)> = Vec::new();
        let mut buf = Vec::new();
        for (device, dev) in self.devices.iter_mut() {
            for (&i, inst) in dev.rules.iter().zip(dev.instances.iter_mut()) {
                let rule = &self.rules.rules()[i as usize];
                let cx = Cx {
                    gateway_id: &self.gateway_id,
                    rule,
                    device,
                };
                cx.advance(inst, now, &mut buf);
                out.extend(buf.drain(..).map(|e| (i as usize, e)));
                for (window, agg) in inst.windows.iter_mut().zip(&rule.aggregates) {
                    window.expire(now, agg.window);
                }
            }
        }
        out.sort_by(|a, b| (&a.1.time, a.0, &a.1.subject).cmp(&(&b.1.time, b.0, &b.1.subject)));
        self.stats.events += out.len() as u64;
        out.into_iter().map(|(_, e)| e).collect()
    }

    /// Every instance (rule, device, state), in rule order then device order.
    pub fn instances(&self) -> Vec<InstanceStatus> {
        self.statuses(|_| true)
    }

    /// The instances that are pending or firing, in the order of [`Engine::instances`].
    /// What the read model shows: a fleet's inactive instances (one per device and rule
    /// that applies) are most of them, and are not sorted or copied here.
    pub fn active_instances(&self) -> Vec<InstanceStatus> {
        self.statuses(|inst| !matches!(inst.state, InstanceState::Inactive))
    }

    fn statuses(&self, keep: impl Fn(&Instance) -> bool) -> Vec<InstanceStatus> {
        self.sorted(keep)
            .into_iter()
            .map(|(i, device, inst)| InstanceStatus {
                rule: self.rules.rules()[i].name.clone(),
                device: device.to_string(),
                state: inst.state,
                last_seen: inst.last_seen,
            })
            .collect()
    }

    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }
}

/// What one transition needs to know besides the instance.
struct Cx<'a> {
    gateway_id: &'a str,
    rule: &'a Rule,
    device: &'a str,
}

impl Cx<'_> {
    /// Applies an observation at `now`: does the condition hold, does the clear condition hold.
    fn observe(&self, inst: &mut Instance, holds: bool, cleared: bool, now: Millis) {
        inst.state = match inst.state {
            InstanceState::Inactive if holds => InstanceState::Pending { since: now },
            InstanceState::Pending { .. } if !holds => InstanceState::Inactive,
            InstanceState::Firing {
                since,
                clearing_since,
            } => InstanceState::Firing {
                since,
                clearing_since: if cleared {
                    Some(clearing_since.unwrap_or(now))
                } else {
                    None
                },
            },
            other => other,
        };
    }

    /// Applies every timer due at or before `now`, emitting events at their due times.
    fn advance(&self, inst: &mut Instance, now: Millis, out: &mut Vec<Event>) {
        let rule = self.rule;
        loop {
            match inst.state {
                InstanceState::Inactive => match rule.kind {
                    RuleKind::Absence { after } if inst.last_seen + after <= now => {
                        inst.state = InstanceState::Pending {
                            since: inst.last_seen + after,
                        };
                    }
                    _ => return,
                },
                InstanceState::Pending { since } => {
                    let cooled = inst
                        .resolved_at
                        .map_or(Millis::MIN, |r| r + rule.cooldown_ms);
                    let due = (since + rule.for_ms).max(cooled);
                    if due > now {
                        return;
                    }
                    inst.state = InstanceState::Firing {
                        since: due,
                        clearing_since: None,
                    };
                    out.push(self.event(inst, EventState::Firing, due, due));
                }
                InstanceState::Firing {
                    since,
                    clearing_since: Some(clearing),
                } => {
                    let due = clearing + rule.keep_firing_for_ms;
                    if due > now {
                        return;
                    }
                    inst.state = InstanceState::Inactive;
                    inst.resolved_at = Some(due);
                    out.push(self.event(inst, EventState::Resolved, due, since));
                }
                InstanceState::Firing {
                    clearing_since: None,
                    ..
                } => return,
            }
        }
    }

    fn event(&self, inst: &Instance, state: EventState, at: Millis, since: Millis) -> Event {
        transition_event(
            self.gateway_id,
            self.rule,
            self.device,
            inst,
            state,
            at,
            since,
            None,
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn transition_event(
    gateway_id: &str,
    rule: &Rule,
    device: &str,
    inst: &Instance,
    state: EventState,
    at: Millis,
    firing_since: Millis,
    reason: Option<String>,
) -> Event {
    Event::new(Transition {
        gateway_id,
        rule: &rule.name,
        event_type: &rule.event,
        device,
        state,
        at,
        firing_since,
        severity: &rule.severity,
        values: inst.values.to_map(),
        labels: rule.labels.clone(),
        annotations: rule.annotations.clone(),
        reason,
    })
}
