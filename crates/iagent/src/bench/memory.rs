//! Memory per idle connection and per conversation, from the server's resident memory
//! (`VmRSS`): read at rest, after opening K idle connections, and after K distinct
//! conversations have each exchanged one message.
//!
//! Before the first reading, one conversation exchanges [`WARMUP_MESSAGES`] messages, so that
//! what is paid once is not charged to the connections or conversations measured: the agent's
//! start, buffers that stay, and the bounded caches that fill as the database grows (SQLite's
//! page cache, 2 MiB, fills with the pages of about 2 000 stored messages). Each reading follows a pause that lets the server
//! finish what the step set off (conversation workers exit when their work is done).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::connection::{self, Pace, Socket};
use super::frames::Frames;
use super::report::{Errors, Memory, Rss};
use super::{BenchArgs, Counters, Target, procfs};

/// How long the server is left alone before each reading.
const SETTLE: Duration = Duration::from_secs(1);

/// Messages of the warm-up conversation: enough to fill the store's page cache, which would
/// otherwise grow during the measurement and be charged to the conversations, though it is a
/// fixed cost that does not grow with them.
const WARMUP_MESSAGES: u64 = 4096;

/// Measures with `count` idle connections and `count` conversations on the server `pid`.
pub(super) async fn measure(
    target: &Target,
    args: &BenchArgs,
    count: usize,
    pid: u32,
) -> anyhow::Result<Memory> {
    eprintln!(
        "iagent bench: memory of process {pid} with {count} idle connections and {count} conversations"
    );
    let counters = Arc::new(Counters::default());
    let mut errors = Errors::default();
    let mut drivers = Vec::new();
    for _ in 0..args.connections {
        drivers.push(open(target, args).await?);
    }

    // The warm-up: one group conversation on one connection, so that none of the private
    // conversations measured below is it.
    let warmup = Arc::new(Frames::new(args.size, 1, 1.0, 1));
    if let Some(one) = drivers.pop() {
        let exchanged = exchange(vec![one], warmup, args.window, |_| WARMUP_MESSAGES);
        drivers.extend(exchanged.run(target, &counters, &mut errors).await?);
    }
    tokio::time::sleep(SETTLE).await;
    let baseline = procfs::rss_kib(pid)?;

    let mut idle = Vec::with_capacity(count);
    for _ in 0..count {
        idle.push(open(target, args).await?);
    }
    tokio::time::sleep(SETTLE).await;
    let idle_connections_open = procfs::rss_kib(pid)?;

    // `count` users, each sending exactly one message: message i of the pool is user i's.
    let frames = Arc::new(Frames::new(args.size, count, 0.0, drivers.len()));
    let connections = drivers.len() as u64;
    let drivers = exchange(drivers, frames, args.window, |connection| {
        (count as u64)
            .saturating_sub(connection as u64)
            .div_ceil(connections)
    })
    .run(target, &counters, &mut errors)
    .await?;
    tokio::time::sleep(SETTLE).await;
    let conversations_done = procfs::rss_kib(pid)?;

    for mut socket in drivers.into_iter().chain(idle) {
        socket.close(None).await.ok();
    }
    errors.not_ok = counters.not_ok.load(std::sync::atomic::Ordering::Relaxed);
    Ok(Memory::new(
        count,
        Rss {
            baseline,
            idle_connections_open,
            conversations_done,
        },
        errors,
    ))
}

async fn open(target: &Target, args: &BenchArgs) -> anyhow::Result<Socket> {
    connection::open(&target.endpoint)
        .await
        .with_context(|| format!("cannot connect to {}", args.url))
}

/// Messages to exchange over some connections: `limit(connection)` of them on each, at most
/// `window` in flight.
struct Exchange<L> {
    sockets: Vec<Socket>,
    frames: Arc<Frames>,
    window: usize,
    limit: L,
}

fn exchange<L: Fn(usize) -> u64>(
    sockets: Vec<Socket>,
    frames: Arc<Frames>,
    window: usize,
    limit: L,
) -> Exchange<L> {
    Exchange {
        sockets,
        frames,
        window,
        limit,
    }
}

impl<L: Fn(usize) -> u64> Exchange<L> {
    /// Sends every message and waits for the responses; hands back the sockets still usable.
    async fn run(
        self,
        target: &Target,
        counters: &Arc<Counters>,
        errors: &mut Errors,
    ) -> anyhow::Result<Vec<Socket>> {
        let tasks: Vec<_> = self
            .sockets
            .into_iter()
            .enumerate()
            .map(|(connection, socket)| {
                let pace = Pace::Closed {
                    window: self.window,
                    limit: Some((self.limit)(connection)),
                };
                tokio::spawn(connection::drive(
                    connection,
                    socket,
                    self.frames.clone(),
                    target.replies,
                    pace,
                    counters.clone(),
                ))
            })
            .collect();
        let mut returned = Vec::new();
        for task in tasks {
            let (outcome, socket) = task.await.context("a connection task failed")??;
            errors.unanswered += outcome.unanswered;
            returned.extend(socket);
        }
        Ok(returned)
    }
}
