//! The HTTP surface: the WebSocket endpoint, the file API, health and metrics.
//!
//! Authentication and admission happen before the upgrade, so a refused client gets a plain
//! HTTP status with a JSON error and no WebSocket ever exists. The request line is never logged:
//! it carries the app token.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde::Deserialize;

use crate::auth::{authenticate, error, loaded, refused_origin};
use crate::gateway::Gateway;
use crate::listener::PeerAddr;
use crate::session;
use crate::{files, push};

/// What a client waits before trying again after a 429 (seconds).
const RETRY_AFTER_SECS: &str = "5";

pub(crate) fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/ws/v1/chat", get(chat))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/files", post(files::upload))
        .route("/api/v1/files/{id}", get(files::download))
        .route("/api/v1/messages", post(push::push))
        .with_state(gateway)
}

#[derive(Deserialize)]
struct ChatQuery {
    app_token: Option<String>,
    /// `false` opens a direct connection: it is not part of the pool and gets only the
    /// responses to its own messages (for tools such as `iagent send`).
    pool: Option<bool>,
}

async fn chat(
    State(gateway): State<Arc<Gateway>>,
    Extension(PeerAddr(peer)): Extension<PeerAddr>,
    query: Result<Query<ChatQuery>, QueryRejection>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let metrics = &gateway.metrics;
    if gateway.stopping.is_cancelled() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is shutting down",
        );
    }
    if let Some(origin) = refused_origin(&gateway.config.security.allowed_origins, &headers) {
        metrics.origin_refused.fetch_add(1, Ordering::Relaxed);
        tracing::info!(origin, "upgrade refused: origin not allowed");
        return error(StatusCode::FORBIDDEN, "origin not allowed");
    }
    let query = query.ok().map(|Query(q)| q);
    let shared = query.as_ref().and_then(|q| q.pool).unwrap_or(true);
    let token = query.and_then(|q| q.app_token);
    let app = match authenticate(&gateway, peer, token, &headers).await {
        Ok(app) => app,
        Err(refusal) => return refusal,
    };
    let state = match loaded(&gateway, &app).await {
        Ok(state) => state,
        Err(refusal) => return refusal,
    };
    let limit = gateway.config.limits.max_connections_per_app;
    let Some(admission) = state.admit(limit) else {
        state
            .counters
            .connections_refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(app = %app.name, limit, "upgrade refused: connection limit");
        let mut response = error(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("the app has {limit} open connections, its limit"),
        );
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(RETRY_AFTER_SECS),
        );
        return response;
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let max = gateway.config.limits.max_frame_bytes;
    upgrade
        .read_buffer_size(gateway.config.limits.read_buffer_bytes)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            let sessions = gateway.sessions.clone();
            sessions.track_future(session::run(gateway, state, admission, socket, shared))
        })
}

async fn healthz(State(gateway): State<Arc<Gateway>>) -> Response {
    if gateway.stopping.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    let body = gateway.metrics.render(&gateway.apps.all());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
