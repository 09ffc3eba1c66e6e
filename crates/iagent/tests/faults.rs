//! Fault injection against the real binary, run as a child process.
//!
//! - SIGKILL under load: a pool of 4 connections floods the gateway; after a seeded number of
//!   responses the process is killed with SIGKILL and restarted on the same data directory. The
//!   backend reconnects, takes what arrives unsolicited (the outbox: 50 for every message the dead
//!   process had claimed and not answered), then resends every message still unanswered plus a
//!   seeded sample of answered ones. This proves (`docs/protocol.md`, "Routing, ordering,
//!   idempotency" and "Liveness, closing, restarts") that nothing is lost across a crash and
//!   nothing is processed twice: every message ends with a response, and every response to one
//!   `msg_id`, before and after the crash, is the same one. Run twice:
//!   - through the built-in `echo` agent, which is repeatable: its messages are asked first and
//!     recorded with their answer in one write, so a crash leaves nothing claimed and unanswered
//!     and the outbox after the restart is (mostly) empty;
//!   - through a `webhook` agent, whose messages are claimed before it is called: a stand-in
//!     webhook in the test answers as many calls as there are responses before the kill, each
//!     after 20 to 50 ms, and holds every later call until the kill, so the kill comes with
//!     messages claimed and at the webhook. Each of those is answered with 50 from the outbox
//!     after the restart, and the webhook is called at most once per `msg_id`, across the crash
//!     and the resends.
//! - A slow consumer: a connection that sends as fast as it can and never reads. The gateway
//!   stops reading it instead of buffering (its memory stays bounded), and the app's other
//!   connection is still answered promptly meanwhile.
//!
//! Faults are drawn from a seeded xorshift64 generator; the seed is printed, and
//! `IAGENT_FAULT_SEED=<seed>` replays another one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message as WsMessage;

mod common;
#[path = "../../iagent-agent/src/stand_in.rs"]
mod stand_in;

use common::{BIN, Lines, WAIT};
use stand_in::{Answer, Recorded, StandIn};

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

/// Runs `iagent ARGS --data DATA`; returns what it printed, trimmed.
fn iagent(data: &Path, args: &[&str]) -> String {
    let output = Command::new(BIN)
        .args(args)
        .arg("--data")
        .arg(data)
        .env("IAGENT_LOG", "warn")
        .output()
        .expect("iagent runs");
    assert!(
        output.status.success(),
        "iagent {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("UTF-8")
        .trim()
        .to_owned()
}

/// Creates an app in `data` with `iagent app create`; returns its token.
fn create_app(data: &Path, name: &str) -> String {
    iagent(data, &["app", "create", name])
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

/// The app the SIGKILL scenario loads.
const LOAD_APP: &str = "load";
/// The SIGKILL scenario's pool, users and messages.
const CONNECTIONS: usize = 4;
const USERS: usize = 300;
const MESSAGES: usize = 3000;

/// The `msg_id` of the scenario's message number `i`: users interleaved, so that many
/// conversations are in flight on every connection.
fn load_msg_id(i: usize) -> String {
    format!("u{}-{}", i % USERS, i / USERS)
}

/// When a message got its first response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    BeforeKill,
    Outbox,
    Resend,
}

/// Every response read, by the `msg_id` it answers, in the order read, with when it came.
type Answers = HashMap<String, Vec<(Phase, Value)>>;

fn record(answers: &mut Answers, phase: Phase, response: Value) {
    let ref_id = response["ref_msg_id"]
        .as_str()
        .unwrap_or_else(|| panic!("a response without ref_msg_id: {response}"))
        .to_owned();
    answers.entry(ref_id).or_default().push((phase, response));
}

/// The seeded choices of one SIGKILL run.
struct Plan {
    seed: u64,
    rng: XorShift64,
    /// How many responses are read before the kill.
    kill_after: usize,
}

impl Plan {
    /// Draws the kill from the seed, and prints both under `label`.
    fn new(label: &str) -> Self {
        let seed = seed();
        let mut rng = XorShift64::new(seed);
        let kill_after = MESSAGES / 5 + rng.below(MESSAGES as u64 / 2) as usize;
        println!(
            "{label}: seed={seed:#x} (replay with IAGENT_FAULT_SEED={seed:#x}) kill_after_responses={kill_after}"
        );
        Self {
            seed,
            rng,
            kill_after,
        }
    }
}

/// What one SIGKILL run saw: every response, and the figures it prints.
struct Run {
    seed: u64,
    answers: Answers,
    sent_before_kill: u64,
    answered_before_kill: usize,
    outbox_frames: usize,
    /// Outbox frames that are the recovery's 50s.
    outbox_50: usize,
    /// What the restarted gateway logged it recovered.
    recovered_logged: usize,
    /// Messages whose first response is the recovery's 50.
    recovered_50: usize,
    /// Messages first answered after a resend whose response the dead process had stored.
    stored_then_resent: usize,
    /// Messages first answered after a resend that the restarted process processed.
    processed_after_restart: usize,
    resent: usize,
    unanswered: usize,
    sample_of_answered: usize,
    lost: Vec<String>,
    /// Messages with two different responses.
    processed_twice: Vec<String>,
    /// How the restarted gateway ended on SIGTERM.
    status: std::process::ExitStatus,
    elapsed: Duration,
}

impl Run {
    /// Messages whose first response came in `phase`.
    fn first_answered(&self, phase: Phase) -> usize {
        self.answers
            .values()
            .filter(|responses| responses[0].0 == phase)
            .count()
    }

    /// The first response to `msg_id`.
    fn first_response(&self, msg_id: &str) -> &(Phase, Value) {
        &self.answers[msg_id][0]
    }

    fn figures(&self) -> String {
        format!(
            "seed={:#x} messages={MESSAGES} users={USERS} connections={CONNECTIONS} \
             sent_before_kill={} answered_before_kill={} answered_from_outbox={} (frames={}, \
             of which 50_by_recovery={}) recovered_logged={} answered_with_50_by_recovery={} \
             answered_by_resend={} (stored_before_kill={}, processed_after_restart={}) \
             resent={} (unanswered={}, sample_of_answered={}) lost={} processed_twice={} \
             elapsed_ms={}",
            self.seed,
            self.sent_before_kill,
            self.answered_before_kill,
            self.first_answered(Phase::Outbox),
            self.outbox_frames,
            self.outbox_50,
            self.recovered_logged,
            self.recovered_50,
            self.first_answered(Phase::Resend),
            self.stored_then_resent,
            self.processed_after_restart,
            self.resent,
            self.unanswered,
            self.sample_of_answered,
            self.lost.len(),
            self.processed_twice.len(),
            self.elapsed.as_millis(),
        )
    }

    /// What holds whatever the agent: nothing lost, one response per message, the recovery's
    /// 50s exactly for what the dead process had claimed and not answered, a clean stop.
    fn check(&self) {
        let seed = self.seed;
        assert!(self.lost.is_empty(), "seed {seed:#x}: lost {:?}", self.lost);
        assert!(
            self.processed_twice.is_empty(),
            "seed {seed:#x}: different responses to one msg_id: {:?}",
            self.processed_twice
                .iter()
                .take(5)
                .map(|id| &self.answers[id])
                .collect::<Vec<_>>()
        );
        assert_eq!(
            self.first_answered(Phase::BeforeKill),
            self.answered_before_kill
        );
        assert_eq!(
            self.recovered_50, self.recovered_logged,
            "every recovered message, and only those, answered with 50"
        );
        assert_eq!(
            self.outbox_50, self.recovered_logged,
            "the recovery's 50s arrive through the outbox"
        );
        assert_eq!(
            self.first_answered(Phase::Outbox),
            self.outbox_50,
            "the outbox held only the recovery's 50s"
        );
        assert_eq!(
            self.outbox_frames, self.outbox_50,
            "no outbox entry was delivered twice"
        );
        assert!(
            self.status.success(),
            "SIGTERM after the restart: {}",
            self.status
        );
    }
}

/// The SIGKILL scenario, on the app [`LOAD_APP`] of `data` with token `token`, answered by the
/// app's default agent: `reply(text)` is what that agent answers a message with text `text`
/// (resp_code 0).
///
/// A pool floods the gateway; once `plan.kill_after` responses are read and `before_kill` is
/// done, the process is SIGKILLed and `after_kill` called. It is restarted on the same data; the
/// backend reconnects, takes what arrives unsolicited (the outbox), then resends every message
/// still unanswered plus a seeded sample of answered ones, and the gateway is stopped with
/// SIGTERM. Panics on a response that is neither `reply` nor the recovery's 50; the rest is
/// for [`Run::check`] and the caller.
async fn sigkill_under_load(
    plan: Plan,
    data: &Path,
    token: &str,
    reply: impl Fn(&str) -> String,
    before_kill: impl Future<Output = ()>,
    after_kill: impl FnOnce(),
) -> Run {
    let Plan {
        seed,
        mut rng,
        kill_after,
    } = plan;
    let started = Instant::now();
    let mut gateway = tokio::task::block_in_place(|| Gateway::start(data, None));
    let order: Vec<String> = (0..MESSAGES).map(load_msg_id).collect();
    let messages: BTreeMap<String, Value> = order
        .iter()
        .map(|msg_id| {
            let user = msg_id.split('-').next().unwrap();
            let message = private(msg_id, user, &format!("load {msg_id}"));
            (msg_id.clone(), message)
        })
        .collect();
    let mut answers = Answers::new();

    // Run 1: flood, then SIGKILL after `kill_after` responses.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (sinks, readers) = open_pool(&gateway, token, CONNECTIONS, &tx).await;
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
    before_kill.await;
    let status = tokio::task::block_in_place(|| gateway.signal_and_wait("KILL"));
    assert!(!status.success(), "killed: {status}");
    let sent_before_kill = sent.load(Ordering::Relaxed);
    after_kill();
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
    let run1_prefix = answers
        .values()
        .next()
        .map(|responses| {
            let id = responses[0].1["msg_id"].as_str().unwrap();
            id.split('-').next().unwrap().to_owned()
        })
        .expect("responses before the kill");

    // Run 2: restart on the same data; the outbox first.
    let mut gateway = tokio::task::block_in_place(|| Gateway::start(data, None));
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
    let (mut sinks, _readers) = open_pool(&gateway, token, CONNECTIONS, &tx).await;
    drop(tx);
    let deadline = Instant::now() + WAIT;
    let outbox_depth = format!("iagent_outbox_depth{{app=\"{LOAD_APP}\"}}");
    while gateway.metric(&outbox_depth).await > 0 {
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

    // Every message answered; all responses to one message the same; 0 is the agent's reply,
    // 50 only for what the dead process had claimed and not answered.
    let lost: Vec<String> = order
        .iter()
        .filter(|msg_id| !answers.contains_key(*msg_id))
        .cloned()
        .collect();
    let mut processed_twice = Vec::new();
    let mut gateway_ids = HashSet::new();
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
            Some(0) => assert_eq!(
                first["content"],
                reply(message["content"].as_str().unwrap()),
                "{first}"
            ),
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
    }
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
    Run {
        seed,
        answers,
        sent_before_kill,
        answered_before_kill,
        outbox_frames,
        outbox_50,
        recovered_logged,
        recovered_50,
        stored_then_resent,
        processed_after_restart,
        resent: resend.len(),
        unanswered: unanswered.len(),
        sample_of_answered: sample.len(),
        lost,
        processed_twice,
        status,
        elapsed: started.elapsed(),
    }
}

/// Through the built-in `echo` agent, which is repeatable: its messages are asked first and
/// recorded with their answer in one write, so a crash leaves nothing claimed and unanswered
/// and the recovery's 50s are rare (none, mostly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_nothing_and_processes_nothing_twice() {
    let plan = Plan::new("sigkill");
    let dir = tempfile::tempdir().unwrap();
    let token = create_app(dir.path(), LOAD_APP);
    let run = sigkill_under_load(plan, dir.path(), &token, str::to_owned, async {}, || {}).await;
    println!("sigkill: {}", run.figures());
    run.check();
}

/// How long the stand-in webhook takes over a call it answers, drawn per call: long enough
/// that many messages are claimed and at their agent at once.
const WEBHOOK_DELAY_MS: (u64, u64) = (20, 50);
/// How many calls the stand-in webhook is holding, at least, when the gateway is killed.
const HELD_AT_KILL: usize = 32;

/// What the stand-in webhook answers a message with text `text`.
fn hooked(text: &str) -> String {
    format!("hooked: {text}")
}

/// A stand-in webhook that answers its first `answer_first` calls after a short delay, then
/// holds every call, unanswered, until released; after the release it answers again.
struct HoldingWebhook {
    stand_in: StandIn,
    /// The `msg_id`s of the calls held so far.
    held: watch::Receiver<Vec<String>>,
    release: watch::Sender<bool>,
}

impl HoldingWebhook {
    async fn start(seed: u64, answer_first: usize) -> Self {
        // A generator of its own, so that the plan's draws are those of the echo run.
        let mut draws = XorShift64::new(seed.rotate_left(32));
        let (low, high) = WEBHOOK_DELAY_MS;
        let delays: Vec<u64> = (0..MESSAGES)
            .map(|_| low + draws.below(high - low + 1))
            .collect();
        let (held_tx, held) = watch::channel(Vec::new());
        let (release, released) = watch::channel(false);
        let stand_in = StandIn::start(move |request: &Recorded, n| {
            let body = request.json();
            let reply = Answer::json(
                200,
                json!({
                    "content_type": 1,
                    "content": hooked(body["message"]["content"].as_str().unwrap_or_default()),
                }),
            );
            if n < answer_first || *released.borrow() {
                let delay = Duration::from_millis(delays[n % delays.len()]);
                return Answer::after(tokio::time::sleep(delay), reply);
            }
            let msg_id = request.header("X-Iagent-Msg-Id").unwrap_or_default();
            held_tx.send_modify(|held| held.push(msg_id.to_owned()));
            let mut released = released.clone();
            Answer::after(
                async move {
                    released.wait_for(|released| *released).await.ok();
                },
                reply,
            )
        })
        .await;
        Self {
            stand_in,
            held,
            release,
        }
    }

    /// How many times each `msg_id` was called, by its `X-Iagent-Msg-Id`.
    fn calls(&self) -> HashMap<String, usize> {
        let mut calls = HashMap::new();
        for request in self.stand_in.requests() {
            let msg_id = request.header("X-Iagent-Msg-Id").expect("X-Iagent-Msg-Id");
            assert_eq!(
                request.json()["message"]["msg_id"],
                msg_id,
                "X-Iagent-Msg-Id"
            );
            *calls.entry(msg_id.to_owned()).or_default() += 1;
        }
        calls
    }
}

/// Through a `webhook` agent, which is not repeatable: its messages are claimed before it is
/// called. The stand-in webhook answers the first `kill_after` calls and holds the later ones,
/// so at the kill at least [`HELD_AT_KILL`] messages are claimed and at the webhook: the restart
/// must answer each of them with 50 from the outbox, and nothing, resends included, may reach
/// the webhook twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_through_a_webhook_recovers_claimed_messages_and_calls_none_twice() {
    let plan = Plan::new("sigkill webhook");
    let kill_after = plan.kill_after;
    let webhook = HoldingWebhook::start(plan.seed, kill_after).await;
    let dir = tempfile::tempdir().unwrap();
    let token = create_app(dir.path(), LOAD_APP);
    let config = json!({
        "url": webhook.stand_in.url, "secret": "faults-secret", "history": 0,
    });
    iagent(
        dir.path(),
        &[
            "agent",
            "add",
            LOAD_APP,
            "hook",
            "--kind",
            "webhook",
            "--config",
            &config.to_string(),
            "--default",
        ],
    );
    let mut holding = webhook.held.clone();
    let run = sigkill_under_load(
        plan,
        dir.path(),
        &token,
        hooked,
        async move {
            timeout(WAIT, holding.wait_for(|held| held.len() >= HELD_AT_KILL))
                .await
                .expect("the webhook is held up")
                .expect("the stand-in runs");
        },
        || {
            webhook.release.send_replace(true);
        },
    )
    .await;

    let held = webhook.held.borrow().clone();
    let calls = webhook.calls();
    let called_twice: Vec<(&String, &usize)> =
        calls.iter().filter(|(_, calls)| **calls > 1).collect();
    let load_calls: usize = (0..MESSAGES)
        .filter_map(|i| calls.get(&load_msg_id(i)))
        .sum();
    let answered_with_0 = (0..MESSAGES)
        .filter(|&i| {
            run.answers
                .get(&load_msg_id(i))
                .is_some_and(|responses| responses[0].1["resp_code"] == 0)
        })
        .count();
    let all_calls: usize = calls.values().sum();
    println!(
        "sigkill webhook: {} webhook_calls={} (messages={load_calls}: replied={answered_with_0}, \
         held_at_kill={}; markers={}) webhook_called_twice={} recovered_before_the_call={}",
        run.figures(),
        all_calls,
        held.len(),
        all_calls - load_calls,
        called_twice.len(),
        run.recovered_50.saturating_sub(held.len()),
    );
    run.check();
    assert!(
        called_twice.is_empty(),
        "seed {:#x}: the webhook was called twice for {called_twice:?}",
        run.seed
    );
    assert_eq!(
        run.answered_before_kill, kill_after,
        "only the calls answered before the kill were answered"
    );
    assert!(held.len() >= HELD_AT_KILL, "{} calls held", held.len());
    for msg_id in &held {
        let (phase, response) = run.first_response(msg_id);
        assert_eq!(*phase, Phase::Outbox, "{msg_id}: {response}");
        assert_eq!(response["resp_code"], 50, "{msg_id}: {response}");
    }
    assert!(run.recovered_50 >= held.len());
    assert_eq!(
        load_calls,
        answered_with_0 + held.len(),
        "the webhook made every reply, and was called otherwise only for the held calls"
    );
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
    assert!(
        status.success(),
        "SIGTERM with a stuck peer gone: {status}; the gateway's log:\n{}",
        gateway.log.text()
    );
}
