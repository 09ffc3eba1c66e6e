//! Routing a response to its app's pool: the connection its message came in on while that is
//! open, else another open connection of the app, else the app's durable outbox, which is
//! drained oldest first whenever the app has a connection.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc::error::{SendError, TrySendError};

use crate::apps::{AppState, ConnId, Origins, PoolMember};
use crate::gateway::Gateway;
use crate::ids::now_ms;
use crate::session::Outbound;

/// Routes one response frame of `app`. Never drops it: when no connection takes it, it goes to
/// the outbox.
pub(crate) async fn deliver(
    gateway: &Arc<Gateway>,
    app: &Arc<AppState>,
    frame: Utf8Bytes,
    origin: Option<ConnId>,
) {
    let mut item = Outbound::Response(frame);
    if let Some(id) = origin {
        item = match app.try_send_to(id, item) {
            Ok(()) => return,
            // Waiting here when the origin's queue is full is the back-pressure: this
            // connection's reader is held by the permits of the messages waiting to be
            // answered.
            Err(TrySendError::Full(back)) => match app.member(id) {
                Some(member) => match member.frames.send(back).await {
                    Ok(()) => return,
                    Err(SendError(back)) => back,
                },
                None => back,
            },
            Err(TrySendError::Closed(back)) => back,
        };
    }
    if origin.is_some() {
        app.counters.rerouted.fetch_add(1, Ordering::Relaxed);
    }
    for member in app.others(origin) {
        item = match member.frames.try_send(item) {
            Ok(()) => return,
            Err(TrySendError::Full(back) | TrySendError::Closed(back)) => back,
        };
    }
    if let Outbound::Response(frame) | Outbound::Outboxed { frame, .. } = item {
        // Boxed, as the rare path it is: its store call would make every message's task
        // larger (see the conversation module's `run`).
        Box::pin(to_outbox(gateway, app, frame)).await;
    }
}

/// Routes the response of a message that came in on `origins` (`None`: on a connection of an
/// earlier process): to the open one it was read on last, with a copy to each other open one
/// (see [`Origins`]); with none of them open, as [`deliver`] routes a response whose origin
/// is gone. Each connection gets it once.
pub(crate) async fn deliver_answer(
    gateway: &Arc<Gateway>,
    app: &Arc<AppState>,
    frame: Utf8Bytes,
    origins: Option<Origins>,
) {
    let Some(Origins { last, earlier }) = origins else {
        return deliver(gateway, app, frame, None).await;
    };
    // Nearly every message came in once: its response is routed as any, with no look-up of
    // the pool and no list made here first.
    if earlier.is_empty() {
        return deliver(gateway, app, frame, Some(last)).await;
    }
    // Boxed, as the rare path it is: its sends would make every message's task larger (see
    // the conversation module's `run`).
    Box::pin(deliver_copies(gateway, app, frame, last, earlier)).await;
}

/// Routes the response of a message that came in on several connections: to `last`, with a
/// copy to each of the `earlier` ones that is open.
async fn deliver_copies(
    gateway: &Arc<Gateway>,
    app: &Arc<AppState>,
    frame: Utf8Bytes,
    last: ConnId,
    earlier: Vec<ConnId>,
) {
    let mut open: Vec<PoolMember> = earlier
        .into_iter()
        .chain([last])
        .filter_map(|id| app.member(id))
        .collect();
    let Some(main) = open.pop() else {
        return deliver(gateway, app, frame, Some(last)).await;
    };
    for member in open {
        // A copy: should this connection have closed meanwhile, the frame still goes to the
        // main one, or on from there.
        if member
            .frames
            .send(Outbound::Response(frame.clone()))
            .await
            .is_ok()
        {
            app.counters.copies.fetch_add(1, Ordering::Relaxed);
        }
    }
    deliver(gateway, app, frame, Some(main.id)).await;
}

/// Stores a response in the app's outbox, and starts a drain if a connection has opened since.
async fn to_outbox(gateway: &Arc<Gateway>, app: &Arc<AppState>, frame: Utf8Bytes) {
    let now = now_ms();
    let ttl = i64::try_from(
        gateway
            .config
            .retention
            .outbox_ttl_secs
            .saturating_mul(1000),
    )
    .unwrap_or(i64::MAX);
    match gateway
        .store
        .outbox_push(
            &app.name,
            frame.as_str().to_owned(),
            now,
            now.saturating_add(ttl),
        )
        .await
    {
        Ok(_) => {
            app.outbox.add_depth(1);
            if app.has_shared_connections() {
                spawn_drain(gateway, app);
            }
        }
        Err(err) => {
            gateway.store_failed("outbox_push", &err);
            tracing::error!(app = %app.name, "a response could not be stored in the outbox and is lost");
        }
    }
}

/// Starts delivering the app's outbox over its pool, unless a drain is already waiting to start
/// (it will see everything stored before it starts).
pub(crate) fn spawn_drain(gateway: &Arc<Gateway>, app: &Arc<AppState>) {
    if app.outbox.depth() == 0 || app.outbox.queued.swap(true, Ordering::AcqRel) {
        return;
    }
    gateway
        .background
        .spawn(drain(gateway.clone(), app.clone()));
}

async fn drain(gateway: Arc<Gateway>, app: Arc<AppState>) {
    let _turn = app.outbox.draining.lock().await;
    app.outbox.queued.store(false, Ordering::Release);
    let mut after = 0;
    loop {
        if gateway.stopping.is_cancelled() {
            return;
        }
        let batch = gateway.config.limits.outbox_batch;
        app.outbox.transit().reading();
        let entries = match gateway.store.outbox_peek(&app.name, after, batch).await {
            Ok(entries) if entries.is_empty() => return,
            Ok(entries) => entries,
            Err(err) => return gateway.store_failed("outbox_peek", &err),
        };
        for entry in entries {
            after = entry.id;
            if !app.outbox.transit().claim(entry.id) {
                continue;
            }
            let mut unsent = Some(Outbound::Outboxed {
                id: entry.id,
                frame: entry.message.into(),
            });
            for member in app.others(None) {
                let Some(item) = unsent.take() else { break };
                if let Err(SendError(back)) = member.frames.send(item).await {
                    unsent = Some(back);
                }
            }
            if unsent.is_some() {
                // Every connection closed meanwhile: the entry stays for the next one.
                app.outbox.transit().release(entry.id);
                return;
            }
        }
    }
}
