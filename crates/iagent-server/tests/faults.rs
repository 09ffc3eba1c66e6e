//! Fault injection against the in-process gateway: connections of an app's pool die between a
//! message and its response, abruptly (the TCP socket is dropped, no close handshake) or with a
//! close handshake, while traffic flows. The backend resends whatever was unanswered on a dead
//! connection over another (or a newly opened) one, as a real pool does.
//!
//! What this proves (`docs/protocol.md`, "Routing, ordering, idempotency"): every message gets a
//! response; every response to one `msg_id` is the same response (same gateway `msg_id`), i.e.
//! the message was processed once, and the agent was called exactly once per `msg_id`; a
//! response whose origin connection is gone is rerouted to another connection of the pool, or,
//! with no connection open, waits in the outbox and is delivered when one opens; responses only
//! ever refer to messages the app sent.
//!
//! The faults are drawn from a seeded xorshift64 generator before any traffic flows, so a run is
//! replayed by its seed: the seed is printed, and `IAGENT_FAULT_SEED=<seed>` replaces it.
//!
//! Not covered here yet: an agent that hangs or errors; every message here is answered by the
//! built-in echo agent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use common::{FRAME_WAIT, TestGateway, private};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The seed of the fault schedule. Replay another with `IAGENT_FAULT_SEED`.
const SEED: u64 = 0x5EED_1A6E_17FA_0017;
const CONNECTIONS: usize = 4;
const USERS: usize = 100;
const MESSAGES: usize = 2000;
/// One message in this many is followed by killing a connection.
const KILL_ONE_IN: u64 = 80;
/// One message in this many is held at the store's gate until its connection is killed.
const HOLD_ONE_IN: u64 = 40;
/// The whole test must finish within this.
const TEST_DEADLINE: Duration = Duration::from_secs(45);

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

    /// True one time in `n`.
    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
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

/// Killing one connection of the pool.
#[derive(Debug, Clone, Copy)]
struct Kill {
    slot: usize,
    /// Dropped without a close handshake (else closed with one).
    abrupt: bool,
    /// How many messages later the backend resends what was unanswered on it. Until then, held
    /// messages released meanwhile are answered with their origin connection gone.
    resend_after: usize,
}

/// What happens at one step of the traffic: one message, and the faults around it.
#[derive(Debug, Clone)]
struct Step {
    msg_id: String,
    user: String,
    slot: usize,
    /// Held at the store's gate until its connection dies (or the end).
    hold: bool,
    /// A connection killed after this message was sent.
    kill: Option<Kill>,
}

/// The fault schedule, drawn from the seed alone (never from timing), so that it replays.
struct Plan {
    steps: Vec<Step>,
    /// Before this step every connection is killed at once: the pool is empty, and responses
    /// made meanwhile go to the outbox.
    blackout: usize,
    blackout_resend_after: usize,
}

impl Plan {
    fn draw(rng: &mut XorShift64) -> Self {
        let blackout = MESSAGES * 3 / 10 + rng.below((MESSAGES * 4 / 10) as u64) as usize;
        let blackout_resend_after = 1 + rng.below(30) as usize;
        // Users with a held message not yet released: a user has at most one, so that a released
        // message is never stuck behind another held one of its conversation.
        let mut held_on: Vec<Vec<usize>> = vec![Vec::new(); CONNECTIONS];
        let mut busy = HashSet::new();
        let mut steps = Vec::with_capacity(MESSAGES);
        for i in 0..MESSAGES {
            if i == blackout {
                busy.clear();
                held_on.iter_mut().for_each(Vec::clear);
            }
            let user = i % USERS;
            let slot = rng.below(CONNECTIONS as u64) as usize;
            // Just before the blackout, hold more, so that the outbox certainly gets used.
            let hold_one_in = if (blackout.saturating_sub(20)..blackout).contains(&i) {
                4
            } else {
                HOLD_ONE_IN
            };
            let mut hold = rng.one_in(hold_one_in) && busy.insert(user);
            if i + 1 == blackout && held_on.iter().all(Vec::is_empty) {
                // The outbox must be used: at least one message is held across the blackout.
                hold = busy.insert(user);
            }
            if hold {
                held_on[slot].push(user);
            }
            let kill = rng.one_in(KILL_ONE_IN).then(|| Kill {
                slot: rng.below(CONNECTIONS as u64) as usize,
                abrupt: rng.below(3) < 2,
                resend_after: rng.below(40) as usize,
            });
            if let Some(kill) = kill {
                for user in held_on[kill.slot].drain(..) {
                    busy.remove(&user);
                }
            }
            steps.push(Step {
                msg_id: format!("u{user}-{}", i / USERS),
                user: format!("u{user}"),
                slot,
                hold,
                kill,
            });
        }
        Self {
            steps,
            blackout,
            blackout_resend_after,
        }
    }
}

type Sink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, WsMessage>;

/// One connection of the backend's pool: the sending half, and a task that forwards every
/// response it reads.
struct Conn {
    id: usize,
    sink: Sink,
    reader: JoinHandle<()>,
}

/// Figures printed at the end.
#[derive(Debug, Default)]
struct Figures {
    killed_abrupt: usize,
    killed_handshake: usize,
    resent: usize,
    resent_after_stall: usize,
    held: usize,
    held_released_orphaned: usize,
    probes: usize,
    responses: usize,
    outbox_at_reconnect: u64,
}

/// The app's backend: a pool of connections, what it sent, and what it got back.
struct Backend<'g> {
    gateway: &'g TestGateway,
    slots: Vec<Option<Conn>>,
    next_conn: usize,
    /// Round-robin cursor for resends.
    next_slot: usize,
    tx: mpsc::UnboundedSender<(usize, Value)>,
    rx: mpsc::UnboundedReceiver<(usize, Value)>,
    /// Every message sent, by `msg_id`.
    messages: BTreeMap<String, Value>,
    /// The connection each message was last sent on.
    last_sent_on: HashMap<String, usize>,
    /// Every response received, by `ref_msg_id`.
    answers: HashMap<String, Vec<Value>>,
    /// Held messages not yet released, with the connection they were sent on.
    held: Vec<(String, usize)>,
    /// Resends due at a step: the messages that were unanswered on a dead connection.
    due: BTreeMap<usize, Vec<String>>,
    figures: Figures,
}

impl<'g> Backend<'g> {
    async fn new(gateway: &'g TestGateway) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut backend = Self {
            gateway,
            slots: (0..CONNECTIONS).map(|_| None).collect(),
            next_conn: 0,
            next_slot: 0,
            tx,
            rx,
            messages: BTreeMap::new(),
            last_sent_on: HashMap::new(),
            answers: HashMap::new(),
            held: Vec::new(),
            due: BTreeMap::new(),
            figures: Figures::default(),
        };
        for slot in 0..CONNECTIONS {
            backend.open(slot).await;
        }
        backend
    }

    async fn open(&mut self, slot: usize) {
        assert!(self.slots[slot].is_none());
        let id = self.next_conn;
        self.next_conn += 1;
        let client = self.gateway.connect().await;
        let (sink, mut stream) = client.ws.split();
        let tx = self.tx.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(frame)) = stream.next().await {
                match frame {
                    WsMessage::Text(text) => {
                        let response: Value =
                            serde_json::from_str(&text).expect("a response is JSON");
                        if tx.send((id, response)).is_err() {
                            return;
                        }
                    }
                    WsMessage::Close(_) => return,
                    _ => {}
                }
            }
        });
        self.slots[slot] = Some(Conn { id, sink, reader });
    }

    /// Kills the connection in `slot`; returns its id.
    async fn kill(&mut self, slot: usize, abrupt: bool) -> usize {
        let Conn {
            id,
            mut sink,
            reader,
        } = self.slots[slot].take().expect("an open connection");
        if abrupt {
            // Both halves dropped: the TCP socket closes with no WebSocket close frame, and
            // whatever the reader had not yet read is lost with it.
            reader.abort();
            reader.await.ok();
            drop(sink);
            self.figures.killed_abrupt += 1;
        } else {
            timeout(FRAME_WAIT, sink.close())
                .await
                .expect("close handshake sent in time")
                .expect("close frame sent");
            timeout(FRAME_WAIT, reader)
                .await
                .expect("the gateway answered the close in time")
                .expect("reader did not panic");
            self.figures.killed_handshake += 1;
        }
        id
    }

    fn open_count(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    async fn send(&mut self, slot: usize, msg_id: &str) {
        let frame = self.messages[msg_id].to_string();
        let conn = self.slots[slot].as_mut().expect("an open connection");
        timeout(FRAME_WAIT, conn.sink.send(WsMessage::text(frame)))
            .await
            .expect("sent in time")
            .expect("the gateway keeps the connection open");
        self.last_sent_on.insert(msg_id.to_owned(), conn.id);
    }

    async fn send_new(&mut self, slot: usize, msg_id: &str, user: &str) {
        let message = private(msg_id, user, &format!("text of {msg_id}"));
        assert!(
            self.messages.insert(msg_id.to_owned(), message).is_none(),
            "msg_id {msg_id} used twice"
        );
        self.send(slot, msg_id).await;
    }

    /// Resends a message on the next open connection, round robin.
    async fn resend(&mut self, msg_id: &str) {
        let slot = loop {
            let slot = self.next_slot % CONNECTIONS;
            self.next_slot += 1;
            if self.slots[slot].is_some() {
                break slot;
            }
        };
        self.send(slot, msg_id).await;
    }

    fn record(&mut self, response: Value) {
        let ref_id = response["ref_msg_id"]
            .as_str()
            .unwrap_or_else(|| panic!("a response without ref_msg_id: {response}"))
            .to_owned();
        assert!(
            self.messages.contains_key(&ref_id),
            "a response to a msg_id this app never sent: {response}"
        );
        self.figures.responses += 1;
        self.answers.entry(ref_id).or_default().push(response);
    }

    /// Takes in every response that has arrived.
    fn drain(&mut self) {
        while let Ok((_, response)) = self.rx.try_recv() {
            self.record(response);
        }
    }

    fn answered(&self, msg_id: &str) -> bool {
        self.answers.contains_key(msg_id)
    }

    /// Waits until `msg_id` has a response.
    async fn wait_answered(&mut self, msg_id: &str) {
        self.drain();
        while !self.answered(msg_id) {
            let (_, response) = timeout(FRAME_WAIT, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no response to {msg_id} in time"))
                .expect("readers alive");
            self.record(response);
        }
    }

    /// Sends a message from a user of its own on `slot` and waits for its response: every
    /// frame sent on that connection before it has then been read by the gateway.
    async fn probe(&mut self, slot: usize) {
        let msg_id = format!("probe-{}", self.figures.probes);
        self.figures.probes += 1;
        let user = msg_id.clone();
        self.send_new(slot, &msg_id, &user).await;
        self.wait_answered(&msg_id).await;
    }

    async fn wait_for_connections(&self) {
        self.gateway
            .wait_for_metric("iagent_connections{app=\"app1\"}", self.open_count() as u64)
            .await;
    }

    /// Releases the held messages that were sent on one of `dead`, now that the gateway knows
    /// those connections are gone, and waits until each was processed: its response is made
    /// with its origin connection gone.
    async fn release_orphans(&mut self, dead: &[usize]) {
        let (orphans, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|(_, conn)| dead.contains(conn));
        self.held = kept;
        for (msg_id, _) in &orphans {
            self.gateway.store.release(msg_id);
        }
        for (msg_id, _) in &orphans {
            let deadline = Instant::now() + FRAME_WAIT;
            while self.gateway.store.completions(msg_id) == 0 {
                assert!(
                    Instant::now() < deadline,
                    "held message {msg_id} not processed after its release"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        self.figures.held_released_orphaned += orphans.len();
    }

    /// Schedules the resend, at step `at`, of what was unanswered on the dead connections.
    fn schedule_resend(&mut self, dead: &[usize], at: usize) {
        self.drain();
        let unanswered: Vec<String> = self
            .last_sent_on
            .iter()
            .filter(|(msg_id, conn)| dead.contains(conn) && !self.answered(msg_id))
            .map(|(msg_id, _)| msg_id.clone())
            .collect();
        self.due.entry(at).or_default().extend(unanswered);
    }

    /// Resends what is due at or before `step` and still unanswered.
    async fn resend_due(&mut self, step: usize) {
        let later = self.due.split_off(&(step + 1));
        let now = std::mem::replace(&mut self.due, later);
        self.drain();
        for msg_id in now.into_values().flatten() {
            if !self.answered(&msg_id) {
                self.resend(&msg_id).await;
                self.figures.resent += 1;
            }
        }
    }

    /// Kills one connection between messages and responses, and recovers as a pool does.
    async fn kill_one(&mut self, step: usize, kill: Kill) {
        if self.held.iter().any(|(_, conn)| {
            self.slots[kill.slot]
                .as_ref()
                .is_some_and(|open| open.id == *conn)
        }) {
            // Make sure the held messages were read before the connection dies, so that they
            // are answered with their origin gone rather than lost on the wire.
            self.probe(kill.slot).await;
        }
        let dead = [self.kill(kill.slot, kill.abrupt).await];
        self.wait_for_connections().await;
        self.release_orphans(&dead).await;
        self.schedule_resend(&dead, step + kill.resend_after);
        self.open(kill.slot).await;
    }

    /// Kills every connection at once; what is answered meanwhile goes to the outbox.
    async fn blackout(&mut self, step: usize, resend_after: usize) {
        for slot in 0..CONNECTIONS {
            self.probe(slot).await;
        }
        let mut dead = Vec::new();
        for slot in 0..CONNECTIONS {
            dead.push(self.kill(slot, true).await);
        }
        self.wait_for_connections().await;
        let orphans = self.held.len() as u64;
        self.release_orphans(&dead).await;
        // Every orphaned response is in the outbox before a connection opens.
        let deadline = Instant::now() + FRAME_WAIT;
        loop {
            let depth = self
                .gateway
                .metric("iagent_outbox_depth{app=\"app1\"}")
                .await;
            if depth >= orphans && self.gateway.metric("iagent_in_flight{app=\"app1\"}").await == 0
            {
                self.figures.outbox_at_reconnect = depth;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "outbox depth stayed at {depth}, expected at least {orphans}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(self.figures.outbox_at_reconnect > 0, "the outbox was used");
        self.schedule_resend(&dead, step + resend_after);
        for slot in 0..CONNECTIONS {
            self.open(slot).await;
        }
    }

    /// After the traffic: resend what is still due, release what is still held, and wait until
    /// every message is answered. A backend whose responses stop coming resends what is still
    /// unanswered (a response can be lost with a connection that died after writing it).
    async fn finish(&mut self) {
        self.resend_due(usize::MAX - 1).await;
        for (msg_id, _) in std::mem::take(&mut self.held) {
            self.gateway.store.release(&msg_id);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.drain();
            let unanswered: Vec<String> = self
                .messages
                .keys()
                .filter(|msg_id| !self.answered(msg_id))
                .cloned()
                .collect();
            if unanswered.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} messages never answered, e.g. {:?}",
                unanswered.len(),
                &unanswered[..unanswered.len().min(10)]
            );
            match timeout(Duration::from_secs(1), self.rx.recv()).await {
                Ok(Some((_, response))) => self.record(response),
                Ok(None) => panic!("readers gone"),
                Err(_) => {
                    // A second without any response: resend what is unanswered.
                    for msg_id in unanswered {
                        self.resend(&msg_id).await;
                        self.figures.resent_after_stall += 1;
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_dying_between_message_and_response_lose_nothing_and_process_nothing_twice() {
    let seed = seed();
    let mut rng = XorShift64::new(seed);
    let plan = Plan::draw(&mut rng);
    println!(
        "faults: seed={seed:#x} (replay with IAGENT_FAULT_SEED={seed:#x}) blackout_at={}",
        plan.blackout
    );
    let gateway = TestGateway::start().await;
    let started = Instant::now();
    let figures = timeout(TEST_DEADLINE, async {
        let mut backend = Backend::new(&gateway).await;
        for (i, step) in plan.steps.iter().enumerate() {
            backend.resend_due(i).await;
            if i == plan.blackout {
                backend.blackout(i, plan.blackout_resend_after).await;
            }
            if step.hold {
                gateway.store.hold(&step.msg_id);
                let conn = backend.slots[step.slot].as_ref().unwrap().id;
                backend.held.push((step.msg_id.clone(), conn));
                backend.figures.held += 1;
            }
            backend.send_new(step.slot, &step.msg_id, &step.user).await;
            backend.drain();
            if let Some(kill) = step.kill {
                backend.kill_one(i, kill).await;
            }
        }
        backend.finish().await;

        // Every response names a message of this app (checked on receipt); every message has a
        // response, and all responses to one message are the same one: processed once.
        let mut gateway_ids = HashSet::new();
        let mut repeated = 0;
        for (msg_id, message) in &backend.messages {
            let answers = &backend.answers[msg_id];
            let first = &answers[0];
            assert_eq!(first["resp_code"], 0, "{first}");
            assert_eq!(first["content"], message["content"], "{first}");
            assert_eq!(first["receiver_id"], message["sender_id"], "{first}");
            for other in &answers[1..] {
                assert_eq!(
                    other, first,
                    "two different responses to {msg_id}: processed twice"
                );
            }
            repeated += answers.len() - 1;
            assert!(
                gateway_ids.insert(first["msg_id"].as_str().unwrap().to_owned()),
                "two messages answered by one gateway msg_id: {first}"
            );
        }
        let lost = backend
            .messages
            .keys()
            .filter(|msg_id| !backend.answered(msg_id))
            .count();
        let processed_twice = backend
            .messages
            .keys()
            .filter(|msg_id| gateway.store.completions(msg_id) > 1)
            .count();
        let never_processed: Vec<_> = backend
            .messages
            .keys()
            .filter(|msg_id| gateway.store.completions(msg_id) == 0)
            .collect();
        assert!(
            never_processed.is_empty(),
            "answered without an agent call: {never_processed:?}"
        );
        let total = backend.messages.len() as u64;
        let rerouted = gateway.metric("iagent_rerouted_total{app=\"app1\"}").await;
        let duplicates = gateway
            .metric("iagent_duplicates_total{app=\"app1\"}")
            .await;
        let made = gateway
            .metric("iagent_responses_total{app=\"app1\",resp_code=\"0\"}")
            .await;
        gateway
            .wait_for_metric("iagent_outbox_depth{app=\"app1\"}", 0)
            .await;
        let figures = backend.figures;
        println!(
            "faults: seed={seed:#x} messages={total} (of which probes={}) connections={CONNECTIONS} \
             users={USERS} connections_killed={} (abrupt={} handshake={}) blackouts=1 \
             held={} held_answered_with_origin_gone={} outbox_at_reconnect={} resent={} \
             resent_after_stall={} responses_received={} repeated_responses={repeated} \
             gateway_rerouted={rerouted} gateway_duplicates={duplicates} lost={lost} \
             processed_twice={processed_twice} elapsed_ms={}",
            figures.probes,
            figures.killed_abrupt + figures.killed_handshake,
            figures.killed_abrupt,
            figures.killed_handshake,
            figures.held,
            figures.held_released_orphaned,
            figures.outbox_at_reconnect,
            figures.resent,
            figures.resent_after_stall,
            figures.responses,
            started.elapsed().as_millis(),
        );
        assert_eq!(lost, 0, "messages never answered");
        assert_eq!(processed_twice, 0, "the agent was called twice for a message");
        assert_eq!(made, total, "one response made per message");
        assert!(
            rerouted >= figures.held_released_orphaned as u64,
            "responses whose origin was gone were rerouted"
        );
        figures
    })
    .await
    .unwrap_or_else(|_| panic!("seed {seed:#x}: the test did not finish in {TEST_DEADLINE:?}"));
    assert!(figures.killed_abrupt > 0 && figures.killed_handshake > 0);
    gateway.stop().await;
}
