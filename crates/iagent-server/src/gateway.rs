//! The gateway's shared state and its lifecycle: start (recover what a previous process left),
//! serve, and shut down without losing anything in flight.
//!
//! Shutdown is signal, then wait, in three steps, each a cancellation token:
//! 1. `stopping`: stop accepting connections and stop reading frames.
//! 2. Work in flight finishes and its responses go out on the still-open connections; after the
//!    grace period, `abandon` makes agent calls give up, and their messages are answered with 50.
//!    Whatever still hangs one more grace period later is left to the next start's recovery.
//! 3. `closing`: every connection leaves its pool and is closed with 1012 behind its last frame;
//!    anything that could not be written goes to the outbox.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use iagent_agent::Kinds;
use iagent_protocol::RespCode;
use iagent_store::{AgentRecord, App, PurgeBefore, Store, StoreError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::apps::{AgentSet, AppState, Apps, Deferred};
use crate::config::Config;
use crate::ids::{MessageIds, now_ms};
use crate::metrics::Metrics;
use crate::rate::RateLimit;
use crate::throttle::AuthThrottle;
use crate::{ServerError, conversation, http, listener, tls};

/// The state every part of the gateway shares.
pub(crate) struct Gateway {
    pub(crate) config: Config,
    /// The validation limits, derived from `config` once.
    pub(crate) protocol_limits: iagent_protocol::Limits,
    pub(crate) store: Arc<dyn Store>,
    /// The agent kinds apps' agents are built from.
    pub(crate) kinds: Kinds,
    pub(crate) apps: Apps,
    pub(crate) ids: MessageIds,
    pub(crate) metrics: Metrics,
    /// Addresses that failed authentication too often.
    pub(crate) throttle: AuthThrottle,
    pub(crate) next_connection: AtomicU64,
    /// Shutdown has begun: accept nothing, read nothing.
    pub(crate) stopping: CancellationToken,
    /// The grace period is over: agent calls give up.
    pub(crate) abandon: CancellationToken,
    /// Work in flight is done: close the connections.
    pub(crate) closing: CancellationToken,
    /// Conversation workers: the work in flight that shutdown waits for.
    pub(crate) work: TaskTracker,
    /// WebSocket sessions.
    pub(crate) sessions: TaskTracker,
    /// Outbox drains and the purge loop.
    pub(crate) background: TaskTracker,
}

impl Gateway {
    /// The state of an app as stored, with its agents built and its limits applied.
    pub(crate) fn app_state(&self, app: &App, agents: &[AgentRecord]) -> AppState {
        let rate = RateLimit::new(self.config.limits.max_messages_per_second_per_app);
        AppState::new(app, AgentSet::build(app, agents, &self.kinds), rate)
    }

    /// Counts and logs a failed store operation.
    pub(crate) fn store_failed(&self, operation: &'static str, err: &StoreError) {
        self.metrics
            .store_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(operation, error = %err, "store operation failed");
    }
}

/// Runs the gateway on `listener` with the built-in agent kinds until `shutdown` resolves, then
/// shuts down gracefully. See [`Server`] to add agent kinds.
pub async fn run(
    listener: TcpListener,
    config: Config,
    store: Arc<dyn Store>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    Server::new(store)
        .config(config)
        .run(listener, shutdown)
        .await
}

/// A gateway to be run: its store, its configuration and the agent kinds it can build.
#[derive(Clone)]
pub struct Server {
    store: Arc<dyn Store>,
    config: Config,
    kinds: Kinds,
}

impl Server {
    /// A gateway over `store` with the default configuration and the built-in agent kinds.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            config: Config::default(),
            kinds: Kinds::builtin(),
        }
    }

    /// Uses this configuration.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Uses these agent kinds (agents of other kinds are left out, and logged, when loaded).
    pub fn agent_kinds(mut self, kinds: Kinds) -> Self {
        self.kinds = kinds;
        self
    }

    /// Serves on `listener` until `shutdown` resolves, then shuts down gracefully.
    ///
    /// Before serving, every app is loaded and every message a previous process left
    /// unanswered is answered with 50 (into the outbox), so that no message is silently
    /// forgotten.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        serve(self, listener, shutdown).await
    }
}

async fn serve(
    server: Server,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let Server {
        store,
        config,
        kinds,
    } = server;
    config.validate().map_err(ServerError::Config)?;
    let acceptor = tls::acceptor(&config.tls)?;
    let throttle = AuthThrottle::new(
        config.security.auth_failures_per_window,
        Duration::from_secs(config.security.auth_failure_window_secs),
        config.security.max_tracked_addresses,
    );
    let gateway = Arc::new(Gateway {
        protocol_limits: config.protocol_limits(),
        config,
        store,
        kinds,
        apps: Apps::default(),
        ids: MessageIds::new().map_err(|err| ServerError::Randomness(err.to_string()))?,
        metrics: Metrics::default(),
        throttle,
        next_connection: AtomicU64::new(1),
        stopping: CancellationToken::new(),
        abandon: CancellationToken::new(),
        closing: CancellationToken::new(),
        work: TaskTracker::new(),
        sessions: TaskTracker::new(),
        background: TaskTracker::new(),
    });
    load_apps(&gateway).await?;
    let recovered = conversation::recover_unanswered(&gateway).await?;
    if recovered > 0 {
        tracing::warn!(
            recovered,
            "answered messages left unanswered by the previous run with 50"
        );
    }

    let address = listener.local_addr().map_err(ServerError::Io)?;
    let router = http::router(gateway.clone());
    let config_tls = gateway.config.tls.enabled();
    gateway
        .background
        .spawn(listener::serve(listener, router, gateway.clone(), acceptor));
    gateway.background.spawn(purge_loop(gateway.clone()));
    gateway.background.spawn(reload_loop(gateway.clone()));
    gateway.background.spawn(deferred_loop(gateway.clone()));
    tracing::info!(%address, tls = config_tls, "serving");

    shutdown.await;
    shut_down(&gateway).await;
    Ok(())
}

async fn load_apps(gateway: &Gateway) -> Result<(), StoreError> {
    // At start every app is new to the reload, which loads it.
    reload_agents(gateway).await?;
    for waiting in gateway.store.deferred().await? {
        let message = serde_json::from_str::<iagent_protocol::Message>(&waiting.inbound);
        let (Some(app), Ok(message)) = (gateway.apps.get(&waiting.app), message) else {
            tracing::error!(app = %waiting.app, "unreadable deferred message left as is");
            continue;
        };
        let deferred = Deferred {
            message,
            agent: waiting.agent,
            origins: None,
            until_ms: waiting.until_ms,
        };
        app.restore_deferred(deferred);
    }
    for (name, depth) in gateway.store.outbox_depths().await? {
        if let Some(app) = gateway.apps.get(&name) {
            app.outbox
                .add_depth(i64::try_from(depth).unwrap_or(i64::MAX));
        }
    }
    Ok(())
}

async fn shut_down(gateway: &Gateway) {
    let grace = gateway.config.timeouts.shutdown_grace();
    tracing::info!(?grace, "shutting down");
    gateway.stopping.cancel();
    gateway.work.close();
    if tokio::time::timeout(grace, gateway.work.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "work still in flight after the grace period: abandoning agent calls"
        );
        gateway.abandon.cancel();
        // Abandoned agent calls answer at once; what still hangs (a stuck store) is left to the
        // next start, which answers every claimed and unanswered message with 50.
        if tokio::time::timeout(grace, gateway.work.wait())
            .await
            .is_err()
        {
            let stuck: usize = gateway.apps.all().iter().map(|app| app.in_flight()).sum();
            tracing::error!(
                stuck,
                "messages still in flight after abandoning; the next start answers them"
            );
        }
    }
    gateway.closing.cancel();
    gateway.sessions.close();
    gateway.sessions.wait().await;
    gateway.background.close();
    gateway.background.wait().await;
    tracing::info!("shut down");
}

/// Answers with 50 every message whose agent did not push its deferred reply in time. Checks
/// four times per deadline (between every 10 ms and every second), so a deadline is kept to
/// within a quarter of itself.
async fn deferred_loop(gateway: Arc<Gateway>) {
    let wait_ms = gateway.config.timeouts.deferred_reply_ms;
    let every = Duration::from_millis((wait_ms / 4).clamp(10, 1000));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = gateway.stopping.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = now_ms();
        for app in gateway.apps.all() {
            for deferred in app.take_expired(now) {
                let cause = format!(
                    "agent {} deferred its reply and did not push it within {} ms",
                    deferred.agent, wait_ms
                );
                tracing::info!(app = %app.name, msg_id = %deferred.message.msg_id, "deferred reply expired");
                let meta = gateway.ids.next();
                let response =
                    deferred
                        .message
                        .text_response(meta, &deferred.agent, RespCode::Failed, cause);
                conversation::answer_deferred(&gateway, &app, deferred, response).await;
            }
        }
    }
}

/// Keeps every app's agents in step with the store: agents added, changed or removed, or a new
/// default, by the CLI or another process, take effect within `agent_reload_ms`, and apps
/// created meanwhile are loaded.
async fn reload_loop(gateway: Arc<Gateway>) {
    let mut ticks = tokio::time::interval(Duration::from_millis(
        gateway.config.timeouts.agent_reload_ms,
    ));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = gateway.stopping.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if let Err(err) = reload_agents(&gateway).await {
            gateway.store_failed("reload_agents", &err);
        }
    }
}

async fn reload_agents(gateway: &Gateway) -> Result<(), StoreError> {
    for app in gateway.store.list_apps().await? {
        match gateway.apps.get(&app.name) {
            Some(state) if state.agents_outdated(&app) => {
                let records = gateway.store.agents(&app.name).await?;
                state.replace_agents(
                    AgentSet::build(&app, &records, &gateway.kinds),
                    app.agents_version,
                );
                tracing::info!(app = %app.name, agents = records.len(), default = %app.default_agent, "agents reloaded");
            }
            Some(_) => {}
            None => {
                let records = gateway.store.agents(&app.name).await?;
                gateway.apps.insert(gateway.app_state(&app, &records));
            }
        }
    }
    Ok(())
}

/// Removes expired dedup records, history and outbox entries, counting and logging the outbox
/// entries that expired undelivered.
async fn purge_loop(gateway: Arc<Gateway>) {
    let retention = &gateway.config.retention;
    let mut ticks = tokio::time::interval(Duration::from_secs(retention.purge_interval_secs));
    loop {
        tokio::select! {
            () = gateway.stopping.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = now_ms();
        let ago = |secs: u64| {
            now.saturating_sub(i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX))
        };
        let before = PurgeBefore {
            dedup: ago(retention.dedup_window_secs),
            history: ago(retention.history_ttl_secs),
            outbox: now,
            files: ago(retention.file_ttl_secs),
        };
        match gateway.store.purge(before).await {
            Ok(purged) => {
                for (name, count) in purged.outbox_expired {
                    tracing::warn!(app = %name, count, "outbox entries expired undelivered");
                    if let Some(app) = gateway.apps.get(&name) {
                        app.counters
                            .outbox_expired
                            .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
                        app.outbox
                            .add_depth(-i64::try_from(count).unwrap_or(i64::MAX));
                    }
                }
                tracing::debug!(
                    dedup = purged.dedup,
                    history = purged.history,
                    files = purged.files,
                    "purged expired records"
                );
            }
            Err(err) => gateway.store_failed("purge", &err),
        }
    }
}
