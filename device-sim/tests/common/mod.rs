//! Shared test parts: a real rumqttd broker in-process, a real mosquitto
//! process, and a raw MQTT subscriber that keeps what it receives. Every wait
//! has a timeout; every port is chosen at run time on 127.0.0.1.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use tokio_util::sync::CancellationToken;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn wait_for_port(port: u16, within: Duration) {
    let until = Instant::now() + within;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        assert!(
            Instant::now() < until,
            "nothing listens on {addr} after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts rumqttd (MQTT 3.1.1) on a free port in this process; returns `host:port`.
pub fn start_rumqttd() -> String {
    let port = free_port();
    let mut v4 = HashMap::new();
    v4.insert(
        "v4".to_owned(),
        rumqttd::ServerSettings {
            name: "v4".into(),
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            tls: None,
            next_connection_delay_ms: 0,
            connections: rumqttd::ConnectionSettings {
                connection_timeout_ms: 5000,
                max_payload_size: 64 * 1024,
                max_inflight_count: 500,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        },
    );
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 2000,
            max_outgoing_packet_count: 500,
            max_segment_size: 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(v4),
        ..Default::default()
    };
    std::thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(config);
        broker.start().expect("rumqttd runs");
    });
    wait_for_port(port, Duration::from_secs(5));
    format!("127.0.0.1:{port}")
}

/// A mosquitto process on a free port, killed on drop.
pub struct Mosquitto {
    pub addr: String,
    pub child: Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\n"
            ),
        )
        .unwrap();
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is installed at /usr/sbin/mosquitto");
        wait_for_port(port, Duration::from_secs(5));
        Mosquitto {
            addr: format!("127.0.0.1:{port}"),
            child,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One message as a subscriber got it.
#[derive(Debug, Clone)]
pub struct Got {
    pub topic: String,
    pub payload: Vec<u8>,
    pub at: Instant,
}

/// A raw subscriber that keeps every message; subscribed when `start` returns.
pub struct Collector {
    pub got: Arc<Mutex<Vec<Got>>>,
    stop: CancellationToken,
    pub client: AsyncClient,
}

impl Collector {
    pub async fn start(addr: &str, filter: &str) -> Collector {
        let (host, port) = addr.rsplit_once(':').unwrap();
        let id = format!("collector-{}", free_port());
        let mut o = MqttOptions::new(id, host, port.parse().unwrap());
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(o, 64);
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let (sink, token) = (got.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = token.cancelled() => break,
                    ev = eventloop.poll() => ev,
                };
                match ev {
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => sink.lock().unwrap().push(Got {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        at: Instant::now(),
                    }),
                    Ok(_) => {}
                    Err(e) => panic!("collector lost its broker: {e}"),
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), ready_rx)
            .await
            .expect("SUBACK within 5 s")
            .unwrap();
        Collector { got, stop, client }
    }

    /// Waits until `n` messages arrived (or `within` passed); returns all so far.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Got> {
        let until = Instant::now() + within;
        loop {
            let len = self.got.lock().unwrap().len();
            if len >= n || Instant::now() >= until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A little longer, so extra (duplicate) messages would show.
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
