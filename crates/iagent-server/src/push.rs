//! Messages an agent starts: `POST /api/v1/messages` delivers a message written by one of the
//! app's agents over the app's pool (any connection, as no connection asked for it), or into
//! its outbox when none is open, and answers with the message's new `msg_id`.
//!
//! The message goes through the same validation as an inbound frame, so a push cannot carry
//! what a backend could not send.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use iagent_protocol::{ChatType, ContentType, Message, RespCode, SenderType, parse_inbound};
use iagent_store::HistoryEntry;
use serde::Deserialize;

use crate::apps::AppState;
use crate::auth::{Caller, error, loaded};
use crate::conversation::{self, ConversationKey};
use crate::delivery;
use crate::files::unknown_file;
use crate::gateway::Gateway;

/// The body of a push: the fields of a message that the agent chooses. The gateway sets the
/// rest: a new `msg_id`, its clock as `timestamp`, `sender_type` 2 and `resp_code` 0.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Push {
    /// The agent writing; one of the app's agents.
    sender_id: String,
    /// The user, in a private chat.
    receiver_id: Option<String>,
    /// The group, in a group chat.
    group_id: Option<String>,
    /// 1 or 2; when absent, 2 if `group_id` is given, else 1.
    chat_type: Option<ChatType>,
    /// When given, must be 2.
    sender_type: Option<SenderType>,
    content_type: ContentType,
    content: String,
    /// The message this push answers: one whose agent deferred its reply. The push then
    /// becomes that message's one response, and `receiver_id`, `group_id` and `chat_type` are
    /// taken from it.
    ref_msg_id: Option<String>,
}

pub(crate) async fn push(
    State(gateway): State<Arc<Gateway>>,
    Caller(app): Caller,
    body: Body,
) -> Response {
    let max = gateway.config.limits.max_frame_bytes;
    let Ok(body) = axum::body::to_bytes(body, max).await else {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("messages are limited to {max} bytes"),
        );
    };
    let push: Push = match serde_json::from_slice(&body) {
        Ok(push) => push,
        Err(err) => return error(StatusCode::BAD_REQUEST, &format!("invalid message: {err}")),
    };
    let state = match loaded(&gateway, &app).await {
        Ok(state) => state,
        Err(refusal) => return refusal,
    };
    if let Some(ref_msg_id) = push.ref_msg_id.clone() {
        return reply(&gateway, &state, &app.name, push, &ref_msg_id).await;
    }
    if !state.agents().contains(&push.sender_id) {
        let reason = format!(
            "sender_id \"{}\" is not an agent of this app",
            push.sender_id
        );
        return error(StatusCode::BAD_REQUEST, &reason);
    }
    if push
        .sender_type
        .is_some_and(|sender_type| sender_type != SenderType::Agent)
    {
        return error(
            StatusCode::BAD_REQUEST,
            "sender_type must be 2: pushed messages are written by agents",
        );
    }
    let chat_type = push.chat_type.unwrap_or(if push.group_id.is_some() {
        ChatType::Group
    } else {
        ChatType::Private
    });
    if chat_type == ChatType::Private && push.receiver_id.as_deref().is_none_or(str::is_empty) {
        return error(
            StatusCode::BAD_REQUEST,
            "a private message needs the user as receiver_id",
        );
    }
    let meta = gateway.ids.next();
    let message = Message {
        chat_type,
        msg_id: meta.msg_id,
        ref_msg_id: None,
        timestamp: meta.timestamp,
        group_id: push.group_id,
        sender_type: SenderType::Agent,
        sender_id: push.sender_id,
        receiver_id: push.receiver_id,
        resp_code: RespCode::Ok,
        content_type: push.content_type,
        content: push.content,
    };
    let frame = message.to_json();
    if let Err(rejection) = parse_inbound(&frame, &gateway.protocol_limits) {
        return error(StatusCode::BAD_REQUEST, &rejection.violation.to_string());
    }
    if let Err(refusal) = check_files(&gateway, &app.name, &message).await {
        return refusal;
    }
    let conversation = match (chat_type, &message.group_id, &message.receiver_id) {
        (ChatType::Group, Some(group), _) => ConversationKey::group(group),
        (_, _, receiver) => {
            ConversationKey::private(receiver.as_deref().unwrap_or_default(), &message.sender_id)
        }
    };
    let entry = HistoryEntry {
        conversation: conversation.shared(),
        at_ms: message.timestamp,
        message: frame.clone().into(),
        reply: None,
    };
    if let Err(err) = gateway.store.append_history(&app.name, vec![entry]).await {
        gateway.store_failed("append_history", &err);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway cannot record messages right now",
        );
    }
    delivery::deliver(&gateway, &state, frame.into(), None).await;
    state.counters.pushed.fetch_add(1, Ordering::Relaxed);
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({ "msg_id": message.msg_id })),
    )
        .into_response()
}

/// Completes a message whose agent deferred its reply: the push becomes its one response,
/// routed where the message came from. Only the agent that deferred may answer, and the reply's
/// chat, group and receiver are those of the message it answers.
async fn reply(
    gateway: &Arc<Gateway>,
    app: &Arc<AppState>,
    app_name: &str,
    push: Push,
    ref_msg_id: &str,
) -> Response {
    let not_waiting = || {
        let reason = format!("no message awaiting a pushed reply has msg_id \"{ref_msg_id}\"");
        error(StatusCode::NOT_FOUND, &reason)
    };
    let Some(waiting) = app.deferred(ref_msg_id) else {
        return not_waiting();
    };
    if push.sender_id != waiting.agent {
        let reason = format!(
            "only agent {}, which deferred the reply, may push it",
            waiting.agent
        );
        return error(StatusCode::BAD_REQUEST, &reason);
    }
    let meta = gateway.ids.next();
    let response = waiting.message.response(
        meta,
        &waiting.agent,
        RespCode::Ok,
        push.content_type,
        push.content,
    );
    if let Err(rejection) = parse_inbound(&response.to_json(), &gateway.protocol_limits) {
        return error(StatusCode::BAD_REQUEST, &rejection.violation.to_string());
    }
    if let Err(refusal) = check_files(gateway, app_name, &response).await {
        return refusal;
    }
    // Taken only now, so that a refused push leaves the message waiting; `None` here means the
    // deadline or another push answered it meanwhile.
    let Some(waiting) = app.take_deferred(ref_msg_id) else {
        return not_waiting();
    };
    let msg_id = response.msg_id.clone();
    conversation::answer_deferred(gateway, app, waiting, response).await;
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({ "msg_id": msg_id })),
    )
        .into_response()
}

/// A media message's files must be files of the app, as for inbound messages.
async fn check_files(gateway: &Gateway, app: &str, message: &Message) -> Result<(), Response> {
    match unknown_file(gateway, app, message).await {
        Ok(None) => Ok(()),
        Ok(Some(violation)) => Err(error(StatusCode::BAD_REQUEST, &violation.to_string())),
        Err(err) => {
            gateway.store_failed("first_missing_file", &err);
            Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the gateway cannot check files right now",
            ))
        }
    }
}
