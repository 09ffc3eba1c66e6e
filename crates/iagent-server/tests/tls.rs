//! TLS termination: with a certificate configured, backends connect with `wss://` and talk as
//! over plain WebSockets; a plain-HTTP client gets no service, and a certificate that cannot be
//! read stops the start with a clear error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{TestGateway, assert_response, private};
use futures_util::{SinkExt, StreamExt};
use iagent_server::{Config, ServerError};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, RootCertStore, crypto::ring};
use tokio_tungstenite::tungstenite::Message;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn tls_config() -> Config {
    let mut config = Config::default();
    config.tls.cert_file = fixture("localhost.cert.pem");
    config.tls.key_file = fixture("localhost.key.pem");
    config
}

/// A client that trusts the fixture test CA.
fn connector() -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(fixture("ca.cert.pem")).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn backends_talk_over_wss_when_a_certificate_is_configured() {
    let gateway = TestGateway::with_config(tls_config()).await;
    let tcp = TcpStream::connect(gateway.addr).await.unwrap();
    let tls = connector()
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake");
    let url = format!(
        "wss://localhost:{}/ws/v1/chat?app_token={}",
        gateway.addr.port(),
        gateway.token
    );
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("upgrade over TLS");
    ws.send(Message::text(private("t1", "alice", "secret").to_string()))
        .await
        .unwrap();
    let frame = tokio::time::timeout(common::FRAME_WAIT, ws.next())
        .await
        .expect("in time");
    let Some(Ok(Message::Text(text))) = frame else {
        panic!("no response: {frame:?}")
    };
    let response: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_response(&response, "t1", 0);
    assert_eq!(response["content"], "secret");
    gateway.stop().await;
}

#[tokio::test]
async fn plain_http_gets_no_service_on_a_tls_port() {
    let gateway = TestGateway::with_config(tls_config()).await;
    let mut tcp = TcpStream::connect(gateway.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(common::FRAME_WAIT, tcp.read_to_end(&mut answer))
        .await
        .expect("closed")
        .ok();
    assert!(
        !String::from_utf8_lossy(&answer).contains("ok"),
        "served in plain text"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn an_unreadable_certificate_stops_the_start_with_its_path() {
    let mut config = tls_config();
    config.tls.cert_file = fixture("missing.pem");
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(iagent_store::SqliteStore::open(dir.path(), Default::default()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let outcome = iagent_server::run(listener, config, store, std::future::pending()).await;
    match outcome {
        Err(ServerError::Tls(message)) => assert!(message.contains("missing.pem"), "{message}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }

    let mut half = Config::default();
    half.tls.cert_file = fixture("localhost.cert.pem");
    let problems = half.validate().expect_err("a certificate without a key");
    assert!(
        problems
            .iter()
            .any(|p| p.contains("tls.cert_file and tls.key_file")),
        "{problems:?}"
    );
}
