//! The pool: responses with the fields `protocol.md` fixes, codes 0 and 10, many users over a
//! pool of connections, the fallback to another connection or the outbox when the origin is
//! gone, duplicates, authentication and app isolation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;

use common::{Client, TestGateway, assert_response, group, private};
use iagent_store::Store;
use serde_json::Value;
use serde_json::json;

#[tokio::test]
async fn echo_replies_with_the_fields_the_protocol_fixes() {
    let gateway = TestGateway::start().await;
    let mut client = gateway.connect().await;
    let response = client.ask(&private("m1", "alice", "hello")).await;
    assert_response(&response, "m1", 0);
    assert_eq!(response["content"], "hello");
    assert_eq!(response["content_type"], 1);
    assert_eq!(response["chat_type"], 1);
    assert_eq!(response["sender_type"], 2);
    assert_eq!(response["sender_id"], "echo");
    assert_eq!(response["receiver_id"], "alice");
    assert!(response.get("group_id").is_none(), "{response}");
    let msg_id = response["msg_id"].as_str().unwrap();
    assert!(!msg_id.is_empty() && msg_id != "m1");
    assert!(response["timestamp"].as_i64().unwrap() > 1_700_000_000_000);
    gateway.stop().await;
}

#[tokio::test]
async fn group_messages_are_answered_only_when_addressed() {
    let gateway = TestGateway::start().await;
    let mut client = gateway.connect().await;

    let response = client
        .ask(&group("g1", "alice", "room", "hello everyone"))
        .await;
    assert_response(&response, "g1", 10);
    assert_eq!(response["content"], "not_addressed");
    assert_eq!(response["group_id"], "room");
    assert_eq!(response["chat_type"], 2);

    let response = client
        .ask(&group("g2", "alice", "room", "hey @echo say this"))
        .await;
    assert_response(&response, "g2", 0);
    assert_eq!(response["content"], "hey @echo say this");
    assert_eq!(response["group_id"], "room");

    let mut addressed = group("g3", "alice", "room", "by receiver");
    addressed["receiver_id"] = json!("echo");
    assert_response(&client.ask(&addressed).await, "g3", 0);

    // A receiver that is not an agent (another member) leaves the default agent unaddressed.
    let mut to_user = group("g4", "alice", "room", "to bob");
    to_user["receiver_id"] = json!("bob");
    let response = client.ask(&to_user).await;
    assert_response(&response, "g4", 10);
    assert_eq!(response["content"], "not_addressed");
    gateway.stop().await;
}

#[tokio::test]
async fn messages_from_agents_are_stored_but_not_answered() {
    let gateway = TestGateway::start().await;
    let mut client = gateway.connect().await;
    let mut relayed = private("a1", "other-agent", "agent speaking");
    relayed["sender_type"] = json!(2);
    let response = client.ask(&relayed).await;
    assert_response(&response, "a1", 10);
    assert_eq!(response["content"], "sender_is_agent");
    assert_eq!(
        gateway.store.completions("a1"),
        1,
        "recorded like any message"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_pool_under_concurrent_traffic_gets_exactly_one_response_per_message_on_its_own_connection()
 {
    const CONNECTIONS: usize = 4;
    const USERS_PER_CONNECTION: usize = 25;
    const MESSAGES_PER_USER: usize = 8;
    let gateway = TestGateway::start().await;
    let mut tasks = Vec::new();
    for connection in 0..CONNECTIONS {
        let mut client = gateway.connect().await;
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            // Interleave users so that many conversations are in flight on one connection.
            for round in 0..MESSAGES_PER_USER {
                for user in 0..USERS_PER_CONNECTION {
                    let msg_id = format!("c{connection}-u{user}-{round}");
                    let text = format!("{msg_id} text");
                    client
                        .send(&private(&msg_id, &format!("c{connection}-u{user}"), &text))
                        .await;
                    sent.push(msg_id);
                }
            }
            let mut received = Vec::new();
            for _ in 0..sent.len() {
                received.push(client.recv().await);
            }
            (sent, received)
        }));
    }
    for task in tasks {
        let (sent, received) = task.await.unwrap();
        let mut answered = HashSet::new();
        for response in &received {
            assert_eq!(response["resp_code"], 0, "{response}");
            let ref_id = response["ref_msg_id"].as_str().unwrap().to_owned();
            assert_eq!(response["content"], format!("{ref_id} text"));
            assert!(
                answered.insert(ref_id),
                "two responses to one message: {response}"
            );
        }
        assert_eq!(
            answered,
            sent.iter().cloned().collect::<HashSet<_>>(),
            "responses on the wrong connection"
        );
        // Within one conversation, responses come in the order the messages were sent.
        for user in 0..USERS_PER_CONNECTION {
            let order: Vec<_> = received
                .iter()
                .filter_map(|r| r["ref_msg_id"].as_str())
                .filter(|id| id.contains(&format!("-u{user}-")))
                .map(|id| id.rsplit('-').next().unwrap().parse::<usize>().unwrap())
                .collect();
            assert!(
                order.windows(2).all(|w| w[0] < w[1]),
                "out of order for user {user}: {order:?}"
            );
        }
    }
    let total = (CONNECTIONS * USERS_PER_CONNECTION * MESSAGES_PER_USER) as u64;
    assert_eq!(
        gateway
            .metric("iagent_responses_total{app=\"app1\",resp_code=\"0\"}")
            .await,
        total
    );
    assert_eq!(
        gateway
            .metric("iagent_messages_in_total{app=\"app1\"}")
            .await,
        total
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_response_whose_connection_closed_goes_to_another_connection_of_the_app() {
    let gateway = TestGateway::start().await;
    let mut origin = gateway.connect().await;
    let mut other = gateway.connect().await;
    gateway.store.hold("slow");
    origin
        .send(&private("slow", "alice", "take your time"))
        .await;
    // The message was read: it is in flight.
    gateway
        .wait_for_metric("iagent_in_flight{app=\"app1\"}", 1)
        .await;
    origin.close().await;
    gateway
        .wait_for_metric("iagent_connections{app=\"app1\"}", 1)
        .await;
    gateway.store.release("slow");
    let response = other.recv().await;
    assert_response(&response, "slow", 0);
    assert_eq!(response["content"], "take your time");
    assert_eq!(
        gateway.metric("iagent_rerouted_total{app=\"app1\"}").await,
        1
    );
    gateway.stop().await;
}

#[tokio::test]
async fn with_no_connection_open_the_response_waits_in_the_outbox() {
    let gateway = TestGateway::start().await;
    let mut origin = gateway.connect().await;
    gateway.store.hold("late");
    origin.send(&private("late", "alice", "for later")).await;
    gateway
        .wait_for_metric("iagent_in_flight{app=\"app1\"}", 1)
        .await;
    origin.close().await;
    gateway
        .wait_for_metric("iagent_connections{app=\"app1\"}", 0)
        .await;
    gateway.store.release("late");
    gateway
        .wait_for_metric("iagent_outbox_depth{app=\"app1\"}", 1)
        .await;
    let mut next = gateway.connect().await;
    let response = next.recv().await;
    assert_response(&response, "late", 0);
    assert_eq!(response["content"], "for later");
    gateway
        .wait_for_metric("iagent_outbox_depth{app=\"app1\"}", 0)
        .await;
    // Delivered once: a new connection gets nothing more, and its own traffic flows.
    let mut another = gateway.connect().await;
    assert_response(
        &another.ask(&private("after", "bob", "hi")).await,
        "after",
        0,
    );
    gateway.stop().await;
}

/// Holds `message` in the store and sends it on each of `clients` in turn, waiting for the
/// gateway to read each: the first into processing, the others as duplicates of it
/// (`duplicates` is the app's count before). The message stays held.
async fn send_held(
    gateway: &TestGateway,
    message: &Value,
    clients: &mut [&mut Client],
    duplicates: u64,
) {
    gateway
        .store
        .hold(message["msg_id"].as_str().expect("msg_id"));
    for (n, client) in (0..).zip(clients.iter_mut()) {
        client.send(message).await;
        if n == 0 {
            gateway
                .wait_for_metric("iagent_in_flight{app=\"app1\"}", 1)
                .await;
        } else {
            gateway
                .wait_for_metric("iagent_duplicates_total{app=\"app1\"}", duplicates + n)
                .await;
        }
    }
}

/// The app's count of response copies (see `delivery::deliver_answer`).
async fn copies(gateway: &TestGateway) -> u64 {
    gateway
        .metric("iagent_response_copies_total{app=\"app1\"}")
        .await
}

#[tokio::test]
async fn a_resent_msg_id_is_answered_again_without_a_second_agent_call() {
    let gateway = TestGateway::start().await;
    let mut first = gateway.connect().await;
    let original = first.ask(&private("once", "alice", "only once")).await;
    assert_response(&original, "once", 0);

    // Resent on another connection after it was answered: the stored response, again.
    let mut second = gateway.connect().await;
    let again = second.ask(&private("once", "alice", "only once")).await;
    assert_eq!(
        again, original,
        "the stored response is sent again as it was"
    );

    // Resent while still in flight: processed once, and its response goes to both connections
    // it came in on, since the gateway cannot know which of them the backend still reads.
    let busy = private("busy", "bob", "working");
    send_held(&gateway, &busy, &mut [&mut first, &mut second], 1).await;
    gateway.store.release("busy");
    let answered = second.recv().await;
    assert_response(&answered, "busy", 0);
    assert_eq!(first.recv().await, answered, "the same response, copied");

    assert_eq!(gateway.store.completions("once"), 1);
    assert_eq!(gateway.store.completions("busy"), 1);
    assert_eq!(
        gateway
            .metric("iagent_duplicates_total{app=\"app1\"}")
            .await,
        2
    );
    assert_eq!(copies(&gateway).await, 1);
    gateway.stop().await;
}

/// When the connection a message was read on last has closed, an earlier one still open gets
/// the response, once: it is not both copied there and rerouted there.
#[tokio::test]
async fn with_the_last_connection_closed_an_earlier_one_gets_the_response_once() {
    let gateway = TestGateway::start().await;
    let mut first = gateway.connect().await;
    let mut second = gateway.connect().await;
    gateway
        .wait_for_metric("iagent_connections{app=\"app1\"}", 2)
        .await;

    let left = private("left", "frank", "hello");
    send_held(&gateway, &left, &mut [&mut first, &mut second], 0).await;
    second.close().await;
    gateway
        .wait_for_metric("iagent_connections{app=\"app1\"}", 1)
        .await;
    gateway.store.release("left");

    assert_response(&first.recv().await, "left", 0);
    assert_response(
        &first.ask(&private("after", "frank", "x")).await,
        "after",
        0,
    );
    assert_eq!(copies(&gateway).await, 0);
    gateway.stop().await;
}

/// A backend that lost a connection resends on another, and the gateway may read a resend
/// written earlier, on a connection the backend has since abandoned, after the one the backend
/// now waits on. The response reaches the connection the backend waits on all the same.
#[tokio::test]
async fn a_resend_read_late_on_an_abandoned_connection_does_not_take_the_response() {
    let gateway = TestGateway::start().await;
    let mut first = gateway.connect().await;
    let mut abandoned = gateway.connect().await;
    let mut current = gateway.connect().await;
    gateway
        .wait_for_metric("iagent_connections{app=\"app1\"}", 3)
        .await;

    // The abandoned connection's resend is read after the one the backend waits on: the
    // gateway's last word on the message.
    let late = private("late", "dave", "hello");
    send_held(
        &gateway,
        &late,
        &mut [&mut first, &mut current, &mut abandoned],
        0,
    )
    .await;
    gateway.store.release("late");

    let answered = current.recv().await;
    assert_response(&answered, "late", 0);
    assert_eq!(answered["content"], "hello");
    assert_eq!(abandoned.recv().await, answered);
    assert_eq!(first.recv().await, answered);
    assert_eq!(gateway.store.completions("late"), 1, "processed once");
    assert_eq!(copies(&gateway).await, 2);
    // Nothing more for it on any connection: the next frame each reads is its own answer.
    for (client, n) in [(&mut first, 1), (&mut abandoned, 2), (&mut current, 3)] {
        let id = format!("next-{n}");
        assert_response(&client.ask(&private(&id, "erin", "x")).await, &id, 0);
    }
    gateway.stop().await;
}

#[tokio::test]
async fn a_bad_token_is_refused_with_401_before_any_websocket() {
    let gateway = TestGateway::start().await;
    let (status, body, _) = gateway.refused("iat_not_a_token").await;
    assert_eq!(status, 401);
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"], "unknown or revoked app_token");
    let (status, body, _) = gateway.refused("").await;
    assert_eq!(status, 401);
    assert!(body.contains("missing app_token"), "{body}");
    assert_eq!(gateway.metric("iagent_auth_failures_total").await, 2);

    // The same token with a "Bearer " prefix is accepted.
    let url = gateway.url(&format!("Bearer%20{}", gateway.token));
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("Bearer prefix accepted");
    ws.close(None).await.unwrap();

    // A revoked token no longer opens connections.
    gateway.store.revoke_tokens("app1", 1).await.unwrap();
    assert_eq!(gateway.refused(&gateway.token).await.0, 401);
    gateway.stop().await;
}

#[tokio::test]
async fn two_apps_under_concurrent_traffic_never_see_each_other() {
    let gateway = TestGateway::start().await;
    let other_token = gateway.create_app("app2").await;
    let mut tasks = Vec::new();
    for (app, token) in [("app1", gateway.token.clone()), ("app2", other_token)] {
        for connection in 0..2 {
            let mut client = gateway.connect_with(&token).await;
            tasks.push(tokio::spawn(async move {
                // Both apps use the same msg_ids and user ids: isolation must not rely on them.
                let ids: Vec<String> = (0..50).map(|i| format!("m{connection}-{i}")).collect();
                for (i, id) in ids.iter().enumerate() {
                    // Five users, the same five in both apps, each under the per-sender limit.
                    let user = format!("user-{}", i % 5);
                    client
                        .send(&private(id, &user, &format!("{app}:{id}")))
                        .await;
                }
                for _ in &ids {
                    let response = client.recv().await;
                    let id = response["ref_msg_id"].as_str().unwrap();
                    assert_eq!(
                        response["content"],
                        format!("{app}:{id}"),
                        "cross-app delivery"
                    );
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(
        gateway
            .metric("iagent_responses_total{app=\"app1\",resp_code=\"0\"}")
            .await,
        100
    );
    assert_eq!(
        gateway
            .metric("iagent_responses_total{app=\"app2\",resp_code=\"0\"}")
            .await,
        100
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_direct_connection_gets_its_own_responses_and_none_of_the_pools() {
    let gateway = TestGateway::start().await;
    let direct_url = format!(
        "ws://{}/ws/v1/chat?pool=false&app_token={}",
        gateway.addr, gateway.token
    );
    let (ws, _) = tokio_tungstenite::connect_async(direct_url)
        .await
        .expect("direct connection");
    let mut direct = common::Client { ws };
    let mut origin = gateway.connect().await;

    gateway.store.hold("pooled");
    origin
        .send(&private("pooled", "alice", "for the pool"))
        .await;
    gateway
        .wait_for_metric("iagent_in_flight{app=\"app1\"}", 1)
        .await;
    origin.close().await;
    gateway
        .wait_for_metric("iagent_connections{app=\"app1\"}", 1)
        .await;
    gateway.store.release("pooled");

    // The orphaned response skips the direct connection and waits in the outbox...
    gateway
        .wait_for_metric("iagent_outbox_depth{app=\"app1\"}", 1)
        .await;
    // ...while the direct connection still gets its own responses, and only those.
    assert_response(
        &direct.ask(&private("mine", "tool", "own")).await,
        "mine",
        0,
    );
    let mut pool = gateway.connect().await;
    assert_response(&pool.recv().await, "pooled", 0);
    gateway.stop().await;
}
