//! The configuration of a fleet run: how many devices, how fast, what they publish, for
//! how long, and how they log in.
//!
//! Owns [`FleetConfig`], [`Rate`] and the credentials file format
//! ([`parse_credentials`]). Input: defaults, a scenario's `[fleet]` table, the caller's
//! overrides. Output: a config the fleet runs, or every problem with it at once
//! ([`FleetConfig::problems`]).
//!
//! Invariants:
//! - a config without problems ends: it has a count or a duration;
//! - with a count, the devices' quotas add up to exactly that count (the first
//!   `count % devices` devices get one more).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::QoS;
use serde::{Deserialize, Serialize};

use crate::payload::Format;
use crate::scenario::Scenario;

/// How fast devices publish.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Rate {
    /// Readings per second, each device.
    PerDevice(f64),
    /// Readings per second for the whole fleet, shared evenly.
    Total(f64),
    /// As fast as the connection takes them.
    Max,
}

impl Rate {
    /// The interval between two readings of one device (`None`: no pause).
    pub(super) fn period(self, devices: u32) -> Option<Duration> {
        let per_device = match self {
            Rate::PerDevice(r) => r,
            Rate::Total(r) => r / devices.max(1) as f64,
            Rate::Max => return None,
        };
        (per_device > 0.0).then(|| Duration::from_secs_f64(1.0 / per_device))
    }
}

/// Everything a fleet run needs.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// `host:port` of the MQTT broker.
    pub broker: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Per-device passwords (device id -> password), for a gateway that authenticates
    /// devices: a device listed here connects with user name = client id = its id and
    /// its own password, instead of `username`/`password`.
    pub credentials: Option<Arc<HashMap<String, String>>>,
    pub devices: u32,
    /// Device ids are `{id_prefix}{n:04}`, n from 1.
    pub id_prefix: String,
    /// Topics are `devices/{id}/{stream}`.
    pub stream: String,
    pub rate: Rate,
    pub qos: QoS,
    pub format: Format,
    /// Total payloads to publish (all devices together).
    pub count: Option<u64>,
    /// Stop publishing after this long.
    pub duration: Option<Duration>,
    /// New connections per second while the fleet comes up (staggered connect).
    pub connect_rate: f64,
    pub scenario: Scenario,
    /// Seed for values and malformed picks; fixed seed, repeatable run.
    pub seed: u64,
    /// Log a progress line this often.
    pub progress: Option<Duration>,
    /// After publishing, wait this long at most for outstanding acks.
    pub drain: Duration,
    pub keep_alive: Duration,
    /// A device that has not connected this long after its start gives up
    /// (so a run with only a count still ends when the broker is away).
    pub connect_timeout: Duration,
    /// Unacked QoS 1 publishes per connection.
    pub inflight: u16,
}

impl FleetConfig {
    /// A config with the defaults: 10 devices, 1 reading/s each, QoS 1, JSON,
    /// default scenario, 10 s.
    pub fn new(broker: impl Into<String>) -> FleetConfig {
        FleetConfig {
            broker: broker.into(),
            username: None,
            password: None,
            credentials: None,
            devices: 10,
            id_prefix: "t-".into(),
            stream: "telemetry".into(),
            rate: Rate::PerDevice(1.0),
            qos: QoS::AtLeastOnce,
            format: Format::Json,
            count: None,
            duration: Some(Duration::from_secs(10)),
            connect_rate: 500.0,
            scenario: Scenario::default(),
            seed: 1,
            progress: None,
            drain: Duration::from_secs(10),
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(30),
            inflight: 100,
        }
    }

    /// A config for `scenario`, taking its `[fleet]` defaults (devices, rate
    /// (0 = max), duration, count, format, qos) over the built-in ones.
    pub fn from_scenario(broker: impl Into<String>, scenario: Scenario) -> FleetConfig {
        let mut cfg = FleetConfig::new(broker);
        let d = &scenario.fleet;
        if let Some(n) = d.devices {
            cfg.devices = n;
        }
        match d.rate {
            Some(0.0) => cfg.rate = Rate::Max,
            Some(r) => cfg.rate = Rate::PerDevice(r),
            None => {}
        }
        if d.duration.is_some() || d.count.is_some() {
            cfg.duration = d.duration;
            cfg.count = d.count;
        }
        if let Some(f) = d.format {
            cfg.format = f;
        }
        match d.qos {
            Some(0) => cfg.qos = QoS::AtMostOnce,
            Some(1) => cfg.qos = QoS::AtLeastOnce,
            _ => {}
        }
        cfg.scenario = scenario;
        cfg
    }

    pub fn device_id(&self, index: u32) -> String {
        format!("{}{:04}", self.id_prefix, index + 1)
    }

    pub fn device_ids(&self) -> Vec<String> {
        (0..self.devices).map(|i| self.device_id(i)).collect()
    }

    /// Payloads device `index` publishes when the run has a count.
    pub(super) fn quota(&self, index: u32) -> Option<u64> {
        let n = self.devices.max(1) as u64;
        self.count
            .map(|c| c / n + u64::from((index as u64) < c % n))
    }

    /// Every problem with this config, including scenario targets.
    pub fn problems(&self) -> Vec<String> {
        let mut out = self.scenario.problems();
        out.extend(self.scenario.target_problems(&self.device_ids()));
        if self.devices == 0 {
            out.push("devices must be at least 1".into());
        }
        if self.count.is_none() && self.duration.is_none() {
            out.push("set a count or a duration so the run ends".into());
        }
        if !(self.connect_rate.is_finite() && self.connect_rate > 0.0) {
            out.push(format!(
                "connect rate must be above 0, not {}",
                self.connect_rate
            ));
        }
        match self.rate {
            Rate::PerDevice(r) | Rate::Total(r) if !(r.is_finite() && r > 0.0) => {
                out.push(format!("rate must be above 0, not {r} (use max)"))
            }
            _ => {}
        }
        if matches!(self.qos, QoS::ExactlyOnce) {
            out.push("QoS 2 is not supported (0 or 1)".into());
        }
        if self.broker.rsplit_once(':').is_none() {
            out.push(format!("broker `{}` is not host:port", self.broker));
        }
        out
    }
}

/// Parses a credentials file: one `device-id:password` line per device; blank lines
/// and lines starting with `#` are ignored. Errors name the line.
pub fn parse_credentials(text: &str) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((id, pw)) if !id.is_empty() && !pw.is_empty() => {
                out.insert(id.to_owned(), pw.to_owned());
            }
            _ => return Err(format!("line {}: expected DEVICE-ID:PASSWORD", n + 1)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::parse_credentials;

    #[test]
    fn credentials_file_lines_parse_and_errors_name_the_line() {
        let c = parse_credentials("# fleet\nt-0001:abc\n\nt-0002:x:y\n").unwrap();
        assert_eq!(c["t-0001"], "abc");
        assert_eq!(c["t-0002"], "x:y", "only the first colon separates");
        assert_eq!(
            parse_credentials("t-1:ok\nnocolon\n").unwrap_err(),
            "line 2: expected DEVICE-ID:PASSWORD"
        );
        assert!(parse_credentials("t-1:\n").is_err());
    }
}
