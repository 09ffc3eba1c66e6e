//! The accept loop. Each TCP connection is served by its own task, so a slow client never holds
//! up the next accept: the TLS handshake (when configured) and the HTTP request head must each
//! complete within the header-read timeout, and the head must fit the header size limits, which
//! cuts off clients that trickle or bloat their upgrade.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::{Extension, Router};
use hyper::rt::{Read, Write};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::gateway::Gateway;

/// How long to pause after a failed accept (say, out of file descriptors) before the next one,
/// so that the loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The address a request came from, for per-address limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerAddr(pub(crate) SocketAddr);

/// Accepts connections until shutdown begins, then lets plain HTTP requests in progress finish.
/// Upgraded WebSocket connections are no longer HTTP connections: their sessions are tracked
/// by the gateway itself.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    gateway: Arc<Gateway>,
    tls: Option<TlsAcceptor>,
) {
    let (limits, timeouts) = (&gateway.config.limits, &gateway.config.timeouts);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(timeouts.header_read())
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers);
    let permits = Arc::new(Semaphore::new(limits.max_http_connections));
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = gateway.stopping.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // Permit before serving: over the limit the connection is closed at once, before it
        // costs a task, a handshake or a buffer.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            gateway
                .metrics
                .http_connections_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "connection refused: too many HTTP connections");
            continue;
        };
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "cannot disable Nagle's algorithm");
        }
        let connection = Connection {
            http: http.clone(),
            router: router.clone().layer(Extension(PeerAddr(peer))),
            stopping: gateway.stopping.clone(),
            peer,
        };
        let (tls, handshake_timeout) = (tls.clone(), timeouts.header_read());
        connections.spawn(async move {
            let _permit = permit;
            connection.serve(stream, tls, handshake_timeout).await;
        });
    }
    connections.close();
    connections.wait().await;
}

/// One accepted TCP connection, until it is upgraded or closed.
struct Connection {
    http: http1::Builder,
    router: Router,
    stopping: CancellationToken,
    peer: SocketAddr,
}

impl Connection {
    async fn serve(self, stream: TcpStream, tls: Option<TlsAcceptor>, handshake_timeout: Duration) {
        let Some(tls) = tls else {
            return self.serve_http(TokioIo::new(stream)).await;
        };
        match tokio::time::timeout(handshake_timeout, tls.accept(stream)).await {
            Ok(Ok(stream)) => self.serve_http(TokioIo::new(stream)).await,
            Ok(Err(err)) => {
                tracing::debug!(peer = %self.peer, error = %err, "TLS handshake failed")
            }
            Err(_) => tracing::debug!(peer = %self.peer, "TLS handshake timed out"),
        }
    }

    async fn serve_http<I: Read + Write + Unpin + Send + 'static>(self, io: I) {
        let service = TowerToHyperService::new(self.router);
        let connection = self.http.serve_connection(io, service).with_upgrades();
        let mut connection = std::pin::pin!(connection);
        let outcome = tokio::select! {
            outcome = connection.as_mut() => outcome,
            () = self.stopping.cancelled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(err) = outcome {
            tracing::debug!(peer = %self.peer, error = %err, "HTTP connection ended with an error");
        }
    }
}
