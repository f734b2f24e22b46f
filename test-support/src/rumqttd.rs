//! An rumqttd broker inside the test process, as an upstream or a device-side broker.
//!
//! Invariants:
//! - One router with two loopback listeners on ports chosen at start: MQTT 5 (what the
//!   gateway's forwarder and the [`crate::Collector`] speak) and MQTT 3.1.1 (what
//!   device-sim's devices speak). A message published on one reaches subscribers on both.
//! - The broker runs on its own thread until the test process ends; [`Rumqttd::start`]
//!   returns once both listeners accept connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

use crate::ports::{free_port, wait_port};

/// The ports of a running in-process rumqttd.
#[derive(Debug, Clone, Copy)]
pub struct Rumqttd {
    /// The MQTT 5 listener.
    pub port: u16,
    /// The MQTT 3.1.1 listener.
    pub v311_port: u16,
}

impl Rumqttd {
    /// Starts a broker on two free ports and waits until both listen.
    pub fn start() -> Rumqttd {
        Rumqttd::start_with(|_| {})
    }

    /// [`Rumqttd::start`], with `configure` setting the broker's hooks before it starts.
    pub fn start_with(configure: impl FnOnce(&mut Broker)) -> Rumqttd {
        let (port, v311_port) = (free_port(), free_port());
        let config = Config {
            id: 0,
            router: RouterConfig {
                max_connections: 2000,
                max_outgoing_packet_count: 1000,
                max_segment_size: 16 * 1024 * 1024,
                max_segment_count: 20,
                ..RouterConfig::default()
            },
            v4: Some(HashMap::from([("v4".to_string(), server("v4", v311_port))])),
            v5: Some(HashMap::from([("v5".to_string(), server("v5", port))])),
            ..Config::default()
        };
        let mut broker = Broker::new(config);
        configure(&mut broker);
        std::thread::spawn(move || {
            let _ = broker.start();
        });
        wait_port(port, Duration::from_secs(5));
        wait_port(v311_port, Duration::from_secs(5));
        Rumqttd { port, v311_port }
    }

    /// `127.0.0.1:PORT` of the MQTT 3.1.1 listener (for device-sim's devices).
    pub fn v311_addr(&self) -> String {
        format!("127.0.0.1:{}", self.v311_port)
    }
}

fn server(name: &str, port: u16) -> ServerSettings {
    ServerSettings {
        name: name.into(),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 5000,
            max_payload_size: 1024 * 1024,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}
