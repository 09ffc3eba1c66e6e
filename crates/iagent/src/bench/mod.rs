//! `iagent bench`: measures a running gateway the way `docs/performance.md` asks, and measures
//! the reference echo server (`bench/reference-echo`, `--reference`) with the same generator,
//! so that `bench/run` can state the gateway's figures as ratios to it.
//!
//! - Closed loop (default): a pool of connections, each keeping `--window` messages in flight;
//!   gives the saturation throughput and latency.
//! - Open loop (`--rate N`): N messages per second in total on a fixed schedule whatever the
//!   responses do, latency measured from each message's scheduled time.
//! - Memory (`--memory K`): the server's resident memory per idle connection and per
//!   conversation, from `/proc/PID/status` around opening K idle connections and K
//!   conversations exchanging a message.
//! - Through the SDK (`--via-client`): the closed loop driven through `iagent-client`'s pool, to
//!   see what the backend's side of the path costs on top.
//!
//! With `--server-pid`, the server's CPU time per 100k round trips is read from
//! `/proc/PID/stat` before and after the measured window.
//!
//! The modules: `connection` (one raw connection's writer and reader), `schedule` (the open
//! loop's timing), `frames` (the messages and matching replies to them), `memory`, `client`,
//! `progress` (the stderr line), `procfs` (CPU and RSS of the server), `stats` (percentiles),
//! `report` (results as text and JSON).

mod client;
mod connection;
mod frames;
mod memory;
mod procfs;
mod progress;
mod report;
mod schedule;
mod stats;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Args;

use connection::{Outcome, Pace};
use frames::{Frames, Replies};
use progress::Progress;
use report::{Errors, Load, Report};
use schedule::Schedule;
use stats::Percentiles;

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// The gateway's (or the reference's) address.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    url: String,
    /// The app token (or set IAGENT_TOKEN); not needed with --reference.
    #[arg(long, env = "IAGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Connections in the pool.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Simulated end users, spread over the connections.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Closed loop: messages in flight per connection.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Open loop: send this many messages per second in total on a fixed schedule, whatever the
    /// responses do; latency is measured from each message's scheduled time.
    #[arg(long, conflicts_with = "via_client")]
    rate: Option<f64>,
    /// Seconds of measured load (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of unmeasured load first.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Share of group messages (0 to 1), each addressed to the agent with `@echo`.
    #[arg(long, default_value_t = 0.0)]
    group_share: f64,
    /// Drive an echo server that returns every frame unchanged (bench/reference-echo): replies
    /// are matched by their own msg_id, and no token is needed.
    #[arg(long)]
    reference: bool,
    /// Drive the gateway through the iagent-client pool instead of raw connections (closed
    /// loop).
    #[arg(long, conflicts_with = "reference")]
    via_client: bool,
    /// Measure memory instead of load: the server's RSS around opening this many idle
    /// connections, then around as many distinct conversations exchanging a message each.
    /// Needs --server-pid.
    #[arg(long, requires = "server_pid", conflicts_with_all = ["rate", "via_client"])]
    memory: Option<usize>,
    /// The server's process id, to report its CPU time per 100k messages (and its memory).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Show the progress line on stderr even when it is not a terminal.
    #[arg(long)]
    progress: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write every measured message's times to this file, a line each: its `msg_id`, when
    /// its latency is measured from (its scheduled time in the open loop, its write in the
    /// closed loop) and when its response was read, both in nanoseconds since the Unix epoch.
    /// `bench/capture` joins them with the times a packet capture saw the message and its
    /// response on the wire. The times are kept in memory until the run ends: 40 bytes a
    /// message.
    #[arg(long, conflicts_with_all = ["via_client", "memory"])]
    latency_log: Option<PathBuf>,
}

/// Counters the connections share with the run and its progress line.
#[derive(Debug, Default)]
struct Counters {
    /// Closed loop: messages sent while set are measured.
    measuring: AtomicBool,
    /// Closed loop: the writers stop.
    stopped: AtomicBool,
    /// Responses of any message so far.
    replies: AtomicU64,
    /// Responses of measured messages so far.
    answered: AtomicU64,
    /// Responses other than 0 so far.
    not_ok: AtomicU64,
}

/// Where the load goes and how its replies are recognised.
struct Target {
    /// The base URL, for the client SDK.
    url: String,
    token: Option<String>,
    /// The chat endpoint, for raw connections.
    endpoint: String,
    replies: Replies,
}

impl Target {
    fn of(args: &BenchArgs) -> anyhow::Result<Self> {
        let base = args.url.trim_end_matches('/');
        let endpoint = match (&args.token, args.reference) {
            (Some(token), _) => format!("{base}/ws/v1/chat?app_token={token}"),
            (None, true) => format!("{base}/ws/v1/chat"),
            (None, false) => bail!("--token (or IAGENT_TOKEN) is needed, except with --reference"),
        };
        Ok(Self {
            url: base.to_owned(),
            token: args.token.clone(),
            endpoint,
            replies: if args.reference {
                Replies::Echo
            } else {
                Replies::Gateway
            },
        })
    }
}

pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.connections == 0 || args.window == 0 || args.users == 0 {
        bail!("--connections, --window and --users must be at least 1");
    }
    if args
        .rate
        .is_some_and(|rate| !(rate > 0.0 && rate.is_finite()))
    {
        bail!("--rate must be a positive number of messages per second");
    }
    if !(args.duration > 0.0 && args.warmup >= 0.0) {
        bail!("--duration must be positive and --warmup not negative");
    }
    let target = Target::of(&args)?;
    let mut report = Report {
        server: if args.reference {
            "reference"
        } else {
            "gateway"
        },
        driver: if args.via_client { "client" } else { "raw" },
        load: None,
        memory: None,
    };
    match (args.memory, args.server_pid) {
        (Some(count), Some(pid)) => {
            report.memory = Some(memory::measure(&target, &args, count, pid).await?);
        }
        _ if args.via_client => report.load = Some(client::run(&target, &args).await?),
        _ => report.load = Some(load(&target, &args).await?),
    }
    print!("{}", report.text());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if report.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The load over raw connections, closed or open loop.
async fn load(target: &Target, args: &BenchArgs) -> anyhow::Result<Load> {
    let frames = Arc::new(Frames::new(
        args.size,
        args.users,
        args.group_share,
        args.connections,
    ));
    let counters = Arc::new(Counters::default());
    let mut sockets = Vec::new();
    for _ in 0..args.connections {
        let socket = connection::open(&target.endpoint)
            .await
            .with_context(|| format!("cannot connect to {}", args.url))?;
        sockets.push(socket);
    }
    let (warmup, duration) = (
        Duration::from_secs_f64(args.warmup),
        Duration::from_secs_f64(args.duration),
    );
    let pace = match args.rate {
        Some(rate) => format!("{rate:.0} messages/s in total (open loop)"),
        None => format!("{} in flight per connection", args.window),
    };
    eprintln!(
        "iagent bench: {} connections, {} users, {pace}, {}-byte texts, {:.1} s (+{:.1} s warm-up)",
        args.connections, args.users, args.size, args.duration, args.warmup
    );

    let start = Instant::now();
    // Kept until the end: dropping it stops the schedule early (as on an error).
    let (_stop_schedule, stop) = std::sync::mpsc::channel::<()>();
    let mut schedule = None;
    let paces: Vec<Pace> = match args.rate {
        Some(rate) => {
            let (writers, ticks): (Vec<_>, Vec<_>) = (0..args.connections)
                .map(|_| tokio::sync::mpsc::unbounded_channel())
                .unzip();
            let plan = Schedule::new(rate, args.connections);
            schedule = Some(schedule::keep(plan, start, warmup, duration, writers, stop));
            ticks.into_iter().map(Pace::Open).collect()
        }
        None => (0..args.connections)
            .map(|_| Pace::Closed {
                window: args.window,
                limit: None,
            })
            .collect(),
    };
    let tasks: Vec<_> = sockets
        .into_iter()
        .zip(paces)
        .enumerate()
        .map(|(connection, (socket, pace))| {
            tokio::spawn(connection::drive(
                connection,
                socket,
                frames.clone(),
                target.replies,
                pace,
                counters.clone(),
                args.latency_log.is_some(),
            ))
        })
        .collect();

    let window = measure(args, &counters, start).await?;
    if let Some(schedule) = schedule {
        tokio::task::spawn_blocking(move || schedule.join())
            .await
            .context("the schedule's thread failed")?
            .map_err(|_| anyhow::anyhow!("the schedule's thread panicked"))?;
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        let (outcome, socket) = task.await.context("a connection task failed")??;
        if let Some(mut socket) = socket {
            socket.close(None).await.ok();
        }
        outcomes.push(outcome);
    }
    if let Some(path) = &args.latency_log {
        write_latency_log(path, &frames, start, &outcomes)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(summarize(args, window, &counters, outcomes))
}

/// Writes each logged message's `msg_id` and times (see `--latency-log`), connection by
/// connection. `start` is any instant of the run, read again with the wall clock to put the
/// monotonic times on the clock a packet capture stamps packets with.
fn write_latency_log(
    path: &Path,
    frames: &Frames,
    start: Instant,
    outcomes: &[Outcome],
) -> std::io::Result<()> {
    let (now, wall) = (Instant::now(), SystemTime::now());
    let start_ns = wall
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(now - start)
        .as_nanos();
    let ns = |at: Instant| start_ns + at.saturating_duration_since(start).as_nanos();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (connection, outcome) in outcomes.iter().enumerate() {
        for &(seq, since, read) in &outcome.log {
            let msg_id = frames.msg_id(connection, seq);
            writeln!(file, "{msg_id} {} {}", ns(since), ns(read))?;
        }
    }
    file.flush()
}

/// The measured window: its length, and the CPU time the server and the generator spent in it.
struct Window {
    seconds: f64,
    cpu: Option<procfs::CpuTime>,
    generator_cpu_seconds: f64,
}

/// Waits out the warm-up and the measured window (showing progress), reading the server's CPU
/// time at both ends of the latter, then stops the closed loop's writers.
async fn measure(args: &BenchArgs, counters: &Counters, start: Instant) -> anyhow::Result<Window> {
    let progress = Progress::new(args.progress);
    let warmup = Duration::from_secs_f64(args.warmup);
    let total = warmup + Duration::from_secs_f64(args.duration);
    progress.wait(counters, start, total, start + warmup).await;
    let cpu_before = args.server_pid.map(procfs::cpu_time).transpose()?;
    let own_before = procfs::cpu_time(std::process::id())?;
    counters.measuring.store(true, Ordering::Relaxed);
    let measured_from = Instant::now();
    progress.wait(counters, start, total, start + total).await;
    counters.measuring.store(false, Ordering::Relaxed);
    let seconds = measured_from.elapsed().as_secs_f64();
    let cpu_after = args.server_pid.map(procfs::cpu_time).transpose()?;
    let own_after = procfs::cpu_time(std::process::id())?;
    counters.stopped.store(true, Ordering::Relaxed);
    progress.finish();
    Ok(Window {
        seconds,
        cpu: cpu_before.zip(cpu_after).map(|(b, a)| a - b),
        generator_cpu_seconds: (own_after - own_before).total(),
    })
}

/// The figures of a load from what its connections measured.
fn summarize(
    args: &BenchArgs,
    window: Window,
    counters: &Counters,
    outcomes: Vec<Outcome>,
) -> Load {
    let mut latencies = Vec::new();
    let mut lags = Vec::new();
    let (mut sent, mut group, mut unanswered) = (0, 0, 0);
    for outcome in outcomes {
        latencies.extend(outcome.latencies_us);
        lags.extend(outcome.lags_us);
        sent += outcome.sent;
        group += outcome.group;
        unanswered += outcome.unanswered;
    }
    let round_trips = latencies.len() as u64;
    let per_100k = |seconds: f64| seconds / round_trips.max(1) as f64 * 100_000.0;
    Load {
        loop_kind: if args.rate.is_some() {
            "open"
        } else {
            "closed"
        },
        rate: args.rate,
        connections: args.connections,
        users: args.users,
        window: args.rate.is_none().then_some(args.window),
        size: args.size,
        group_share: args.group_share,
        seconds: window.seconds,
        sent,
        round_trips,
        round_trips_per_second: round_trips as f64 / window.seconds,
        group_round_trips: group,
        latency_ms: Percentiles::of_micros(latencies),
        send_lag_ms: args.rate.map(|_| Percentiles::of_micros(lags)),
        errors: Errors {
            not_ok: counters.not_ok.load(Ordering::Relaxed),
            unanswered,
        },
        server_cpu_seconds_per_100k: window.cpu.map(|cpu| per_100k(cpu.total())),
        server_system_cpu_seconds_per_100k: window.cpu.map(|cpu| per_100k(cpu.system)),
        generator_cores: window.generator_cpu_seconds / window.seconds,
    }
}
