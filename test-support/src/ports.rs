//! Loopback ports: one that is free now, and waiting until something listens on one.
//!
//! Invariants: only 127.0.0.1; [`free_port`] never hands out one port twice in a process
//! (the kernel may offer a port again as soon as it is closed, and a test that asked for
//! two ports before binding either got the same one twice); [`wait_port`] gives up
//! (panics) after its timeout.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Ports [`free_port`] has handed out in this process.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A port on 127.0.0.1 that nothing listened on a moment ago, and that this process has
/// not been given before.
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        if HANDED_OUT.lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("no loopback port that was not handed out before in 1000 tries");
}

/// Blocks until a TCP connect to `127.0.0.1:port` succeeds; panics after `timeout`.
pub fn wait_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on {addr} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_never_hands_out_a_port_twice() {
        // 300 draws from the kernel's ~28,000 ephemeral ports would repeat one more often
        // than not.
        let ports: Vec<u16> = (0..300).map(|_| free_port()).collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
    }
}
