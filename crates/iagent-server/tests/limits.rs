//! Limits and liveness: protocol-level abuse (a frame over the size limit, invalid UTF-8 in a
//! text frame) closes only the offending connection with 1009 / 1007; an app at its connection
//! limit is refused with 429 and `Retry-After` until a slot frees; a peer that stops answering
//! pings is closed while one that keeps reading stays, and one that stops reading is dropped at
//! the write timeout with its responses rerouted; an app at its in-flight limit gets 50
//! `overloaded` for a message that is then not recorded; and `/healthz` answers while serving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{FRAME_WAIT, TestGateway, assert_response, private};
use futures_util::{SinkExt, StreamExt};
use iagent_server::Config;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

#[tokio::test]
async fn a_frame_over_the_size_limit_closes_only_its_connection_with_1009() {
    let mut config = Config::default();
    config.limits.max_frame_bytes = 1024;
    config.limits.max_text_bytes = 512;
    let gateway = TestGateway::with_config(config).await;
    let mut offender = gateway.connect().await;
    let mut other = gateway.connect().await;

    // A frame under the limit is read as usual.
    let fits = private("fits", "alice", &"a".repeat(512));
    assert!(fits.to_string().len() < 1024);
    assert_response(&offender.ask(&fits).await, "fits", 0);

    let too_big = private("too-big", "alice", &"b".repeat(2_000));
    assert!(too_big.to_string().len() > 1024);
    offender.send(&too_big).await;
    let close = offender.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1009, "{close:?}");

    gateway
        .wait_for_metric("iagent_connections{app=\"app1\"}", 1)
        .await;
    let response = other.ask(&private("other", "bob", "still here")).await;
    assert_response(&response, "other", 0);
    assert_eq!(response["content"], "still here");
    // The oversized frame was never read as a message: no response was made for it.
    assert_eq!(gateway.store.completions("too-big"), 0);
    assert_eq!(
        gateway
            .metric("iagent_responses_total{app=\"app1\",resp_code=\"40\"}")
            .await,
        0
    );
    gateway.stop().await;
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_closes_only_its_connection_with_1007() {
    let gateway = TestGateway::start().await;
    let mut offender = gateway.connect().await;
    let mut other = gateway.connect().await;

    let mut bytes = br#"{"chat_type":1,"msg_id":"bad-utf8","content":""#.to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    bytes.extend_from_slice(br#""}"#);
    assert!(std::str::from_utf8(&bytes).is_err());
    offender
        .ws
        .send(WsMessage::Frame(Frame::message(
            bytes,
            OpCode::Data(Data::Text),
            true,
        )))
        .await
        .expect("frame sent");
    let close = offender.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1007, "{close:?}");

    gateway
        .wait_for_metric("iagent_connections{app=\"app1\"}", 1)
        .await;
    assert_response(
        &other.ask(&private("other", "bob", "still here")).await,
        "other",
        0,
    );
    gateway.stop().await;
}

#[tokio::test]
async fn an_app_at_its_connection_limit_is_refused_with_429_until_a_slot_frees() {
    let mut config = Config::default();
    config.limits.max_connections_per_app = 2;
    let gateway = TestGateway::with_config(config).await;
    let mut first = gateway.connect().await;
    let mut second = gateway.connect().await;

    let (status, body, retry_after) = gateway.refused(&gateway.token).await;
    assert_eq!(status, 429, "{body}");
    let retry_after = retry_after.expect("a Retry-After header");
    assert!(
        retry_after.parse::<u64>().is_ok_and(|secs| secs > 0),
        "Retry-After is a number of seconds: {retry_after}"
    );
    let error: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
    let text = error["error"].as_str().expect("an error text");
    assert!(text.contains('2'), "names the limit: {text}");
    assert!(
        !text.contains(&gateway.token),
        "the token never appears: {text}"
    );

    // The refusal changed nothing: both connections still work.
    assert_response(&first.ask(&private("f1", "alice", "hi")).await, "f1", 0);
    assert_response(&second.ask(&private("s1", "bob", "hi")).await, "s1", 0);
    assert_eq!(gateway.metric("iagent_connections{app=\"app1\"}").await, 2);

    // The limit is per app: another app connects freely.
    let other_token = gateway.create_app("app2").await;
    let mut other_app = gateway.connect_with(&other_token).await;
    assert_response(&other_app.ask(&private("o1", "carol", "hi")).await, "o1", 0);

    // One closes: a new connection is admitted in its place, and the limit holds again.
    first.close().await;
    gateway
        .wait_for_metric("iagent_connections{app=\"app1\"}", 1)
        .await;
    let mut third = gateway.connect().await;
    assert_response(&third.ask(&private("t1", "dave", "hi")).await, "t1", 0);
    assert_eq!(gateway.refused(&gateway.token).await.0, 429);
    assert_response(&second.ask(&private("s2", "bob", "hi")).await, "s2", 0);
    assert_eq!(
        gateway
            .metric("iagent_connections_refused_total{app=\"app1\"}")
            .await,
        2,
        "both refusals are counted"
    );
    gateway.stop().await;
}

/// A config whose connections are pinged every 100 ms and dead after 2 unanswered pings.
fn fast_pings() -> Config {
    let mut config = Config::default();
    config.timeouts.ping_interval_ms = 100;
    config.timeouts.dead_after_pings = 2;
    config
}

#[tokio::test]
async fn a_peer_that_never_answers_pings_is_closed() {
    let gateway = TestGateway::with_config(fast_pings()).await;
    // The handshake completes, then the client never polls its stream again, so it never
    // answers a ping (tungstenite answers pings only while the stream is read).
    let silent = gateway.connect().await;
    gateway
        .wait_for_metric("iagent_connections{app=\"app1\"}", 0)
        .await;

    // The gateway really dropped it: reading now ends with a close or an error, not silence.
    let mut silent = silent;
    let ended = tokio::time::timeout(FRAME_WAIT, async {
        loop {
            match silent.ws.next().await {
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                Some(Ok(WsMessage::Close(_)) | Err(_)) | None => return,
                Some(Ok(other)) => panic!("unexpected frame {other:?}"),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the dead connection was not closed");

    // The gateway itself is fine: a new connection is served.
    let mut fresh = gateway.connect().await;
    assert_response(
        &fresh.ask(&private("fresh", "alice", "hi")).await,
        "fresh",
        0,
    );
    gateway.stop().await;
}

/// A peer that sends and never reads: once the socket's buffers are full, the gateway's write
/// to it waits, and past `write_timeout_ms` the connection is dropped and what it could not
/// take goes to the rest of the pool.
#[tokio::test]
async fn a_peer_that_stops_reading_is_dropped_at_the_write_timeout_and_its_responses_rerouted() {
    let mut config = Config::default();
    config.timeouts.write_timeout_ms = 200;
    let gateway = TestGateway::with_config(config).await;
    let mut reader = gateway.connect().await;
    let stalled = gateway.connect().await;
    gateway
        .wait_for_metric("iagent_connections{app=\"app1\"}", 2)
        .await;

    // Echoes of 16 KiB (the largest text) fill the loopback's buffers within a few hundred
    // messages; the sending stops by itself when the gateway drops the connection. The
    // receiving half is never polled: nothing is read.
    let (mut sink, _never_read) = stalled.ws.split();
    let text = "x".repeat(16 * 1024);
    let sending = tokio::spawn(async move {
        for n in 0..4096 {
            let message = private(&format!("stalled-{n}"), &format!("user-{n}"), &text);
            if sink
                .send(WsMessage::text(message.to_string()))
                .await
                .is_err()
            {
                return;
            }
        }
    });

    // The stalled connection leaves the pool at its write timeout, and its responses come
    // out of the one that reads.
    gateway
        .wait_for_metric("iagent_connections{app=\"app1\"}", 1)
        .await;
    let response = reader.recv().await;
    let ref_msg_id = response["ref_msg_id"].as_str().expect("a response");
    assert!(ref_msg_id.starts_with("stalled-"), "{response}");
    assert_eq!(response["resp_code"], 0);
    assert!(
        gateway.metric("iagent_rerouted_total{app=\"app1\"}").await >= 1,
        "the unwritten responses were rerouted"
    );
    sending.abort();
    gateway.stop().await;
}

/// A shutdown that begins while a peer has stopped reading: the connection's writer gives up
/// at the write timeout, and everything waiting for room in its full queue (responses routed
/// to it, its own closing frame) is routed elsewhere instead of waiting for ever, so the
/// shutdown ends.
#[tokio::test]
async fn a_shutdown_ends_while_a_peer_has_stopped_reading() {
    let mut config = Config::default();
    config.timeouts.write_timeout_ms = 1_000;
    config.timeouts.shutdown_grace_ms = 300;
    config.limits.outbound_queue = 4;
    let gateway = TestGateway::with_config(config).await;
    let stalled = gateway.connect().await;
    let (mut sink, _never_read) = stalled.ws.split();
    // 8 MiB of echoes, more than the loopback's buffers hold: the writer's socket fills, its
    // queue fills behind it, and the conversations wait for room in it.
    let text = "x".repeat(16 * 1024);
    for n in 0..512 {
        let message = private(&format!("s{n}"), &format!("user-{n}"), &text);
        sink.send(WsMessage::text(message.to_string()))
            .await
            .expect("the gateway reads");
    }
    // Fails if the gateway has not stopped within 30 s: it ends after the write timeout and
    // the two grace periods, about 1.6 s.
    gateway.stop().await;
}

#[tokio::test]
async fn a_peer_that_keeps_reading_answers_pings_and_stays_connected() {
    let gateway = TestGateway::with_config(fast_pings()).await;
    let mut client = gateway.connect().await;

    // Read for six ping intervals, three times the dead window: tungstenite answers each ping
    // while we poll.
    let until = tokio::time::Instant::now() + Duration::from_millis(600);
    let mut pings = 0;
    loop {
        match tokio::time::timeout_at(until, client.ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(WsMessage::Ping(_)))) => pings += 1,
            Ok(other) => panic!("unexpected while idle: {other:?}"),
        }
    }
    assert!(
        pings >= 2,
        "the gateway pings every 50 ms; got {pings} pings"
    );

    assert_eq!(gateway.metric("iagent_connections{app=\"app1\"}").await, 1);
    let response = client.ask(&private("alive", "alice", "still here")).await;
    assert_response(&response, "alive", 0);
    assert_eq!(response["content"], "still here");
    gateway.stop().await;
}

#[tokio::test]
async fn over_the_in_flight_limit_a_message_gets_50_overloaded_and_is_not_recorded() {
    let mut config = Config::default();
    config.limits.max_in_flight_per_app = 1;
    let gateway = TestGateway::with_config(config).await;
    let mut client = gateway.connect().await;

    gateway.store.hold("h");
    client.send(&private("h", "alice", "held")).await;
    gateway
        .wait_for_metric("iagent_in_flight{app=\"app1\"}", 1)
        .await;

    let response = client.ask(&private("second", "bob", "later")).await;
    assert_response(&response, "second", 50);
    assert!(
        response["content"].as_str().unwrap().contains("overloaded"),
        "{response}"
    );
    assert_eq!(response["receiver_id"], "bob");
    assert_eq!(response["sender_id"], "echo");

    gateway.store.release("h");
    let response = client.recv().await;
    assert_response(&response, "h", 0);
    assert_eq!(response["content"], "held");
    gateway
        .wait_for_metric("iagent_in_flight{app=\"app1\"}", 0)
        .await;

    // The refused message was not recorded: resent, it is processed as new.
    let response = client.ask(&private("second", "bob", "later")).await;
    assert_response(&response, "second", 0);
    assert_eq!(response["content"], "later");
    assert_eq!(gateway.store.completions("second"), 1);
    assert_eq!(
        gateway
            .metric("iagent_duplicates_total{app=\"app1\"}")
            .await,
        0
    );
    assert_eq!(
        gateway
            .metric("iagent_responses_total{app=\"app1\",resp_code=\"50\"}")
            .await,
        1
    );
    gateway.stop().await;
}

#[tokio::test]
async fn healthz_answers_ok_while_serving() {
    let gateway = TestGateway::start().await;
    let (status, body) = gateway.get("/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(body.trim(), "ok");

    // Still ok with a connection open and traffic flowing.
    let mut client = gateway.connect().await;
    assert_response(&client.ask(&private("m", "alice", "hi")).await, "m", 0);
    let (status, body) = gateway.get("/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));
    gateway.stop().await;
}

#[tokio::test]
async fn a_noisy_sender_is_refused_beyond_its_in_flight_limit_while_others_are_served() {
    let mut config = Config::default();
    config.limits.max_in_flight_per_sender = 2;
    let gateway = TestGateway::with_config(config).await;
    let mut client = gateway.connect().await;
    gateway.store.hold("n1");
    client.send(&private("n1", "noisy", "one")).await;
    client.send(&private("n2", "noisy", "two")).await;
    gateway
        .wait_for_metric("iagent_in_flight{app=\"app1\"}", 2)
        .await;

    let refused = client.ask(&private("n3", "noisy", "three")).await;
    assert_response(&refused, "n3", 50);
    assert!(
        refused["content"]
            .as_str()
            .unwrap()
            .starts_with("sender busy: noisy"),
        "{refused}"
    );
    // Another user on the same connection is served meanwhile.
    assert_response(&client.ask(&private("q1", "quiet", "hi")).await, "q1", 0);

    gateway.store.release("n1");
    assert_response(&client.recv().await, "n1", 0);
    assert_response(&client.recv().await, "n2", 0);
    // The refused message was not recorded: resent, it is processed.
    assert_response(&client.ask(&private("n3", "noisy", "three")).await, "n3", 0);
    gateway.stop().await;
}

#[tokio::test]
async fn an_app_over_its_rate_gets_50_and_other_apps_are_unaffected() {
    const RATE: u32 = 5;
    let mut config = Config::default();
    config.limits.max_messages_per_second_per_app = RATE;
    let gateway = TestGateway::with_config(config).await;
    let other_token = gateway.create_app("app2").await;
    let mut client = gateway.connect().await;
    let started = std::time::Instant::now();
    for i in 0..20 {
        client
            .send(&private(&format!("r{i}"), "alice", "burst"))
            .await;
    }
    let mut answered = 0;
    let mut limited = 0;
    for _ in 0..20 {
        let response = client.recv().await;
        match response["resp_code"].as_u64() {
            Some(0) => answered += 1,
            Some(50) => {
                assert!(
                    response["content"]
                        .as_str()
                        .unwrap()
                        .starts_with("rate limited"),
                    "{response}"
                );
                limited += 1;
            }
            _ => panic!("unexpected {response}"),
        }
    }
    // A burst of one second's worth passes, plus what refilled while the burst was read: at
    // most the rate times the time until the last response (an upper bound on that time).
    let refilled = (started.elapsed().as_secs_f64() * f64::from(RATE)).floor() as u32;
    assert!(
        (RATE..=RATE + refilled).contains(&answered),
        "answered {answered}, refilled <= {refilled}"
    );
    assert_eq!(answered + limited, 20);
    // app2 has its own bucket: its whole burst passes although app1's is spent.
    let mut other = gateway.connect_with(&other_token).await;
    for i in 0..RATE {
        assert_response(
            &other.ask(&private(&format!("o{i}"), "bob", "x")).await,
            &format!("o{i}"),
            0,
        );
    }
    gateway.stop().await;
}
