//! A TCP proxy in front of a broker on loopback, for outages on demand.
//!
//! Invariants: while down, every open connection is cut and new ones are accepted and
//! closed at once (the client sees a connection reset, not a hang); while up, bytes are
//! copied both ways unchanged. The proxy runs on the test's tokio runtime.

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy in front of `127.0.0.1:target`; `set_up(false)` cuts every connection and
/// refuses new ones until `set_up(true)`.
pub struct Proxy {
    pub port: u16,
    up: watch::Sender<bool>,
}

impl Proxy {
    /// Listens on a free port, up or down from the start.
    pub async fn start(target: u16, up: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = watch::channel(up);
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if !*rx.borrow() {
                    drop(inbound);
                    continue;
                }
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    let (mut ri, mut wi) = inbound.into_split();
                    let (mut ro, mut wo) = outbound.into_split();
                    tokio::select! {
                        _ = tokio::io::copy(&mut ri, &mut wo) => {}
                        _ = tokio::io::copy(&mut ro, &mut wi) => {}
                        _ = rx.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Proxy { port, up: tx }
    }

    pub fn set_up(&self, up: bool) {
        let _ = self.up.send(up);
    }
}
