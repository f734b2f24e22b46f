//! An upstream broker for end-to-end tests: Mosquitto when it is installed, otherwise an
//! in-process rumqttd, so a test of forwarding runs everywhere and against Mosquitto in CI
//! (`GATEWAY_REQUIRE_MOSQUITTO=1`, see [`crate::mosquitto`]).
//!
//! Invariants:
//! - `port` is an MQTT 5 listener on 127.0.0.1 that accepts anonymous clients;
//! - a Mosquitto started here is killed when the value is dropped (rumqttd runs until the
//!   test process ends).

use crate::{Mosquitto, Rumqttd};

/// The upstream broker of a test.
pub struct UpstreamBroker {
    /// The port the gateway forwards to (`mqtt://127.0.0.1:{port}`).
    pub port: u16,
    /// The Mosquitto process, when that is the broker.
    pub mosquitto: Option<Mosquitto>,
}

impl UpstreamBroker {
    /// Mosquitto if installed, otherwise rumqttd in process.
    pub fn start() -> UpstreamBroker {
        let mosquitto = Mosquitto::start();
        UpstreamBroker {
            port: mosquitto
                .as_ref()
                .map_or_else(|| Rumqttd::start().port, |m| m.port),
            mosquitto,
        }
    }
}
