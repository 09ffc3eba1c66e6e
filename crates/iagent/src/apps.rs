//! `iagent app ...`, and the first-start bootstrap that gives a new gateway an app to talk to.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use iagent_store::{SqliteStore, Store};

use crate::settings::DEFAULT_DATA_DIR;

/// The app a gateway creates on its first start.
const FIRST_APP: &str = "default";

#[derive(Subcommand)]
pub(crate) enum AppCommand {
    /// Create an app (with the built-in echo agent as its default) and print its token.
    Create {
        /// The app's name: 1 to 64 of a-z, 0-9, '-' and '_'.
        name: String,
        /// Data directory.
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
    /// List apps.
    List {
        /// Data directory.
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
    /// Revoke every token of an app and print a new one.
    RotateToken {
        /// The app.
        name: String,
        /// Data directory.
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
    /// Revoke every token of an app; its connections are refused from then on.
    RevokeToken {
        /// The app.
        name: String,
        /// Data directory.
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
}

pub(crate) fn open(data: &std::path::Path) -> anyhow::Result<SqliteStore> {
    SqliteStore::open_shared(data, iagent_store::Options::default())
        .with_context(|| format!("cannot open the store in {}", data.display()))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

pub(crate) async fn run(command: AppCommand) -> anyhow::Result<ExitCode> {
    match command {
        AppCommand::Create { name, data } => {
            let (_, token) = open(&data)?.create_app(&name, now_ms()).await?;
            println!("{}", token.expose());
        }
        AppCommand::List { data } => {
            println!(
                "{:<24} {:<16} {:>6}  created",
                "name", "default agent", "tokens"
            );
            for app in open(&data)?.list_apps().await? {
                println!(
                    "{:<24} {:<16} {:>6}  {}",
                    app.name, app.default_agent, app.live_tokens, app.created_ms
                );
            }
        }
        AppCommand::RotateToken { name, data } => {
            let token = open(&data)?.rotate_token(&name, now_ms()).await?;
            println!("{}", token.expose());
        }
        AppCommand::RevokeToken { name, data } => {
            let revoked = open(&data)?.revoke_tokens(&name, now_ms()).await?;
            writeln!(std::io::stderr(), "revoked {revoked} token(s) of {name}").ok();
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// On a gateway's first start (no app at all), creates one and prints its token, once, with the
/// command that talks to it.
pub(crate) async fn bootstrap(store: &dyn Store, address: SocketAddr) -> anyhow::Result<()> {
    if !store.list_apps().await?.is_empty() {
        return Ok(());
    }
    let (app, token) = store.create_app(FIRST_APP, now_ms()).await?;
    let program = std::env::args().next().unwrap_or_else(|| "iagent".into());
    println!(
        "\nFirst start: created app \"{name}\" whose default agent is the built-in echo agent.\n\
         Its token is shown only this once (iagent stores a hash of it):\n\n    {token}\n\n\
         Talk to it from another terminal:\n\n    \
         {program} send --url ws://{address} --token {token} \"hello\"\n\n\
         Backends connect a pool of WebSockets to ws://{address}/ws/v1/chat?app_token=TOKEN\n",
        name = app.name,
        token = token.expose(),
    );
    Ok(())
}
