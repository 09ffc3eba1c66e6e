//! The outbound HTTP(S) client of the kinds that call a service (`webhook`, `openai`): one
//! keep-alive connection pool per process, JSON POSTs under a deadline, bounded response bodies,
//! retries with exponential backoff, and failures classified by whether a retry can help.
//!
//! TLS is rustls with the Mozilla roots compiled in (`webpki-roots`), so `https://` works on a
//! host without system certificates, and `http://` works for services on a private network or
//! the same machine.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tokio_rustls::rustls::crypto::ring;

/// The largest response body read, in bytes (1 MiB). A reply is a chat message, a few KiB at
/// most; the bound keeps a misbehaving service from taking the gateway's memory. A larger body
/// is an error, whatever its status.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// How long opening a connection (TCP and TLS) may take, at most (5 s). A service that cannot be
/// reached in this time is treated like one that refused the connection: the request was
/// never sent, so it is retried while the agent's timeout allows.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an idle pooled connection is kept for reuse (60 s): long enough to carry a
/// conversation's next message, short enough not to hold sockets a service has forgotten.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Idle connections kept per host (32): the concurrent calls a busy agent makes to one service.
pub const MAX_IDLE_PER_HOST: usize = 32;

/// The longest wait between two attempts (10 s), however many attempts came before.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The most retries a configuration may ask for (10).
pub const MAX_RETRIES: u32 = 10;

/// The longest `timeout_ms` a configuration may give (10 minutes). The gateway's agent deadline
/// (`timeouts.agent_deadline_ms`) bounds every call anyway.
pub const MAX_TIMEOUT_MS: u64 = 10 * 60 * 1000;

/// The most characters of a service's response body quoted in an error (200): enough to carry
/// its message, short enough to fit in a 50 response and a log line.
const EXCERPT_CHARS: usize = 200;

type Connector = HttpsConnector<HttpConnector>;

/// A cloneable handle to the process's connection pool.
#[derive(Clone, Debug)]
pub(crate) struct HttpClient {
    client: Client<Connector, Full<Bytes>>,
}

/// The process's one client: agents of every app that call the same host share its
/// connections, however often the agents are rebuilt.
static SHARED: OnceLock<Result<HttpClient, String>> = OnceLock::new();

/// The shared client; `Err` when TLS cannot be set up (which the ring provider always can).
pub(crate) fn shared() -> Result<HttpClient, String> {
    SHARED.get_or_init(HttpClient::new).clone()
}

impl HttpClient {
    fn new() -> Result<Self, String> {
        let mut http = HttpConnector::new();
        // The scheme is checked by the TLS layer, which also serves `http://`.
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_nodelay(true);
        let connector = HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(ring::default_provider())
            .map_err(|err| format!("cannot set up TLS: {err}"))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        // No pool timer: idle connections past their timeout are dropped when the pool is next
        // used, so the pool spawns no background task of its own.
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
            .build(connector);
        Ok(Self { client })
    }

    /// POSTs `body` (JSON) to `url` once, with `headers`; the response's body is read whole
    /// (at most [`MAX_RESPONSE_BYTES`]) within `timeout`.
    async fn post_json(
        &self,
        url: &Uri,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Response, HttpError> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = url.clone();
        let map = request.headers_mut();
        map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in headers {
            map.insert(name, value);
        }
        let exchange = async {
            let response = self.client.request(request).await.map_err(|err| {
                if err.is_connect() {
                    HttpError::Connect(causes(&err))
                } else {
                    HttpError::Transport(causes(&err))
                }
            })?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|err| {
                    if err.is::<LengthLimitError>() {
                        HttpError::TooLarge
                    } else {
                        HttpError::Transport(causes(err.as_ref()))
                    }
                })?
                .to_bytes();
            Ok(Response {
                status,
                retry_after,
                body,
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(HttpError::Timeout))
    }

    /// POSTs `body` to `url` until it gets a final answer, within `policy`'s timeout measured
    /// from the first attempt. An attempt is repeated only when the request certainly was not
    /// acted on or the service asked for a retry: after a connection failure, or a status for
    /// which `retry_status` says yes, while retries are left and the wait before the next
    /// attempt ends before the deadline. Never after a timeout or a broken response: the
    /// service may have acted on the request. `headers` is called for each attempt (a signature
    /// may cover the attempt's time).
    ///
    /// Returns the last outcome, and how many attempts were made.
    pub(crate) async fn post_with_retries(
        &self,
        url: &Uri,
        headers: impl Fn() -> Result<Vec<(HeaderName, HeaderValue)>, HttpError>,
        body: Bytes,
        policy: &RetryPolicy,
        retry_status: impl Fn(StatusCode) -> bool,
    ) -> (Result<Response, HttpError>, u32) {
        let deadline = Instant::now() + policy.timeout;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return (Err(HttpError::Timeout), attempts - 1);
            }
            let outcome = match headers() {
                Ok(headers) => self.post_json(url, headers, body.clone(), remaining).await,
                Err(err) => return (Err(err), attempts),
            };
            let wait = match &outcome {
                Err(HttpError::Connect(_)) => policy.backoff(attempts),
                Ok(response) if retry_status(response.status) => response
                    .retry_after
                    .unwrap_or_else(|| policy.backoff(attempts)),
                _ => return (outcome, attempts),
            };
            if attempts > policy.max_retries || Instant::now() + wait >= deadline {
                return (outcome, attempts);
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// What a service answered.
#[derive(Debug, Clone)]
pub(crate) struct Response {
    pub(crate) status: StatusCode,
    /// `Retry-After`, when given in seconds.
    pub(crate) retry_after: Option<Duration>,
    pub(crate) body: Bytes,
}

impl Response {
    /// The body as JSON of type `T`.
    pub(crate) fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|err| HttpError::Malformed {
            cause: err.to_string(),
            excerpt: excerpt(&self.body),
        })
    }
}

/// Why a call to a service failed, classified by whether the service may have acted on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HttpError {
    /// No connection could be made (refused, name not resolved, TLS handshake failed, no
    /// connection within [`CONNECT_TIMEOUT`]): the request was not sent, so a retry is safe.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// No complete answer within the time left. The service may have received the request and
    /// acted on it.
    #[error("no answer in time")]
    Timeout,
    /// The connection broke after the request was sent: the outcome is unknown.
    #[error("the connection failed: {0}")]
    Transport(String),
    /// The response body is larger than [`MAX_RESPONSE_BYTES`].
    #[error("the response body is larger than {} bytes", MAX_RESPONSE_BYTES)]
    TooLarge,
    /// The response body is not what the service's contract says.
    #[error("malformed response body ({cause}): {excerpt}")]
    Malformed {
        /// What is wrong with it.
        cause: String,
        /// The start of the body, on one line.
        excerpt: String,
    },
    /// A request could not be made from the agent's configuration.
    #[error("{0}")]
    Request(String),
}

/// How often, and for how long, a call is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetryPolicy {
    /// The time all attempts of one call may take together, from the first attempt's start.
    pub(crate) timeout: Duration,
    /// Attempts after the first.
    pub(crate) max_retries: u32,
    /// The wait after the first attempt; it doubles after each further one, up to
    /// [`MAX_BACKOFF`].
    pub(crate) backoff: Duration,
}

impl RetryPolicy {
    /// The wait after attempt `attempt` (counting from 1).
    fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(16);
        self.backoff.saturating_mul(1 << doublings).min(MAX_BACKOFF)
    }
}

/// The timeout and retry keys every kind that calls a service shares, as configured (each kind
/// has its own defaults); [`Timing::policy`] checks them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// See [`RetryPolicy::timeout`], in ms.
    pub(crate) timeout_ms: u64,
    /// See [`RetryPolicy::max_retries`].
    pub(crate) max_retries: u32,
    /// See [`RetryPolicy::backoff`], in ms.
    pub(crate) retry_backoff_ms: u64,
}

impl Timing {
    /// The policy these keys describe, or what is wrong with them.
    pub(crate) fn policy(self) -> Result<RetryPolicy, String> {
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            return Err(format!(
                "timeout_ms must be between 1 and {MAX_TIMEOUT_MS}, not {}",
                self.timeout_ms
            ));
        }
        if self.max_retries > MAX_RETRIES {
            return Err(format!(
                "max_retries must be at most {MAX_RETRIES}, not {}",
                self.max_retries
            ));
        }
        let backoff = Duration::from_millis(self.retry_backoff_ms);
        if backoff > MAX_BACKOFF {
            return Err(format!(
                "retry_backoff_ms must be at most {}, not {}",
                MAX_BACKOFF.as_millis(),
                self.retry_backoff_ms
            ));
        }
        Ok(RetryPolicy {
            timeout: Duration::from_millis(self.timeout_ms),
            max_retries: self.max_retries,
            backoff,
        })
    }
}

/// Reads a service URL from a configuration: `http://` or `https://` with a host.
pub(crate) fn parse_url(key: &str, url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|err| format!("{key}: {url:?} is not an http:// or https:// URL: {err}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(format!(
                "{key}: {url:?} must start with http:// or https://"
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{key}: {url:?} has no host"));
    }
    Ok(uri)
}

/// Up to [`EXCERPT_CHARS`] characters of a body, on one line: what an error quotes of a
/// service's answer, without letting it forge log lines or flood a response.
pub(crate) fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut words = text.split(|c: char| c.is_whitespace() || c.is_control());
    let mut out = String::new();
    let mut chars = 0;
    for word in words.by_ref().filter(|word| !word.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
            chars += 1;
        }
        for c in word.chars() {
            if chars == EXCERPT_CHARS {
                out.push('…');
                return out;
            }
            out.push(c);
            chars += 1;
        }
    }
    if out.is_empty() {
        "(empty body)".into()
    } else {
        out
    }
}

/// An error and its causes, `outer: inner: innermost`, skipping repeats: hyper's own message
/// ("client error (Connect)") says little, its sources say what happened.
fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// Lowercase hexadecimal, as signatures are written.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let policy = RetryPolicy {
            timeout: Duration::from_secs(1),
            max_retries: 3,
            backoff: Duration::from_millis(100),
        };
        assert_eq!(policy.backoff(1), Duration::from_millis(100));
        assert_eq!(policy.backoff(2), Duration::from_millis(200));
        assert_eq!(policy.backoff(3), Duration::from_millis(400));
        assert_eq!(policy.backoff(60), MAX_BACKOFF);
    }

    #[test]
    fn excerpts_are_one_bounded_line() {
        assert_eq!(excerpt(b"  bad\r\ngateway\t\x1b[31m "), "bad gateway [31m");
        assert_eq!(excerpt(b""), "(empty body)");
        let long = excerpt("é".repeat(500).as_bytes());
        assert_eq!(long.chars().count(), EXCERPT_CHARS + 1);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn urls_need_a_scheme_and_a_host() {
        assert!(parse_url("url", "https://example.com/hook").is_ok());
        assert!(parse_url("url", "http://127.0.0.1:9000").is_ok());
        assert!(
            parse_url("url", "example.com:80")
                .unwrap_err()
                .contains("must start with http:// or https://")
        );
        assert!(
            parse_url("url", "example.com/hook")
                .unwrap_err()
                .contains("is not an http:// or https:// URL")
        );
        assert!(parse_url("url", "ftp://example.com").is_err());
        assert!(parse_url("url", "not a url").is_err());
    }

    #[test]
    fn timing_is_checked() {
        let timing = Timing {
            timeout_ms: 1000,
            max_retries: 2,
            retry_backoff_ms: 100,
        };
        assert!(timing.policy().is_ok());
        for bad in [
            Timing {
                timeout_ms: 0,
                ..timing
            },
            Timing {
                max_retries: MAX_RETRIES + 1,
                ..timing
            },
            Timing {
                retry_backoff_ms: 60_000,
                ..timing
            },
        ] {
            assert!(bad.policy().is_err());
        }
    }

    #[test]
    fn hex_is_lowercase_and_padded() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }
}
