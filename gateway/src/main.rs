//! The `gateway` command: parses flags, sets up logging, loads the configuration and
//! hands over to `gateway::run`. Exit codes: 0 ok, 64 bad configuration (including a
//! port in use), 1 any other failure, including a stop that did not finish within
//! `gateway.shutdown_grace`.
//!
//! Invariant: `gateway run` exits within `gateway.shutdown_grace` plus about a second
//! after SIGTERM or SIGINT, even with a stage stuck: `run` gives up on what is still
//! running when the grace is over, and the runtime then waits at most
//! [`RUNTIME_SHUTDOWN`] for tasks it still holds (a DNS lookup of the upstream host, an
//! open HTTP connection).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use gateway::config::{Config, Source};
use gateway::pipeline::{Fault, RunError};

/// Exit code for a bad configuration (EX_USAGE / EX_CONFIG family, as sysexits.h).
const EXIT_CONFIG: u8 = 64;
/// Longest wait for the async runtime's leftover tasks once `run` has returned.
const RUNTIME_SHUTDOWN: Duration = Duration::from_millis(500);
/// Hidden, for the test that the shutdown grace holds: `stuck-device-events` makes the
/// device events stage hang at shutdown ([`gateway::pipeline::Fault`]). Not a setting.
const TEST_FAULT_ENV: &str = "GATEWAY_TEST_FAULT";

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "IoT telemetry edge gateway: embedded MQTT broker, decoding, rules and durable store-and-forward to an upstream broker."
)]
struct Cli {
    /// Configuration file (TOML). Default: config/gateway.toml when present, else the
    /// built-in defaults. GATEWAY__SECTION__KEY environment variables override it.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default when no command is given).
    Run,
    /// Validate the configuration, report every problem, and exit (64 when invalid).
    CheckConfig,
    /// Inspect the outbox of messages waiting for upstream.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// Validate and test operator rule files.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Query the event log: one CloudEvents JSON document per line, oldest first.
    Events {
        /// Only events from this long ago until now, e.g. 30m, 1h, 7d.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// Only events of this type, e.g. SensorTemperatureExceeded.
        #[arg(long = "type", value_name = "TYPE")]
        event_type: Option<String>,
        /// Only events of this device.
        #[arg(long)]
        device: Option<String>,
        /// At most this many events.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Manage device credentials (auth.credentials_file); a running gateway reloads them.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Downlink commands queued for devices.
    Commands {
        #[command(subcommand)]
        command: CommandsCommand,
    },
    /// Show the newest payloads that did not decode, with the reason.
    DeadLetters {
        /// How many to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Report every error of every rule file as file:line:col: message; exit 1 if any.
    Check {
        /// Rules directory; default: rules.dir of the configuration.
        dir: Option<PathBuf>,
    },
    /// Run the rule test files (*.test.toml) and show a diff for each failure; exit 1 if any fails.
    Test {
        /// Rules directory; default: rules.dir of the configuration.
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// Create a credential for a device and print its password (shown this once only).
    Add {
        /// Device id: the MQTT client id and username the device connects with.
        id: String,
    },
    /// List the devices that have a credential.
    List,
    /// Remove a device's credential; its next connection attempt is refused.
    Remove { id: String },
}

#[derive(Subcommand)]
enum CommandsCommand {
    /// One line per queued command, oldest first per device; works whether or not the
    /// gateway runs (it opens the database read-only).
    List {
        /// Only this device's commands.
        #[arg(long)]
        device: Option<String>,
    },
    /// Remove every queued command of a device, reported upstream as `dropped` on the next
    /// run. Needs the gateway stopped (it writes the database).
    Drop { device: String },
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Depth in messages and bytes, oldest age, per-lane counts and drop counters; works
    /// whether or not the gateway runs (it opens the database read-only).
    Stats,
}

fn main() -> ExitCode {
    // Before any thread starts: fewer arenas and, for the long-running server, no
    // per-thread malloc caches (this runs the gateway again with them off), so that less
    // memory stays after a burst.
    gateway::memory::limit_arenas();
    let cli = Cli::parse();
    if matches!(cli.command, None | Some(Command::Run)) {
        if let Some(e) = gateway::memory::without_thread_caches() {
            eprintln!(
                "warning: could not restart with glibc's per-thread malloc cache off ({e}); \
                 running with it, which keeps 1-2 MB more after a burst"
            );
        }
    }
    let source = match &cli.config {
        Some(path) => Source::Explicit(path),
        None => Source::Default,
    };
    let config = match Config::load(source) {
        Ok(c) => c,
        Err(errors) => {
            eprint!("{errors}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(config),
        Command::CheckConfig => {
            println!("configuration is valid");
            ExitCode::SUCCESS
        }
        Command::DeadLetters { limit } => dead_letters(&config, limit),
        Command::Devices { command } => devices(&config, command),
        Command::Rules { command } => {
            let (dir, check) = match command {
                RulesCommand::Check { dir } => (dir, true),
                RulesCommand::Test { dir } => (dir, false),
            };
            let dir = dir.unwrap_or_else(|| config.rules.dir.clone());
            let mut out = std::io::stdout();
            let ok = if check {
                gateway::rules::check_command(&dir, &mut out)
            } else {
                gateway::rules::test_command(&dir, &mut out)
            };
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Events {
            since,
            event_type,
            device,
            limit,
        } => {
            let since = since.map_or(0, |d| gateway::reading::now_millis() - d.as_millis() as i64);
            match gateway::store::query_events(
                &config.storage.path,
                since,
                event_type.as_deref(),
                device.as_deref(),
                limit,
            ) {
                Ok(events) => {
                    for e in events {
                        println!("{}", String::from_utf8_lossy(&e.json));
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("gateway: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Commands { command } => commands(&config, command),
        Command::Outbox {
            command: OutboxCommand::Stats,
        } => match gateway::store::stats_command(&config.storage.path, &mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "gateway: cannot read the outbox at {}: {e}",
                    config.storage.path.display()
                );
                ExitCode::FAILURE
            }
        },
    }
}

/// `gateway commands list|drop`.
fn commands(config: &Config, command: CommandsCommand) -> ExitCode {
    let path = &config.storage.path;
    match command {
        CommandsCommand::List { device } => {
            match gateway::store::list_commands_file(path, device.as_deref()) {
                Ok(queue) => {
                    for c in queue {
                        println!(
                            "{}\t{}\t{}\tqueued_at={}\texpires_at={}\t{} bytes",
                            c.device,
                            c.command,
                            c.id,
                            c.queued_at,
                            c.expires_at,
                            c.payload.len()
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!(
                        "gateway: cannot read the commands in {}: {e}",
                        path.display()
                    );
                    ExitCode::FAILURE
                }
            }
        }
        CommandsCommand::Drop { device } => {
            match gateway::store::drop_commands_file(config, &device) {
                Ok(n) => {
                    println!("dropped {n} command(s) of {device}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!(
                        "gateway: cannot drop the commands of {device} in {} (is the gateway running? stop it first): {e}",
                        path.display()
                    );
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(level: &str) {
    let filter = std::env::var("RUST_LOG").ok().unwrap_or_else(|| {
        if level.contains("rumqtt") {
            level.to_string()
        } else {
            // rumqttd logs ordinary disconnects as errors; the gateway counts what matters.
            format!("{level},rumqttd=off,rumqttc=warn")
        }
    });
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn run(config: Config) -> ExitCode {
    init_logging(&config.log.level);
    // One async worker: the pipeline's heavy stages run on their own threads (broker,
    // decode with the rules, store), the runtime only drives the forwarder, the HTTP
    // server and timers. A second worker only made the forwarder's tasks (its client's event loop
    // and its session) wake each other across threads; tokio's default of one worker per
    // core costs a thread and a malloc arena per core on a 4-core Raspberry Pi for
    // nothing (BENCHMARKS.md, "Footprint", "Where the CPU goes").
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gateway: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let fault = match std::env::var(TEST_FAULT_ENV).as_deref() {
        Ok("stuck-device-events") => Some(Fault::StuckDeviceEvents),
        _ => None,
    };
    // The handlers are installed now, before anything says the gateway is up: a SIGTERM
    // that came before the first poll of a lazily installed handler would kill the process
    // with the default action instead of stopping it.
    let shutdown = {
        let _runtime = runtime.enter();
        shutdown_signal()
    };
    let result = runtime.block_on(gateway::pipeline::run_with_fault(config, shutdown, fault));
    // Dropping the runtime would wait for every task on its blocking pool, however long.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::Config(errors)) => {
            eprint!("{errors}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            tracing::error!(error = %e, "Gateway failed.");
            ExitCode::FAILURE
        }
    }
}

/// Installs the SIGINT and SIGTERM handlers at once (inside the runtime) and returns a
/// future that completes on the first of them.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("Cannot install signal handlers; stop the gateway with SIGKILL.");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received."),
            _ = int.recv() => tracing::info!("SIGINT received."),
        }
    }
}

fn devices(config: &Config, command: DevicesCommand) -> ExitCode {
    use gateway::broker::auth::Credentials;
    let path = &config.auth.credentials_file;
    let result = Credentials::load_or_empty(path).and_then(|mut creds| match command {
        DevicesCommand::Add { id } => {
            let password = creds.add(&id)?;
            creds.save(path)?;
            eprintln!(
                "Device '{id}' added to {}. Its password follows; it is not stored and is shown only this once.",
                path.display()
            );
            println!("{password}");
            if config.auth.anonymous {
                eprintln!("Note: auth.anonymous is true, so the gateway does not check credentials yet.");
            }
            Ok(true)
        }
        DevicesCommand::List => {
            for id in creds.ids() {
                println!("{id}");
            }
            Ok(true)
        }
        DevicesCommand::Remove { id } => {
            if !creds.remove(&id) {
                eprintln!("gateway: no device '{id}' in {}", path.display());
                return Ok(false);
            }
            creds.save(path)?;
            eprintln!("Device '{id}' removed from {}.", path.display());
            Ok(true)
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

fn dead_letters(config: &Config, limit: usize) -> ExitCode {
    match gateway::store::read_dead_letters(&config.storage.path, limit) {
        Ok(letters) => {
            for dl in letters {
                let payload =
                    String::from_utf8_lossy(&dl.payload[..dl.payload.len().min(120)]).into_owned();
                let time = chrono::DateTime::from_timestamp_millis(dl.received_at)
                    .map_or(dl.received_at.to_string(), |t| t.to_rfc3339());
                println!("{time}\t{}\t{}\t{payload:?}", dl.topic, dl.reason);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gateway: {e}");
            ExitCode::FAILURE
        }
    }
}
