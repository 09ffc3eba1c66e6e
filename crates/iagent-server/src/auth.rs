//! Who is asking: the app a request's token belongs to, for every route that needs one (the
//! WebSocket upgrade and the file API), with the per-address throttle of failed checks and the
//! `Origin` allow-list. Refusals are plain HTTP responses with a JSON error.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use iagent_store::App;
use serde::Deserialize;

use crate::apps::AppState;
use crate::gateway::Gateway;
use crate::listener::PeerAddr;

/// A JSON error response: `{"error": "..."}`.
pub(crate) fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// The token a request presents: the `app_token` query parameter, else an
/// `Authorization: Bearer` header; a `Bearer ` prefix on the parameter is tolerated.
pub(crate) fn presented_token(from_query: Option<String>, headers: &HeaderMap) -> Option<String> {
    let from_header = || {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::to_owned)
    };
    let token = from_query.or_else(from_header)?;
    let token = token
        .strip_prefix("Bearer ")
        .map(str::to_owned)
        .unwrap_or(token);
    let token = token.trim();
    (!token.is_empty()).then(|| token.to_owned())
}

/// The app whose live token the request presents, or the response refusing it: 429 while the
/// address is throttled, 401 for a missing or unknown token (counted against the address),
/// 503 when the store cannot answer.
pub(crate) async fn authenticate(
    gateway: &Gateway,
    peer: SocketAddr,
    query_token: Option<String>,
    headers: &HeaderMap,
) -> Result<App, Response> {
    let metrics = &gateway.metrics;
    if let Some(wait) = gateway.throttle.blocked(peer.ip()) {
        metrics.auth_throttled.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%peer, "request refused: too many failed token checks");
        let mut response = error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed token checks from this address; try again later",
        );
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        return Err(response);
    }
    let unauthorized = |reason: &'static str| {
        metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
        gateway.throttle.failed(peer.ip());
        tracing::info!(%peer, "request refused: {reason}");
        error(StatusCode::UNAUTHORIZED, reason)
    };
    let Some(token) = presented_token(query_token, headers) else {
        return Err(unauthorized("missing app_token"));
    };
    match gateway.store.app_for_token(&token).await {
        Ok(Some(app)) => Ok(app),
        Ok(None) => Err(unauthorized("unknown or revoked app_token")),
        Err(err) => {
            gateway.store_failed("app_for_token", &err);
            Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the gateway cannot check tokens right now",
            ))
        }
    }
}

/// The gateway's state of an authenticated app, loading it on its first request.
pub(crate) async fn loaded(gateway: &Gateway, app: &App) -> Result<Arc<AppState>, Response> {
    if let Some(state) = gateway.apps.get(&app.name) {
        return Ok(state);
    }
    match gateway.store.agents(&app.name).await {
        Ok(records) => Ok(gateway.apps.insert(gateway.app_state(app, &records))),
        Err(err) => {
            gateway.store_failed("agents", &err);
            Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the gateway cannot load the app right now",
            ))
        }
    }
}

/// The query of the API routes: just the token (which may come as a header instead).
#[derive(Deserialize)]
struct TokenQuery {
    app_token: Option<String>,
}

/// The app an API request authenticates as. Extracting it runs [`authenticate`], so a handler
/// that takes a `Caller` runs only for a live token, before anything else of the request (its
/// body included) is read.
pub(crate) struct Caller(pub(crate) App);

impl FromRequestParts<Arc<Gateway>> for Caller {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        gateway: &Arc<Gateway>,
    ) -> Result<Self, Response> {
        // The listener gives every request its peer's address.
        let Some(PeerAddr(peer)) = parts.extensions.get::<PeerAddr>().copied() else {
            return Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "request without a peer address",
            ));
        };
        let token = Query::<TokenQuery>::try_from_uri(&parts.uri)
            .ok()
            .and_then(|Query(query)| query.app_token);
        authenticate(gateway, peer, token, &parts.headers)
            .await
            .map(Caller)
    }
}

/// The request's `Origin`, when an allow-list is set and does not contain it. Requests without
/// an `Origin` (backend servers send none) are never refused for it.
pub(crate) fn refused_origin<'a>(allowed: &[String], headers: &'a HeaderMap) -> Option<&'a str> {
    if allowed.is_empty() {
        return None;
    }
    let origin = headers.get(header::ORIGIN)?;
    let origin = origin.to_str().unwrap_or("<not text>");
    (!allowed
        .iter()
        .any(|allowed| allowed.eq_ignore_ascii_case(origin)))
    .then_some(origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comes_from_query_or_bearer_header() {
        let empty = HeaderMap::new();
        let query = |token: &str| Some(token.to_owned());
        assert_eq!(presented_token(query("t1"), &empty).as_deref(), Some("t1"));
        assert_eq!(
            presented_token(query("Bearer t1"), &empty).as_deref(),
            Some("t1")
        );
        assert_eq!(presented_token(query(""), &empty), None);
        assert_eq!(presented_token(None, &empty), None);
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t2"));
        assert_eq!(presented_token(None, &headers).as_deref(), Some("t2"));
        assert_eq!(
            presented_token(query("t1"), &headers).as_deref(),
            Some("t1")
        );
    }

    #[test]
    fn origins_are_refused_only_against_a_list() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            refused_origin(&["https://a.example".into()], &headers),
            None,
            "no Origin"
        );
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://b.example"),
        );
        assert_eq!(refused_origin(&[], &headers), None, "no list");
        assert_eq!(
            refused_origin(&["https://A.example".into()], &headers),
            Some("https://b.example")
        );
        assert_eq!(
            refused_origin(&["https://B.EXAMPLE".into()], &headers),
            None
        );
    }
}
