//! Configuration: built-in defaults, then the TOML file, then `GATEWAY__SECTION__KEY`
//! environment variables (the `config` crate), validated in one pass.
//!
//! Invariants:
//! - every problem is reported at once, each naming its key (and the file or variable
//!   it came from when known); an unknown key is a problem, not a silent no-op;
//! - nothing binds a port or opens a file before the whole configuration is valid;
//! - one schema: every stage's settings are built from [`Config`] (e.g.
//!   `StoreConfig::from_config`, `ForwarderConfig::from_config`), never defaulted again.
//!
//! Layout: [`KEYS`] (`keys.rs`) lists every key with its default; `sections.rs` holds the
//! typed sections; `reader.rs` reads typed values and collects problems; `validate.rs`
//! and `tls.rs` build and check the sections. The shipped `config/gateway.toml`
//! documents every key, and a test checks that the two agree.

mod keys;
mod reader;
mod sections;
mod tls;
mod validate;

use std::fmt;
use std::path::Path;

use config::{Environment, File, FileFormat};

use reader::{Provenance, Reader};

pub use keys::{DefaultValue, KEYS};
pub use sections::{
    AuthSection, BrokerSection, BrokerTls, DownlinkSection, GatewaySection, HttpSection,
    IngestSection, LogSection, RulesSection, StorageSection, UpstreamInflight, UpstreamProtocol,
    UpstreamSection, UpstreamTls, UpstreamUrl, UpstreamUrls,
};

/// The file read when `--config` is not given; a missing default file is not an error.
pub const DEFAULT_PATH: &str = "config/gateway.toml";
/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "GATEWAY";

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub gateway: GatewaySection,
    pub broker: BrokerSection,
    pub ingest: IngestSection,
    pub storage: StorageSection,
    pub rules: RulesSection,
    pub upstream: UpstreamSection,
    pub downlink: DownlinkSection,
    pub log: LogSection,
    pub http: HttpSection,
    pub auth: AuthSection,
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem{}):",
            self.0.len(),
            if self.0.len() == 1 { "" } else { "s" }
        )?;
        for problem in &self.0 {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Where the configuration file comes from.
#[derive(Debug, Clone)]
pub enum Source<'a> {
    /// `--config PATH`: the file must exist.
    Explicit(&'a Path),
    /// No flag: `config/gateway.toml` when present, else the defaults.
    Default,
    /// No file at all (tests).
    None,
}

impl Config {
    /// Loads defaults < file < environment and validates the result.
    pub fn load(source: Source<'_>) -> Result<Config, ConfigErrors> {
        Self::load_with(source, std::env::vars())
    }

    /// Like [`Config::load`], with the environment given explicitly.
    pub fn load_with(
        source: Source<'_>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let mut builder = config::Config::builder();
        let mut provenance = Provenance::default();
        for (key, default) in KEYS {
            builder = match *default {
                DefaultValue::Str(s) => builder.set_default(*key, s),
                DefaultValue::Int(i) => builder.set_default(*key, i),
                DefaultValue::Bool(b) => builder.set_default(*key, b),
            }
            .expect("static default keys are valid");
        }
        match source {
            Source::Explicit(path) => {
                if !path.is_file() {
                    return Err(ConfigErrors(vec![format!(
                        "config file {} does not exist",
                        path.display()
                    )]));
                }
                builder = builder.add_source(File::from(path).format(FileFormat::Toml));
                provenance.read_file(path);
            }
            Source::Default => {
                builder =
                    builder.add_source(File::new(DEFAULT_PATH, FileFormat::Toml).required(false));
                provenance.read_file(Path::new(DEFAULT_PATH));
            }
            Source::None => {}
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        provenance.env_vars = env.keys().cloned().collect();
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        let merged = builder
            .build()
            .map_err(|e| ConfigErrors(vec![e.to_string()]))?;
        Reader::new(merged, provenance).finish()
    }

    /// The configuration built from the defaults alone.
    pub fn defaults() -> Config {
        Config::load_with(Source::None, []).expect("the built-in defaults are valid")
    }

    /// The upstream topic prefix with `{gateway_id}` filled in, without a trailing `/`.
    pub fn upstream_prefix(&self) -> String {
        self.upstream
            .topic_prefix
            .replace("{gateway_id}", &self.gateway.id)
            .trim_end_matches('/')
            .to_string()
    }

    /// Checks that the broker's ports can be bound, before anything starts.
    pub fn check_ports(&self) -> Result<(), ConfigErrors> {
        let mut problems = Vec::new();
        let listeners = [
            ("broker.listen", Some(self.broker.listen)),
            ("broker.listen_v5", self.broker.listen_v5),
            ("http.listen", self.http.listen),
            (
                "broker.listen_tls",
                self.broker.tls.as_ref().map(|t| t.listen),
            ),
        ];
        for (key, addr) in listeners {
            let Some(addr) = addr else { continue };
            if let Err(e) = std::net::TcpListener::bind(addr) {
                problems.push(format!("{key}: cannot listen on {addr}: {e}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(problems))
        }
    }
}

#[cfg(test)]
mod tests;
