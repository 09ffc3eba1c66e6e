//! `iagent agent ...`: an app's agents, and the agents a configuration file declares.
//!
//! Changes are written to the store; a running gateway picks them up within
//! `timeouts.agent_reload_ms`. Every configuration is checked by building the agent before it
//! is stored, so a typo is refused here rather than leaving an agent the gateway cannot build.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use iagent_server::Kinds;
use iagent_store::{AgentRecord, Store};

use crate::apps::open;
use crate::settings::{AgentDeclaration, DEFAULT_DATA_DIR};

#[derive(Subcommand)]
pub(crate) enum AgentCommand {
    /// Add an agent to an app, or replace the one with the same id.
    Add {
        /// The app.
        app: String,
        /// The agent's id: 1 to 128 of A-Z, a-z, 0-9, '-', '_' and '.'.
        id: String,
        /// Its kind: echo or rules.
        #[arg(long)]
        kind: String,
        /// Its configuration, a JSON object (see docs/agents.md).
        #[arg(long, default_value = "{}")]
        config: String,
        /// Also make it the app's default agent.
        #[arg(long)]
        default: bool,
        /// Data directory.
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
    /// List an app's agents.
    List {
        /// The app.
        app: String,
        /// Data directory.
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
    /// Remove an agent (not the app's default).
    Remove {
        /// The app.
        app: String,
        /// The agent.
        id: String,
        /// Data directory.
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
    /// Make an agent the app's default: it answers messages that name no agent.
    Default {
        /// The app.
        app: String,
        /// The agent.
        id: String,
        /// Data directory.
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data: PathBuf,
    },
}

pub(crate) async fn run(command: AgentCommand) -> anyhow::Result<ExitCode> {
    match command {
        AgentCommand::Add {
            app,
            id,
            kind,
            config,
            default,
            data,
        } => {
            let store = open(&data)?;
            put(&store, &app, AgentRecord { id, kind, config }, default).await?;
        }
        AgentCommand::List { app, data } => {
            let store = open(&data)?;
            let default = store
                .list_apps()
                .await?
                .into_iter()
                .find(|a| a.name == app)
                .map(|a| a.default_agent)
                .with_context(|| format!("no app named \"{app}\""))?;
            println!("{:<24} {:<10} {:<8} config", "id", "kind", "default");
            for agent in store.agents(&app).await? {
                let mark = if agent.id == default { "yes" } else { "" };
                println!(
                    "{:<24} {:<10} {:<8} {}",
                    agent.id, agent.kind, mark, agent.config
                );
            }
        }
        AgentCommand::Remove { app, id, data } => open(&data)?.remove_agent(&app, &id).await?,
        AgentCommand::Default { app, id, data } => {
            open(&data)?.set_default_agent(&app, &id).await?
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Checks an agent's configuration by building it, then stores it (and makes it the default).
async fn put(
    store: &dyn Store,
    app: &str,
    agent: AgentRecord,
    default: bool,
) -> anyhow::Result<()> {
    Kinds::builtin().build(&agent.id, &agent.kind, &agent.config)?;
    let id = agent.id.clone();
    store.put_agent(app, agent).await?;
    if default {
        store.set_default_agent(app, &id).await?;
    }
    Ok(())
}

/// Stores the agents a configuration file declares, at every start, so that the file stays
/// the source of truth for them.
pub(crate) async fn apply(
    store: &dyn Store,
    declarations: &[AgentDeclaration],
) -> anyhow::Result<()> {
    for declaration in declarations {
        let config = serde_json::to_string(&declaration.config)?;
        let agent = AgentRecord {
            id: declaration.id.clone(),
            kind: declaration.kind.clone(),
            config,
        };
        put(store, &declaration.app, agent, declaration.default)
            .await
            .with_context(|| {
                format!(
                    "agent \"{}\" of app \"{}\" in the configuration",
                    declaration.id, declaration.app
                )
            })?;
    }
    Ok(())
}
