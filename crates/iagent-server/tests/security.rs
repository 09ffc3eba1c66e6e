//! The front door under hostile clients: request heads that trickle in or are too large are cut
//! off, an address that keeps failing authentication is refused before its token is looked up,
//! an Origin outside the allow-list is refused, and idle HTTP connections cannot pile up.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{FRAME_WAIT, TestGateway, assert_response, private};
use iagent_server::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// Reads until the server closes the connection; returns what it sent.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    tokio::time::timeout(FRAME_WAIT, stream.read_to_end(&mut received))
        .await
        .expect("the gateway closed the connection in time")
        .ok();
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test]
async fn a_request_head_that_trickles_in_is_cut_off() {
    let mut config = Config::default();
    config.timeouts.header_read_ms = 200;
    let gateway = TestGateway::with_config(config).await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(b"GET /ws/v1/chat HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // The head never completes; the gateway must not wait for it forever.
    let answer = read_to_close(&mut stream).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    // Others are unaffected.
    assert_response(
        &gateway.connect().await.ask(&private("m", "u", "x")).await,
        "m",
        0,
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_request_head_over_the_limit_is_refused_with_431() {
    let gateway = TestGateway::start().await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    let huge = "a".repeat(64 * 1024);
    let request = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: {huge}\r\n\r\n");
    // The gateway may close before reading it all; the write's result does not matter.
    stream.write_all(request.as_bytes()).await.ok();
    let answer = read_to_close(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.80}");

    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let request = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    stream.write_all(request.as_bytes()).await.ok();
    let answer = read_to_close(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.80}");
    gateway.stop().await;
}

#[tokio::test]
async fn an_address_failing_authentication_repeatedly_is_refused_even_with_a_valid_token() {
    let mut config = Config::default();
    config.security.auth_failures_per_window = 3;
    let gateway = TestGateway::with_config(config).await;
    for _ in 0..3 {
        assert_eq!(gateway.refused("iat_guess").await.0, 401);
    }
    let (status, body, retry_after) = gateway.refused(&gateway.token).await;
    assert_eq!(status, 429, "{body}");
    let retry_after: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(gateway.metric("iagent_auth_throttled_total").await, 1);
    assert_eq!(gateway.metric("iagent_auth_failures_total").await, 3);
    gateway.stop().await;
}

#[tokio::test]
async fn an_origin_outside_the_allow_list_is_refused_with_403() {
    let mut config = Config::default();
    config.security.allowed_origins = vec!["https://app.example".into()];
    let gateway = TestGateway::with_config(config).await;
    let with_origin = |origin: &'static str| {
        let mut request = gateway.url(&gateway.token).into_client_request().unwrap();
        request
            .headers_mut()
            .insert("origin", HeaderValue::from_static(origin));
        request
    };
    match tokio_tungstenite::connect_async(with_origin("https://evil.example")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 403);
        }
        other => panic!("expected a 403, got {:?}", other.map(|_| ())),
    }
    assert_eq!(gateway.metric("iagent_origin_refused_total").await, 1);
    let (ws, _) = tokio_tungstenite::connect_async(with_origin("https://app.example"))
        .await
        .expect("allowed");
    drop(ws);
    // Backends send no Origin at all: always allowed.
    assert_response(
        &gateway.connect().await.ask(&private("m", "u", "x")).await,
        "m",
        0,
    );
    gateway.stop().await;
}

#[tokio::test]
async fn connections_past_the_http_connection_limit_are_closed_at_once() {
    let mut config = Config::default();
    config.limits.max_http_connections = 2;
    let gateway = TestGateway::with_config(config).await;
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        idle.push(stream);
    }
    // The two idle connections hold both places until the head timeout; the third is closed.
    let mut third = TcpStream::connect(gateway.addr).await.unwrap();
    assert_eq!(read_to_close(&mut third).await, "");
    drop(idle);
    // Their places free once the gateway notices they closed.
    let deadline = tokio::time::Instant::now() + FRAME_WAIT;
    loop {
        let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut stream).await;
        if answer.starts_with("HTTP/1.1 200") {
            // The third connection, and any retry that came before the places freed.
            let refused: u64 = answer
                .lines()
                .find_map(|line| line.strip_prefix("iagent_http_connections_refused_total "))
                .expect("the series")
                .parse()
                .unwrap();
            assert!(refused >= 1, "{refused}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the places never freed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gateway.stop().await;
}
