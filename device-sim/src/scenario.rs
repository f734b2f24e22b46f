//! Scenario files: what a simulated fleet publishes and what happens to it over time.
//!
//! Input: a TOML file (see `device-sim/scenarios/*.toml` and the crate README):
//! optional `[fleet]` defaults, `[fields.NAME]` value models, and `[[event]]`
//! entries (spike, silence, reconnect, malformed, burst) at offsets from the
//! moment the fleet starts. Output: a validated [`Scenario`] and, per device, a
//! [`Plan`] the device task consults at every tick.
//!
//! Invariants:
//! - loading reports every problem at once, each naming the file and the
//!   offending field or event (`event[2] (spike): field `temp` is not defined`);
//!   TOML syntax and type errors carry line and column.
//! - a [`Plan`] holds only the events that target its device.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::model::Model;
use crate::payload::Format;

/// Errors from reading, parsing or validating a scenario.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("scenario {origin}: {source}")]
    Parse {
        origin: String,
        source: Box<toml::de::Error>,
    },
    #[error("scenario {origin} is invalid:\n  - {}", problems.join("\n  - "))]
    Invalid {
        origin: String,
        problems: Vec<String>,
    },
}

/// The directory of the shipped scenario files.
pub fn shipped_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

/// Fleet settings a scenario may suggest; command-line flags win.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetDefaults {
    pub devices: Option<u32>,
    /// Readings per second per device.
    pub rate: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    pub duration: Option<Duration>,
    pub count: Option<u64>,
    pub format: Option<Format>,
    pub qos: Option<u8>,
}

/// Which devices an event applies to: `"all"`, the first N, or a list of ids.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub enum Target {
    #[default]
    All,
    First(u32),
    Ids(Vec<String>),
}

impl Target {
    pub fn matches(&self, index: u32, id: &str) -> bool {
        match self {
            Target::All => true,
            Target::First(n) => index < *n,
            Target::Ids(ids) => ids.iter().any(|i| i == id),
        }
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Target;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#""all", a number of devices, or a list of device ids"#)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Target, E> {
                if s == "all" {
                    Ok(Target::All)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(s), &self))
                }
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Target, E> {
                u32::try_from(n)
                    .map(Target::First)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(n), &self))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Target, E> {
                u32::try_from(n)
                    .map(Target::First)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(n), &self))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Target, A::Error> {
                let mut ids = Vec::new();
                while let Some(id) = seq.next_element::<String>()? {
                    ids.push(id);
                }
                Ok(Target::Ids(ids))
            }
        }
        d.deserialize_any(V)
    }
}

/// Something that happens to some devices at a point in the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Event {
    /// Drive `field` from its model value to `value` over `ramp`, keep it there
    /// for `hold`, then return to the model value over `release`.
    Spike {
        #[serde(with = "humantime_serde")]
        at: Duration,
        #[serde(default)]
        devices: Target,
        field: String,
        value: f64,
        #[serde(default, with = "humantime_serde")]
        ramp: Duration,
        #[serde(with = "humantime_serde")]
        hold: Duration,
        #[serde(default, with = "humantime_serde")]
        release: Duration,
    },
    /// Publish nothing for `for`; with `disconnect` (the default) also drop
    /// the connection and reconnect when the window ends.
    Silence {
        #[serde(with = "humantime_serde")]
        at: Duration,
        #[serde(default)]
        devices: Target,
        #[serde(rename = "for", with = "humantime_serde")]
        duration: Duration,
        #[serde(default = "yes")]
        disconnect: bool,
    },
    /// Drop the connection abruptly and reconnect after `down`, all targeted
    /// devices at once (a reconnect storm); `times` storms `every` apart.
    Reconnect {
        #[serde(with = "humantime_serde")]
        at: Duration,
        #[serde(default)]
        devices: Target,
        #[serde(default, with = "humantime_serde")]
        down: Duration,
        #[serde(default = "one")]
        times: u32,
        #[serde(default, with = "humantime_serde")]
        every: Duration,
    },
    /// Replace `fraction` of the payloads with bytes no decoder accepts.
    Malformed {
        #[serde(with = "humantime_serde")]
        at: Duration,
        #[serde(default)]
        devices: Target,
        #[serde(rename = "for", with = "humantime_serde")]
        duration: Duration,
        fraction: f64,
    },
    /// Multiply the publish rate by `factor` for `for`.
    Burst {
        #[serde(with = "humantime_serde")]
        at: Duration,
        #[serde(default)]
        devices: Target,
        #[serde(rename = "for", with = "humantime_serde")]
        duration: Duration,
        factor: f64,
    },
}

fn yes() -> bool {
    true
}
fn one() -> u32 {
    1
}

impl Event {
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Spike { .. } => "spike",
            Event::Silence { .. } => "silence",
            Event::Reconnect { .. } => "reconnect",
            Event::Malformed { .. } => "malformed",
            Event::Burst { .. } => "burst",
        }
    }

    pub fn devices(&self) -> &Target {
        match self {
            Event::Spike { devices, .. }
            | Event::Silence { devices, .. }
            | Event::Reconnect { devices, .. }
            | Event::Malformed { devices, .. }
            | Event::Burst { devices, .. } => devices,
        }
    }

    fn problems(&self, fields: &BTreeMap<String, Model>) -> Vec<String> {
        let mut out = Vec::new();
        match self {
            Event::Spike {
                field,
                value,
                hold,
                ramp,
                release,
                ..
            } => {
                if !fields.contains_key(field) {
                    let known: Vec<&str> = fields.keys().map(String::as_str).collect();
                    out.push(format!(
                        "field `{field}` is not defined (fields: {})",
                        known.join(", ")
                    ));
                }
                if !value.is_finite() {
                    out.push("`value` must be a finite number".into());
                }
                if (*ramp + *hold + *release).is_zero() {
                    out.push("`ramp`, `hold` and `release` add up to 0s".into());
                }
            }
            Event::Silence { duration, .. } if duration.is_zero() => {
                out.push("`for` must be longer than 0s".into())
            }
            Event::Reconnect { times, every, .. } => {
                if *times == 0 {
                    out.push("`times` must be at least 1".into());
                }
                if *times > 1 && every.is_zero() {
                    out.push("`every` must be longer than 0s when `times` > 1".into());
                }
            }
            Event::Malformed {
                fraction, duration, ..
            } => {
                if !(0.0..=1.0).contains(fraction) {
                    out.push(format!(
                        "`fraction` must be between 0 and 1, not {fraction}"
                    ));
                }
                if duration.is_zero() {
                    out.push("`for` must be longer than 0s".into());
                }
            }
            Event::Burst {
                factor, duration, ..
            } => {
                if !(factor.is_finite() && *factor > 0.0) {
                    out.push(format!("`factor` must be above 0, not {factor}"));
                }
                if duration.is_zero() {
                    out.push("`for` must be longer than 0s".into());
                }
            }
            Event::Silence { .. } => {}
        }
        if let Target::Ids(ids) = self.devices() {
            if ids.is_empty() {
                out.push("`devices` is an empty list".into());
            }
        }
        out
    }
}

/// A validated scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub fleet: FleetDefaults,
    /// Field name -> model; the default is temperature and humidity.
    #[serde(default = "default_fields")]
    pub fields: BTreeMap<String, Model>,
    #[serde(default, rename = "event")]
    pub events: Vec<Event>,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            name: "steady".into(),
            description: "Temperature and humidity, no events.".into(),
            fleet: FleetDefaults::default(),
            fields: default_fields(),
            events: Vec::new(),
        }
    }
}

fn default_fields() -> BTreeMap<String, Model> {
    BTreeMap::from([
        (
            "temperature".to_owned(),
            Model::RandomWalk {
                start: 22.0,
                step: 0.2,
                min: 15.0,
                max: 30.0,
                unit: Some("Cel".into()),
            },
        ),
        (
            "humidity".to_owned(),
            Model::Sine {
                mean: 45.0,
                amplitude: 5.0,
                period: Duration::from_secs(600),
                noise: 0.5,
                unit: Some("%RH".into()),
            },
        ),
    ])
}

impl Scenario {
    /// Loads one of the scenarios shipped in `device-sim/scenarios/` by name
    /// (`overheat`, `offline`, `battery-low`, `rising-fast`, ...).
    pub fn shipped(name: &str) -> Result<Scenario, ScenarioError> {
        Scenario::load(&shipped_dir().join(format!("{name}.toml")))
    }

    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Scenario::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates scenario text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Scenario, ScenarioError> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            origin: origin.to_owned(),
            source: Box::new(e),
        })?;
        let problems = scenario.problems();
        if problems.is_empty() {
            Ok(scenario)
        } else {
            Err(ScenarioError::Invalid {
                origin: origin.to_owned(),
                problems,
            })
        }
    }

    /// Every problem in the scenario, one sentence each.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.fields.is_empty() {
            out.push("no fields: define at least one [fields.NAME]".to_owned());
        }
        for name in self.fields.keys() {
            if matches!(name.as_str(), "ts" | "seq") {
                out.push(format!(
                    "field `{name}` is reserved (every reading carries ts and seq)"
                ));
            }
        }
        for (name, model) in &self.fields {
            out.extend(model.problems(name));
        }
        for (i, event) in self.events.iter().enumerate() {
            for p in event.problems(&self.fields) {
                out.push(format!("event[{i}] ({}): {p}", event.kind()));
            }
        }
        if let Some(rate) = self.fleet.rate {
            if !(rate.is_finite() && rate >= 0.0) {
                out.push(format!("fleet.rate must be 0 (max) or above, not {rate}"));
            }
        }
        if let Some(qos) = self.fleet.qos {
            if qos > 1 {
                out.push(format!("fleet.qos must be 0 or 1, not {qos}"));
            }
        }
        out
    }

    /// Problems that depend on the fleet: event targets naming unknown devices.
    pub fn target_problems(&self, ids: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for (i, event) in self.events.iter().enumerate() {
            match event.devices() {
                Target::Ids(list) => {
                    for id in list.iter().filter(|id| !ids.contains(id)) {
                        out.push(format!(
                            "event[{i}] ({}): device `{id}` is not in the fleet ({} .. {})",
                            event.kind(),
                            ids.first().map(String::as_str).unwrap_or("-"),
                            ids.last().map(String::as_str).unwrap_or("-"),
                        ));
                    }
                }
                Target::First(n) if *n as usize > ids.len() => out.push(format!(
                    "event[{i}] ({}): targets {n} devices but the fleet has {}",
                    event.kind(),
                    ids.len()
                )),
                _ => {}
            }
        }
        out
    }

    /// The events that apply to device number `index` with id `id`.
    pub fn plan_for(&self, index: u32, id: &str) -> Plan {
        Plan {
            events: self
                .events
                .iter()
                .filter(|e| e.devices().matches(index, id))
                .cloned()
                .collect(),
        }
    }
}

/// The events one device follows.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    events: Vec<Event>,
}

/// A connection drop planned for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Disconnect {
    pub at: Duration,
    /// When the device may connect again, from the fleet start.
    pub until: Duration,
    /// Silence (no publishing) rather than only a reconnect.
    pub silent: bool,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The value of `field` at `t`, given what its model says.
    pub fn value(&self, field: &str, t: Duration, model_value: f64) -> f64 {
        let mut v = model_value;
        for e in &self.events {
            if let Event::Spike {
                at,
                field: f,
                value,
                ramp,
                hold,
                release,
                ..
            } = e
            {
                if f != field || t < *at {
                    continue;
                }
                let dt = t - *at;
                if dt < *ramp {
                    v += (value - v) * dt.as_secs_f64() / ramp.as_secs_f64();
                } else if dt < *ramp + *hold {
                    v = *value;
                } else if dt < *ramp + *hold + *release {
                    let back = (dt - *ramp - *hold).as_secs_f64() / release.as_secs_f64();
                    v = value + (v - value) * back;
                }
            }
        }
        crate::model::round2(v)
    }

    /// Whether the device publishes nothing at `t`.
    pub fn silent(&self, t: Duration) -> bool {
        self.events.iter().any(
            |e| matches!(e, Event::Silence { at, duration, .. } if t >= *at && t < *at + *duration),
        )
    }

    /// The fraction of payloads to replace with malformed bytes at `t`.
    pub fn malformed_fraction(&self, t: Duration) -> f64 {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Malformed {
                    at,
                    duration,
                    fraction,
                    ..
                } if t >= *at && t < *at + *duration => Some(*fraction),
                _ => None,
            })
            .fold(0.0, f64::max)
    }

    /// The rate multiplier at `t`.
    pub fn rate_factor(&self, t: Duration) -> f64 {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Burst {
                    at,
                    duration,
                    factor,
                    ..
                } if t >= *at && t < *at + *duration => Some(*factor),
                _ => None,
            })
            .product()
    }

    /// When the silences ending after `t` end, so a silent device knows when to wake.
    pub fn silence_end(&self, t: Duration) -> Option<Duration> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Silence { at, duration, .. } if t >= *at && t < *at + *duration => {
                    Some(*at + *duration)
                }
                _ => None,
            })
            .max()
    }

    /// Every planned connection drop, in time order.
    pub fn disconnects(&self) -> Vec<Disconnect> {
        let mut out = Vec::new();
        for e in &self.events {
            match e {
                Event::Silence {
                    at,
                    duration,
                    disconnect: true,
                    ..
                } => out.push(Disconnect {
                    at: *at,
                    until: *at + *duration,
                    silent: true,
                }),
                Event::Reconnect {
                    at,
                    down,
                    times,
                    every,
                    ..
                } => {
                    for k in 0..*times {
                        let start = *at + *every * k;
                        out.push(Disconnect {
                            at: start,
                            until: start + *down,
                            silent: false,
                        });
                    }
                }
                _ => {}
            }
        }
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spike_ramps_holds_and_releases() {
        let s = Scenario::from_toml(
            r#"
            [[event]]
            kind = "spike"
            at = "10s"
            field = "temperature"
            value = 80.0
            ramp = "10s"
            hold = "30s"
            release = "10s"
            "#,
            "inline",
        )
        .unwrap();
        let plan = s.plan_for(0, "t-0001");
        let secs = Duration::from_secs;
        assert_eq!(plan.value("temperature", secs(5), 20.0), 20.0);
        assert_eq!(plan.value("temperature", secs(15), 20.0), 50.0);
        assert_eq!(plan.value("temperature", secs(30), 20.0), 80.0);
        assert_eq!(plan.value("temperature", secs(55), 20.0), 50.0);
        assert_eq!(plan.value("temperature", secs(61), 20.0), 20.0);
        assert_eq!(plan.value("humidity", secs(30), 40.0), 40.0);
    }

    #[test]
    fn targets_pick_devices() {
        assert!(Target::All.matches(7, "x"));
        assert!(Target::First(2).matches(1, "x"));
        assert!(!Target::First(2).matches(2, "x"));
        assert!(Target::Ids(vec!["t-0003".into()]).matches(9, "t-0003"));
    }

    #[test]
    fn reconnect_storms_repeat() {
        let s = Scenario::from_toml(
            r#"
            [[event]]
            kind = "reconnect"
            at = "5s"
            down = "1s"
            times = 3
            every = "10s"
            "#,
            "inline",
        )
        .unwrap();
        let disconnects = s.plan_for(0, "a").disconnects();
        assert_eq!(
            disconnects
                .iter()
                .map(|d| d.at.as_secs())
                .collect::<Vec<_>>(),
            [5, 15, 25]
        );
        assert!(disconnects
            .iter()
            .all(|d| d.until - d.at == Duration::from_secs(1)));
    }
}
