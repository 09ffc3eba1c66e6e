//! `iagent`: the gateway binary. Runs the gateway, manages apps, prints the default
//! configuration, and sends a message to a running gateway.
//!
//! Standard output carries only what a command produces (a token, a list, a reply); logs go to
//! standard error, filtered by `IAGENT_LOG` (default `info`).

/// mimalloc instead of the system allocator: every message allocates and frees frames, parsed
/// fields and futures across worker threads, and glibc's malloc spent about a sixth of the
/// gateway's CPU doing it (measured in `BENCHMARKS.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod agents;
mod apps;
mod bench;
mod chat;
mod send;
mod settings;

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// The iagent chat gateway: connects app backends to AI agents over pooled WebSockets.
#[derive(Parser)]
#[command(name = "iagent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway. With no configuration it uses ./iagent-data and 127.0.0.1:8080, and on
    /// its first start creates an app and prints its token.
    Serve {
        /// Address to listen on [default: 127.0.0.1:8080].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Data directory, created if missing [default: ./iagent-data].
        #[arg(long)]
        data: Option<PathBuf>,
        /// Configuration file (TOML); `iagent config` prints one with every default.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Manage apps and their tokens.
    App {
        #[command(subcommand)]
        command: apps::AppCommand,
    },
    /// Manage an app's agents.
    Agent {
        #[command(subcommand)]
        command: agents::AgentCommand,
    },
    /// Print the default configuration, commented, as TOML.
    Config,
    /// Send one text message to a running gateway and print the response.
    Send(send::SendArgs),
    /// Chat with an agent as one user, line by line.
    Chat(chat::ChatArgs),
    /// Load a running gateway with many users over a pool and print throughput and latency.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if matches!(cli.command, Command::Bench(_)) {
        // The open loop's schedule thread wakes each connection's writer from outside the
        // runtime, through its global queue, which a worker looks at only every 61 tasks by
        // default: after a burst of responses a message waited behind the readers' turns
        // before it was written, and its latency, measured from its due time, said so
        // (`bench/capture`: the slowest 1% of the gateway's messages spent 620 to 700 µs of
        // it in the generator before the wire, 60 to 110 µs with the queue looked at first).
        runtime.global_queue_interval(1);
    }
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(err) => {
            report(&format!("cannot start the async runtime: {err}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(err) => {
            report(&format!("{err:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Tells the user why the command failed; a closed stderr leaves only the exit code to say it.
fn report(message: &str) {
    writeln!(std::io::stderr(), "iagent: {message}").ok();
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve {
            listen,
            data,
            config,
        } => {
            let settings = settings::Settings::load(config.as_deref(), listen, data)?;
            serve(settings).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::App { command } => apps::run(command).await,
        Command::Agent { command } => agents::run(command).await,
        Command::Config => {
            print!("{}", settings::default_file());
            Ok(ExitCode::SUCCESS)
        }
        Command::Send(args) => send::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Chat(args) => chat::run(args).await,
    }
}

async fn serve(settings: settings::Settings) -> anyhow::Result<()> {
    // Checked before anything is created, so a bad file cannot leave a half-made first start.
    settings.server.validate().map_err(|problems| {
        anyhow::anyhow!("invalid configuration:\n  {}", problems.join("\n  "))
    })?;
    let mut signals = StopSignals::listen()?;
    let store = iagent_store::SqliteStore::open(&settings.data_dir, settings.store)
        .with_context(|| format!("cannot open the store in {}", settings.data_dir.display()))?;
    let store: std::sync::Arc<dyn iagent_store::Store> = std::sync::Arc::new(store);
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let address = listener.local_addr()?;
    apps::bootstrap(store.as_ref(), address).await?;
    agents::apply(store.as_ref(), &settings.agents).await?;
    let shutdown = async move {
        signals.next().await;
        // A second signal is the operator saying "now": skip the rest of the graceful shutdown.
        tokio::spawn(async move {
            signals.next().await;
            tracing::warn!("second signal: exiting without finishing the shutdown");
            std::process::exit(130);
        });
    };
    iagent_server::run(listener, settings.server, store, shutdown).await?;
    Ok(())
}

/// The operator's stop requests: Ctrl-C and, on Unix, SIGTERM.
///
/// Listened for as soon as this is made, before the gateway serves: a signal that arrived
/// before anyone listened would take the default action and kill the process mid-start.
struct StopSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    #[cfg(unix)]
    fn listen() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?,
            terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
        })
    }

    #[cfg(not(unix))]
    fn listen() -> anyhow::Result<Self> {
        Ok(Self {})
    }

    /// Resolves on the next stop request.
    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IAGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A closed stderr (a log pipe that went away) must not take the gateway down: write errors
    // are dropped instead of being reported on that same stderr, which would panic.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .log_internal_errors(false)
        .init();
}
