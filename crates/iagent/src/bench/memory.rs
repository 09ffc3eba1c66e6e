//! Memory per idle connection and per conversation, from the server's resident memory
//! (`VmRSS`): read at rest, after opening K idle connections, after K other conversations
//! have each exchanged one message, and after K distinct conversations have each exchanged one
//! message; the last step is the one measured.
//!
//! What is paid once must not be charged to the connections or conversations measured: the
//! agent's start, buffers that stay, the memory of the most conversations in processing at once
//! (which the allocator keeps), and the bounded caches that fill as the database grows
//! (SQLite's page cache, 2 MiB, fills with the pages of about 2 000 stored messages). So
//! before the first reading, K other conversations exchange at least [`WARMUP_MESSAGES`]
//! messages in the same way. The first round of conversations after the idle connections
//! opened still cost about 2 MiB more than the next, once, whatever K (1 000 or 4 000), so
//! that round is made with other conversations too. Each reading follows a pause that lets the
//! server finish what the step set off (conversation workers exit when their work is done).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::connection::{self, Pace, Socket};
use super::frames::Frames;
use super::report::{Errors, Memory, Rss};
use super::{BenchArgs, Counters, Target, procfs};

/// How long the server is left alone before each reading.
const SETTLE: Duration = Duration::from_secs(1);

/// The fewest messages of the warm-up: enough to fill the store's page cache, which would
/// otherwise grow during the measurement and be charged to the conversations, though it is a
/// fixed cost that does not grow with them.
const WARMUP_MESSAGES: usize = 4096;

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

    // The warm-up: users numbered after those measured below, so that none of their
    // conversations is measured.
    let connections = drivers.len();
    let warmup = Arc::new(Frames::new(args.size, count, 0.0, connections).with_users_from(count));
    let messages = share(count.max(WARMUP_MESSAGES), connections);
    let drivers = exchange(drivers, warmup, args.window, messages)
        .run(target, &counters, &mut errors)
        .await?;
    tokio::time::sleep(SETTLE).await;
    let baseline = procfs::rss_kib(pid)?;

    let mut idle = Vec::with_capacity(count);
    for _ in 0..count {
        idle.push(open(target, args).await?);
    }
    tokio::time::sleep(SETTLE).await;
    let idle_connections_open = procfs::rss_kib(pid)?;

    // Once more as many other conversations, with the idle connections open: the first round
    // of conversations after them costs about 2 MiB more than the next, once, whatever their
    // number (1000 or 4000).
    let again =
        Arc::new(Frames::new(args.size, count, 0.0, connections).with_users_from(2 * count));
    let drivers = exchange(drivers, again, args.window, share(count, connections))
        .run(target, &counters, &mut errors)
        .await?;
    tokio::time::sleep(SETTLE).await;
    let conversations_warm = procfs::rss_kib(pid)?;

    // `count` users, each sending exactly one message: message i of the pool is user i's.
    let frames = Arc::new(Frames::new(args.size, count, 0.0, connections));
    let drivers = exchange(drivers, frames, args.window, share(count, connections))
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
            conversations_warm,
            conversations_done,
        },
        errors,
    ))
}

/// How many of `messages` each of `connections` sends: message i of the pool goes on
/// connection `i % connections`.
fn share(messages: usize, connections: usize) -> impl Fn(usize) -> u64 {
    move |connection| {
        (messages as u64)
            .saturating_sub(connection as u64)
            .div_ceil(connections.max(1) as u64)
    }
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
                    false,
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
