//! What every decoder target checks: the real entry point `gateway::decode::decode`
//! returns (never panics, never overflows the stack), and what it returns keeps the
//! module's invariants: at least one reading, each with at least one field, identity
//! from the topic, finite numbers.

use std::sync::OnceLock;

use gateway::decode::{decode, TopicPattern};
use gateway::reading::{Millis, Value};

pub const TOPIC: &str = "devices/d-1/telemetry";
pub const NOW: Millis = 1_764_235_200_000;

fn pattern() -> &'static TopicPattern {
    static PATTERN: OnceLock<TopicPattern> = OnceLock::new();
    PATTERN.get_or_init(|| TopicPattern::parse("devices/{device}/{stream}").unwrap())
}

pub fn check(payload: &[u8], content_type: Option<&str>) {
    match decode(pattern(), TOPIC, payload, content_type, NOW) {
        Ok(readings) => {
            assert!(!readings.is_empty(), "Ok with no readings");
            for r in &readings {
                assert!(!r.fields.is_empty(), "a reading without fields");
                assert_eq!((r.device.as_str(), r.stream.as_str()), ("d-1", "telemetry"));
                for (name, value) in &r.fields {
                    if let Value::Number(n) = value {
                        assert!(n.is_finite(), "field {name} is {n}");
                    }
                }
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
