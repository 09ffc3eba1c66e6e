//! The `webhook` kind: the app's own HTTP service decides the reply.
//!
//! The agent POSTs `{"agent_id", "message", "history"}` to the configured URL, signed with the
//! agent's secret, and maps the answer to a reply:
//!
//! | the webhook answers | the agent's reply |
//! | --- | --- |
//! | 200 `{"content_type": 1, "content": "..."}` | [`Reply::Content`] |
//! | 200 `{"reply": false, "reason": "..."}` | [`Reply::Declined`] with the reason |
//! | 204 | [`Reply::Declined`] with [`DECLINED`] |
//! | 202 | [`Reply::Deferred`]: the webhook pushes its reply later |
//! | anything else, or nothing in time | [`AgentError`] |
//!
//! Headers: `X-Iagent-Timestamp` (ms since the Unix epoch), `X-Iagent-Signature: sha256=HEX`
//! (HMAC-SHA256 with the secret over `timestamp + "." + body`), and `X-Iagent-Msg-Id`, the
//! message's `msg_id`, the same on every attempt, so the webhook can recognise a retry.
//!
//! ```json
//! {
//!   "url": "https://hooks.example.com/iagent",
//!   "secret_env": "SHOP_WEBHOOK_SECRET",
//!   "timeout_ms": 10000,
//!   "history": 20,
//!   "strategy": { "group": "mention" }
//! }
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{StatusCode, Uri};
use iagent_protocol::validate::parse_file_ids;
use iagent_protocol::{ContentType, Message};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::http::{self, HttpClient, HttpError, Response, RetryPolicy, Timing};
use crate::{Agent, AgentError, Environment, MAX_HISTORY, Reply, ReplyStrategy, Replying, Turn};

/// The kind's name in configuration.
pub const KIND: &str = "webhook";

/// The reason code of the 10 sent when the webhook answers 204, or declines without a reason.
pub const DECLINED: &str = "webhook_declined";

/// The header with the time of the attempt, in ms since the Unix epoch. The signature covers
/// it, so a webhook that refuses stale timestamps cannot be sent a recorded request again later.
pub const TIMESTAMP_HEADER: &str = "x-iagent-timestamp";

/// The header with the signature: `sha256=` and the HMAC-SHA256, in lowercase hex, of
/// `timestamp + "." + body` under the agent's secret.
pub const SIGNATURE_HEADER: &str = "x-iagent-signature";

/// The header with the message's `msg_id`. A retried call carries the same one, so a webhook
/// that has already acted on it can answer the same again rather than act twice.
pub const MSG_ID_HEADER: &str = "x-iagent-msg-id";

/// How long a call may take, all attempts together, unless configured (10 s).
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// Earlier messages of the conversation sent with each call, unless configured (20).
pub const DEFAULT_HISTORY: usize = 20;

/// Attempts after the first, unless configured (2).
pub const DEFAULT_MAX_RETRIES: u32 = 2;

/// The wait before the first retry, unless configured (200 ms); it doubles with each retry.
pub const DEFAULT_RETRY_BACKOFF_MS: u64 = 200;

/// The webhook agent.
#[derive(Debug, Clone)]
pub struct Webhook {
    id: String,
    strategy: ReplyStrategy,
    url: Uri,
    secret: Secret,
    env: Environment,
    history: usize,
    policy: RetryPolicy,
    client: HttpClient,
}

/// Where the signing secret is.
#[derive(Clone)]
enum Secret {
    /// In the configuration itself.
    Inline(String),
    /// In this environment variable of the gateway's process.
    Env(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Inline(_) => f.write_str("Inline(..)"),
            Self::Env(name) => f.debug_tuple("Env").field(name).finish(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    url: String,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    secret_env: Option<String>,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_history")]
    history: usize,
    #[serde(default = "default_max_retries")]
    max_retries: u32,
    #[serde(default = "default_retry_backoff_ms")]
    retry_backoff_ms: u64,
    #[serde(default)]
    strategy: ReplyStrategy,
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}
fn default_history() -> usize {
    DEFAULT_HISTORY
}
fn default_max_retries() -> u32 {
    DEFAULT_MAX_RETRIES
}
fn default_retry_backoff_ms() -> u64 {
    DEFAULT_RETRY_BACKOFF_MS
}

/// What the webhook is sent.
#[derive(Serialize)]
struct Call<'a> {
    agent_id: &'a str,
    message: &'a Message,
    history: &'a [Message],
}

/// A 200's body: a reply, or `reply: false` with a reason. Keys beyond these are ignored, so a
/// webhook may add its own.
#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    reply: Option<bool>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    content_type: Option<i64>,
    #[serde(default)]
    content: Option<String>,
}

impl Webhook {
    /// A webhook agent from its JSON configuration; `env` is where `secret_env` is looked up.
    pub fn from_config(id: &str, config: &str, env: Environment) -> Result<Self, String> {
        let config: Config = crate::parse_config(config)?;
        let url = http::parse_url("url", &config.url)?;
        let secret = match (config.secret, config.secret_env) {
            (Some(secret), None) if !secret.is_empty() => Secret::Inline(secret),
            (None, Some(name)) if !name.is_empty() => Secret::Env(name),
            (Some(_), Some(_)) => {
                return Err("give either \"secret\" or \"secret_env\", not both".into());
            }
            (None, None) => {
                return Err(
                    "a signing secret is required: give \"secret_env\" (the name of an \
                     environment variable holding it) or \"secret\""
                        .into(),
                );
            }
            _ => return Err("the secret, or its variable's name, is empty".into()),
        };
        if config.history > MAX_HISTORY {
            return Err(format!(
                "history must be at most {MAX_HISTORY}, not {}",
                config.history
            ));
        }
        let policy = Timing {
            timeout_ms: config.timeout_ms,
            max_retries: config.max_retries,
            retry_backoff_ms: config.retry_backoff_ms,
        }
        .policy()?;
        Ok(Self {
            id: id.to_owned(),
            strategy: config.strategy,
            url,
            secret,
            env,
            history: config.history,
            policy,
            client: http::shared()?,
        })
    }

    fn failed(&self, cause: impl Into<String>) -> AgentError {
        AgentError::Failed {
            agent: self.id.clone(),
            cause: cause.into(),
        }
    }

    fn secret(&self) -> Result<String, AgentError> {
        match &self.secret {
            Secret::Inline(secret) => Ok(secret.clone()),
            Secret::Env(name) => self.env.get(name).filter(|s| !s.is_empty()).ok_or_else(|| {
                self.failed(format!(
                    "the webhook's secret is not set: environment variable {name} is empty or missing"
                ))
            }),
        }
    }

    async fn call(&self, turn: Turn<'_>) -> Result<Reply, AgentError> {
        let secret = self.secret()?;
        let history = &turn.history[turn.history.len().saturating_sub(self.history)..];
        let body = serde_json::to_vec(&Call {
            agent_id: &self.id,
            message: turn.message,
            history,
        })
        .map_err(|err| self.failed(format!("cannot encode the call: {err}")))?;
        let body = Bytes::from(body);
        let msg_id = HeaderValue::from_str(&turn.message.msg_id)
            .map_err(|_| self.failed("the msg_id cannot be sent as a header"))?;
        let headers = || signed_headers(&secret, &body, msg_id.clone());
        let (outcome, attempts) = self
            .client
            .post_with_retries(&self.url, headers, body.clone(), &self.policy, |status| {
                status.is_server_error()
            })
            .await;
        let tries = if attempts > 1 {
            format!(" (after {attempts} attempts)")
        } else {
            String::new()
        };
        match outcome {
            Ok(response) => self.interpret(&response, &tries),
            Err(HttpError::Timeout) => Err(AgentError::Timeout {
                agent: self.id.clone(),
                deadline: self.policy.timeout,
            }),
            Err(err) => Err(self.failed(format!("webhook call failed: {err}{tries}"))),
        }
    }

    /// The reply a webhook's response stands for.
    fn interpret(&self, response: &Response, tries: &str) -> Result<Reply, AgentError> {
        match response.status {
            StatusCode::OK => {}
            StatusCode::ACCEPTED => return Ok(Reply::Deferred),
            StatusCode::NO_CONTENT => return Ok(Reply::Declined(DECLINED.into())),
            status => {
                return Err(self.failed(format!(
                    "webhook answered HTTP {}{tries}: {}",
                    status.as_u16(),
                    http::excerpt(&response.body)
                )));
            }
        }
        let malformed = |err: HttpError| self.failed(format!("webhook answered 200 with a {err}"));
        let answer: Answer = response.json().map_err(malformed)?;
        let malformed = |cause: String| {
            malformed(HttpError::Malformed {
                cause,
                excerpt: http::excerpt(&response.body),
            })
        };
        if answer.reply == Some(false) {
            let reason = answer.reason.filter(|reason| !reason.is_empty());
            return Ok(Reply::Declined(reason.unwrap_or_else(|| DECLINED.into())));
        }
        let (Some(code), Some(content)) = (answer.content_type, answer.content) else {
            return Err(malformed(
                "a reply needs \"content_type\" and \"content\"; to decline, send \
                 {\"reply\": false, \"reason\": \"...\"}"
                    .into(),
            ));
        };
        let content_type = ContentType::from_code(code).ok_or_else(|| {
            malformed(format!(
                "content_type {code} is not one of {}",
                ContentType::ALLOWED
            ))
        })?;
        if content_type == ContentType::Text {
            if content.is_empty() {
                return Err(malformed("the reply's content is empty".into()));
            }
        } else if let Err(err) = parse_file_ids(&content) {
            return Err(malformed(format!("a media reply's content: {err}")));
        }
        Ok(Reply::Content {
            content_type,
            content,
        })
    }
}

/// The headers of one attempt: its timestamp, the signature over it and the body, and the
/// message's id.
fn signed_headers(
    secret: &str,
    body: &[u8],
    msg_id: HeaderValue,
) -> Result<Vec<(HeaderName, HeaderValue)>, HttpError> {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis())
        .to_string();
    let signature = format!("sha256={}", sign(secret, &timestamp, body));
    let value = |text: String| {
        HeaderValue::from_str(&text).map_err(|err| HttpError::Request(err.to_string()))
    };
    Ok(vec![
        (HeaderName::from_static(TIMESTAMP_HEADER), value(timestamp)?),
        (HeaderName::from_static(SIGNATURE_HEADER), value(signature)?),
        (HeaderName::from_static(MSG_ID_HEADER), msg_id),
    ])
}

/// HMAC-SHA256 of `timestamp + "." + body` under `secret`, in lowercase hex.
fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length, so this cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        unreachable!("HMAC accepts keys of every length")
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    http::hex(&mac.finalize().into_bytes())
}

impl Agent for Webhook {
    fn id(&self) -> &str {
        &self.id
    }

    fn strategy(&self) -> &ReplyStrategy {
        &self.strategy
    }

    fn reply<'a>(&'a self, turn: Turn<'a>) -> Replying<'a> {
        Replying::Later(Box::pin(self.call(turn)))
    }

    fn history_len(&self) -> usize {
        self.history
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::{Duration, Instant};

    use iagent_protocol::{ChatType, RespCode, SenderType};
    use serde_json::json;

    use super::*;
    use crate::NoFiles;
    use crate::stand_in::{Answer, Recorded, StandIn, refusing_url};

    const SECRET: &str = "s3cret";

    fn message(msg_id: &str, text: &str) -> Message {
        Message {
            chat_type: ChatType::Private,
            msg_id: msg_id.into(),
            ref_msg_id: None,
            timestamp: 1,
            group_id: None,
            sender_type: SenderType::User,
            sender_id: "alice".into(),
            receiver_id: Some("hook".into()),
            resp_code: RespCode::Ok,
            content_type: ContentType::Text,
            content: text.into(),
        }
    }

    fn agent(config: serde_json::Value) -> Webhook {
        Webhook::from_config("hook", &config.to_string(), Environment::from_fn(|_| None))
            .expect("configuration is valid")
    }

    fn hook(url: &str) -> Webhook {
        agent(json!({ "url": url, "secret": SECRET, "retry_backoff_ms": 10 }))
    }

    async fn ask(
        agent: &Webhook,
        message: &Message,
        history: &[Message],
    ) -> Result<Reply, AgentError> {
        agent
            .reply(Turn {
                message,
                history,
                files: &NoFiles,
            })
            .await
    }

    /// Whether a request carries a valid signature under `secret`, recomputed here.
    fn signed_with(request: &Recorded, secret: &str) -> bool {
        let (Some(timestamp), Some(signature)) = (
            request.header(TIMESTAMP_HEADER),
            request.header(SIGNATURE_HEADER),
        ) else {
            return false;
        };
        let Some(hex) = signature.strip_prefix("sha256=") else {
            return false;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(&request.body);
        let Ok(bytes) = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
            .collect::<Result<Vec<u8>, _>>()
        else {
            return false;
        };
        mac.verify_slice(&bytes).is_ok()
    }

    fn said(text: &str) -> Reply {
        Reply::Content {
            content_type: ContentType::Text,
            content: text.into(),
        }
    }

    #[tokio::test]
    async fn sends_the_signed_call_and_returns_the_reply() {
        let stand_in = StandIn::start(|request, _| {
            if signed_with(request, SECRET) {
                Answer::json(
                    200,
                    json!({"content_type": 1, "content": "hi alice", "extra": 1}),
                )
            } else {
                Answer::text(401, "bad signature")
            }
        })
        .await;
        let agent = agent(
            json!({ "url": format!("{}/hook", stand_in.url), "secret": SECRET, "history": 1 }),
        );
        let history = [message("h1", "first"), message("h2", "second")];
        let reply = ask(&agent, &message("m1", "hello"), &history).await;
        assert_eq!(reply, Ok(said("hi alice")));

        let request = &stand_in.requests()[0];
        assert_eq!(
            (request.method.as_str(), request.path.as_str()),
            ("POST", "/hook")
        );
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert_eq!(request.header(MSG_ID_HEADER), Some("m1"));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let sent: u128 = request.header(TIMESTAMP_HEADER).unwrap().parse().unwrap();
        assert!(
            now.abs_diff(sent) < 60_000,
            "timestamp {sent} is not now ({now})"
        );
        let body = request.json();
        assert_eq!(body["agent_id"], "hook");
        assert_eq!(
            body["message"],
            serde_json::to_value(message("m1", "hello")).unwrap()
        );
        // Only the configured number of earlier messages, the latest ones.
        assert_eq!(body["history"].as_array().unwrap().len(), 1);
        assert_eq!(body["history"][0]["msg_id"], "h2");
    }

    #[tokio::test]
    async fn a_wrong_secret_makes_a_signature_the_webhook_rejects() {
        let stand_in = StandIn::start(|request, _| {
            if signed_with(request, SECRET) {
                Answer::json(200, json!({"content_type": 1, "content": "ok"}))
            } else {
                Answer::text(401, "bad signature")
            }
        })
        .await;
        let forger = agent(json!({ "url": stand_in.url, "secret": "not-the-secret" }));
        let reply = ask(&forger, &message("m1", "hello"), &[]).await;
        assert_eq!(
            reply,
            Err(AgentError::Failed {
                agent: "hook".into(),
                cause: "webhook answered HTTP 401: bad signature".into()
            })
        );
        assert!(!signed_with(&stand_in.requests()[0], SECRET));
        assert!(signed_with(&stand_in.requests()[0], "not-the-secret"));
    }

    #[tokio::test]
    async fn declines_defers_and_media_replies_are_mapped() {
        let stand_in =
            StandIn::start(
                |request, _| match request.json()["message"]["content"].as_str() {
                    Some("no") => {
                        Answer::json(200, json!({"reply": false, "reason": "closed_on_sunday"}))
                    }
                    Some("no reason") => Answer::json(200, json!({"reply": false})),
                    Some("204") => Answer::text(204, ""),
                    Some("later") => Answer::text(202, ""),
                    Some("picture") => Answer::json(
                        200,
                        json!({"content_type": 2, "content": "{\"file_ids\":[\"f1\"]}"}),
                    ),
                    Some("bad picture") => {
                        Answer::json(200, json!({"content_type": 2, "content": "f1"}))
                    }
                    Some("bad type") => {
                        Answer::json(200, json!({"content_type": 9, "content": "x"}))
                    }
                    Some("half") => Answer::json(200, json!({"content": "x"})),
                    _ => Answer::text(200, "<html>not json</html>"),
                },
            )
            .await;
        let agent = hook(&stand_in.url);
        let ask = |text: &'static str| {
            let agent = &agent;
            async move { ask(agent, &message("m", text), &[]).await }
        };
        assert_eq!(
            ask("no").await,
            Ok(Reply::Declined("closed_on_sunday".into()))
        );
        assert_eq!(ask("no reason").await, Ok(Reply::Declined(DECLINED.into())));
        assert_eq!(ask("204").await, Ok(Reply::Declined(DECLINED.into())));
        assert_eq!(ask("later").await, Ok(Reply::Deferred));
        assert_eq!(
            ask("picture").await,
            Ok(Reply::Content {
                content_type: ContentType::Image,
                content: "{\"file_ids\":[\"f1\"]}".into()
            })
        );
        let cause = |reply: Result<Reply, AgentError>| match reply {
            Err(AgentError::Failed { cause, .. }) => cause,
            other => panic!("not a failure: {other:?}"),
        };
        let bad = cause(ask("bad picture").await);
        assert!(
            bad.starts_with(
                "webhook answered 200 with a malformed response body (a media reply's content:"
            ),
            "{bad}"
        );
        let bad = cause(ask("bad type").await);
        assert!(
            bad.contains("content_type 9 is not one of 1, 2, 3 or 4"),
            "{bad}"
        );
        let bad = cause(ask("half").await);
        assert!(
            bad.contains("a reply needs \"content_type\" and \"content\""),
            "{bad}"
        );
        let bad = cause(ask("html").await);
        assert!(
            bad.starts_with("webhook answered 200 with a malformed response body ("),
            "{bad}"
        );
        assert!(bad.ends_with("): <html>not json</html>"), "{bad}");
        // None of these was retried.
        assert_eq!(stand_in.calls(), 9);
    }

    #[tokio::test]
    async fn server_errors_are_retried_with_the_same_msg_id_and_client_errors_are_not() {
        let stand_in =
            StandIn::start(
                |request, n| match (request.json()["message"]["content"].as_str(), n) {
                    (Some("flaky"), 0) => Answer::text(503, "warming up"),
                    (Some("flaky"), _) => {
                        Answer::json(200, json!({"content_type": 1, "content": "made it"}))
                    }
                    _ => Answer::text(422, "{\"error\":\n\"unprocessable\"}"),
                },
            )
            .await;
        let agent = hook(&stand_in.url);
        assert_eq!(
            ask(&agent, &message("m1", "flaky"), &[]).await,
            Ok(said("made it"))
        );
        let requests = stand_in.requests();
        assert_eq!(requests.len(), 2);
        assert!(
            requests
                .iter()
                .all(|r| r.header(MSG_ID_HEADER) == Some("m1"))
        );
        assert!(requests.iter().all(|r| signed_with(r, SECRET)));

        let reply = ask(&agent, &message("m2", "invalid"), &[]).await;
        assert_eq!(
            reply,
            Err(AgentError::Failed {
                agent: "hook".into(),
                cause: "webhook answered HTTP 422: {\"error\": \"unprocessable\"}".into()
            })
        );
        assert_eq!(stand_in.calls(), 3, "a 4xx is not retried");
    }

    #[tokio::test]
    async fn server_errors_stop_being_retried_after_max_retries() {
        let stand_in = StandIn::start(|_, _| Answer::text(500, "down")).await;
        let agent = agent(
            json!({ "url": stand_in.url, "secret": SECRET, "max_retries": 3, "retry_backoff_ms": 1 }),
        );
        let reply = ask(&agent, &message("m1", "hello"), &[]).await;
        assert_eq!(
            reply,
            Err(AgentError::Failed {
                agent: "hook".into(),
                cause: "webhook answered HTTP 500 (after 4 attempts): down".into()
            })
        );
        assert_eq!(stand_in.calls(), 4);
    }

    #[tokio::test]
    async fn a_webhook_that_does_not_answer_in_time_is_a_timeout_and_is_not_retried() {
        let stand_in = StandIn::start(|_, _| Answer::Hang).await;
        let agent = agent(
            json!({ "url": stand_in.url, "secret": SECRET, "timeout_ms": 300, "retry_backoff_ms": 1 }),
        );
        let started = Instant::now();
        let reply = ask(&agent, &message("m1", "hello"), &[]).await;
        assert_eq!(
            reply,
            Err(AgentError::Timeout {
                agent: "hook".into(),
                deadline: Duration::from_millis(300)
            })
        );
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(stand_in.calls(), 1, "the webhook may have acted on it");
    }

    #[tokio::test]
    async fn a_refused_connection_is_retried_then_fails_with_its_cause() {
        let url = refusing_url().await;
        let agent =
            agent(json!({ "url": url, "secret": SECRET, "max_retries": 2, "retry_backoff_ms": 1 }));
        let reply = ask(&agent, &message("m1", "hello"), &[]).await;
        let Err(AgentError::Failed { cause, .. }) = reply else {
            panic!("not a failure: {reply:?}");
        };
        assert!(
            cause.starts_with("webhook call failed: cannot connect: "),
            "{cause}"
        );
        assert!(cause.ends_with(" (after 3 attempts)"), "{cause}");
        assert!(cause.to_lowercase().contains("refused"), "{cause}");
    }

    #[tokio::test]
    async fn a_broken_connection_or_an_oversized_body_fails_without_a_retry() {
        let stand_in =
            StandIn::start(
                |request, _| match request.json()["message"]["content"].as_str() {
                    Some("close") => Answer::Close,
                    _ => Answer::text(200, &"x".repeat(http::MAX_RESPONSE_BYTES + 1)),
                },
            )
            .await;
        let agent = hook(&stand_in.url);
        let cause = |reply: Result<Reply, AgentError>| match reply {
            Err(AgentError::Failed { cause, .. }) => cause,
            other => panic!("not a failure: {other:?}"),
        };
        // The webhook got the call and may have acted on it: it is not called again.
        let broken = cause(ask(&agent, &message("m1", "close"), &[]).await);
        assert!(
            broken.starts_with("webhook call failed: the connection failed: "),
            "{broken}"
        );
        assert_eq!(stand_in.calls(), 1);
        assert_eq!(
            cause(ask(&agent, &message("m2", "huge"), &[]).await),
            "webhook call failed: the response body is larger than 1048576 bytes"
        );
        assert_eq!(stand_in.calls(), 2);
    }

    #[tokio::test]
    async fn retries_stop_at_the_deadline() {
        let stand_in = StandIn::start(|_, _| Answer::text(502, "bad gateway")).await;
        // The first wait (400 ms) would end after the deadline (300 ms): one attempt only.
        let agent = agent(
            json!({ "url": stand_in.url, "secret": SECRET, "timeout_ms": 300, "max_retries": 5, "retry_backoff_ms": 400 }),
        );
        let reply = ask(&agent, &message("m1", "hello"), &[]).await;
        assert_eq!(
            reply,
            Err(AgentError::Failed {
                agent: "hook".into(),
                cause: "webhook answered HTTP 502: bad gateway".into()
            })
        );
        assert_eq!(stand_in.calls(), 1);
    }

    #[tokio::test]
    async fn the_secret_can_come_from_an_environment_variable() {
        let stand_in = StandIn::start(|request, _| {
            if signed_with(request, "from-env") {
                Answer::json(200, json!({"content_type": 1, "content": "ok"}))
            } else {
                Answer::text(401, "bad signature")
            }
        })
        .await;
        let config = json!({ "url": stand_in.url, "secret_env": "HOOK_SECRET" }).to_string();
        let env = Environment::from_fn(|name| (name == "HOOK_SECRET").then(|| "from-env".into()));
        let agent = Webhook::from_config("hook", &config, env).unwrap();
        assert_eq!(
            ask(&agent, &message("m1", "hello"), &[]).await,
            Ok(said("ok"))
        );

        let config = json!({ "url": stand_in.url, "secret_env": "UNSET_SECRET" }).to_string();
        let agent = Webhook::from_config("hook", &config, Environment::from_fn(|_| None)).unwrap();
        let reply = ask(&agent, &message("m2", "hello"), &[]).await;
        assert_eq!(
            reply,
            Err(AgentError::Failed {
                agent: "hook".into(),
                cause: "the webhook's secret is not set: environment variable UNSET_SECRET is empty or missing".into()
            })
        );
        assert_eq!(stand_in.calls(), 1, "nothing is sent unsigned");
    }

    #[test]
    fn signatures_match_other_implementations() {
        // Computed with Python's hmac module, as in the verification snippet of docs/agents.md.
        assert_eq!(
            sign("s3cret", "1700000000000", br#"{"agent_id":"hook"}"#),
            "6c87dacda494facbe7d97d297d17ad630a231609aef06e102c33097649713e8e"
        );
    }

    #[test]
    fn configuration_errors_say_what_is_wrong() {
        let build = |config: serde_json::Value| {
            Webhook::from_config("hook", &config.to_string(), Environment::from_fn(|_| None))
                .map(drop)
                .unwrap_err()
        };
        let url = "https://hooks.example.com/x";
        assert!(build(json!({ "url": url })).contains("a signing secret is required"));
        assert!(
            build(json!({ "url": url, "secret": "a", "secret_env": "B" })).contains("not both")
        );
        assert!(build(json!({ "url": url, "secret": "" })).contains("empty"));
        assert!(build(json!({ "url": "hooks.example.com", "secret": "a" })).contains("http://"));
        assert!(
            build(json!({ "url": url, "secret": "a", "history": 201 }))
                .contains("history must be at most 200")
        );
        assert!(
            build(json!({ "url": url, "secret": "a", "timeout_ms": 0 })).contains("timeout_ms")
        );
        assert!(
            build(json!({ "url": url, "secret": "a", "colour": "red" }))
                .contains("unknown field `colour`")
        );
        let agent = agent(json!({ "url": url, "secret": "a" }));
        assert_eq!(agent.history_len(), DEFAULT_HISTORY);
        assert_eq!(
            agent.policy.timeout,
            Duration::from_millis(DEFAULT_TIMEOUT_MS)
        );
        assert!(
            !format!("{agent:?}").contains("\"a\""),
            "the secret stays out of logs"
        );
    }
}
