//! One connection slot of the pool: connect, run the session, reconnect with backoff.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::backoff::{Rng, backoff};
use crate::client::{Config, Event, Shared};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A connection that hears nothing (not even a pong) for this many ping intervals is dead; the
/// gateway uses the same rule.
const DEAD_AFTER_PINGS: u32 = 3;

/// How long a closing connection waits for the gateway's close reply at shutdown.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The outcome of a slot's first connection attempt, reported to [`crate::Client::connect`].
pub(crate) enum FirstAttempt {
    Opened,
    Unauthorized,
    Failed(String),
}

/// Why an attempt did not produce an open connection.
enum Refused {
    /// 401: the token is not accepted.
    Unauthorized,
    /// Anything else; with the gateway's `Retry-After`, when it sent one.
    Other(String, Option<Duration>),
}

/// How a session ended.
enum End {
    Shutdown,
    Lost(String),
}

/// Runs connection slot `index` until shutdown.
pub(crate) async fn run(
    index: usize,
    config: Arc<Config>,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<Event>,
    first: oneshot::Sender<FirstAttempt>,
) {
    let mut first = Some(first);
    let mut report = |outcome: FirstAttempt| {
        if let Some(first) = first.take() {
            // `connect` may have given up waiting (it never does before every report).
            first.send(outcome).ok();
        }
    };
    let mut rng = Rng::from_entropy();
    let mut shutdown = shared.shutdown.subscribe();
    let mut attempt: u32 = 0;
    loop {
        let result = tokio::select! {
            result = open(&config) => result,
            () = stopped(&mut shutdown) => return,
        };
        let delay = match result {
            Ok(ws) => {
                report(FirstAttempt::Opened);
                attempt = 0;
                let (tx, rx) = mpsc::unbounded_channel();
                if events.send(Event::Opened(index, tx)).is_err() {
                    return;
                }
                tracing::debug!(conn = index, "connected");
                let end = session(index, ws, rx, &config, &shared, &mut shutdown).await;
                if events.send(Event::Closed(index)).is_err() {
                    return;
                }
                match end {
                    End::Shutdown => return,
                    End::Lost(reason) => {
                        tracing::info!(conn = index, %reason, "connection lost; reconnecting");
                    }
                }
                backoff(0, config.backoff_min, config.backoff_max, rng.next_f64())
            }
            Err(Refused::Unauthorized) => {
                report(FirstAttempt::Unauthorized);
                tracing::warn!(conn = index, "the gateway refused the token (401)");
                // Retrying soon cannot help: wait the longest.
                config.backoff_max.max(config.backoff_min)
            }
            Err(Refused::Other(reason, retry_after)) => {
                tracing::debug!(conn = index, %reason, attempt, "connection attempt failed");
                report(FirstAttempt::Failed(reason));
                let delay = backoff(
                    attempt,
                    config.backoff_min,
                    config.backoff_max,
                    rng.next_f64(),
                );
                attempt = attempt.saturating_add(1);
                retry_after.map_or(delay, |after| delay.max(after))
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(&mut shutdown) => return,
        }
    }
}

/// One connection attempt: TCP, TLS if `wss://`, and the upgrade, within the connect timeout.
async fn open(config: &Config) -> Result<Socket, Refused> {
    let mut request = config
        .endpoint()
        .into_client_request()
        .map_err(|err| Refused::Other(format!("invalid url: {err}"), None))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {}", config.token))
        .map_err(|_| Refused::Other("the token is not a valid header value".into(), None))?;
    request.headers_mut().insert(header::AUTHORIZATION, bearer);
    match tokio::time::timeout(
        config.connect_timeout,
        tokio_tungstenite::connect_async(request),
    )
    .await
    {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(WsError::Http(response))) if response.status() == StatusCode::UNAUTHORIZED => {
            Err(Refused::Unauthorized)
        }
        Ok(Err(WsError::Http(response))) => {
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.trim().parse().ok())
                .map(Duration::from_secs);
            Err(Refused::Other(
                format!("refused with HTTP {}", response.status()),
                retry_after,
            ))
        }
        Ok(Err(err)) => Err(Refused::Other(err.to_string(), None)),
        Err(_) => Err(Refused::Other("connect timed out".into(), None)),
    }
}

/// Runs one open connection: writes the driver's frames, hands received frames to
/// [`Shared::deliver`], pings, and closes at shutdown.
async fn session(
    index: usize,
    mut ws: Socket,
    mut outgoing: mpsc::UnboundedReceiver<Utf8Bytes>,
    config: &Config,
    shared: &Shared,
    shutdown: &mut watch::Receiver<bool>,
) -> End {
    let interval = config.ping_interval;
    let mut ping = tokio::time::interval_at(Instant::now() + interval, interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            frame = ws.next() => {
                last_heard = Instant::now();
                match frame {
                    Some(Ok(WsMessage::Text(text))) => shared.deliver(index, &text).await,
                    Some(Ok(WsMessage::Close(frame))) => {
                        let reason = frame.map_or_else(
                            || "closed by the gateway".to_owned(),
                            |f| format!("closed by the gateway: {} {}", u16::from(f.code), f.reason),
                        );
                        return End::Lost(reason);
                    }
                    Some(Ok(WsMessage::Binary(_))) => {
                        tracing::warn!(conn = index, "dropped a binary frame");
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => return End::Lost(err.to_string()),
                    None => return End::Lost("the connection ended".into()),
                }
            }
            text = outgoing.recv() => {
                let Some(text) = text else {
                    // The driver ended: shutdown.
                    close(&mut ws).await;
                    return End::Shutdown;
                };
                if let Err(err) = write_batch(&mut ws, text, &mut outgoing).await {
                    return End::Lost(err.to_string());
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() >= interval * DEAD_AFTER_PINGS {
                    return End::Lost(format!("nothing heard for {DEAD_AFTER_PINGS} ping intervals"));
                }
                if let Err(err) = ws.send(WsMessage::Ping(Default::default())).await {
                    return End::Lost(err.to_string());
                }
            }
            () = shared.kills[index].notified() => {
                // Test hook: drop the socket without a close frame.
                return End::Lost("dropped on request".into());
            }
            () = stopped(shutdown) => {
                close(&mut ws).await;
                return End::Shutdown;
            }
        }
    }
}

/// Writes `first` and whatever else is queued, then flushes once.
async fn write_batch(
    ws: &mut Socket,
    first: Utf8Bytes,
    outgoing: &mut mpsc::UnboundedReceiver<Utf8Bytes>,
) -> Result<(), WsError> {
    ws.feed(WsMessage::Text(first)).await?;
    while let Ok(text) = outgoing.try_recv() {
        ws.feed(WsMessage::Text(text)).await?;
    }
    ws.flush().await
}

/// A normal close: send 1000, then wait a little for the gateway's close reply.
async fn close(ws: &mut Socket) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: Utf8Bytes::from_static("client shutting down"),
    };
    if ws.close(Some(frame)).await.is_ok() {
        let drain = async { while let Some(Ok(_)) = ws.next().await {} };
        tokio::time::timeout(CLOSE_WAIT, drain).await.ok();
    }
}

/// Resolves once shutdown began (or the client is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which is a shutdown too.
    shutdown.wait_for(|down| *down).await.ok();
}
