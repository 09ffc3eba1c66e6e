//! One raw connection of the load: a writer that sends messages as its pace allows, and a
//! reader that matches each received frame to the message it answers and records the latency.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::Semaphore;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::Counters;
use super::frames::{Frames, Replies, answered};
use super::schedule::Tick;

/// A WebSocket of the load generator.
pub(super) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens one connection to `endpoint`, with Nagle's algorithm off as on the servers' side:
/// otherwise a small frame can wait for the acknowledgement of the previous one, which adds
/// the TCP stack's delays to the latencies measured.
pub(super) async fn open(endpoint: &str) -> anyhow::Result<Socket> {
    let (socket, _) = tokio_tungstenite::connect_async_with_config(endpoint, None, true)
        .await
        .context("cannot open a connection")?;
    Ok(socket)
}

/// How long the reader waits for the rest of the responses once nothing more is to be sent and
/// nothing arrives: past it the messages still waiting count as unanswered.
const SILENCE: Duration = Duration::from_secs(5);

/// What decides when the next message goes out.
pub(super) enum Pace {
    /// Closed loop: `window` messages in flight; each response lets the next one go. Stops when
    /// `Counters::stopped` is set, or after `limit` messages.
    Closed { window: usize, limit: Option<u64> },
    /// Open loop: each message when the schedule says, whatever the responses do. Stops when
    /// the schedule ends.
    Open(UnboundedReceiver<Tick>),
}

/// What one connection measured.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    /// Latency of each answered measured message, in µs.
    pub(super) latencies_us: Vec<u32>,
    /// Open loop: how late each measured message was written after its due time, in µs.
    pub(super) lags_us: Vec<u32>,
    /// Measured messages sent.
    pub(super) sent: u64,
    /// Measured round trips that were group messages.
    pub(super) group: u64,
    /// Messages (measured or not) never answered.
    pub(super) unanswered: u64,
    /// With a latency log: each answered measured message, as (its number on the connection,
    /// when its latency is measured from, when its response was read).
    pub(super) log: Vec<(u64, Instant, Instant)>,
}

/// A message written and not yet answered.
struct Waiting {
    since: Instant,
    measured: bool,
    group: bool,
}

/// Drives `socket` as connection number `connection` until its pace ends and every response is
/// in (or [`SILENCE`] passes), and hands the socket back with what it measured, each measured
/// message's times too if `log`.
pub(super) async fn drive(
    connection: usize,
    socket: Socket,
    frames: Arc<Frames>,
    replies: Replies,
    pace: Pace,
    counters: Arc<Counters>,
    log: bool,
) -> anyhow::Result<(Outcome, Option<Socket>)> {
    let (sink, mut stream) = socket.split();
    let waiting: Arc<Mutex<HashMap<u64, Waiting>>> = Arc::default();
    let writer = Writer {
        connection,
        sink,
        frames: frames.clone(),
        waiting: waiting.clone(),
        counters: counters.clone(),
        sent: 0,
        lags_us: Vec::new(),
    };
    // The closed loop's window: the reader makes room in it with each response.
    let (writer, window) = match pace {
        Pace::Closed { window, limit } => {
            let window = Arc::new(Semaphore::new(window));
            (
                tokio::spawn(writer.closed(window.clone(), limit)),
                Some(window),
            )
        }
        Pace::Open(ticks) => (tokio::spawn(writer.open(ticks)), None),
    };

    let mut outcome = Outcome::default();
    let mut silent_since = Instant::now();
    // Wakes the reader now and then, so that the end of the writer is noticed soon after it
    // happens. One timer for the whole run, not one per frame: the generator must stay cheaper
    // than the servers it measures.
    let mut check = tokio::time::interval(Duration::from_millis(100));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let writing = !writer.is_finished();
        if !writing && lock(&waiting).is_empty() {
            break;
        }
        if !writing && silent_since.elapsed() >= SILENCE {
            break;
        }
        let frame = tokio::select! {
            frame = stream.next() => frame,
            _ = check.tick() => continue,
        };
        let Some(frame) = frame else {
            break;
        };
        let frame = frame.context("the connection failed")?;
        let WsMessage::Text(text) = frame else {
            continue;
        };
        let Some((seq, ok)) = answered(&frames, replies, &text) else {
            continue;
        };
        let Some(message) = lock(&waiting).remove(&seq) else {
            continue;
        };
        silent_since = Instant::now();
        if let Some(window) = &window {
            window.add_permits(1);
        }
        counters.replies.fetch_add(1, Ordering::Relaxed);
        if !ok {
            counters.not_ok.fetch_add(1, Ordering::Relaxed);
        }
        if message.measured {
            let read = Instant::now();
            counters.answered.fetch_add(1, Ordering::Relaxed);
            outcome.latencies_us.push(micros(read - message.since));
            if log {
                outcome.log.push((seq, message.since, read));
            }
            outcome.group += u64::from(message.group);
        }
    }
    if let Some(window) = &window {
        // Wakes a writer still waiting for room, so that it ends.
        window.close();
    }
    let sink = match tokio::time::timeout(SILENCE, writer).await {
        Ok(joined) => {
            let written = joined.context("the writer failed")?;
            outcome.sent = written.sent;
            outcome.lags_us = written.lags_us;
            written.sink
        }
        // A writer stuck on a server that stopped reading is dropped with its socket.
        Err(_) => None,
    };
    outcome.unanswered = lock(&waiting).len() as u64;
    Ok((outcome, sink.and_then(|sink| sink.reunite(stream).ok())))
}

type Sink = futures_util::stream::SplitSink<Socket, WsMessage>;

/// The sending half of a connection and what it keeps while sending.
struct Writer {
    connection: usize,
    sink: Sink,
    frames: Arc<Frames>,
    waiting: Arc<Mutex<HashMap<u64, Waiting>>>,
    counters: Arc<Counters>,
    sent: u64,
    lags_us: Vec<u32>,
}

/// What a writer leaves when it ends: its sink, unless it failed.
struct Written {
    sink: Option<Sink>,
    sent: u64,
    lags_us: Vec<u32>,
}

impl Writer {
    /// Closed loop: a message whenever there is room in the window. Messages that find room
    /// together are written together and flushed once, as a real pool does under load.
    async fn closed(mut self, window: Arc<Semaphore>, limit: Option<u64>) -> Written {
        let mut seq = 0;
        let outcome: anyhow::Result<()> = async {
            while limit.is_none_or(|limit| seq < limit)
                && !self.counters.stopped.load(Ordering::Relaxed)
            {
                let Ok(permit) = window.acquire().await else {
                    break;
                };
                permit.forget();
                if self.counters.stopped.load(Ordering::Relaxed) {
                    break;
                }
                loop {
                    let measured = self.counters.measuring.load(Ordering::Relaxed);
                    self.feed(seq, Instant::now(), measured).await?;
                    seq += 1;
                    if limit.is_some_and(|limit| seq >= limit) {
                        break;
                    }
                    match window.try_acquire() {
                        Ok(permit) => permit.forget(),
                        Err(_) => break,
                    }
                }
                self.sink.flush().await?;
            }
            Ok(())
        }
        .await;
        self.end(outcome)
    }

    /// Open loop: each message the schedule hands over; those already due when the writer
    /// wakes are written together and flushed once.
    async fn open(mut self, mut ticks: UnboundedReceiver<Tick>) -> Written {
        let outcome: anyhow::Result<()> = async {
            while let Some(tick) = ticks.recv().await {
                self.tick(tick).await?;
                while let Ok(tick) = ticks.try_recv() {
                    self.tick(tick).await?;
                }
                self.sink.flush().await?;
            }
            Ok(())
        }
        .await;
        self.end(outcome)
    }

    async fn tick(&mut self, tick: Tick) -> anyhow::Result<()> {
        if tick.measured {
            self.lags_us.push(micros(tick.due.elapsed()));
        }
        self.feed(tick.seq, tick.due, tick.measured).await
    }

    /// Queues message `seq` (its latency counted from `since`) without flushing.
    async fn feed(&mut self, seq: u64, since: Instant, measured: bool) -> anyhow::Result<()> {
        let frame = self.frames.frame(self.connection, seq);
        let group = self
            .frames
            .is_group(self.frames.index(self.connection, seq));
        lock(&self.waiting).insert(
            seq,
            Waiting {
                since,
                measured,
                group,
            },
        );
        self.sent += u64::from(measured);
        self.sink
            .feed(WsMessage::text(frame))
            .await
            .context("cannot send")
    }

    fn end(self, outcome: anyhow::Result<()>) -> Written {
        // The sink stays open until every response is in: closing it earlier would make the
        // gateway route the rest to other connections. A failed sink is of no further use.
        Written {
            sink: outcome.is_ok().then_some(self.sink),
            sent: self.sent,
            lags_us: self.lags_us,
        }
    }
}

fn micros(elapsed: Duration) -> u32 {
    u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
