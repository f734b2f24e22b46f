//! The TLS keys of the configuration: `broker.listen_tls`, `broker.tls_cert`,
//! `broker.tls_key`, `broker.tls_client_ca`, `upstream.ca_file`, `upstream.client_cert`,
//! `upstream.client_key`.
//!
//! Invariants: every configured file is loaded here, so a missing file, a file without a
//! certificate or key, or a key that does not match its certificate is a configuration
//! problem naming its key (exit 64), never a failure after start; a TLS file set where it
//! has no effect (no `broker.listen_tls`, an `mqtt://` upstream) is a problem too.

use std::path::{Path, PathBuf};

use super::{BrokerSection, BrokerTls, Reader, UpstreamTls, UpstreamUrls};
use crate::tls;

impl Reader {
    /// A path key; `None` when empty.
    fn path(&mut self, key: &str) -> Option<PathBuf> {
        self.optional(key, |r| r.string(key))
            .flatten()
            .map(PathBuf::from)
    }

    /// Loads one file with `load`, reporting its error against `key`.
    fn tls_file<T>(
        &mut self,
        key: &str,
        path: &Path,
        load: impl FnOnce(&Path) -> Result<T, tls::TlsError>,
    ) -> Option<T> {
        load(path).map_err(|e| self.problem(key, e)).ok()
    }

    pub(super) fn broker_tls(&mut self, broker: &BrokerSection) -> Option<BrokerTls> {
        let listen = self
            .optional("broker.listen_tls", |r| r.addr("broker.listen_tls"))
            .flatten();
        let cert = self.path("broker.tls_cert");
        let key = self.path("broker.tls_key");
        let client_ca = self.path("broker.tls_client_ca");
        let Some(listen) = listen else {
            for (name, set) in [
                ("broker.tls_cert", cert.is_some()),
                ("broker.tls_key", key.is_some()),
                ("broker.tls_client_ca", client_ca.is_some()),
            ] {
                if set {
                    self.problem(name, "has no effect without broker.listen_tls");
                }
            }
            return None;
        };
        if listen == broker.listen || Some(listen) == broker.listen_v5 {
            self.problem(
                "broker.listen_tls",
                "must differ from broker.listen and broker.listen_v5",
            );
        }
        if cert.is_none() {
            self.problem("broker.tls_cert", "is required with broker.listen_tls");
        }
        if key.is_none() {
            self.problem("broker.tls_key", "is required with broker.listen_tls");
        }
        let (cert, key) = (cert?, key?);
        let cert_ok = self.tls_file("broker.tls_cert", &cert, tls::load_certs);
        let key_ok = self.tls_file("broker.tls_key", &key, tls::load_key);
        let ca_ok = match &client_ca {
            Some(ca) => self
                .tls_file("broker.tls_client_ca", ca, tls::load_roots)
                .is_some(),
            None => true,
        };
        let section = BrokerTls {
            listen,
            cert,
            key,
            client_ca,
        };
        if cert_ok.is_some() && key_ok.is_some() && ca_ok {
            if let Err(e) = section.server_config() {
                self.problem("broker.tls_key", e);
            }
        }
        Some(section)
    }

    pub(super) fn upstream_tls(&mut self, url: Option<&UpstreamUrls>) -> Option<UpstreamTls> {
        let ca_file = self.path("upstream.ca_file");
        let cert = self.path("upstream.client_cert");
        let key = self.path("upstream.client_key");
        if !url.is_some_and(UpstreamUrls::tls) {
            for (name, set) in [
                ("upstream.ca_file", ca_file.is_some()),
                ("upstream.client_cert", cert.is_some()),
                ("upstream.client_key", key.is_some()),
            ] {
                if set {
                    self.problem(name, "is only used with an mqtts:// upstream.url");
                }
            }
            return None;
        }
        let client_cert = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                self.problem(
                    "upstream.client_key",
                    "is required with upstream.client_cert",
                );
                None
            }
            (None, Some(_)) => {
                self.problem(
                    "upstream.client_cert",
                    "is required with upstream.client_key",
                );
                None
            }
        };
        let ca_ok = match &ca_file {
            Some(ca) => self.tls_file("upstream.ca_file", ca, tls::load_roots),
            None => {
                let system = tls::system_roots();
                self.tls_file("upstream.ca_file", Path::new(""), |_| system)
            }
        };
        let pair_ok = match &client_cert {
            Some((c, k)) => {
                let c = self.tls_file("upstream.client_cert", c, tls::load_certs);
                let k = self.tls_file("upstream.client_key", k, tls::load_key);
                c.is_some() && k.is_some()
            }
            None => true,
        };
        let section = UpstreamTls {
            ca_file,
            client_cert,
        };
        if ca_ok.is_some() && pair_ok {
            if let Err(e) = section.client_config() {
                self.problem("upstream.client_key", e);
            }
        }
        Some(section)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigErrors, Source};

    /// A CA, a server certificate for 127.0.0.1 it issued, and an unrelated file.
    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Files {
            let dir = tempfile::tempdir().unwrap();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = ca.self_signed(&ca_key).unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
                .unwrap()
                .signed_by(&key, &ca, &ca_key)
                .unwrap();
            let other_key = rcgen::KeyPair::generate().unwrap();
            for (name, text) in [
                ("ca.pem", ca.pem()),
                ("cert.pem", cert.pem()),
                ("key.pem", key.serialize_pem()),
                ("other-key.pem", other_key.serialize_pem()),
                ("garbage.pem", "hello\n".to_string()),
            ] {
                std::fs::write(dir.path().join(name), text).unwrap();
            }
            Files { dir }
        }

        fn path(&self, name: &str) -> String {
            self.dir.path().join(name).display().to_string()
        }

        fn load(&self, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
            let env = env.iter().map(|(k, v)| {
                let v = if v.ends_with(".pem") {
                    self.path(v)
                } else {
                    v.to_string()
                };
                (k.to_string(), v)
            });
            Config::load_with(Source::None, env)
        }
    }

    fn problems(r: Result<Config, ConfigErrors>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn device_listener_with_and_without_client_certificates() {
        let f = Files::new();
        let c = f
            .load(&[
                ("GATEWAY__BROKER__LISTEN_TLS", "127.0.0.1:8883"),
                ("GATEWAY__BROKER__TLS_CERT", "cert.pem"),
                ("GATEWAY__BROKER__TLS_KEY", "key.pem"),
            ])
            .unwrap();
        let tls = c.broker.tls.unwrap();
        assert_eq!(tls.listen, "127.0.0.1:8883".parse().unwrap());
        assert_eq!(tls.client_ca, None);
        let c = f
            .load(&[
                ("GATEWAY__BROKER__LISTEN_TLS", "127.0.0.1:8883"),
                ("GATEWAY__BROKER__TLS_CERT", "cert.pem"),
                ("GATEWAY__BROKER__TLS_KEY", "key.pem"),
                ("GATEWAY__BROKER__TLS_CLIENT_CA", "ca.pem"),
            ])
            .unwrap();
        assert_eq!(
            c.broker.tls.unwrap().client_ca,
            Some(f.dir.path().join("ca.pem"))
        );
        assert!(Config::defaults().broker.tls.is_none());
    }

    #[test]
    fn device_listener_problems_name_their_keys() {
        let f = Files::new();
        let p = problems(f.load(&[("GATEWAY__BROKER__LISTEN_TLS", "127.0.0.1:8883")]));
        assert!(
            p.contains("broker.tls_cert: is required with broker.listen_tls"),
            "{p}"
        );
        assert!(
            p.contains("broker.tls_key: is required with broker.listen_tls"),
            "{p}"
        );

        let p = problems(f.load(&[
            ("GATEWAY__BROKER__LISTEN_TLS", "127.0.0.1:8883"),
            ("GATEWAY__BROKER__TLS_CERT", "garbage.pem"),
            ("GATEWAY__BROKER__TLS_KEY", "missing.pem"),
            ("GATEWAY__BROKER__TLS_CLIENT_CA", "key.pem"),
        ]));
        assert!(p.contains("broker.tls_cert: "), "{p}");
        assert!(p.contains("garbage.pem holds no PEM certificate"), "{p}");
        assert!(p.contains("broker.tls_key: cannot read "), "{p}");
        assert!(p.contains("broker.tls_client_ca: "), "{p}");
        assert!(p.contains("(3 problems)"), "{p}");

        let p = problems(f.load(&[
            ("GATEWAY__BROKER__LISTEN_TLS", "127.0.0.1:8883"),
            ("GATEWAY__BROKER__TLS_CERT", "cert.pem"),
            ("GATEWAY__BROKER__TLS_KEY", "other-key.pem"),
        ]));
        assert!(p.contains("broker.tls_key: certificate "), "{p}");
        assert!(p.contains("do not make a usable pair"), "{p}");

        let p = problems(f.load(&[("GATEWAY__BROKER__TLS_CERT", "cert.pem")]));
        assert!(
            p.contains("broker.tls_cert: has no effect without broker.listen_tls"),
            "{p}"
        );
    }

    #[test]
    fn upstream_mqtts_with_ca_and_client_certificate() {
        let f = Files::new();
        let c = f
            .load(&[
                ("GATEWAY__UPSTREAM__URL", "mqtts://127.0.0.1"),
                ("GATEWAY__UPSTREAM__CA_FILE", "ca.pem"),
                ("GATEWAY__UPSTREAM__CLIENT_CERT", "cert.pem"),
                ("GATEWAY__UPSTREAM__CLIENT_KEY", "key.pem"),
            ])
            .unwrap();
        let urls = c.upstream.url.unwrap();
        let url = urls.nth(0);
        assert_eq!((url.port, url.tls), (8883, true));
        assert_eq!(url.to_string(), "mqtts://127.0.0.1:8883");
        let tls = c.upstream.tls.unwrap();
        assert_eq!(tls.ca_file, Some(f.dir.path().join("ca.pem")));
        assert!(tls.client_cert.is_some());
        assert!(tls.client_config().is_ok());
    }

    #[test]
    fn upstream_tls_problems_name_their_keys() {
        let f = Files::new();
        let p = problems(f.load(&[
            ("GATEWAY__UPSTREAM__URL", "mqtt://127.0.0.1"),
            ("GATEWAY__UPSTREAM__CA_FILE", "ca.pem"),
        ]));
        assert!(
            p.contains("upstream.ca_file: is only used with an mqtts:// upstream.url"),
            "{p}"
        );

        let p = problems(f.load(&[
            ("GATEWAY__UPSTREAM__URL", "mqtts://127.0.0.1"),
            ("GATEWAY__UPSTREAM__CA_FILE", "garbage.pem"),
            ("GATEWAY__UPSTREAM__CLIENT_CERT", "cert.pem"),
        ]));
        assert!(p.contains("upstream.ca_file: "), "{p}");
        assert!(p.contains("garbage.pem holds no PEM certificate"), "{p}");
        assert!(
            p.contains("upstream.client_key: is required with upstream.client_cert"),
            "{p}"
        );

        let p = problems(f.load(&[
            ("GATEWAY__UPSTREAM__URL", "mqtts://127.0.0.1"),
            ("GATEWAY__UPSTREAM__CA_FILE", "ca.pem"),
            ("GATEWAY__UPSTREAM__CLIENT_CERT", "cert.pem"),
            ("GATEWAY__UPSTREAM__CLIENT_KEY", "other-key.pem"),
        ]));
        assert!(p.contains("upstream.client_key: certificate "), "{p}");
    }
}
