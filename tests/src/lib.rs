//! End-to-end tests live in `tests/`; their brokers, ports, fixtures and the gateway
//! process come from the workspace's `test-support` crate.
