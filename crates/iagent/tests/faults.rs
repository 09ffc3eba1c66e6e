//! Fault injection against the real binary, run as a child process.
//!
//! - SIGKILL under load: a pool of 4 connections floods the gateway; after a seeded number of
//!   responses the process is killed with SIGKILL and restarted on the same data directory. The
//!   backend reconnects, takes what arrives unsolicited (the outbox: 50 for every message the dead
//!   process had claimed and not answered), then resends every message still unanswered plus a
//!   seeded sample of answered ones. This proves (`docs/protocol.md`, "Routing, ordering,
//!   idempotency" and "Liveness, closing, restarts") that nothing is lost across a crash and
//!   nothing is processed twice: every message ends with a response, and every response to one
//!   `msg_id`, before and after the crash, is the same one.
//! - A slow consumer: a connection that sends as fast as it can and never reads. The gateway
//!   stops reading it instead of buffering (its memory stays bounded), and the app's other
//!   connection is still answered promptly meanwhile.
//!
//! Faults are drawn from a seeded xorshift64 generator; the seed is printed, and
//! `IAGENT_FAULT_SEED=<seed>` replays another one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message as WsMessage;

mod common;

use common::{BIN, Lines, WAIT};
/// The seed of the faults. Replay another with `IAGENT_FAULT_SEED`.
const SEED: u64 = 0x5EED_0000_C0FF_EE01;

/// xorshift64 (Marsaglia 2003): tiny, seeded, and the same on every platform.
struct XorShift64(u64);

impl XorShift64 {
    fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    std::env::var("IAGENT_FAULT_SEED")
        .ok()
        .map(|text| {
            let text = text.trim();
            match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            }
            .expect("IAGENT_FAULT_SEED is a number")
        })
        .unwrap_or(SEED)
}

/// `iagent serve` as a child process; killed when dropped, so a failing test leaves nothing.
struct Gateway {
    child: Child,
    /// `127.0.0.1:PORT`, from the `serving` log line.
    address: String,
    log: Lines,
}

impl Gateway {
    /// Starts `serve` on a free port and waits for its `serving` log line.
    fn start(data: &Path, config: Option<&Path>) -> Self {
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data);
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        let mut child = command
            .env("IAGENT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("serve starts");
        let mut log = Lines::of(child.stderr.take().expect("stderr piped"));
        let serving = log.wait_for("serving");
        let address = serving
            .split_whitespace()
            .find_map(|word| word.strip_prefix("address="))
            .unwrap_or_else(|| panic!("no address in {serving:?}"))
            .to_owned();
        Self {
            child,
            address,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn url(&self, token: &str) -> String {
        format!("ws://{}/ws/v1/chat?app_token={token}", self.address)
    }

    /// Sends `signal` (`KILL`, `TERM`) and waits, bounded, for the process to exit.
    fn signal_and_wait(&mut self, signal: &str) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -{signal} failed");
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait works") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "serve did not exit within {WAIT:?} of SIG{signal}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The value of one metric series, e.g. `iagent_outbox_depth{app="load"}`.
    async fn metric(&self, series: &str) -> u64 {
        let mut stream = tokio::net::TcpStream::connect(&self.address)
            .await
            .expect("connect");
        let request = "GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
            .lines()
            .find_map(|line| {
                line.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map(|value| value.trim().parse().expect("a number"))
            .unwrap_or_else(|| panic!("no series {series} in\n{response}"))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

/// Creates an app in `data` with `iagent app create`; returns its token.
fn create_app(data: &Path, name: &str) -> String {
    let output = Command::new(BIN)
        .args(["app", "create", name, "--data"])
        .arg(data)
        .env("IAGENT_LOG", "warn")
        .output()
        .expect("iagent runs");
    assert!(
        output.status.success(),
        "app create failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("UTF-8")
        .trim()
        .to_owned()
}

/// A valid private text message from `user`.
fn private(msg_id: &str, user: &str, text: &str) -> Value {
    json!({
        "chat_type": 1, "msg_id": msg_id, "timestamp": 1_700_000_000_000_i64, "sender_type": 1,
        "sender_id": user, "resp_code": 0, "content_type": 1, "content": text,
    })
}

type Sink = futures_util::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    WsMessage,
>;

/// Opens `count` connections; each gets a task forwarding every response it reads, tagged with
/// the connection's index, until the connection ends. Returns the sending halves.
async fn open_pool(
    gateway: &Gateway,
    token: &str,
    count: usize,
    tx: &mpsc::UnboundedSender<(usize, Value)>,
) -> (Vec<Sink>, Vec<tokio::task::JoinHandle<()>>) {
    let mut sinks = Vec::new();
    let mut readers = Vec::new();
    for index in 0..count {
        let (ws, _) = tokio_tungstenite::connect_async(gateway.url(token))
            .await
            .expect("upgrade accepted");
        let (sink, mut stream) = ws.split();
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            while let Some(Ok(frame)) = stream.next().await {
                if let WsMessage::Text(text) = frame {
                    let response: Value = serde_json::from_str(&text).expect("a response is JSON");
                    if tx.send((index, response)).is_err() {
                        return;
                    }
                }
            }
        }));
        sinks.push(sink);
    }
    (sinks, readers)
}

/// The cause the gateway gives a message the previous process claimed and never answered.
const RECOVERED: &str = "the gateway restarted before this message was answered";

/// When a message got its first response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    BeforeKill,
    Outbox,
    Resend,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_nothing_and_processes_nothing_twice() {
    const CONNECTIONS: usize = 4;
    const USERS: usize = 300;
    const MESSAGES: usize = 3000;
    let seed = seed();
    let mut rng = XorShift64::new(seed);
    let kill_after = MESSAGES / 5 + rng.below(MESSAGES as u64 / 2) as usize;
    println!(
        "sigkill: seed={seed:#x} (replay with IAGENT_FAULT_SEED={seed:#x}) kill_after_responses={kill_after}"
    );
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let token = create_app(dir.path(), "load");
    let mut gateway = tokio::task::block_in_place(|| Gateway::start(dir.path(), None));

    // Users interleaved, so that many conversations are in flight on every connection.
    let messages: BTreeMap<String, Value> = (0..MESSAGES)
        .map(|i| {
            let msg_id = format!("u{}-{}", i % USERS, i / USERS);
            let message = private(
                &msg_id,
                &format!("u{}", i % USERS),
                &format!("load {msg_id}"),
            );
            (msg_id, message)
        })
        .collect();
    let order: Vec<String> = (0..MESSAGES)
        .map(|i| format!("u{}-{}", i % USERS, i / USERS))
        .collect();
    let mut answers: HashMap<String, Vec<(Phase, Value)>> = HashMap::new();
    let record = |answers: &mut HashMap<String, Vec<(Phase, Value)>>, phase, response: Value| {
        let ref_id = response["ref_msg_id"]
            .as_str()
            .unwrap_or_else(|| panic!("a response without ref_msg_id: {response}"))
            .to_owned();
        answers.entry(ref_id).or_default().push((phase, response));
    };

    // Run 1: flood, then SIGKILL after `kill_after` responses.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (sinks, readers) = open_pool(&gateway, &token, CONNECTIONS, &tx).await;
    drop(tx);
    let sent = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for (index, mut sink) in sinks.into_iter().enumerate() {
        let frames: Vec<String> = order
            .iter()
            .skip(index)
            .step_by(CONNECTIONS)
            .map(|msg_id| messages[msg_id].to_string())
            .collect();
        let sent = sent.clone();
        senders.push(tokio::spawn(async move {
            for frame in frames {
                if sink.feed(WsMessage::text(frame)).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            sink.flush().await.ok();
            // Kept open (not closed) until the gateway dies.
            sink
        }));
    }
    let deadline = Instant::now() + WAIT;
    while answers.len() < kill_after {
        let (_, response) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("responses flow")
            .expect("connections open");
        record(&mut answers, Phase::BeforeKill, response);
    }
    let status = tokio::task::block_in_place(|| gateway.signal_and_wait("KILL"));
    assert!(!status.success(), "killed: {status}");
    let sent_before_kill = sent.load(Ordering::Relaxed);
    // Whatever was read before the process died still counts as answered before the kill.
    for reader in readers {
        timeout(WAIT, reader)
            .await
            .expect("connections end with the process")
            .unwrap();
    }
    for sender in senders {
        drop(
            timeout(WAIT, sender)
                .await
                .expect("senders end with the process"),
        );
    }
    while let Ok((_, response)) = rx.try_recv() {
        record(&mut answers, Phase::BeforeKill, response);
    }
    let answered_before_kill = answers.len();
    let first_prefix = |answers: &HashMap<String, Vec<(Phase, Value)>>| {
        answers.values().next().map(|responses| {
            let id = responses[0].1["msg_id"].as_str().unwrap();
            id.split('-').next().unwrap().to_owned()
        })
    };
    let run1_prefix = first_prefix(&answers).expect("responses before the kill");

    // Run 2: restart on the same data; the outbox first.
    let mut gateway = tokio::task::block_in_place(|| Gateway::start(dir.path(), None));
    let recovered_logged: usize = gateway
        .log
        .seen()
        .iter()
        .find(|line| line.contains("left unanswered by the previous run"))
        .and_then(|line| {
            line.split_whitespace()
                .find_map(|word| word.strip_prefix("recovered="))
        })
        .map_or(0, |count| count.parse().expect("a count"));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (mut sinks, _readers) = open_pool(&gateway, &token, CONNECTIONS, &tx).await;
    drop(tx);
    let deadline = Instant::now() + WAIT;
    while gateway.metric("iagent_outbox_depth{app=\"load\"}").await > 0 {
        assert!(Instant::now() < deadline, "the outbox was not delivered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The outbox is written; a marker answered on each connection comes after whatever the
    // outbox put on that connection.
    let mut markers = HashSet::new();
    for (index, sink) in sinks.iter_mut().enumerate() {
        let marker = format!("marker-{index}");
        sink.send(WsMessage::text(
            private(&marker, &marker, "marker").to_string(),
        ))
        .await
        .expect("sent");
        markers.insert(marker);
    }
    let mut outbox_frames = 0;
    while !markers.is_empty() {
        let (index, response) = timeout(WAIT, rx.recv())
            .await
            .expect("markers answered")
            .expect("connections open");
        let ref_id = response["ref_msg_id"].as_str().unwrap_or_default();
        if ref_id.starts_with("marker-") {
            assert_eq!(ref_id, format!("marker-{index}"), "{response}");
            assert_eq!(response["resp_code"], 0, "{response}");
            markers.remove(ref_id);
        } else {
            outbox_frames += 1;
            record(&mut answers, Phase::Outbox, response);
        }
    }

    // Then resend everything unanswered, and a sample of the answered.
    let unanswered: Vec<&String> = order
        .iter()
        .filter(|msg_id| !answers.contains_key(*msg_id))
        .collect();
    // One draw per message, answered or not, so the draws do not depend on timing.
    let drawn: Vec<bool> = order.iter().map(|_| rng.below(10) == 0).collect();
    let sample: Vec<&String> = order
        .iter()
        .zip(&drawn)
        .filter(|(msg_id, drawn)| **drawn && answers.contains_key(*msg_id))
        .map(|(msg_id, _)| msg_id)
        .collect();
    let resend: Vec<&String> = unanswered.iter().chain(&sample).copied().collect();
    for (i, msg_id) in resend.iter().enumerate() {
        sinks[i % CONNECTIONS]
            .feed(WsMessage::text(messages[*msg_id].to_string()))
            .await
            .expect("sent");
    }
    for sink in &mut sinks {
        sink.flush().await.expect("flushed");
    }
    let mut awaited: HashSet<&String> = resend.iter().copied().collect();
    let deadline = Instant::now() + WAIT;
    while !awaited.is_empty() {
        let Ok(Some((_, response))) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            panic!(
                "seed {seed:#x}: {} resent messages not answered, e.g. {:?}",
                awaited.len(),
                awaited.iter().take(10).collect::<Vec<_>>()
            );
        };
        let ref_id = response["ref_msg_id"].as_str().unwrap().to_owned();
        awaited.remove(&ref_id);
        record(&mut answers, Phase::Resend, response);
    }

    // Every message answered; all responses to one message the same; 0 is the echo, 50 only
    // for what the dead process had claimed and not answered.
    let lost: Vec<&String> = order
        .iter()
        .filter(|msg_id| !answers.contains_key(*msg_id))
        .collect();
    let mut processed_twice = Vec::new();
    let mut gateway_ids = HashSet::new();
    let mut first_phase = HashMap::new();
    let (mut recovered_50, mut stored_then_resent, mut processed_after_restart) = (0, 0, 0);
    for (msg_id, responses) in &answers {
        let message = messages
            .get(msg_id)
            .unwrap_or_else(|| panic!("a response to a msg_id never sent: {msg_id}"));
        let (phase, first) = &responses[0];
        if responses.iter().any(|(_, other)| other != first) {
            processed_twice.push(msg_id.clone());
        }
        match first["resp_code"].as_u64() {
            Some(0) => assert_eq!(first["content"], message["content"], "{first}"),
            Some(50) => {
                assert!(
                    first["content"].as_str().unwrap().starts_with(RECOVERED),
                    "{first}"
                );
                recovered_50 += 1;
            }
            _ => panic!("unexpected response {first}"),
        }
        assert!(
            gateway_ids.insert(first["msg_id"].as_str().unwrap().to_owned()),
            "one gateway msg_id for two messages: {first}"
        );
        if *phase == Phase::Resend {
            if first["msg_id"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{run1_prefix}-"))
            {
                stored_then_resent += 1;
            } else {
                processed_after_restart += 1;
            }
        }
        first_phase.insert(msg_id.clone(), *phase);
    }
    let count = |phase| first_phase.values().filter(|p| **p == phase).count();
    let outbox_50 = answers
        .values()
        .filter(|responses| {
            responses[0].0 == Phase::Outbox
                && responses[0].1["content"]
                    .as_str()
                    .is_some_and(|c| c.starts_with(RECOVERED))
        })
        .count();
    let status = tokio::task::block_in_place(|| gateway.signal_and_wait("TERM"));
    println!(
        "sigkill: seed={seed:#x} messages={MESSAGES} users={USERS} connections={CONNECTIONS} \
         sent_before_kill={sent_before_kill} answered_before_kill={answered_before_kill} \
         answered_from_outbox={} (frames={outbox_frames}, of which 50_by_recovery={outbox_50}) \
         recovered_logged={recovered_logged} answered_with_50_by_recovery={recovered_50} \
         answered_by_resend={} (stored_before_kill={stored_then_resent}, \
         processed_after_restart={processed_after_restart}) resent={} (unanswered={}, \
         sample_of_answered={}) lost={} processed_twice={} elapsed_ms={}",
        count(Phase::Outbox),
        count(Phase::Resend),
        resend.len(),
        unanswered.len(),
        sample.len(),
        lost.len(),
        processed_twice.len(),
        started.elapsed().as_millis(),
    );
    assert!(lost.is_empty(), "seed {seed:#x}: lost {lost:?}");
    assert!(
        processed_twice.is_empty(),
        "seed {seed:#x}: different responses to one msg_id: {:?}",
        processed_twice
            .iter()
            .take(5)
            .map(|id| &answers[id])
            .collect::<Vec<_>>()
    );
    assert_eq!(count(Phase::BeforeKill), answered_before_kill);
    assert_eq!(
        recovered_50, recovered_logged,
        "every recovered message, and only those, answered with 50"
    );
    assert_eq!(
        outbox_50, recovered_logged,
        "the recovery's 50s arrive through the outbox"
    );
    assert_eq!(
        count(Phase::Outbox),
        outbox_50,
        "the outbox held only the recovery's 50s"
    );
    assert!(status.success(), "SIGTERM after the restart: {status}");
}

/// The gateway's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .map(|kib| kib.trim().parse().expect("a number"))
        .expect("VmRSS in /proc/PID/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_reads_is_bounded_and_does_not_stall_its_pool() {
    const MAX_MESSAGES: u64 = 200_000;
    const FLOOD_FOR: Duration = Duration::from_secs(10);
    const MAX_GROWTH_KIB: u64 = 64 * 1024;
    const PROMPT: Duration = Duration::from_secs(5);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("iagent.toml");
    std::fs::write(
        &config,
        "[limits]\noutbound_queue = 64\nmax_in_flight_per_connection = 32\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let token = create_app(&data, "slow");
    let mut gateway = tokio::task::block_in_place(|| Gateway::start(&data, Some(&config)));
    let pid = gateway.pid();

    let (good, _) = tokio_tungstenite::connect_async(gateway.url(&token))
        .await
        .expect("upgrade accepted");
    let (mut good_sink, mut good_stream) = good.split();
    let mut ask = async |msg_id: &str| -> Duration {
        let asked = Instant::now();
        good_sink
            .send(WsMessage::text(
                private(msg_id, "good-user", "still there?").to_string(),
            ))
            .await
            .expect("sent");
        loop {
            let frame = timeout(PROMPT, good_stream.next())
                .await
                .unwrap_or_else(|_| panic!("no response to {msg_id} within {PROMPT:?}"))
                .expect("open")
                .expect("readable");
            if let WsMessage::Text(text) = frame {
                let response: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(response["ref_msg_id"], msg_id, "{response}");
                assert_eq!(response["resp_code"], 0, "{response}");
                return asked.elapsed();
            }
        }
    };
    ask("warm-up").await;
    let (mut stuck, _) = tokio_tungstenite::connect_async(gateway.url(&token))
        .await
        .expect("upgrade accepted");
    let baseline = rss_kib(pid);

    // The stuck connection: sends ~1 KiB messages as fast as the socket takes them, never reads.
    let sent = Arc::new(AtomicU64::new(0));
    let flood_until = Instant::now() + FLOOD_FOR;
    let flood = tokio::spawn({
        let sent = sent.clone();
        async move {
            let text = "x".repeat(1000);
            for i in 0..MAX_MESSAGES {
                let frame = private(&format!("s{i}"), &format!("s{}", i % 100), &text).to_string();
                match tokio::time::timeout_at(flood_until, stuck.send(WsMessage::text(frame))).await
                {
                    Ok(Ok(())) => sent.fetch_add(1, Ordering::Relaxed),
                    Ok(Err(err)) => panic!("the gateway closed the stuck connection: {err}"),
                    Err(_) => break,
                };
            }
            // Still open, never read, until the test ends.
            stuck
        }
    });

    let mut peak = baseline;
    let mut last_count = 0;
    let mut unchanged_since = Instant::now();
    let mut stalled_at = None;
    let mut probes = Vec::new();
    let mut next_probe = Instant::now();
    while !flood.is_finished() {
        peak = peak.max(rss_kib(pid));
        let count = sent.load(Ordering::Relaxed);
        if count != last_count {
            last_count = count;
            unchanged_since = Instant::now();
        } else if stalled_at.is_none() && unchanged_since.elapsed() >= Duration::from_millis(500) {
            stalled_at = Some(count);
        }
        // While the stuck connection is stuck, the pool's other connection is answered.
        if stalled_at.is_some() && Instant::now() >= next_probe {
            probes.push(ask(&format!("probe-{}", probes.len())).await);
            next_probe = Instant::now() + Duration::from_millis(500);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stuck = flood.await.expect("flood task");
    peak = peak.max(rss_kib(pid));
    let sent = sent.load(Ordering::Relaxed);
    let slowest = probes.iter().max().copied().unwrap_or_default();
    println!(
        "slow consumer: outbound_queue=64 max_in_flight_per_connection=32 message_bytes~1KiB \
         flood_secs={} sent={sent} stalled_after={} rss_baseline_kib={baseline} \
         rss_peak_kib={peak} rss_growth_kib={} probes_answered={} slowest_probe_ms={}",
        FLOOD_FOR.as_secs(),
        stalled_at.map_or("never".to_owned(), |n| n.to_string()),
        peak.saturating_sub(baseline),
        probes.len(),
        slowest.as_millis(),
    );
    assert!(
        stalled_at.is_some(),
        "the gateway kept reading a connection that never reads ({sent} messages taken)"
    );
    assert!(sent < MAX_MESSAGES, "sends never blocked");
    assert!(
        peak.saturating_sub(baseline) < MAX_GROWTH_KIB,
        "RSS grew from {baseline} KiB to {peak} KiB"
    );
    assert!(!probes.is_empty(), "the other connection was probed");
    drop(stuck);
    let status = tokio::task::block_in_place(|| gateway.signal_and_wait("TERM"));
    assert!(status.success(), "SIGTERM with a stuck peer gone: {status}");
}
