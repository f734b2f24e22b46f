//! The TLS listener for devices (`broker.listen_tls`): terminates TLS and relays the
//! plaintext MQTT stream to a loopback-only rumqttd listener.
//!
//! Why not rumqttd's own TLS (`ServerSettings.tls`): rumqttd 0.20 does the handshake
//! inside its accept loop with no timeout (one silent TCP client stops every later TLS
//! device from connecting), re-reads the PEM files on every connection, and verifies
//! client certificates only with a compile-time feature that then requires them on
//! every TLS listener and rewrites client ids from the certificate's organisation. Here
//! the handshake runs per connection with a deadline, and client-certificate
//! verification is a setting (`broker.tls_client_ca`).
//!
//! Inputs: TCP connections on `broker.listen_tls`, the [`rustls::ServerConfig`] built by
//! [`crate::tls::server_config`]. Output: one TCP connection per device to the relay
//! listener (`127.0.0.1`, port chosen at start; it speaks MQTT 3.1.1 and has the same
//! connection settings as `broker.listen`).
//!
//! Invariants:
//! - a connection reaches the broker only after a completed handshake (and a verified
//!   client certificate when `broker.tls_client_ca` is set);
//! - a handshake that does not finish within [`HANDSHAKE_TIMEOUT`] is dropped, and never
//!   delays another connection;
//! - at most `max_connections` TLS connections (handshaking or relayed) at once: beyond
//!   that a new connection is closed at once and counted, so a flood of idle sockets
//!   cannot grow tasks and file descriptors without bound;
//! - every accepted device socket has TCP keepalive on ([`rumqttd::enable_tcp_keepalive`]),
//!   so a vanished device is detected even with MQTT keep alive 0;
//! - failed handshakes are counted and logged at most once per [`FAILURE_LOG_INTERVAL`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// How long a device has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed handshakes are logged at most this often (the rest are counted).
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Counters of the TLS listener.
#[derive(Debug, Default)]
pub struct TlsListenerStats {
    /// Handshakes completed and relayed to the broker.
    pub accepted: AtomicU64,
    /// Handshakes that failed or timed out (plaintext clients, unknown CAs, scanners).
    pub handshake_failures: AtomicU64,
    /// Connections closed unread because `max_connections` TLS connections were open.
    pub refused_over_limit: AtomicU64,
    last_failure_log: Mutex<Option<Instant>>,
}

impl TlsListenerStats {
    fn handshake_failed(&self, peer: SocketAddr, error: &dyn std::fmt::Display) {
        let total = self.handshake_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if self.may_log() {
            tracing::warn!(%peer, %error, failures = total, "TLS handshake with a device failed.");
        }
    }

    fn over_limit(&self, peer: SocketAddr) {
        let total = self.refused_over_limit.fetch_add(1, Ordering::Relaxed) + 1;
        if self.may_log() {
            tracing::warn!(%peer, refused = total, "TLS listener is at max_connections; closing new connections.");
        }
    }

    /// True at most once per [`FAILURE_LOG_INTERVAL`] (shared by both warnings).
    fn may_log(&self) -> bool {
        let mut last = self
            .last_failure_log
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let due = last.is_none_or(|t| t.elapsed() >= FAILURE_LOG_INTERVAL);
        if due {
            *last = Some(Instant::now());
        }
        due
    }
}

/// A bound TLS listener, ready to [`serve`](TlsListener::serve).
pub struct TlsListener {
    listener: std::net::TcpListener,
    acceptor: TlsAcceptor,
    relay: SocketAddr,
    slots: Arc<Semaphore>,
    stats: Arc<TlsListenerStats>,
}

impl TlsListener {
    /// Binds `listen` (no runtime needed); every completed handshake is relayed to `relay`;
    /// at most `max_connections` at once.
    pub fn bind(
        listen: SocketAddr,
        config: Arc<rustls::ServerConfig>,
        relay: SocketAddr,
        max_connections: usize,
    ) -> std::io::Result<TlsListener> {
        let listener = std::net::TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        Ok(TlsListener {
            listener,
            acceptor: TlsAcceptor::from(config),
            relay,
            slots: Arc::new(Semaphore::new(max_connections.max(1))),
            stats: Arc::default(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn stats(&self) -> Arc<TlsListenerStats> {
        self.stats.clone()
    }

    /// Accepts connections forever; each one runs in its own task.
    pub async fn serve(self) -> std::io::Result<()> {
        let listener = TcpListener::from_std(self.listener)?;
        tracing::info!(listen = %listener.local_addr()?, "TLS listener is up.");
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(error = %e, "TLS listener cannot accept a connection.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                self.stats.over_limit(peer);
                drop(tcp);
                continue;
            };
            // A device with MQTT keep alive 0 is never timed out by the broker; TCP
            // keepalive ends the relay of one that vanished (the relay then closes).
            if let Err(e) = rumqttd::enable_tcp_keepalive(&tcp) {
                tracing::debug!(error = %e, %peer, "Cannot enable TCP keepalive.");
            }
            let acceptor = self.acceptor.clone();
            let stats = self.stats.clone();
            let relay = self.relay;
            tokio::spawn(async move {
                let _slot = slot;
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return stats.handshake_failed(peer, &e),
                    Err(_) => return stats.handshake_failed(peer, &"handshake timed out"),
                };
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = relay_to(tls, relay).await {
                    tracing::debug!(%peer, error = %e, "TLS connection ended with an error.");
                }
            });
        }
    }
}

async fn relay_to(
    mut tls: tokio_rustls::server::TlsStream<TcpStream>,
    relay: SocketAddr,
) -> std::io::Result<()> {
    let mut broker = TcpStream::connect(relay).await?;
    broker.set_nodelay(true)?;
    tls.get_ref().0.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut tls, &mut broker).await?;
    Ok(())
}
