//! Value models: how one field of a simulated device changes over time.
//!
//! Inputs: a [`Model`] (from a scenario file or code), the time since the fleet
//! started, a per-device random generator, and the device's [`Switches`] (the actuators
//! its commands turn on and off). Output: the next value.
//!
//! Invariants:
//! - a model is validated once ([`Model::problems`]) before any device runs;
//!   a validated model never yields NaN or infinity.
//! - the generator is seeded per device, so a run with a fixed seed is repeatable.
//! - only a `thermal` model reads a switch: it is how a command closes the loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// How a field's value evolves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Model {
    /// Always `value`.
    Constant {
        value: f64,
        #[serde(default)]
        unit: Option<String>,
    },
    /// Starts at `start`, moves by a uniform step in `[-step, step]` per second of time
    /// between readings (`[-step * sqrt(s), step * sqrt(s)]` after `s` seconds: one
    /// reading a second moves it by up to `step`, ten a second by up to `step / sqrt(10)`
    /// each, so its drift over a minute does not depend on the rate), kept inside
    /// `[min, max]`.
    RandomWalk {
        start: f64,
        step: f64,
        min: f64,
        max: f64,
        #[serde(default)]
        unit: Option<String>,
    },
    /// `mean + amplitude * sin(2 pi t / period + phase)` plus uniform noise in
    /// `[-noise, noise]`; each device gets its own random phase.
    Sine {
        mean: f64,
        amplitude: f64,
        #[serde(with = "humantime_serde")]
        period: Duration,
        #[serde(default)]
        noise: f64,
        #[serde(default)]
        unit: Option<String>,
    },
    /// `start + by * floor(t / every)`, kept inside `[min, max]` (e.g. a draining battery).
    Step {
        start: f64,
        by: f64,
        #[serde(with = "humantime_serde")]
        every: Duration,
        #[serde(default = "neg_inf")]
        min: f64,
        #[serde(default = "pos_inf")]
        max: f64,
        #[serde(default)]
        unit: Option<String>,
    },
    /// A body that heats and a fan that cools it: from `start`, rises by `rise` per second
    /// while the switch `fan` is off and falls by `fall` per second while it is on, kept
    /// inside `[min, max]`. The device turns the switch on and off when it receives
    /// commands on `devices/{id}/commands/{fan}`.
    Thermal {
        start: f64,
        rise: f64,
        fall: f64,
        min: f64,
        max: f64,
        #[serde(default = "default_fan")]
        fan: String,
        #[serde(default)]
        unit: Option<String>,
    },
}

fn default_fan() -> String {
    "fan".into()
}

fn neg_inf() -> f64 {
    f64::NEG_INFINITY
}
fn pos_inf() -> f64 {
    f64::INFINITY
}

impl Model {
    pub fn unit(&self) -> Option<&str> {
        match self {
            Model::Constant { unit, .. }
            | Model::RandomWalk { unit, .. }
            | Model::Sine { unit, .. }
            | Model::Step { unit, .. }
            | Model::Thermal { unit, .. } => unit.as_deref(),
        }
    }

    /// The switch this model listens to, if any.
    pub fn switch(&self) -> Option<&str> {
        match self {
            Model::Thermal { fan, .. } => Some(fan),
            _ => None,
        }
    }

    /// Everything wrong with this model, as sentences naming the field.
    pub fn problems(&self, field: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut finite = |name: &str, v: f64| {
            if !v.is_finite() {
                out.push(format!("field `{field}`: `{name}` must be a finite number"));
            }
        };
        match self {
            Model::Constant { value, .. } => finite("value", *value),
            Model::RandomWalk {
                start,
                step,
                min,
                max,
                ..
            } => {
                finite("start", *start);
                finite("step", *step);
                finite("min", *min);
                finite("max", *max);
                if min > max {
                    out.push(format!(
                        "field `{field}`: `min` ({min}) is above `max` ({max})"
                    ));
                }
                if *step < 0.0 {
                    out.push(format!("field `{field}`: `step` must not be negative"));
                }
            }
            Model::Sine {
                mean,
                amplitude,
                period,
                noise,
                ..
            } => {
                finite("mean", *mean);
                finite("amplitude", *amplitude);
                finite("noise", *noise);
                if period.is_zero() {
                    out.push(format!("field `{field}`: `period` must be longer than 0s"));
                }
            }
            Model::Step {
                start,
                by,
                every,
                min,
                max,
                ..
            } => {
                finite("start", *start);
                finite("by", *by);
                if every.is_zero() {
                    out.push(format!("field `{field}`: `every` must be longer than 0s"));
                }
                if min > max {
                    out.push(format!(
                        "field `{field}`: `min` ({min}) is above `max` ({max})"
                    ));
                }
            }
            Model::Thermal {
                start,
                rise,
                fall,
                min,
                max,
                fan,
                ..
            } => {
                finite("start", *start);
                finite("rise", *rise);
                finite("fall", *fall);
                finite("min", *min);
                finite("max", *max);
                if min > max {
                    out.push(format!(
                        "field `{field}`: `min` ({min}) is above `max` ({max})"
                    ));
                }
                if *rise < 0.0 || *fall < 0.0 {
                    out.push(format!(
                        "field `{field}`: `rise` and `fall` are rates and must not be negative"
                    ));
                }
                let level = !fan.is_empty() && !fan.contains(['/', '+', '#']);
                if !level {
                    out.push(format!(
                        "field `{field}`: `fan` must be one topic level (no `/`, `+` or `#`)"
                    ));
                }
            }
        }
        out
    }
}

/// The on/off actuators of one device (a fan), set by the commands it receives and read
/// by its models. Shared between the device's connection and publisher tasks.
#[derive(Debug, Default)]
pub struct Switches {
    switches: Vec<(String, AtomicBool)>,
}

impl Switches {
    /// All off.
    pub fn new(names: impl IntoIterator<Item = String>) -> Switches {
        let mut switches: Vec<(String, AtomicBool)> = Vec::new();
        for name in names {
            if !switches.iter().any(|(n, _)| *n == name) {
                switches.push((name, AtomicBool::new(false)));
            }
        }
        Switches { switches }
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.switches.iter().map(|(n, _)| n.as_str())
    }

    pub fn is_on(&self, name: &str) -> bool {
        self.switches
            .iter()
            .any(|(n, on)| n == name && on.load(Ordering::Relaxed))
    }

    /// Sets a switch; false when the device has no switch of that name.
    pub fn set(&self, name: &str, on: bool) -> bool {
        match self.switches.iter().find(|(n, _)| n == name) {
            Some((_, state)) => {
                state.store(on, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

/// The running state of one model on one device.
#[derive(Debug, Clone)]
pub struct Generator {
    model: Model,
    current: f64,
    phase: f64,
    /// When the last value was made (for rate models).
    last: Option<Duration>,
}

impl Generator {
    pub fn new(model: Model, rng: &mut SmallRng) -> Self {
        let current = match &model {
            Model::RandomWalk { start, .. } | Model::Thermal { start, .. } => *start,
            _ => 0.0,
        };
        let phase = rng.random_range(0.0..std::f64::consts::TAU);
        Generator {
            model,
            current,
            phase,
            last: None,
        }
    }

    /// The value at `t` since the fleet started, with the device's switches as they are.
    pub fn next(&mut self, t: Duration, rng: &mut SmallRng, switches: &Switches) -> f64 {
        let v = match &self.model {
            Model::Constant { value, .. } => *value,
            Model::RandomWalk { step, min, max, .. } => {
                // The spread grows with the square root of the time since the previous
                // value, as a random walk's does: the value drifts as far in a minute
                // whether the device reports once a second or ten times.
                let secs = self
                    .last
                    .map_or(1.0, |last| t.saturating_sub(last).as_secs_f64());
                let spread = step * secs.sqrt();
                let delta = if spread > 0.0 {
                    rng.random_range(-spread..=spread)
                } else {
                    0.0
                };
                self.current = (self.current + delta).clamp(*min, *max);
                self.current
            }
            Model::Sine {
                mean,
                amplitude,
                period,
                noise,
                ..
            } => {
                let angle = std::f64::consts::TAU * t.as_secs_f64() / period.as_secs_f64();
                let jitter = if *noise > 0.0 {
                    rng.random_range(-*noise..=*noise)
                } else {
                    0.0
                };
                mean + amplitude * (angle + self.phase).sin() + jitter
            }
            Model::Step {
                start,
                by,
                every,
                min,
                max,
                ..
            } => {
                let steps = (t.as_secs_f64() / every.as_secs_f64()).floor();
                (start + by * steps).clamp(*min, *max)
            }
            Model::Thermal {
                rise,
                fall,
                min,
                max,
                fan,
                ..
            } => {
                let dt = self
                    .last
                    .map_or(0.0, |last| t.saturating_sub(last).as_secs_f64());
                let rate = if switches.is_on(fan) { -*fall } else { *rise };
                self.current = (self.current + rate * dt).clamp(*min, *max);
                self.current
            }
        };
        self.last = Some(t);
        round2(v)
    }
}

/// Two decimals keep payloads short and readable.
pub fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn random_walk_stays_in_bounds() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut g = Generator::new(
            Model::RandomWalk {
                start: 20.0,
                step: 5.0,
                min: 15.0,
                max: 25.0,
                unit: None,
            },
            &mut rng,
        );
        for i in 0..1000 {
            let v = g.next(Duration::from_millis(i), &mut rng, &Switches::default());
            assert!((15.0..=25.0).contains(&v), "{v}");
        }
    }

    /// The largest move between two readings, and how far the value went in `secs`
    /// seconds, at `per_sec` readings a second.
    fn walk(per_sec: u64, secs: u64, seed: u64) -> (f64, f64) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut g = Generator::new(
            Model::RandomWalk {
                start: 500.0,
                step: 0.2,
                min: 0.0,
                max: 1000.0,
                unit: None,
            },
            &mut rng,
        );
        let none = Switches::default();
        let first = g.next(Duration::ZERO, &mut rng, &none);
        let (mut prev, mut largest) = (first, 0.0f64);
        for i in 1..=per_sec * secs {
            let v = g.next(Duration::from_millis(i * 1000 / per_sec), &mut rng, &none);
            largest = largest.max((v - prev).abs());
            prev = v;
        }
        (largest, prev - first)
    }

    #[test]
    fn a_random_walk_drifts_as_far_per_minute_at_any_rate() {
        // One reading a second: moves of up to `step`, as before the spread was per second.
        let (largest, _) = walk(1, 600, 7);
        assert!(largest <= 0.2 + 0.01 && largest > 0.15, "{largest}");
        // Ten a second: each move is up to step / sqrt(10).
        let (largest, _) = walk(10, 60, 7);
        assert!(largest <= 0.2 / 10f64.sqrt() + 0.01, "{largest}");
        // Over a minute the drift is alike: its spread (root mean square over many walks)
        // is step / sqrt(3) * sqrt(60) = 0.89 at either rate, not sqrt(10) times more at
        // ten a second.
        let rms = |per_sec: u64| {
            let runs = 200;
            let sum: f64 = (0..runs)
                .map(|seed| walk(per_sec, 60, seed).1.powi(2))
                .sum();
            (sum / runs as f64).sqrt()
        };
        let (one, ten) = (rms(1), rms(10));
        assert!((0.7..1.1).contains(&one), "1/s: {one}");
        assert!((0.7..1.1).contains(&ten), "10/s: {ten}");
    }

    #[test]
    fn step_moves_every_interval() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut g = Generator::new(
            Model::Step {
                start: 100.0,
                by: -10.0,
                every: Duration::from_secs(10),
                min: 0.0,
                max: 100.0,
                unit: None,
            },
            &mut rng,
        );
        let none = Switches::default();
        assert_eq!(g.next(Duration::from_secs(9), &mut rng, &none), 100.0);
        assert_eq!(g.next(Duration::from_secs(25), &mut rng, &none), 80.0);
        assert_eq!(g.next(Duration::from_secs(500), &mut rng, &none), 0.0);
    }

    #[test]
    fn sine_stays_within_amplitude_and_noise() {
        let mut rng = SmallRng::seed_from_u64(3);
        let mut g = Generator::new(
            Model::Sine {
                mean: 45.0,
                amplitude: 5.0,
                period: Duration::from_secs(60),
                noise: 0.5,
                unit: None,
            },
            &mut rng,
        );
        let values: Vec<f64> = (0..600)
            .map(|i| {
                g.next(
                    Duration::from_millis(i * 100),
                    &mut rng,
                    &Switches::default(),
                )
            })
            .collect();
        assert!(values.iter().all(|v| (39.49..=50.51).contains(v)));
        let spread = values.iter().cloned().fold(f64::MIN, f64::max)
            - values.iter().cloned().fold(f64::MAX, f64::min);
        assert!(
            spread > 8.0,
            "a full period should swing the value: {spread}"
        );
    }

    #[test]
    fn thermal_rises_with_the_fan_off_and_falls_with_it_on() {
        let mut rng = SmallRng::seed_from_u64(1);
        let model = Model::Thermal {
            start: 60.0,
            rise: 1.0,
            fall: 2.0,
            min: 20.0,
            max: 90.0,
            fan: "fan".into(),
            unit: None,
        };
        assert!(model.problems("temperature").is_empty());
        let switches = Switches::new(model.switch().map(str::to_owned));
        let mut g = Generator::new(model, &mut rng);
        let secs = Duration::from_secs;
        assert_eq!(g.next(secs(0), &mut rng, &switches), 60.0);
        assert_eq!(g.next(secs(10), &mut rng, &switches), 70.0);
        assert_eq!(g.next(secs(40), &mut rng, &switches), 90.0, "capped at max");
        assert!(switches.set("fan", true));
        assert_eq!(g.next(secs(45), &mut rng, &switches), 80.0);
        assert_eq!(
            g.next(secs(100), &mut rng, &switches),
            20.0,
            "floored at min"
        );
        assert!(switches.set("fan", false));
        assert_eq!(g.next(secs(101), &mut rng, &switches), 21.0);
        assert!(!switches.set("pump", true), "no such switch");
    }

    #[test]
    fn thermal_problems_are_reported() {
        let model = Model::Thermal {
            start: 60.0,
            rise: -1.0,
            fall: 2.0,
            min: 90.0,
            max: 20.0,
            fan: "a/b".into(),
            unit: None,
        };
        assert_eq!(model.problems("t").len(), 3, "{:?}", model.problems("t"));
    }
}
