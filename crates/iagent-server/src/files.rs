//! The file API: `POST /api/v1/files` stores the request body as a file of the app and answers
//! its id; `GET /api/v1/files/{id}` returns a file of the app. Files belong to the app that
//! uploaded them: another app's id is answered exactly like an id that does not exist.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use iagent_protocol::validate::parse_file_ids;
use iagent_protocol::{ContentType, Message, Violation};
use iagent_store::StoreError;

use crate::auth::{Caller, error};
use crate::gateway::Gateway;
use crate::ids::now_ms;

/// The files of one app, as its agents read them (an agent that looks at images, say).
pub(crate) struct AppFiles<'a> {
    pub(crate) gateway: &'a Gateway,
    pub(crate) app: &'a str,
}

impl iagent_agent::Files for AppFiles<'_> {
    fn read<'a>(
        &'a self,
        file_id: &'a str,
    ) -> iagent_agent::BoxFuture<'a, Result<Option<iagent_agent::File>, String>> {
        Box::pin(async move {
            match self.gateway.store.get_file(self.app, file_id).await {
                Ok(found) => Ok(found.map(|(meta, bytes)| iagent_agent::File {
                    content_type: meta.content_type,
                    bytes,
                })),
                Err(err) => {
                    self.gateway.store_failed("get_file", &err);
                    Err("the gateway could not read the file (storage unavailable)".into())
                }
            }
        })
    }
}

/// The content type of an upload that names none.
const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// The first file a media message names that is not a file of the app, as the violation that
/// makes the message illegal. Validation has checked the form of the ids; the store says whether
/// they are files of this app, and another app's file is as unknown as one that never existed.
pub(crate) async fn unknown_file(
    gateway: &Gateway,
    app: &str,
    message: &Message,
) -> Result<Option<Violation>, StoreError> {
    if message.content_type == ContentType::Text {
        return Ok(None);
    }
    let ids = parse_file_ids(&message.content)
        .map(|ids| ids.file_ids)
        .unwrap_or_default();
    Ok(gateway
        .store
        .first_missing_file(app, ids)
        .await?
        .map(Violation::UnknownFile))
}

/// Stores an upload. The [`Caller`] is authenticated before a byte of the body is read, so that
/// nobody without a token can make the gateway buffer an upload.
pub(crate) async fn upload(
    State(gateway): State<Arc<Gateway>>,
    Caller(app): Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let content_type = match headers.get(header::CONTENT_TYPE) {
        None => DEFAULT_CONTENT_TYPE.to_owned(),
        Some(value) => match value.to_str() {
            Ok(value) if !value.trim().is_empty() && value.len() <= 255 => value.trim().to_owned(),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "Content-Type must be a MIME type of at most 255 bytes",
                );
            }
        },
    };
    let max = gateway.config.limits.max_file_bytes;
    let bytes = match axum::body::to_bytes(body, max).await {
        Ok(bytes) if bytes.is_empty() => {
            return error(StatusCode::BAD_REQUEST, "the file is empty");
        }
        Ok(bytes) => bytes,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("files are limited to {max} bytes"),
            );
        }
    };
    match gateway
        .store
        .put_file(&app.name, &content_type, bytes.to_vec(), now_ms())
        .await
    {
        Ok(meta) => {
            tracing::debug!(app = %app.name, file = %meta.id, size = meta.size, "file stored");
            let body = serde_json::json!({
                "file_id": meta.id,
                "content_type": meta.content_type,
                "size": meta.size,
            });
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(err) => {
            gateway.store_failed("put_file", &err);
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the gateway cannot store files right now",
            )
        }
    }
}

/// Returns a file of the caller's app.
pub(crate) async fn download(
    State(gateway): State<Arc<Gateway>>,
    Caller(app): Caller,
    Path(id): Path<String>,
) -> Response {
    match gateway.store.get_file(&app.name, &id).await {
        Ok(Some((meta, bytes))) => {
            let content_type = HeaderValue::from_str(&meta.content_type)
                .unwrap_or(HeaderValue::from_static(DEFAULT_CONTENT_TYPE));
            let headers = [
                (header::CONTENT_TYPE, content_type),
                (
                    header::X_CONTENT_TYPE_OPTIONS,
                    HeaderValue::from_static("nosniff"),
                ),
                (
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("private, max-age=86400, immutable"),
                ),
            ];
            (StatusCode::OK, headers, bytes).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, "no such file"),
        Err(err) => {
            gateway.store_failed("get_file", &err);
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the gateway cannot read files right now",
            )
        }
    }
}
