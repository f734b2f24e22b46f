//! Test support for the whole workspace: every test crate and bench (gateway's
//! integration tests and benches, device-sim's tests, the end-to-end `e2e` crate) takes
//! its brokers, ports, waits and fixtures from here.
//!
//! Modules, by what they are:
//! - [`ports`]: free loopback ports and waiting for a listener.
//! - [`wait`]: polling a condition until a deadline.
//! - [`rumqttd`]: an rumqttd broker inside the test process.
//! - [`mosquitto`]: Mosquitto as a child process (plain and TLS listeners).
//! - [`tls`]: throwaway certificate authorities.
//! - [`proxy`]: a TCP proxy that cuts the link on demand.
//! - [`collector`]: an upstream subscriber that records what arrived, and delivery checks.
//! - [`client`]: a device-like MQTT client (publish and subscribe) for a broker under test.
//! - [`mqtt5`]: an MQTT 5 client with subscription options and properties, for conformance.
//! - [`paho`]: the Python paho-mqtt client's scenarios under `tests/python/`.
//! - [`gateway_process`]: the real `gateway` binary as a child process.
//! - [`http_server`]: an HTTP server with scripted replies that records what it got.
//! - [`tmpfs`]: a small real filesystem that can be filled up.
//! - [`upstream`]: the upstream broker of a forwarding test (Mosquitto, else rumqttd).
//!
//! Invariants:
//! - Everything listens on and connects to 127.0.0.1 only; ports are chosen at run time.
//! - Every wait has a timeout and panics with what it waited for.
//! - This crate does not depend on `gateway` (which dev-depends on it).

pub mod client;
pub mod collector;
pub mod gateway_process;
pub mod http_server;
pub mod mosquitto;
pub mod mqtt5;
pub mod paho;
pub mod ports;
pub mod proxy;
pub mod rumqttd;
pub mod tls;
pub mod tmpfs;
pub mod upstream;
pub mod wait;

pub use client::{publish_acked, publish_all, raw_connect, subscribe};
pub use collector::{check_delivery, check_delivery_with, Collector, Received};
pub use gateway_process::{counter, metric, workspace_bin, Gateway};
pub use http_server::{HttpServer, Reply};
pub use mosquitto::Mosquitto;
pub use mqtt5::V5Client;
pub use paho::{paho_available, run_paho};
pub use ports::{free_port, wait_port};
pub use proxy::Proxy;
pub use rumqttd::Rumqttd;
pub use tls::{Issued, TestCa};
pub use upstream::UpstreamBroker;
pub use wait::{wait_until, wait_until_async};
