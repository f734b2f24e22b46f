//! Shared parts of the forwarder tests and bench: real upstream brokers (rumqttd in
//! process, mosquitto as a child process), a TCP proxy that can cut the link, and a
//! subscriber that records what arrived upstream.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} did not open");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts an rumqttd broker (MQTT 5 listener) on `port` in this process; it lives until
/// the test process ends.
pub fn start_rumqttd(port: u16) {
    use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
    let server = ServerSettings {
        name: "v5".into(),
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
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 1000,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 20,
            ..RouterConfig::default()
        },
        v5: Some(HashMap::from([("v5".to_string(), server)])),
        ..Config::default()
    };
    let mut broker = Broker::new(config);
    std::thread::spawn(move || {
        let _ = broker.start();
    });
    wait_port(port, Duration::from_secs(5));
}

/// True when mosquitto tests should run; panics when they are required but impossible.
pub fn mosquitto_available() -> bool {
    let present = Path::new(MOSQUITTO).exists();
    if !present && std::env::var("GATEWAY_REQUIRE_MOSQUITTO").as_deref() == Ok("1") {
        panic!("GATEWAY_REQUIRE_MOSQUITTO=1 but {MOSQUITTO} is missing");
    }
    if !present {
        eprintln!("skipping: {MOSQUITTO} not found");
    }
    present
}

/// A mosquitto child process on a loopback port, with persistence in a temp dir so a
/// graceful restart keeps queued messages of persistent sessions.
pub struct Mosquitto {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start(dir: &Path) -> Mosquitto {
        let port = free_port();
        // Started as root, mosquitto drops to its own user: let it write its persistence file.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {}/\nmax_queued_messages 0\nmax_inflight_messages 0\n\
                 log_dest none\n",
                dir.display()
            ),
        )
        .unwrap();
        let mut m = Mosquitto {
            port,
            dir: dir.to_owned(),
            child: None,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(5));
    }

    /// Graceful stop (SIGTERM: mosquitto saves its persistence file), waits for exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TCP proxy in front of an upstream broker; `set_up(false)` cuts every connection and
/// refuses new ones until `set_up(true)`.
pub struct Proxy {
    pub port: u16,
    up: watch::Sender<bool>,
}

impl Proxy {
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

/// One message as the upstream subscriber saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub id: Option<String>,
    pub replayed: Option<bool>,
    pub payload: Vec<u8>,
    pub at: Instant,
}

impl Received {
    pub fn seq(&self) -> u64 {
        self.id
            .as_deref()
            .and_then(|id| id.rsplit_once(':'))
            .and_then(|(_, s)| s.parse().ok())
            .expect("message without an id")
    }
}

/// A QoS 1 subscriber upstream with a persistent session, recording every publish.
#[derive(Clone)]
pub struct Collector {
    pub received: Arc<Mutex<Vec<Received>>>,
}

impl Collector {
    pub async fn start(port: u16, filter: &str) -> Collector {
        let received = Arc::new(Mutex::new(Vec::new()));
        let mut opts = MqttOptions::new(format!("collector-{}", free_port()), "127.0.0.1", port);
        opts.set_clean_start(false)
            .set_session_expiry_interval(Some(3600))
            .set_max_packet_size(Some(4 * 1024 * 1024))
            .set_keep_alive(Duration::from_secs(5));
        let (client, mut el) = AsyncClient::new(opts, 100);
        let (subscribed_tx, mut subscribed_rx) = tokio::sync::mpsc::channel(1);
        let sink = received.clone();
        let filter = filter.to_owned();
        tokio::spawn(async move {
            let mut subscribed = false;
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        if !ack.session_present {
                            let _ = client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) if !subscribed => {
                        subscribed = true;
                        let _ = subscribed_tx.send(()).await;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let props = p.properties.unwrap_or_default();
                        let prop = |k: &str| {
                            props
                                .user_properties
                                .iter()
                                .find(|(name, _)| name == k)
                                .map(|(_, v)| v.clone())
                        };
                        sink.lock().unwrap().push(Received {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            id: prop("id"),
                            replayed: prop("replayed").map(|v| v == "true"),
                            payload: p.payload.to_vec(),
                            at: Instant::now(),
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed_rx.recv())
            .await
            .expect("collector did not subscribe");
        Collector { received }
    }

    pub fn len(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    pub fn snapshot(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Distinct message ids received so far.
    pub fn unique(&self) -> usize {
        let r = self.received.lock().unwrap();
        r.iter().map(|m| m.seq()).collect::<HashSet<_>>().len()
    }

    /// Waits until `n` distinct ids arrived; panics with the count after `timeout`.
    pub async fn wait_unique(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.unique();
            if got >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {got} of {n} distinct messages arrived within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Checks delivery: every expected seq arrived, per device the first arrivals are in seq
/// order; returns the number of duplicates.
pub fn check_delivery(
    received: &[Received],
    expected: usize,
    device_of: impl Fn(&Received) -> String,
) -> usize {
    check_delivery_with(received, expected, device_of, true)
}

/// As [`check_delivery`]; with `strict = false`, order is checked only among messages
/// that arrived exactly once. That is the guarantee when the upstream broker may still
/// route the tail of a dropped connection while the new one replays it (rumqttd's
/// session takeover is concurrent): those repeats may arrive out of place.
pub fn check_delivery_with(
    received: &[Received],
    expected: usize,
    device_of: impl Fn(&Received) -> String,
    strict: bool,
) -> usize {
    let mut count: HashMap<u64, usize> = HashMap::new();
    for m in received {
        *count.entry(m.seq()).or_default() += 1;
    }
    let mut seen = HashSet::new();
    let mut last_per_device: HashMap<String, u64> = HashMap::new();
    for m in received {
        let seq = m.seq();
        if !seen.insert(seq) || (!strict && count[&seq] > 1) {
            continue;
        }
        let device = device_of(m);
        if let Some(prev) = last_per_device.insert(device.clone(), seq) {
            assert!(
                prev < seq,
                "device {device}: seq {seq} arrived after {prev}"
            );
        }
    }
    assert_eq!(seen.len(), expected, "distinct messages");
    received.len() - seen.len()
}

/// A throwaway certificate authority for TLS tests (rcgen), writing PEM files into a dir.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes the CA certificate to `dir/{name}.pem`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, self.pem()).unwrap();
        path
    }

    /// Issues a certificate for `sans` (DNS names or IP addresses; none for a client)
    /// and writes `dir/{name}.pem` and `dir/{name}.key`; returns both PEM texts too.
    pub fn issue(&self, dir: &Path, name: &str, sans: &[&str]) -> Issued {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let issued = Issued {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        std::fs::write(&issued.cert, &issued.cert_pem).unwrap();
        std::fs::write(&issued.key, &issued.key_pem).unwrap();
        issued
    }
}

/// A certificate and key issued by a [`TestCa`], as files and as PEM text.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Mosquitto {
    /// Mosquitto with a plaintext listener (`port`, for collectors) and a TLS listener
    /// (the returned port) whose server certificate for 127.0.0.1 is issued by `ca`;
    /// with `require_certificate`, TLS clients must present a certificate from `ca`.
    pub fn start_tls(dir: &Path, ca: &TestCa, require_certificate: bool) -> (Mosquitto, u16) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let (port, tls_port) = (free_port(), free_port());
        let ca_file = ca.write(dir, "mosquitto-ca");
        let server = ca.issue(dir, "mosquitto-server", &["127.0.0.1"]);
        std::fs::write(
            dir.join("mosquitto.conf"),
            format!(
                "allow_anonymous true\npersistence false\nmax_queued_messages 0\n\
                 max_inflight_messages 0\nlog_dest none\n\
                 listener {port} 127.0.0.1\n\
                 listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
                 require_certificate {require_certificate}\n",
                ca_file.display(),
                server.cert.display(),
                server.key.display()
            ),
        )
        .unwrap();
        let mut m = Mosquitto {
            port,
            dir: dir.to_owned(),
            child: None,
        };
        m.spawn();
        wait_port(tls_port, Duration::from_secs(5));
        (m, tls_port)
    }
}
