//! The `device-sim` command: a thin CLI over the library.
//!
//! `device-sim [FLAGS]` runs a fleet (bench mode when `--upstream` is given);
//! `device-sim compare A.json B.json` prints two bench reports side by side;
//! `device-sim rounds A1.json B1.json A2.json B2.json ...` the rounds of an alternating bench.
//! Exit codes: 0 done, 1 runtime failure, 2 `--min-delivered` not met, 64 bad flags or scenario.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use device_sim::stats::Watch;
use device_sim::{report, BenchReport, FleetConfig, Format, QoS, Rate, Scenario, UpstreamConfig};
use tokio_util::sync::CancellationToken;

const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "device-sim",
    version,
    about = "Simulated MQTT device fleet, load generator and benchmark harness",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print two bench reports (from --json) side by side with the ratio A/B, as Markdown.
    Compare {
        /// Report A (e.g. the gateway); `-` when side A was not measured.
        a: PathBuf,
        /// Report B (e.g. the Mosquitto bridge).
        b: PathBuf,
    },
    /// Print the rounds of a bench that alternated its sides (reports A1 B1 A2 B2 ...):
    /// one process's CPU per round with the ratio A/B, the ratio of the means and the
    /// median of the rounds' ratios, as Markdown.
    Rounds {
        /// The `--watch` name of the process compared (bench/run.sh names the edge `edge`).
        #[arg(long, default_value = "edge")]
        process: String,
        /// Reports in pairs, side A then side B of each round.
        #[arg(required = true, num_args = 2..)]
        reports: Vec<PathBuf>,
    },
}

#[derive(Args)]
struct RunArgs {
    /// MQTT broker the devices connect to, host:port.
    #[arg(long, env = "DEVICE_SIM_BROKER", default_value = "127.0.0.1:1883")]
    broker: String,
    /// MQTT user name for the devices.
    #[arg(long, env = "DEVICE_SIM_USERNAME")]
    username: Option<String>,
    /// MQTT password for the devices.
    #[arg(long, env = "DEVICE_SIM_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// File of per-device credentials, one `DEVICE-ID:PASSWORD` line each (e.g. from
    /// `gateway devices add`): each listed device connects as itself.
    #[arg(long, value_name = "FILE")]
    credentials: Option<PathBuf>,
    /// Number of simulated devices, each its own connection [default: 10, or the scenario's].
    #[arg(long)]
    devices: Option<u32>,
    /// Readings per second per device, or `max` [default: 1, or the scenario's].
    #[arg(long, conflicts_with = "total_rate")]
    rate: Option<String>,
    /// Readings per second for the whole fleet, shared evenly across devices.
    #[arg(long)]
    total_rate: Option<f64>,
    /// MQTT QoS of the readings: 0 or 1 [default: 1, or the scenario's].
    #[arg(long)]
    qos: Option<u8>,
    /// Payload format: json, cbor, senml-json, senml-cbor [default: json, or the scenario's].
    #[arg(long)]
    format: Option<Format>,
    /// Stop after this many payloads in total (spread across devices).
    #[arg(long)]
    count: Option<u64>,
    /// Stop publishing after this long (e.g. 30s, 5m) [default: 10s unless --count is given, or the scenario's].
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Scenario file (TOML): field models, events, fleet defaults.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Device id prefix; ids are PREFIX0001, PREFIX0002, ...
    #[arg(long, default_value = "t-")]
    id_prefix: String,
    /// Stream name: topics are devices/{id}/{stream}.
    #[arg(long, default_value = "telemetry")]
    stream: String,
    /// New connections per second while the fleet comes up.
    #[arg(long, default_value_t = 500.0)]
    connect_rate: f64,
    /// Random seed for values and malformed picks.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Progress line interval (0s: no progress lines).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    progress: Duration,
    /// After publishing, wait at most this long for outstanding acks.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    drain: Duration,
    /// A device that cannot connect for this long gives up.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    connect_timeout: Duration,
    /// Unacknowledged QoS 1 publishes allowed per connection.
    #[arg(long, default_value_t = 100)]
    inflight: u16,
    /// Bench mode: upstream broker (host:port) to subscribe to for end-to-end delivery and latency.
    #[arg(long)]
    upstream: Option<String>,
    /// Bench mode: topic filter on the upstream broker.
    #[arg(long, default_value = "bench/devices/#")]
    upstream_topic: String,
    /// Bench mode: upstream user name.
    #[arg(long, env = "DEVICE_SIM_UPSTREAM_USERNAME")]
    upstream_username: Option<String>,
    /// Bench mode: upstream password.
    #[arg(long, env = "DEVICE_SIM_UPSTREAM_PASSWORD", hide_env_values = true)]
    upstream_password: Option<String>,
    /// Bench mode: stop waiting for stragglers after this long without a new message.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    settle: Duration,
    /// Bench mode: wait at most this long for stragglers after publishing ends.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    max_wait: Duration,
    /// Bench mode: report CPU and RSS of this process, NAME=PID (repeatable).
    #[arg(long = "watch")]
    watch: Vec<Watch>,
    /// Bench mode: name of this run in reports.
    #[arg(long, default_value = "run")]
    label: String,
    /// Write the summary or bench report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Bench mode: exit with code 2 unless at least this many readings were delivered upstream.
    #[arg(long)]
    min_delivered: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEVICE_SIM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    match cli.command {
        Some(Command::Compare { a, b }) => print_table("compare", compare(&a, &b)),
        Some(Command::Rounds { process, reports }) => {
            print_table("rounds", rounds(&reports, &process))
        }
        None => {
            let (fleet, upstream) = match configure(cli.run) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("device-sim: {e:#}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(run(fleet, upstream))
        }
    }
}

struct Upstream {
    cfg: Option<UpstreamConfig>,
    json: Option<PathBuf>,
    min_delivered: Option<u64>,
}

/// Flags over scenario defaults over built-in defaults.
fn configure(a: RunArgs) -> anyhow::Result<(FleetConfig, Upstream)> {
    let scenario = match &a.scenario {
        Some(path) => Scenario::load(path)?,
        None => Scenario::default(),
    };
    let mut cfg = FleetConfig::from_scenario(a.broker, scenario);
    cfg.username = a.username;
    cfg.password = a.password;
    if let Some(path) = &a.credentials {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let creds = device_sim::fleet::parse_credentials(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        cfg.credentials = Some(std::sync::Arc::new(creds));
    }
    if let Some(n) = a.devices {
        cfg.devices = n;
    }
    match (a.total_rate, a.rate.as_deref()) {
        (Some(total), _) => cfg.rate = Rate::Total(total),
        (None, Some("max")) => cfg.rate = Rate::Max,
        (None, Some(r)) => {
            cfg.rate = Rate::PerDevice(
                r.parse()
                    .with_context(|| format!("--rate `{r}` is not a number or `max`"))?,
            )
        }
        (None, None) => {}
    }
    match a.qos {
        Some(0) => cfg.qos = QoS::AtMostOnce,
        Some(1) => cfg.qos = QoS::AtLeastOnce,
        Some(q) => anyhow::bail!("--qos {q}: only 0 and 1 are supported"),
        None => {}
    }
    if let Some(f) = a.format {
        cfg.format = f;
    }
    if a.count.is_some() || a.duration.is_some() {
        cfg.count = a.count;
        cfg.duration = a.duration;
    }
    cfg.id_prefix = a.id_prefix;
    cfg.stream = a.stream;
    cfg.connect_rate = a.connect_rate;
    cfg.seed = a.seed;
    cfg.progress = (!a.progress.is_zero()).then_some(a.progress);
    cfg.drain = a.drain;
    cfg.connect_timeout = a.connect_timeout;
    cfg.inflight = a.inflight;
    let problems = cfg.problems();
    if !problems.is_empty() {
        anyhow::bail!("invalid settings:\n  - {}", problems.join("\n  - "));
    }
    let upstream = a.upstream.map(|broker| UpstreamConfig {
        broker,
        topic: a.upstream_topic,
        username: a.upstream_username,
        password: a.upstream_password,
        settle: a.settle,
        max_wait: a.max_wait,
        watch: a.watch,
        label: a.label,
    });
    if upstream.is_none() && a.min_delivered.is_some() {
        anyhow::bail!("--min-delivered needs --upstream");
    }
    Ok((
        cfg,
        Upstream {
            cfg: upstream,
            json: a.json,
            min_delivered: a.min_delivered,
        },
    ))
}

async fn run(fleet: FleetConfig, upstream: Upstream) -> ExitCode {
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::warn!("Interrupted: stopping the fleet.");
            on_signal.cancel();
        }
    });
    let result = match upstream.cfg {
        Some(up) => device_sim::bench::run_until(fleet, up, shutdown)
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| {
                print!("{}", report::bench(&r));
                write_json(upstream.json.as_ref(), &r)?;
                Ok(Some(r.delivered))
            }),
        None => device_sim::run_until(fleet, shutdown)
            .await
            .map_err(anyhow::Error::from)
            .and_then(|s| {
                print!("{}", report::summary(&s));
                write_json(upstream.json.as_ref(), &s)?;
                Ok(None)
            }),
    };
    match result {
        Ok(delivered) => match (upstream.min_delivered, delivered) {
            (Some(min), Some(got)) if got < min => {
                eprintln!("device-sim: {got} readings delivered upstream, fewer than --min-delivered {min}");
                ExitCode::from(2)
            }
            _ => ExitCode::SUCCESS,
        },
        Err(e) => {
            eprintln!("device-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn write_json<T: serde::Serialize>(path: Option<&PathBuf>, value: &T) -> anyhow::Result<()> {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(value)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn print_table(command: &str, table: anyhow::Result<String>) -> ExitCode {
    match table {
        Ok(table) => {
            print!("{table}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("device-sim {command}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn read_report(p: &PathBuf) -> anyhow::Result<BenchReport> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a bench report", p.display()))
}

fn compare(a: &PathBuf, b: &PathBuf) -> anyhow::Result<String> {
    let a = if a.as_os_str() == "-" {
        None
    } else {
        Some(read_report(a)?)
    };
    Ok(report::compare(a.as_ref(), &read_report(b)?))
}

fn rounds(reports: &[PathBuf], process: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        reports.len().is_multiple_of(2),
        "reports come in pairs (A then B of each round); got {}",
        reports.len()
    );
    let pairs = reports
        .chunks(2)
        .map(|pair| Ok((read_report(&pair[0])?, read_report(&pair[1])?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(report::rounds(&pairs, process))
}
