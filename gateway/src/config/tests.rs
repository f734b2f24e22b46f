use std::path::Path;

use super::validate::parse_host_port;
use super::*;

fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, toml).unwrap();
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    Config::load_with(Source::Explicit(&path), env)
}

#[test]
fn defaults_are_valid() {
    let c = Config::defaults();
    assert_eq!(c.broker.listen, "0.0.0.0:1883".parse().unwrap());
    assert_eq!(c.broker.listen_v5, None);
    assert_eq!(c.ingest.topic_pattern.filters(), "devices/+/+");
    assert_eq!(c.upstream.url, None);
    assert_eq!(c.upstream.client_id, "edge-gateway");
    assert_eq!(c.upstream_prefix(), "gateways/edge-gateway");
}

#[test]
fn shipped_file_documents_every_key_and_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/gateway.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let table: toml::Table = text.parse().unwrap();
    for (key, _) in KEYS {
        let (section, name) = key.split_once('.').unwrap();
        assert!(
            table.get(section).and_then(|s| s.get(name)).is_some(),
            "{key} missing from config/gateway.toml"
        );
    }
    Config::load_with(Source::Explicit(&path), []).unwrap();
}

#[test]
fn file_then_environment_override_defaults() {
    let c = load(
        "[broker]\nlisten = \"127.0.0.1:1999\"\nmax_connections = 5\n[upstream]\nurl = \"mqtt://up.example:2883\"\n",
        &[("GATEWAY__BROKER__MAX_CONNECTIONS", "7"), ("GATEWAY__BROKER__LISTEN_V5", "127.0.0.1:2000"), ("GATEWAY__GATEWAY__ID", "gw-9")],
    )
    .unwrap();
    assert_eq!(c.broker.listen, "127.0.0.1:1999".parse().unwrap());
    assert_eq!(c.broker.max_connections, 7);
    assert_eq!(c.broker.listen_v5, Some("127.0.0.1:2000".parse().unwrap()));
    assert_eq!(
        c.upstream.url,
        Some(
            UpstreamUrl {
                host: "up.example".into(),
                port: 2883,
                tls: false
            }
            .into()
        )
    );
    assert_eq!(c.upstream.protocol, UpstreamProtocol::V5);
    assert_eq!(c.upstream.client_id, "gw-9");
}

#[test]
fn ingest_topic_pattern_may_list_several_patterns() {
    let c = load(
        "[ingest]\ntopic_pattern = [\"devices/{device}/{stream}\", \"site/{device}\"]\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.ingest.topic_pattern.filters(), "devices/+/+, site/+");
    // The form an environment variable can carry.
    let c = load(
        "",
        &[(
            "GATEWAY__INGEST__TOPIC_PATTERN",
            "a/{device}, b/{device}/{stream}",
        )],
    )
    .unwrap();
    assert_eq!(c.ingest.topic_pattern.filters(), "a/+, b/+/+");
    let err = load(
        "[ingest]\ntopic_pattern = [\"a/{device}\", \"a/{device}\", \"b/#\", 3]\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    for expected in [
        "entry 2 'a/{device}' is listed twice",
        "entry 3 'b/#'",
        "entry 4 is '3'",
    ] {
        assert!(err.contains(expected), "missing '{expected}' in:\n{err}");
    }
}

#[test]
fn every_problem_is_reported_at_once_naming_its_key() {
    let err = load(
        "[broker]\nlisen = \"x\"\nmax_connections = \"many\"\n[storage]\nmax_age = \"5 parsecs\"\n[bogus]\na = 1\n",
        &[("GATEWAY__UPSTREAM__URL", "http://x"), ("GATEWAY__INGEST__TOPIC_PATTERN", "devices/#")],
    )
    .unwrap_err();
    let text = err.to_string();
    for expected in [
        "broker.lisen: unknown key; did you mean 'broker.listen'?",
        "broker.max_connections: expected an integer, found 'many'",
        "storage.max_age: '5 parsecs' is not a duration",
        "bogus: unknown section",
        "upstream.url: 'http://x': expected mqtt://host:port",
        "ingest.topic_pattern: 'devices/#'",
    ] {
        assert!(text.contains(expected), "missing '{expected}' in:\n{text}");
    }
    assert_eq!(err.0.len(), 6, "{text}");
    assert!(
        text.contains("gateway.toml"),
        "problems name the file they came from:\n{text}"
    );
}

#[test]
fn missing_explicit_file_is_an_error() {
    let err =
        Config::load_with(Source::Explicit(Path::new("/nonexistent/gw.toml")), []).unwrap_err();
    assert!(err
        .to_string()
        .contains("/nonexistent/gw.toml does not exist"));
}

#[test]
fn port_in_use_names_the_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let c = load("", &[("GATEWAY__BROKER__LISTEN", &addr)]).unwrap();
    let err = c.check_ports().unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("broker.listen: cannot listen on {addr}")),
        "{err}"
    );
}

#[test]
fn upstream_urls() {
    assert_eq!(
        parse_host_port("h", false).unwrap(),
        UpstreamUrl {
            host: "h".into(),
            port: 1883,
            tls: false
        }
    );
    assert_eq!(
        parse_host_port("[::1]:1884", false).unwrap(),
        UpstreamUrl {
            host: "::1".into(),
            port: 1884,
            tls: false
        }
    );
    assert!(parse_host_port("h:x", false).is_err());
    assert!(parse_host_port("", false).is_err());
}

#[test]
fn upstream_url_lists_from_the_file_and_the_environment() {
    let c = load(
        "[upstream]\nurl = [\"mqtt://node-1\", \"mqtt://node-2:2883\"]\nprotocol = \"3.1.1\"\n",
        &[],
    )
    .unwrap();
    let urls = c.upstream.url.unwrap();
    assert_eq!(urls.len(), 2);
    assert_eq!(urls.to_string(), "mqtt://node-1:1883, mqtt://node-2:2883");
    assert_eq!(urls.nth(2), urls.nth(0), "round robin");
    assert_eq!(c.upstream.protocol, UpstreamProtocol::V311);

    let c = load(
        "",
        &[
            (
                "GATEWAY__UPSTREAM__URL",
                "mqtts://a.example, mqtts://b.example:9883",
            ),
            ("GATEWAY__UPSTREAM__PROTOCOL", "5"),
        ],
    )
    .unwrap();
    let urls = c.upstream.url.unwrap();
    assert_eq!(
        urls.to_string(),
        "mqtts://a.example:8883, mqtts://b.example:9883"
    );
    assert!(urls.tls());
    assert_eq!(c.upstream.protocol, UpstreamProtocol::V5);
    assert!(c.upstream.tls.is_some(), "one TLS setting for the list");
}

#[test]
fn bad_upstream_url_lists_and_protocols_are_reported_clearly() {
    let problem = |toml: &str, env: &[(&str, &str)]| -> String {
        let err = load(toml, env).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        err.0[0].clone()
    };
    let p = problem("[upstream]\nurl = [\"mqtt://a\", \"mqtts://b\"]\n", &[]);
    assert!(
        p.starts_with(
            "upstream.url: mixes mqtt:// and mqtts:// URLs; all must use the same scheme"
        ),
        "{p}"
    );
    assert!(p.ends_with("gateway.toml)"), "names the file: {p}");
    let p = problem("[upstream]\nurl = []\n", &[]);
    assert!(
        p.starts_with("upstream.url: the list is empty; use \"\" to turn forwarding off"),
        "{p}"
    );
    let p = problem(
        "[upstream]\nurl = [\"mqtt://a:1883\", \"mqtt://b\", \"mqtt://a\"]\n",
        &[],
    );
    assert!(
        p.starts_with("upstream.url: mqtt://a:1883 is listed twice"),
        "{p}"
    );
    let p = problem("[upstream]\nurl = [\"mqtt://a\", 1883]\n", &[]);
    assert!(
        p.starts_with("upstream.url: entry 2 is '1883', expected a string"),
        "{p}"
    );
    let p = problem("", &[("GATEWAY__UPSTREAM__URL", "mqtt://a,http://b")]);
    assert_eq!(
        p,
        "upstream.url: entry 2 'http://b': expected mqtt://host:port or mqtts://host:port (from environment variable GATEWAY__UPSTREAM__URL)"
    );
    let p = problem("", &[("GATEWAY__UPSTREAM__URL", "mqtt://a,")]);
    assert!(p.starts_with("upstream.url: entry 2 '': expected"), "{p}");
    let p = problem("[upstream]\nprotocol = \"4\"\n", &[]);
    assert!(
        p.starts_with("upstream.protocol: '4': expected \"5\" (MQTT 5) or \"3.1.1\""),
        "{p}"
    );
    // The TLS files belong to an mqtts:// list, as to one mqtts:// URL.
    let p = problem(
        "",
        &[
            ("GATEWAY__UPSTREAM__URL", "mqtt://a,mqtt://b"),
            ("GATEWAY__UPSTREAM__CA_FILE", "ca.pem"),
        ],
    );
    assert!(
        p.starts_with("upstream.ca_file: is only used with an mqtts:// upstream.url"),
        "{p}"
    );
}

#[test]
fn the_upstream_window_is_auto_or_a_number_of_messages() {
    assert_eq!(
        Config::defaults().upstream.max_inflight,
        UpstreamInflight::Auto
    );
    let inflight =
        |toml: &str, env: &[(&str, &str)]| load(toml, env).unwrap().upstream.max_inflight;
    assert_eq!(
        inflight("[upstream]\nmax_inflight = 400\n", &[]),
        UpstreamInflight::Fixed(400)
    );
    assert_eq!(
        inflight("[upstream]\nmax_inflight = \"auto\"\n", &[]),
        UpstreamInflight::Auto
    );
    assert_eq!(
        inflight("", &[("GATEWAY__UPSTREAM__MAX_INFLIGHT", "65535")]),
        UpstreamInflight::Fixed(u16::MAX)
    );
    for bad in ["0", "65536", "\"many\"", "-1"] {
        let err = load(&format!("[upstream]\nmax_inflight = {bad}\n"), &[]).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        let shown = bad.trim_matches('"');
        assert!(
            err.0[0].starts_with(&format!(
                "upstream.max_inflight: '{shown}': expected \"auto\" or a number of messages from 1 to 65535"
            )),
            "{err}"
        );
    }
}
