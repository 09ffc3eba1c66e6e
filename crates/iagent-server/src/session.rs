//! One WebSocket connection of an app's pool: a reader that validates frames and hands messages
//! on, and a writer that owns the socket's sending half and drains the connection's bounded
//! queue of outgoing frames.
//!
//! When a connection ends for any reason, it leaves the pool first (nothing new is routed to
//! it), then every frame still queued for it is routed again, so a dropped connection loses no
//! response.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket};
use futures_util::future::BoxFuture;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use iagent_protocol::{Message, Rejection, RespCode, Violation, parse_inbound};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{MissedTickBehavior, interval, timeout};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::apps::{Admission, AppState, Begin, ConnId, InFlightLimits, PoolMember};
use crate::conversation::{self, ConversationKey, Job};
use crate::gateway::Gateway;
use crate::{delivery, files};

/// WebSocket close code: the gateway is restarting; reconnect (RFC 6455 registry).
pub(crate) const CLOSE_RESTART: u16 = 1012;
/// WebSocket close code: a message was larger than the limit.
pub(crate) const CLOSE_TOO_BIG: u16 = 1009;
/// WebSocket close code: a text frame was not valid UTF-8.
pub(crate) const CLOSE_INVALID_DATA: u16 = 1007;

/// Outbox acknowledgements collected before they are removed from the store in one write.
const ACK_BATCH: usize = 64;

/// A frame waiting to be written to a connection.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// A response (or any message) to the app.
    Response(Utf8Bytes),
    /// An outbox entry: removed from the outbox once written.
    Outboxed { id: i64, frame: Utf8Bytes },
    /// A liveness probe.
    Ping,
    /// The last frame: closes the connection.
    Close(u16, &'static str),
}

/// How the reading side of a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadEnd {
    /// The peer closed the connection, or it broke.
    PeerGone,
    /// The peer stopped answering pings.
    Dead,
    /// The peer broke the protocol; the connection is closed with this code.
    Abuse(u16, &'static str),
    /// The gateway is shutting down.
    Stopping,
    /// The writing side ended first.
    WriterGone,
}

struct Session {
    gateway: Arc<Gateway>,
    app: Arc<AppState>,
    id: ConnId,
    /// This connection's queue of outgoing frames.
    frames: mpsc::Sender<Outbound>,
    /// Places in the per-connection in-flight limit.
    permits: Arc<Semaphore>,
    /// Cancelled when the connection is finished: both sides stop.
    gone: CancellationToken,
}

/// Serves one upgraded connection until it ends, then reroutes what was queued for it. A
/// `shared` connection takes the pool's traffic; a direct one only its own responses.
pub(crate) async fn run(
    gateway: Arc<Gateway>,
    app: Arc<AppState>,
    admission: Admission,
    socket: WebSocket,
    shared: bool,
) {
    let id = gateway.next_connection.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("conn", id, app = %app.name);
    async move {
        let limits = &gateway.config.limits;
        let (frames, mut queue) = mpsc::channel(limits.outbound_queue);
        let session = Session {
            permits: Arc::new(Semaphore::new(limits.max_in_flight_per_connection)),
            gateway: gateway.clone(),
            app: app.clone(),
            id,
            frames,
            gone: CancellationToken::new(),
        };
        let (sink, mut stream) = socket.split();
        app.join(PoolMember {
            id,
            frames: session.frames.clone(),
            shared,
        });
        tracing::info!(shared, "connection opened");
        if shared {
            delivery::spawn_drain(&gateway, &app);
        }

        let reading = async {
            let end = session.read(&mut stream).await;
            session.finish_reading(end).await;
            end
        };
        let (end, unwritten) = tokio::join!(reading, session.write(sink, &mut queue));

        app.leave(id);
        // The writer closed the queue as it stopped; what was in it still comes out.
        let mut leftovers: Vec<Outbound> = unwritten.into_iter().collect();
        while let Ok(item) = queue.try_recv() {
            leftovers.push(item);
        }
        session.reroute(leftovers).await;
        drop(admission);
        tracing::info!(end = ?end, "connection closed");
    }
    .instrument(span)
    .await;
}

impl Session {
    async fn read(&self, stream: &mut SplitStream<WebSocket>) -> ReadEnd {
        let timeouts = &self.gateway.config.timeouts;
        let mut pings = interval(timeouts.ping_interval());
        pings.set_missed_tick_behavior(MissedTickBehavior::Delay);
        pings.tick().await;
        let mut last_heard = Instant::now();
        let mut held = None;
        // Made once and polled again whenever the reader waits: a cancellation future made anew
        // for each frame put itself in its token's list of waiters, under the list's lock, and
        // took itself out again when the frame won the race (twice a message for the two tokens).
        let stopping = self.gateway.stopping.cancelled();
        let gone = self.gone.cancelled();
        tokio::pin!(stopping, gone);
        loop {
            // Back-pressure: a connection with all its permits in use is not read until one of
            // its messages is answered.
            let permit = match held.take() {
                Some(permit) => permit,
                None => match self.permits.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => {
                        let permit = tokio::select! {
                            biased;
                            () = &mut stopping => return ReadEnd::Stopping,
                            () = &mut gone => return ReadEnd::WriterGone,
                            permit = self.permits.clone().acquire_owned() => match permit {
                                Ok(permit) => permit,
                                Err(_) => return ReadEnd::WriterGone,
                            },
                        };
                        // The wait was the gateway's, not the peer's silence: the peer's pongs
                        // were waiting unread meanwhile.
                        last_heard = last_heard.max(Instant::now());
                        permit
                    }
                },
            };
            // The frame first: the futures that wait for the end and the next ping are polled
            // only while no frame is ready, and the end is looked at as a flag before each
            // frame instead. Polled before every frame, they were about 2% of the runtime
            // thread's instructions at saturation (`bench/instructions`), for a ping that a
            // connection sending frames does not need.
            if self.gateway.stopping.is_cancelled() {
                return ReadEnd::Stopping;
            }
            if self.gone.is_cancelled() {
                return ReadEnd::WriterGone;
            }
            let frame = tokio::select! {
                biased;
                frame = stream.next() => frame,
                () = &mut stopping => return ReadEnd::Stopping,
                () = &mut gone => return ReadEnd::WriterGone,
                _ = pings.tick() => {
                    if last_heard.elapsed() >= timeouts.dead_after() {
                        return ReadEnd::Dead;
                    }
                    if self.frames.try_send(Outbound::Ping).is_err() {
                        // The queue is full: the writer is busy, and one that is stuck is caught
                        // by the write timeout.
                        tracing::trace!("ping skipped: queue full");
                    }
                    held = Some(permit);
                    continue;
                }
            };
            last_heard = Instant::now();
            match frame {
                Some(Ok(WsMessage::Text(text))) => self.on_text(&text, permit, last_heard).await,
                Some(Ok(WsMessage::Binary(_))) => {
                    self.app
                        .counters
                        .messages_in
                        .fetch_add(1, Ordering::Relaxed);
                    self.reject(Rejection::unreadable(Violation::BinaryFrame))
                        .await;
                }
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                Some(Ok(WsMessage::Close(_))) | None => return ReadEnd::PeerGone,
                Some(Err(err)) => return classify(err),
            }
        }
    }

    /// After reading stopped: on shutdown, wait until work in flight is answered, then close
    /// with 1012 behind the last response; on abuse, close with its code; otherwise stop.
    async fn finish_reading(&self, end: ReadEnd) {
        let close = match end {
            ReadEnd::Stopping => {
                tokio::select! {
                    () = self.gateway.closing.cancelled() => {}
                    () = self.gone.cancelled() => {}
                }
                Outbound::Close(CLOSE_RESTART, "service restart")
            }
            ReadEnd::Abuse(code, reason) => Outbound::Close(code, reason),
            ReadEnd::PeerGone | ReadEnd::Dead | ReadEnd::WriterGone => {
                self.app.leave(self.id);
                self.gone.cancel();
                return;
            }
        };
        self.app.leave(self.id);
        if self.frames.send(close).await.is_err() {
            self.gone.cancel();
        }
    }

    async fn on_text(&self, text: &str, permit: OwnedSemaphorePermit, received: Instant) {
        let (gateway, app) = (&self.gateway, &self.app);
        app.counters.messages_in.fetch_add(1, Ordering::Relaxed);
        let message = match parse_inbound(text, &gateway.protocol_limits) {
            Ok(message) => message,
            Err(rejection) => return self.reject(rejection).await,
        };
        let agents = app.agents();
        let agent = match agents.resolve(&message) {
            Ok(agent) => agent,
            Err(Some(violation)) => {
                return self
                    .reject(Rejection::of_message(&message, violation))
                    .await;
            }
            Err(None) => {
                let cause = "the app's default agent does not exist, so nobody can answer";
                return self
                    .refuse(&message, agents.default_id(), cause.into())
                    .await;
            }
        };
        match files::unknown_file(gateway, &app.name, &message).await {
            Ok(None) => {}
            Ok(Some(violation)) => {
                return self
                    .reject(Rejection::of_message(&message, violation))
                    .await;
            }
            Err(err) => {
                gateway.store_failed("first_missing_file", &err);
                let cause = "the gateway could not check the message's files (storage unavailable)";
                return self.refuse(&message, agent.id(), cause.into()).await;
            }
        }
        if let Some(rate) = &app.rate
            && !rate.admit()
        {
            let cause = format!(
                "rate limited: the app sends more than {} messages per second; resend later",
                rate.per_second()
            );
            return self.refuse(&message, agent.id(), cause).await;
        }
        let limits = &gateway.config.limits;
        let conversation = ConversationKey::of(&message, agent.id());
        let job = Job {
            msg_id: Arc::from(message.msg_id.as_str()),
            message,
            agent,
            conversation,
            received,
            permit,
        };
        let in_flight = InFlightLimits {
            per_app: limits.max_in_flight_per_app,
            per_sender: limits.max_in_flight_per_sender,
        };
        match app.begin(job, self.id, in_flight) {
            Begin::Start(job) => {
                let worker = conversation::run(gateway.clone(), app.clone(), job);
                gateway
                    .work
                    .spawn(worker.instrument(app.conversation_span.clone()));
            }
            Begin::Queued => {}
            Begin::Duplicate => {
                app.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            Begin::Overloaded(job) => {
                let cause = format!(
                    "overloaded: the app has {} messages in flight, its limit; resend later",
                    limits.max_in_flight_per_app
                );
                self.refuse(&job.message, job.agent.id(), cause).await;
            }
            Begin::SenderBusy(job) => {
                let cause = format!(
                    "sender busy: {} has {} messages in flight, the limit per sender; resend later",
                    job.message.sender_id, limits.max_in_flight_per_sender
                );
                self.refuse(&job.message, job.agent.id(), cause).await;
            }
        }
    }

    /// Answers a valid message with 50 without recording it, so that a resend is processed.
    /// Boxed, as [`Session::reject`] is: a rare path, whose routing's state would otherwise be
    /// part of the reader's, and so of every connection's task, idle or not.
    fn refuse(&self, message: &Message, agent_id: &str, cause: String) -> BoxFuture<'_, ()> {
        let meta = self.gateway.ids.next();
        Box::pin(self.respond(message.text_response(meta, agent_id, RespCode::Failed, cause)))
    }

    /// Answers an illegal frame with 40. A frame that named a readable message is answered in
    /// the name of the app's default agent; an unreadable one in the gateway's. Boxed: inline,
    /// its state was 1 KiB of every connection's task (`-Zprint-type-sizes`), which the
    /// memory per idle connection counts.
    fn reject(&self, rejection: Rejection) -> BoxFuture<'_, ()> {
        let agents = self.app.agents();
        let signer = rejection.msg_id.as_ref().map(|_| agents.default_id());
        tracing::debug!(reason = %rejection.violation, "frame rejected");
        Box::pin(self.respond(rejection.response(self.gateway.ids.next(), signer)))
    }

    /// Counts a response made without processing and routes it, from this connection.
    async fn respond(&self, response: Message) {
        self.app.counters.response(response.resp_code);
        let frame = response.to_json().into();
        delivery::deliver(&self.gateway, &self.app, frame, Some(self.id)).await;
    }

    /// Writes queued frames until the connection is finished; returns the frame whose write
    /// failed, if one did, so that it is routed elsewhere.
    async fn write(
        &self,
        mut sink: SplitSink<WebSocket, WsMessage>,
        queue: &mut mpsc::Receiver<Outbound>,
    ) -> Option<Outbound> {
        let write_timeout = self.gateway.config.timeouts.write_timeout();
        let mut written = Vec::new();
        let unwritten = loop {
            let item = tokio::select! {
                biased;
                item = queue.recv() => item,
                () = self.gone.cancelled() => break None,
            };
            let Some(item) = item else { break None };
            let (frame, last) = match &item {
                Outbound::Response(frame) | Outbound::Outboxed { frame, .. } => {
                    (WsMessage::Text(frame.clone()), false)
                }
                Outbound::Ping => (WsMessage::Ping(Bytes::new()), false),
                Outbound::Close(code, reason) => (
                    WsMessage::Close(Some(CloseFrame {
                        code: *code,
                        reason: Utf8Bytes::from_static(reason),
                    })),
                    true,
                ),
            };
            // Frames are written into the socket's buffer and flushed once the queue is empty, so
            // a burst of responses costs one flush. An empty queue is looked at again after the
            // other ready tasks have run: a store commit answers hundreds of messages at once,
            // and their responses reach this queue one task at a time.
            let flush = last
                || (queue.is_empty() && {
                    tokio::task::yield_now().await;
                    queue.is_empty()
                });
            let write = async {
                sink.feed(frame).await?;
                if flush { sink.flush().await } else { Ok(()) }
            };
            let mut write = std::pin::pin!(write);
            // Tried once before the write timeout is armed: the socket takes nearly every frame
            // at once, and a timeout armed for each read the clock and made a timer entry.
            let outcome = match poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
                Poll::Ready(written) => Ok(written),
                Poll::Pending => timeout(write_timeout, write).await,
            };
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::debug!(error = %err, "write failed");
                    break Some(item);
                }
                Err(_) => {
                    tracing::warn!(timeout = ?write_timeout, "write timed out: the peer stopped reading");
                    break Some(item);
                }
            }
            if let Outbound::Outboxed { id, .. } = item {
                written.push(id);
            }
            if last {
                break None;
            }
            if written.len() >= ACK_BATCH || (flush && !written.is_empty()) {
                self.acknowledge(&mut written).await;
            }
        };
        // Nothing reads the queue any more: closed now, every send waiting for room in it (a
        // response routed here, the reader's own refusal or closing frame) gets its frame
        // back at once, to route elsewhere. Left open until the reader had ended too, a
        // reader waiting to queue its closing frame behind a full queue waited for ever, and
        // held the shutdown with it.
        queue.close();
        self.gone.cancel();
        self.acknowledge(&mut written).await;
        unwritten
    }

    /// Removes written outbox entries from the store, and only then records them as removed:
    /// a drain skips them until its next read of the store, which can no longer list them, so
    /// that no drain sends one twice (a read under way during the removal still lists them).
    async fn acknowledge(&self, written: &mut Vec<i64>) {
        if written.is_empty() {
            return;
        }
        let ids = std::mem::take(written);
        let removed = self
            .gateway
            .store
            .outbox_remove(&self.app.name, ids.clone())
            .await;
        let mut transit = self.app.outbox.transit();
        match removed {
            Ok(()) => {
                self.app
                    .outbox
                    .add_depth(-i64::try_from(ids.len()).unwrap_or(i64::MAX));
                ids.into_iter().for_each(|id| transit.removed(id));
            }
            Err(err) => {
                // Still stored: a later drain sends them again, the one duplicate a store
                // failure can cause.
                self.gateway.store_failed("outbox_remove", &err);
                ids.into_iter().for_each(|id| transit.release(id));
            }
        }
    }

    /// Routes the frames this connection could not write to the rest of the pool (or the
    /// outbox); outbox entries simply stay in the outbox for the next drain.
    async fn reroute(&self, leftovers: Vec<Outbound>) {
        let mut outbox_left = false;
        for item in leftovers {
            match item {
                Outbound::Response(frame) => {
                    self.app.counters.rerouted.fetch_add(1, Ordering::Relaxed);
                    delivery::deliver(&self.gateway, &self.app, frame, None).await;
                }
                Outbound::Outboxed { id, .. } => {
                    self.app.outbox.transit().release(id);
                    outbox_left = true;
                }
                Outbound::Ping | Outbound::Close(..) => {}
            }
        }
        if outbox_left {
            delivery::spawn_drain(&self.gateway, &self.app);
        }
    }
}

/// What a read error means for the connection.
fn classify(err: axum::Error) -> ReadEnd {
    let inner = err.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => ReadEnd::Abuse(CLOSE_TOO_BIG, "message too big"),
        Some(tungstenite::Error::Utf8(_)) => {
            ReadEnd::Abuse(CLOSE_INVALID_DATA, "invalid UTF-8 in a text frame")
        }
        _ => {
            tracing::debug!(error = %inner, "read failed");
            ReadEnd::PeerGone
        }
    }
}
