//! `iagent bench`: drives a running gateway with many simulated users over a pool of
//! connections, each keeping a window of messages in flight (closed loop), and prints round trips
//! per second, latency percentiles, errors and, given the server's pid, its CPU time per 100k
//! messages (read from `/proc/PID/stat`, as `docs/performance.md` asks).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// The gateway's address.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    url: String,
    /// The app token (or set IAGENT_TOKEN).
    #[arg(long, env = "IAGENT_TOKEN", hide_env_values = true)]
    token: String,
    /// Connections in the pool.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Simulated end users, spread over the connections.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Messages in flight per connection.
    #[arg(long, default_value_t = 64)]
    window: usize,
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
    /// The gateway's process id, to report its CPU time per 100k messages.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// What one run measured.
#[derive(Debug, Serialize)]
struct Results {
    connections: usize,
    users: usize,
    window: usize,
    size: usize,
    seconds: f64,
    round_trips: u64,
    round_trips_per_second: f64,
    latency_ms: Percentiles,
    errors: Errors,
    server_cpu_seconds_per_100k: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

#[derive(Debug, Default, Serialize)]
struct Errors {
    /// Responses with resp_code 10, 40 or 50.
    not_ok: u64,
    /// Messages still unanswered at the end.
    unanswered: u64,
}

/// Counters shared by the connections.
#[derive(Default)]
struct Shared {
    measuring: AtomicBool,
    stopped: AtomicBool,
    answered: AtomicU64,
    not_ok: AtomicU64,
}

pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if args.connections == 0 || args.window == 0 || args.users == 0 {
        bail!("--connections, --window and --users must be at least 1");
    }
    let url = format!(
        "{}/ws/v1/chat?app_token={}",
        args.url.trim_end_matches('/'),
        args.token
    );
    let shared = Arc::new(Shared::default());
    let mut pool = Vec::new();
    for connection in 0..args.connections {
        let (socket, _) = tokio_tungstenite::connect_async(&url)
            .await
            .with_context(|| format!("cannot connect to {}", args.url))?;
        pool.push(tokio::spawn(drive(
            connection,
            socket,
            args_for(&args),
            shared.clone(),
        )));
    }
    eprintln!(
        "iagent bench: {} connections, {} users, {} in flight per connection, {}-byte texts, {:.1} s (+{:.1} s warm-up)",
        args.connections, args.users, args.window, args.size, args.duration, args.warmup
    );
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    let cpu_before = args.server_pid.map(cpu_seconds).transpose()?;
    let answered_before = shared.answered.load(Ordering::Relaxed);
    shared.measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1).min(deadline - Instant::now())).await;
        let done = shared.answered.load(Ordering::Relaxed) - answered_before;
        eprint!(
            "\r  {:5.1} s  {:>10} round trips  {:>9.0}/s   ",
            started.elapsed().as_secs_f64(),
            done,
            done as f64 / started.elapsed().as_secs_f64()
        );
    }
    shared.measuring.store(false, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let round_trips = shared.answered.load(Ordering::Relaxed) - answered_before;
    let cpu_after = args.server_pid.map(cpu_seconds).transpose()?;
    shared.stopped.store(true, Ordering::Relaxed);
    eprintln!();

    let mut latencies = Vec::new();
    let mut errors = Errors::default();
    for connection in pool {
        let outcome = connection.await.context("a connection task failed")??;
        latencies.extend(outcome.latencies_us);
        errors.unanswered += outcome.unanswered;
    }
    errors.not_ok = shared.not_ok.load(Ordering::Relaxed);
    latencies.sort_unstable();
    let at = |q: f64| {
        let index = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
        latencies
            .get(index)
            .map_or(0.0, |us| f64::from(*us) / 1000.0)
    };
    let results = Results {
        connections: args.connections,
        users: args.users,
        window: args.window,
        size: args.size,
        seconds,
        round_trips,
        round_trips_per_second: round_trips as f64 / seconds,
        latency_ms: Percentiles {
            p50: at(0.5),
            p99: at(0.99),
            p999: at(0.999),
            max: at(1.0),
        },
        errors,
        server_cpu_seconds_per_100k: cpu_before
            .zip(cpu_after)
            .map(|(before, after)| (after - before) / round_trips.max(1) as f64 * 100_000.0),
    };
    print_results(&results);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let clean = results.errors.not_ok == 0 && results.errors.unanswered == 0;
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_results(r: &Results) {
    println!(
        "round trips:  {} in {:.1} s = {:.0}/s",
        r.round_trips, r.seconds, r.round_trips_per_second
    );
    let l = &r.latency_ms;
    println!(
        "latency:      p50 {:.3} ms   p99 {:.3} ms   p99.9 {:.3} ms   max {:.3} ms",
        l.p50, l.p99, l.p999, l.max
    );
    println!(
        "errors:       {} not ok, {} unanswered",
        r.errors.not_ok, r.errors.unanswered
    );
    if let Some(cpu) = r.server_cpu_seconds_per_100k {
        println!("server CPU:   {cpu:.3} s per 100k round trips");
    }
}

/// What one connection needs to know.
#[derive(Clone)]
struct Load {
    connection: usize,
    connections: usize,
    users: usize,
    window: usize,
    text: String,
    group_share: f64,
}

fn args_for(args: &BenchArgs) -> Load {
    Load {
        connection: 0,
        connections: args.connections,
        users: args.users,
        window: args.window,
        text: "x".repeat(args.size.max(1)),
        group_share: args.group_share.clamp(0.0, 1.0),
    }
}

struct Outcome {
    latencies_us: Vec<u32>,
    unanswered: u64,
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One connection: a sender keeping `window` messages in flight, and a reader matching
/// responses to them by `ref_msg_id`.
async fn drive(
    connection: usize,
    socket: Socket,
    load: Load,
    shared: Arc<Shared>,
) -> anyhow::Result<Outcome> {
    let load = Load { connection, ..load };
    let (mut sink, mut stream) = socket.split();
    let window = Arc::new(Semaphore::new(load.window));
    let sent_at: Arc<std::sync::Mutex<HashMap<u64, (Instant, bool)>>> = Arc::default();
    let sender = {
        let (window, sent_at, shared) = (window.clone(), sent_at.clone(), shared.clone());
        tokio::spawn(async move {
            let mut seq = 0u64;
            let group_every = if load.group_share > 0.0 {
                (1.0 / load.group_share).round() as u64
            } else {
                0
            };
            while !shared.stopped.load(Ordering::Relaxed) {
                let permit = window.clone().acquire_owned().await?;
                permit.forget();
                let user = (seq as usize * load.connections + load.connection) % load.users;
                let group = group_every > 0 && seq.is_multiple_of(group_every);
                let frame = message(load.connection, seq, user, group, &load.text);
                let measuring = shared.measuring.load(Ordering::Relaxed);
                lock(&sent_at).insert(seq, (Instant::now(), measuring));
                sink.send(WsMessage::text(frame)).await?;
                seq += 1;
            }
            // The sink stays open until every response is in: closing it earlier would make the
            // gateway route the rest to other connections.
            anyhow::Ok(sink)
        })
    };
    let mut latencies_us = Vec::new();
    loop {
        let frame = match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
            Ok(Some(frame)) => frame.context("the connection failed")?,
            Ok(None) | Err(_) => break,
        };
        let WsMessage::Text(text) = frame else {
            continue;
        };
        let response: serde_json::Value = serde_json::from_str(&text)?;
        let Some(seq) = response["ref_msg_id"]
            .as_str()
            .and_then(|id| id.rsplit('-').next())
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        let Some((at, measured)) = lock(&sent_at).remove(&seq) else {
            continue;
        };
        window.add_permits(1);
        if response["resp_code"] != 0 {
            shared.not_ok.fetch_add(1, Ordering::Relaxed);
        }
        if measured && shared.measuring.load(Ordering::Relaxed) {
            shared.answered.fetch_add(1, Ordering::Relaxed);
            latencies_us.push(u32::try_from(at.elapsed().as_micros()).unwrap_or(u32::MAX));
        }
        if shared.stopped.load(Ordering::Relaxed) && lock(&sent_at).is_empty() {
            break;
        }
    }
    window.close();
    if let Ok(mut sink) = sender.await.context("the sender task failed")? {
        sink.close().await.ok();
    }
    let unanswered = lock(&sent_at).len() as u64;
    Ok(Outcome {
        latencies_us,
        unanswered,
    })
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn message(connection: usize, seq: u64, user: usize, group: bool, text: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (chat_type, group_field, content) = if group {
        (
            2,
            format!(",\"group_id\":\"g{}\"", user % 100),
            format!("@echo {text}"),
        )
    } else {
        (1, String::new(), text.to_owned())
    };
    format!(
        "{{\"chat_type\":{chat_type},\"msg_id\":\"b{}-{connection}-{seq}\",\"timestamp\":{}{group_field},\"sender_type\":1,\"sender_id\":\"u{user}\",\"resp_code\":0,\"content_type\":1,\"content\":\"{content}\"}}",
        run_id(),
        now.as_millis(),
    )
}

/// A per-run prefix for msg_ids, so that a second run is not answered from the first's dedup
/// records.
fn run_id() -> &'static str {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        format!("{:x}", now.as_nanos())
    })
}

/// The process's user and system CPU time, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("no process {pid}"))?;
    // Fields after the command name (which may hold spaces, inside parentheses).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat(5), i.e. 11 and 12 after the name.
    Ok((ticks(11) + ticks(12)) / clock_ticks_per_second())
}

/// USER_HZ: 100 on every Linux this runs on (the kernel ABI fixes it for /proc).
fn clock_ticks_per_second() -> f64 {
    100.0
}
