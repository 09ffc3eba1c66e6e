//! The `openai` kind: a model behind any OpenAI-compatible chat-completions endpoint (OpenAI,
//! vLLM, Ollama, llama.cpp's server, ...) answers, with the conversation so far as context.
//!
//! Each message becomes one `POST {base_url}/chat/completions`: the system prompt, the
//! conversation's last `history` messages (the agent's own replies as `assistant`, everything
//! else as `user`; in group chats each prefixed with `[sender_id] ` so the model can tell the
//! speakers apart), then the message itself. The first choice's text is the reply.
//!
//! With `vision` on, an image message is sent as `image_url` parts holding the images
//! themselves as `data:` URLs (read from the app's files, at most [`MAX_IMAGE_BYTES`] in all),
//! for vision-capable models; earlier images in the history are sent as `[image]`.
//!
//! ```json
//! {
//!   "model": "gpt-4o-mini",
//!   "api_key_env": "OPENAI_API_KEY",
//!   "system_prompt": "You are the shop's helpful assistant. Answer briefly.",
//!   "history": 20,
//!   "temperature": 0.3,
//!   "max_tokens": 400
//! }
//! ```

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use hyper::header::{AUTHORIZATION, HeaderName, HeaderValue};
use hyper::{StatusCode, Uri};
use iagent_protocol::validate::parse_file_ids;
use iagent_protocol::{ChatType, ContentType, Message, SenderType};
use serde::{Deserialize, Serialize};

use crate::http::{self, HttpClient, HttpError, Response, RetryPolicy, Timing};
use crate::{Agent, AgentError, Environment, MAX_HISTORY, Reply, ReplyStrategy, Replying, Turn};

/// The kind's name in configuration.
pub const KIND: &str = "openai";

/// The endpoint's base URL unless configured: OpenAI's own API.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// How long a call may take, all attempts together, unless configured (25 s): below the
/// gateway's default agent deadline (30 s), so that a slow model is reported by this agent,
/// with its cause, rather than cut off by the gateway.
pub const DEFAULT_TIMEOUT_MS: u64 = 25_000;

/// Earlier messages of the conversation sent as context, unless configured (20).
pub const DEFAULT_HISTORY: usize = 20;

/// Attempts after the first, unless configured (2).
pub const DEFAULT_MAX_RETRIES: u32 = 2;

/// The wait before the first retry, unless configured (500 ms); it doubles with each retry. A
/// `Retry-After` from the provider takes its place.
pub const DEFAULT_RETRY_BACKOFF_MS: u64 = 500;

/// The reason code of the 10 sent for a message the model cannot be shown: voice, video, and
/// images unless `vision` is on.
pub const UNSUPPORTED_CONTENT: &str = "unsupported_content";

/// The most image bytes one message may send to the model (8 MiB, before base64, which adds a
/// third): the request is built in memory, and providers refuse larger requests anyway
/// (OpenAI takes at most 20 MB per image). A message whose images are larger is answered with
/// 50, saying so.
pub const MAX_IMAGE_BYTES: usize = 8 << 20;

/// The highest `temperature` the API accepts.
const MAX_TEMPERATURE: f64 = 2.0;

/// The OpenAI-compatible agent.
#[derive(Debug, Clone)]
pub struct OpenAi {
    id: String,
    strategy: ReplyStrategy,
    url: Uri,
    model: String,
    api_key_env: Option<String>,
    system_prompt: Option<String>,
    history: usize,
    temperature: Option<f64>,
    max_tokens: Option<u32>,
    vision: bool,
    policy: RetryPolicy,
    env: Environment,
    client: HttpClient,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_base_url")]
    base_url: String,
    model: String,
    #[serde(default)]
    api_key_env: Option<String>,
    #[serde(default)]
    system_prompt: Option<String>,
    #[serde(default = "default_history")]
    history: usize,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_max_retries")]
    max_retries: u32,
    #[serde(default = "default_retry_backoff_ms")]
    retry_backoff_ms: u64,
    #[serde(default)]
    vision: bool,
    #[serde(default)]
    strategy: ReplyStrategy,
}

fn default_base_url() -> String {
    DEFAULT_BASE_URL.into()
}
fn default_history() -> usize {
    DEFAULT_HISTORY
}
fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}
fn default_max_retries() -> u32 {
    DEFAULT_MAX_RETRIES
}
fn default_retry_backoff_ms() -> u64 {
    DEFAULT_RETRY_BACKOFF_MS
}

/// The request body of `POST /chat/completions`.
#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<ChatMessage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
}

/// One message of the context.
#[derive(Serialize)]
struct ChatMessage {
    role: Role,
    content: Content,
}

/// A message's content: text, or parts (text and images) for vision models.
#[derive(Serialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Serialize)]
struct ImageUrl {
    /// `data:<mime type>;base64,<bytes>`.
    url: String,
}

#[derive(Serialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum Role {
    System,
    User,
    Assistant,
}

/// The parts of a completion this agent reads; providers add many more.
#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
}

impl OpenAi {
    /// An agent from its JSON configuration; `env` is where `api_key_env` is looked up.
    pub fn from_config(id: &str, config: &str, env: Environment) -> Result<Self, String> {
        let config: Config = crate::parse_config(config)?;
        let base = config.base_url.trim_end_matches('/');
        let url = http::parse_url("base_url", &format!("{base}/chat/completions"))?;
        if config.model.trim().is_empty() {
            return Err("model must not be empty".into());
        }
        if config.api_key_env.as_deref() == Some("") {
            return Err("api_key_env is empty; leave it out to send no API key".into());
        }
        if config.history > MAX_HISTORY {
            return Err(format!(
                "history must be at most {MAX_HISTORY}, not {}",
                config.history
            ));
        }
        if let Some(temperature) = config.temperature
            && !(0.0..=MAX_TEMPERATURE).contains(&temperature)
        {
            return Err(format!(
                "temperature must be between 0 and {MAX_TEMPERATURE}, not {temperature}"
            ));
        }
        if config.max_tokens == Some(0) {
            return Err("max_tokens must be at least 1".into());
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
            model: config.model,
            api_key_env: config.api_key_env,
            system_prompt: config.system_prompt.filter(|prompt| !prompt.is_empty()),
            history: config.history,
            temperature: config.temperature,
            max_tokens: config.max_tokens,
            vision: config.vision,
            policy,
            env,
            client: http::shared()?,
        })
    }

    fn failed(&self, cause: impl Into<String>) -> AgentError {
        AgentError::Failed {
            agent: self.id.clone(),
            cause: cause.into(),
        }
    }

    /// The `Authorization` header, when an API key is configured.
    fn authorization(&self) -> Result<Option<HeaderValue>, AgentError> {
        let Some(name) = &self.api_key_env else {
            return Ok(None);
        };
        let key = self
            .env
            .get(name)
            .filter(|key| !key.is_empty())
            .ok_or_else(|| {
                self.failed(format!(
                    "the API key is not set: environment variable {name} is empty or missing"
                ))
            })?;
        let mut value = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
            self.failed(format!(
                "the API key in environment variable {name} is not a valid header value"
            ))
        })?;
        value.set_sensitive(true);
        Ok(Some(value))
    }

    /// What the model is told of `message`: who wrote it, as a role, and its text, labelled
    /// with its sender in group chats.
    fn context_message(&self, message: &Message, group: bool) -> ChatMessage {
        let own = message.sender_type == SenderType::Agent && message.sender_id == self.id;
        let text = match message.content_type {
            ContentType::Text => message.content.as_str(),
            ContentType::Image => "[image]",
            ContentType::Voice => "[voice message]",
            ContentType::Video => "[video]",
        };
        let (role, content) = if own {
            (Role::Assistant, text.to_owned())
        } else if group {
            (Role::User, format!("[{}] {text}", message.sender_id))
        } else {
            (Role::User, text.to_owned())
        };
        ChatMessage {
            role,
            content: Content::Text(content),
        }
    }

    /// An image message as the model sees it with vision: its images as `data:` URLs, after
    /// the sender's label in group chats.
    async fn image_message(&self, turn: Turn<'_>) -> Result<ChatMessage, AgentError> {
        let ids = parse_file_ids(&turn.message.content)
            .map_err(|err| self.failed(format!("cannot read the image message: {err}")))?
            .file_ids;
        let mut parts = Vec::with_capacity(ids.len() + 1);
        if turn.message.chat_type == ChatType::Group {
            parts.push(Part::Text {
                text: format!("[{}]", turn.message.sender_id),
            });
        }
        let mut total = 0usize;
        for id in &ids {
            let file = turn
                .files
                .read(id)
                .await
                .map_err(|cause| self.failed(cause))?
                .ok_or_else(|| self.failed(format!("image {id} no longer exists")))?;
            let mime = media_type(&file.content_type)
                .filter(|mime| mime.starts_with("image/"))
                .ok_or_else(|| {
                    self.failed(format!(
                        "file {id} is not an image: its type is {:?}",
                        file.content_type
                    ))
                })?;
            total = total.saturating_add(file.bytes.len());
            if total > MAX_IMAGE_BYTES {
                return Err(self.failed(format!(
                    "the message's images are larger than {} MiB together, the most sent to a model",
                    MAX_IMAGE_BYTES >> 20
                )));
            }
            parts.push(Part::ImageUrl {
                image_url: ImageUrl {
                    url: format!("data:{mime};base64,{}", BASE64.encode(&file.bytes)),
                },
            });
        }
        Ok(ChatMessage {
            role: Role::User,
            content: Content::Parts(parts),
        })
    }

    /// The request's messages: the system prompt, the history, the message.
    async fn messages(&self, turn: Turn<'_>) -> Result<Vec<ChatMessage>, AgentError> {
        let group = turn.message.chat_type == ChatType::Group;
        let history = &turn.history[turn.history.len().saturating_sub(self.history)..];
        let mut messages = Vec::with_capacity(history.len() + 2);
        if let Some(prompt) = &self.system_prompt {
            messages.push(ChatMessage {
                role: Role::System,
                content: Content::Text(prompt.clone()),
            });
        }
        messages.extend(
            history
                .iter()
                .map(|message| self.context_message(message, group)),
        );
        messages.push(match turn.message.content_type {
            ContentType::Image => self.image_message(turn).await?,
            _ => self.context_message(turn.message, group),
        });
        Ok(messages)
    }

    async fn call(&self, turn: Turn<'_>) -> Result<Reply, AgentError> {
        match turn.message.content_type {
            ContentType::Text => {}
            ContentType::Image if self.vision => {}
            _ => return Ok(Reply::Declined(UNSUPPORTED_CONTENT.into())),
        }
        let authorization = self.authorization()?;
        let request = ChatRequest {
            model: &self.model,
            messages: self.messages(turn).await?,
            temperature: self.temperature,
            max_tokens: self.max_tokens,
        };
        let body = serde_json::to_vec(&request)
            .map_err(|err| self.failed(format!("cannot encode the request: {err}")))?;
        let headers = || -> Result<Vec<(HeaderName, HeaderValue)>, HttpError> {
            Ok(authorization
                .iter()
                .map(|value| (AUTHORIZATION, value.clone()))
                .collect())
        };
        let (outcome, attempts) = self
            .client
            .post_with_retries(
                &self.url,
                headers,
                Bytes::from(body),
                &self.policy,
                |status| status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error(),
            )
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
            Err(err) => Err(self.failed(format!("cannot call the model: {err}{tries}"))),
        }
    }

    /// The reply a completion stands for, or the provider's error.
    fn interpret(&self, response: &Response, tries: &str) -> Result<Reply, AgentError> {
        if response.status != StatusCode::OK {
            return Err(self.failed(format!(
                "the model's provider answered HTTP {}{tries}: {}",
                response.status.as_u16(),
                provider_error(&response.body)
            )));
        }
        let completion: Completion = response
            .json()
            .map_err(|err| self.failed(format!("the model's provider answered with a {err}")))?;
        let Some(choice) = completion.choices.into_iter().next() else {
            return Err(self.failed("the model's provider answered with no choices"));
        };
        let content = choice.message.content.unwrap_or_default();
        let content = content.trim();
        if content.is_empty() {
            return Err(self.failed(match choice.message.refusal {
                Some(refusal) => {
                    format!("the model refused: {}", http::excerpt(refusal.as_bytes()))
                }
                None => "the model's reply is empty".into(),
            }));
        }
        Ok(Reply::Content {
            content_type: ContentType::Text,
            content: content.to_owned(),
        })
    }
}

/// The media type of a stored file's `Content-Type`, lowercased and without parameters, if it
/// is a plain `type/subtype` that can go into a `data:` URL as it is.
fn media_type(content_type: &str) -> Option<String> {
    let mime = content_type.split(';').next()?.trim().to_ascii_lowercase();
    let (kind, subtype) = mime.split_once('/')?;
    let token = |part: &str| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    (token(kind) && token(subtype)).then_some(mime)
}

/// The provider's own words for an error: `error.message` of an OpenAI-style error body (or
/// `error` when it is a string, as some servers send), else the start of the body; one line.
fn provider_error(body: &[u8]) -> String {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|value| match &value["error"] {
            serde_json::Value::String(message) => Some(message.clone()),
            error => error["message"].as_str().map(str::to_owned),
        });
    match message {
        Some(message) => http::excerpt(message.as_bytes()),
        None => http::excerpt(body),
    }
}

impl Agent for OpenAi {
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

    use iagent_protocol::RespCode;
    use serde_json::{Value, json};

    use super::*;
    use crate::NoFiles;
    use crate::stand_in::{Answer, StandIn};

    fn message(chat_type: ChatType, sender: (SenderType, &str), text: &str) -> Message {
        Message {
            chat_type,
            msg_id: format!("m-{text}"),
            ref_msg_id: None,
            timestamp: 1,
            group_id: (chat_type == ChatType::Group).then(|| "room".into()),
            sender_type: sender.0,
            sender_id: sender.1.into(),
            receiver_id: None,
            resp_code: RespCode::Ok,
            content_type: ContentType::Text,
            content: text.into(),
        }
    }

    fn user(name: &str) -> (SenderType, &str) {
        (SenderType::User, name)
    }

    fn agent_sender(name: &str) -> (SenderType, &str) {
        (SenderType::Agent, name)
    }

    fn completion(text: &str) -> Answer {
        Answer::json(
            200,
            json!({
                "id": "chatcmpl-1", "object": "chat.completion", "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
            }),
        )
    }

    fn build(config: Value, env: Environment) -> Result<OpenAi, String> {
        OpenAi::from_config("bot", &config.to_string(), env)
    }

    fn agent(config: Value) -> OpenAi {
        build(config, Environment::from_fn(|_| None)).unwrap()
    }

    async fn ask(
        agent: &OpenAi,
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

    fn said(text: &str) -> Reply {
        Reply::Content {
            content_type: ContentType::Text,
            content: text.into(),
        }
    }

    fn cause(reply: Result<Reply, AgentError>) -> String {
        match reply {
            Err(AgentError::Failed { cause, .. }) => cause,
            other => panic!("not a failure: {other:?}"),
        }
    }

    #[tokio::test]
    async fn sends_prompt_history_and_settings_and_returns_the_first_choice() {
        let stand_in = StandIn::start(|_, _| completion("\n  Hello, Alice!  ")).await;
        let env = Environment::from_fn(|name| (name == "BOT_KEY").then(|| "sk-test".into()));
        let agent = build(
            json!({
                "base_url": format!("{}/v1/", stand_in.url), "model": "small-model",
                "api_key_env": "BOT_KEY", "system_prompt": "Be brief.", "history": 2,
                "temperature": 0.25, "max_tokens": 64
            }),
            env,
        )
        .unwrap();
        let history = [
            message(ChatType::Private, user("alice"), "too old"),
            message(ChatType::Private, user("alice"), "hi"),
            message(ChatType::Private, agent_sender("bot"), "hello"),
        ];
        let reply = ask(
            &agent,
            &message(ChatType::Private, user("alice"), "how are you?"),
            &history,
        )
        .await;
        assert_eq!(reply, Ok(said("Hello, Alice!")));

        let request = &stand_in.requests()[0];
        assert_eq!(request.path, "/v1/chat/completions");
        assert_eq!(request.header("authorization"), Some("Bearer sk-test"));
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert_eq!(
            request.json(),
            json!({
                "model": "small-model",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "how are you?"}
                ],
                "temperature": 0.25,
                "max_tokens": 64
            })
        );
    }

    #[tokio::test]
    async fn group_messages_are_labelled_with_their_senders() {
        let stand_in = StandIn::start(|_, _| completion("noted")).await;
        let agent = agent(json!({ "base_url": stand_in.url, "model": "m" }));
        let history = [
            message(ChatType::Group, user("alice"), "lunch at noon?"),
            message(ChatType::Group, agent_sender("planner"), "noon is free"),
            message(ChatType::Group, agent_sender("bot"), "I can book it"),
        ];
        let now = message(ChatType::Group, user("bob"), "@bot book it");
        assert_eq!(ask(&agent, &now, &history).await, Ok(said("noted")));
        let request = &stand_in.requests()[0];
        // No key configured: no Authorization header (local servers); no unset settings sent.
        assert_eq!(request.header("authorization"), None);
        assert_eq!(
            request.json(),
            json!({
                "model": "m",
                "messages": [
                    {"role": "user", "content": "[alice] lunch at noon?"},
                    {"role": "user", "content": "[planner] noon is free"},
                    {"role": "assistant", "content": "I can book it"},
                    {"role": "user", "content": "[bob] @bot book it"}
                ]
            })
        );
    }

    #[tokio::test]
    async fn rate_limits_and_server_errors_are_retried_honouring_retry_after() {
        let stand_in = StandIn::start(|_, n| match n {
            0 => Answer::Respond {
                status: 429,
                headers: vec![("Retry-After".into(), "1".into())],
                body: json!({"error": {"message": "Rate limit reached"}}).to_string(),
            },
            1 => Answer::text(502, "bad gateway"),
            _ => completion("finally"),
        })
        .await;
        let agent =
            agent(json!({ "base_url": stand_in.url, "model": "m", "retry_backoff_ms": 10 }));
        let started = Instant::now();
        let reply = ask(&agent, &message(ChatType::Private, user("a"), "hi"), &[]).await;
        assert_eq!(reply, Ok(said("finally")));
        assert_eq!(stand_in.calls(), 3);
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "Retry-After was not honoured"
        );
    }

    #[tokio::test]
    async fn a_retry_after_beyond_the_deadline_ends_the_call_at_once() {
        let stand_in = StandIn::start(|_, _| Answer::Respond {
            status: 429,
            headers: vec![("Retry-After".into(), "30".into())],
            body: json!({"error": {"message": "Rate limit reached for requests"}}).to_string(),
        })
        .await;
        let agent = agent(json!({ "base_url": stand_in.url, "model": "m", "timeout_ms": 2000 }));
        let started = Instant::now();
        let reply = ask(&agent, &message(ChatType::Private, user("a"), "hi"), &[]).await;
        assert_eq!(
            cause(reply),
            "the model's provider answered HTTP 429: Rate limit reached for requests"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(stand_in.calls(), 1);
    }

    #[tokio::test]
    async fn provider_errors_are_reported_in_its_words_and_not_retried() {
        let stand_in = StandIn::start(|request, _| match request.json()["model"].as_str() {
            Some("wrong-key") => Answer::json(
                401,
                json!({"error": {"message": "Incorrect API key provided: sk-...\nSee the docs.", "type": "invalid_request_error"}}),
            ),
            Some("ollama") => Answer::json(404, json!({"error": "model \"llama9\" not found"})),
            Some("no-choices") => Answer::json(200, json!({"choices": []})),
            Some("refuses") => Answer::json(200, json!({"choices": [{"message": {"content": null, "refusal": "I can't help with that."}}]})),
            _ => Answer::text(200, "not json"),
        })
        .await;
        let ask_model = |model: &'static str| {
            let agent = agent(json!({ "base_url": stand_in.url, "model": model }));
            async move { cause(ask(&agent, &message(ChatType::Private, user("a"), "hi"), &[]).await) }
        };
        assert_eq!(
            ask_model("wrong-key").await,
            "the model's provider answered HTTP 401: Incorrect API key provided: sk-... See the docs."
        );
        assert_eq!(
            ask_model("ollama").await,
            "the model's provider answered HTTP 404: model \"llama9\" not found"
        );
        assert_eq!(
            ask_model("no-choices").await,
            "the model's provider answered with no choices"
        );
        assert_eq!(
            ask_model("refuses").await,
            "the model refused: I can't help with that."
        );
        assert!(
            ask_model("garbled")
                .await
                .starts_with("the model's provider answered with a malformed response body (")
        );
        assert_eq!(stand_in.calls(), 5);
    }

    #[tokio::test]
    async fn a_model_that_does_not_answer_in_time_is_a_timeout() {
        let stand_in = StandIn::start(|_, _| Answer::Hang).await;
        let agent = agent(json!({ "base_url": stand_in.url, "model": "m", "timeout_ms": 250 }));
        let started = Instant::now();
        let reply = ask(&agent, &message(ChatType::Private, user("a"), "hi"), &[]).await;
        assert_eq!(
            reply,
            Err(AgentError::Timeout {
                agent: "bot".into(),
                deadline: Duration::from_millis(250)
            })
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(stand_in.calls(), 1);
    }

    #[tokio::test]
    async fn a_missing_api_key_fails_without_calling_and_media_is_declined() {
        let stand_in = StandIn::start(|_, _| completion("x")).await;
        let agent = agent(
            json!({ "base_url": stand_in.url, "model": "m", "api_key_env": "NOT_SET_ANYWHERE" }),
        );
        assert_eq!(
            cause(ask(&agent, &message(ChatType::Private, user("a"), "hi"), &[]).await),
            "the API key is not set: environment variable NOT_SET_ANYWHERE is empty or missing"
        );
        let mut voice = message(ChatType::Private, user("a"), "");
        voice.content_type = ContentType::Voice;
        voice.content = r#"{"file_ids":["f1"]}"#.into();
        assert_eq!(
            ask(&agent, &voice, &[]).await,
            Ok(Reply::Declined(UNSUPPORTED_CONTENT.into()))
        );
        assert_eq!(stand_in.calls(), 0);
    }

    /// Files held in memory, by id.
    struct MemoryFiles(Vec<(&'static str, &'static str, Vec<u8>)>);

    impl crate::Files for MemoryFiles {
        fn read<'a>(
            &'a self,
            file_id: &'a str,
        ) -> crate::BoxFuture<'a, Result<Option<crate::File>, String>> {
            let found =
                self.0
                    .iter()
                    .find(|(id, _, _)| *id == file_id)
                    .map(|(_, content_type, bytes)| crate::File {
                        content_type: (*content_type).into(),
                        bytes: bytes.clone(),
                    });
            Box::pin(std::future::ready(Ok(found)))
        }
    }

    fn image(chat_type: ChatType, ids: &[&str]) -> Message {
        let mut message = message(chat_type, user("alice"), "");
        message.content_type = ContentType::Image;
        message.content = json!({ "file_ids": ids }).to_string();
        message
    }

    #[tokio::test]
    async fn with_vision_images_are_sent_as_data_urls() {
        let stand_in = StandIn::start(|_, _| completion("a cat")).await;
        let agent = agent(json!({ "base_url": stand_in.url, "model": "m", "vision": true }));
        let files = MemoryFiles(vec![
            ("f1", "image/png", b"\x89PNG-one".to_vec()),
            ("f2", "Image/JPEG; q=1", b"jpeg?".to_vec()),
            ("doc", "application/pdf", b"%PDF".to_vec()),
            ("big", "image/png", vec![0; MAX_IMAGE_BYTES + 1]),
        ]);
        let ask_with = |message: Message| {
            let (agent, files) = (&agent, &files);
            async move {
                let history = [self::message(ChatType::Group, user("bob"), "look")];
                agent
                    .reply(Turn {
                        message: &message,
                        history: &history,
                        files,
                    })
                    .await
            }
        };
        assert_eq!(
            ask_with(image(ChatType::Group, &["f1", "f2"])).await,
            Ok(said("a cat"))
        );
        let body = stand_in.requests()[0].json();
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": "[bob] look"},
                {"role": "user", "content": [
                    {"type": "text", "text": "[alice]"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORy1vbmU="}},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,anBlZz8="}}
                ]}
            ])
        );

        assert_eq!(
            cause(ask_with(image(ChatType::Private, &["gone"])).await),
            "image gone no longer exists"
        );
        assert_eq!(
            cause(ask_with(image(ChatType::Private, &["doc"])).await),
            "file doc is not an image: its type is \"application/pdf\""
        );
        assert_eq!(
            cause(ask_with(image(ChatType::Private, &["big"])).await),
            "the message's images are larger than 8 MiB together, the most sent to a model"
        );
        assert_eq!(stand_in.calls(), 1);
    }

    #[tokio::test]
    async fn without_vision_images_are_declined_and_history_images_are_named() {
        let stand_in = StandIn::start(|_, _| completion("ok")).await;
        let agent = agent(json!({ "base_url": stand_in.url, "model": "m" }));
        assert_eq!(
            ask(&agent, &image(ChatType::Private, &["f1"]), &[]).await,
            Ok(Reply::Declined(UNSUPPORTED_CONTENT.into()))
        );
        assert_eq!(stand_in.calls(), 0);
        let history = [image(ChatType::Private, &["f1"])];
        let text = message(ChatType::Private, user("alice"), "what was that?");
        assert_eq!(ask(&agent, &text, &history).await, Ok(said("ok")));
        assert_eq!(
            stand_in.requests()[0].json()["messages"][0]["content"],
            "[image]"
        );
    }

    #[test]
    fn media_types_are_plain_and_lowercase() {
        assert_eq!(media_type("image/png").as_deref(), Some("image/png"));
        assert_eq!(
            media_type(" Image/WebP ; x=y").as_deref(),
            Some("image/webp")
        );
        assert_eq!(media_type("image/png,evil"), None);
        assert_eq!(media_type("image"), None);
        assert_eq!(media_type("/png"), None);
    }

    #[test]
    fn configuration_is_checked() {
        let error = |config: Value| {
            build(config, Environment::from_fn(|_| None))
                .map(drop)
                .unwrap_err()
        };
        assert!(error(json!({})).contains("missing field `model`"));
        assert!(error(json!({ "model": " " })).contains("model must not be empty"));
        assert!(error(json!({ "model": "m", "temperature": 2.5 })).contains("temperature"));
        assert!(error(json!({ "model": "m", "max_tokens": 0 })).contains("max_tokens"));
        assert!(
            error(json!({ "model": "m", "history": 201 })).contains("history must be at most 200")
        );
        assert!(error(json!({ "model": "m", "base_url": "localhost:11434" })).contains("base_url"));
        assert!(
            error(json!({ "model": "m", "api_key": "sk-inline" }))
                .contains("unknown field `api_key`")
        );
        let agent = agent(json!({ "model": "m" }));
        assert_eq!(agent.url, "https://api.openai.com/v1/chat/completions");
        assert_eq!(agent.history_len(), DEFAULT_HISTORY);
        assert_eq!(
            agent.policy.timeout,
            Duration::from_millis(DEFAULT_TIMEOUT_MS)
        );
    }
}
