//! Agents that misbehave: one that hangs is answered with 50 within its deadline (and at
//! shutdown), one that fails is answered with 50 and its cause, one that declines with 10 and
//! its reason; none of them holds up other conversations on the same connection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{TestGateway, assert_response, group, private};
use iagent_agent::{Agent, AgentError, Reply, ReplyStrategy, Replying, Turn};
use iagent_server::{Config, Kinds};
use iagent_store::AgentRecord;
use serde_json::json;

/// What a test agent does when asked.
#[derive(Clone, Copy)]
enum Behaviour {
    Hang,
    Fail,
    Decline,
}

struct Misbehaving {
    id: String,
    behaviour: Behaviour,
    strategy: ReplyStrategy,
}

impl Agent for Misbehaving {
    fn id(&self) -> &str {
        &self.id
    }

    fn strategy(&self) -> &ReplyStrategy {
        &self.strategy
    }

    /// A hang and a failure come as answers to wait for, as a service's would; a refusal is
    /// made at once.
    fn reply<'a>(&'a self, _turn: Turn<'a>) -> Replying<'a> {
        match self.behaviour {
            Behaviour::Hang => Replying::Later(Box::pin(std::future::pending())),
            Behaviour::Fail => {
                Replying::Later(Box::pin(std::future::ready(Err(AgentError::Failed {
                    agent: self.id.clone(),
                    cause: "the model exploded".into(),
                }))))
            }
            Behaviour::Decline => Replying::Now(Ok(Reply::Declined("busy".into()))),
        }
    }
}

fn kinds() -> Kinds {
    let kind = |behaviour| {
        move |id: &str, _config: &str| {
            let agent = Misbehaving {
                id: id.to_owned(),
                behaviour,
                strategy: ReplyStrategy::default(),
            };
            Ok(Arc::new(agent) as Arc<dyn Agent>)
        }
    };
    Kinds::builtin()
        .with("hang", kind(Behaviour::Hang))
        .with("fail", kind(Behaviour::Fail))
        .with("decline", kind(Behaviour::Decline))
}

fn agent(id: &str, kind: &str) -> AgentRecord {
    AgentRecord {
        id: id.into(),
        kind: kind.into(),
        config: "{}".into(),
    }
}

async fn gateway(config: Config) -> TestGateway {
    let agents = vec![
        agent("sleepy", "hang"),
        agent("broken", "fail"),
        agent("shy", "decline"),
    ];
    TestGateway::with_agents(config, kinds(), agents).await
}

fn to(agent: &str, msg_id: &str, user: &str) -> serde_json::Value {
    let mut message = private(msg_id, user, "hello");
    message["receiver_id"] = json!(agent);
    message
}

#[tokio::test]
async fn an_agent_that_hangs_is_answered_with_50_at_its_deadline_without_holding_up_others() {
    let mut config = Config::default();
    config.timeouts.agent_deadline_ms = 1000;
    let gateway = gateway(config).await;
    let mut client = gateway.connect().await;
    client.send(&to("sleepy", "slow", "alice")).await;
    // Another conversation on the same connection is answered while the first one hangs.
    let other = client.ask(&private("quick", "bob", "fast")).await;
    assert_response(&other, "quick", 0);
    let response = client.recv().await;
    assert_response(&response, "slow", 50);
    assert_eq!(response["sender_id"], "sleepy");
    assert_eq!(
        response["content"],
        "agent sleepy did not answer within 1 s"
    );
    // The 50 is the message's one response: a resend gets it again, the agent is not asked again.
    assert_eq!(client.ask(&to("sleepy", "slow", "alice")).await, response);
    assert_eq!(gateway.store.completions("slow"), 1);
    gateway.stop().await;
}

#[tokio::test]
async fn an_agent_that_fails_is_answered_with_50_and_its_cause() {
    let gateway = gateway(Config::default()).await;
    let mut client = gateway.connect().await;
    let response = client.ask(&to("broken", "b1", "alice")).await;
    assert_response(&response, "b1", 50);
    assert_eq!(
        response["content"],
        "agent broken failed: the model exploded"
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
async fn an_agent_that_declines_is_answered_with_10_and_its_reason() {
    let gateway = gateway(Config::default()).await;
    let mut client = gateway.connect().await;
    let response = client.ask(&to("shy", "d1", "alice")).await;
    assert_response(&response, "d1", 10);
    assert_eq!(response["content"], "busy");
    assert_eq!(response["sender_id"], "shy");
    // In a group, the agent named by receiver_id answers instead of the default.
    let mut addressed = group("d2", "alice", "room", "hello shy");
    addressed["receiver_id"] = json!("shy");
    let response = client.ask(&addressed).await;
    assert_response(&response, "d2", 10);
    assert_eq!(response["sender_id"], "shy");
    gateway.stop().await;
}

#[tokio::test]
async fn at_shutdown_a_hanging_agent_is_abandoned_and_its_message_answered_before_the_close() {
    let mut config = Config::default();
    config.timeouts.shutdown_grace_ms = 200;
    let mut gateway = gateway(config).await;
    let mut client = gateway.connect().await;
    client.send(&to("sleepy", "s1", "alice")).await;
    gateway
        .wait_for_metric("iagent_in_flight{app=\"app1\"}", 1)
        .await;
    gateway.begin_shutdown();
    let response = client.recv().await;
    assert_response(&response, "s1", 50);
    assert!(
        response["content"]
            .as_str()
            .unwrap()
            .contains("shut down before the agent answered")
    );
    let close = client.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1012);
    gateway.stop().await;
}

#[tokio::test]
async fn a_stored_agent_of_an_unknown_kind_is_left_out_not_fatal() {
    let agents = vec![agent("ghost", "telepathy")];
    let gateway = TestGateway::with_agents(Config::default(), Kinds::builtin(), agents).await;
    let mut client = gateway.connect().await;
    let response = client.ask(&to("ghost", "g1", "alice")).await;
    assert_response(&response, "g1", 40);
    assert_eq!(
        response["content"],
        "receiver_id \"ghost\" is not an agent of this app"
    );
    assert_response(&client.ask(&private("e1", "alice", "hi")).await, "e1", 0);
    gateway.stop().await;
}

#[tokio::test]
async fn agents_changed_in_the_store_take_effect_while_serving() {
    use iagent_store::Store;
    let mut config = Config::default();
    config.timeouts.agent_reload_ms = 20;
    let gateway = TestGateway::with_config(config).await;
    let mut client = gateway.connect().await;
    assert_response(&client.ask(&to("late", "l0", "alice")).await, "l0", 40);

    let late = AgentRecord {
        id: "late".into(),
        kind: "echo".into(),
        config: "{}".into(),
    };
    gateway.store.put_agent("app1", late).await.unwrap();
    gateway
        .store
        .set_default_agent("app1", "late")
        .await
        .unwrap();
    // Within a few reload intervals the new agent answers, and is the default.
    let deadline = tokio::time::Instant::now() + common::FRAME_WAIT;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let msg_id = format!("l{attempt}");
        let response = client.ask(&private(&msg_id, "alice", "hi")).await;
        if response["sender_id"] == "late" {
            assert_response(&response, &msg_id, 0);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reloaded: {response}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_response(&client.ask(&to("late", "named", "alice")).await, "named", 0);
    gateway.stop().await;
}

/// Replies with the history it was given: users' texts, and `<id>` for agents' messages.
struct Recaller {
    id: String,
    strategy: ReplyStrategy,
}

impl Agent for Recaller {
    fn id(&self) -> &str {
        &self.id
    }

    fn strategy(&self) -> &ReplyStrategy {
        &self.strategy
    }

    fn history_len(&self) -> usize {
        3
    }

    fn reply<'a>(&'a self, turn: Turn<'a>) -> Replying<'a> {
        let seen: Vec<String> = turn
            .history
            .iter()
            .map(|m| match m.sender_type {
                iagent_protocol::SenderType::User => format!("{}:{}", m.sender_id, m.content),
                iagent_protocol::SenderType::Agent => format!("<{}>", m.sender_id),
            })
            .collect();
        let content = format!("h:{}", seen.join(","));
        Replying::Now(Ok(Reply::Content {
            content_type: iagent_protocol::ContentType::Text,
            content,
        }))
    }
}

#[tokio::test]
async fn agents_that_want_history_get_the_conversations_last_messages_both_ways() {
    let kinds = Kinds::builtin().with("recall", |id, _| {
        Ok(Arc::new(Recaller {
            id: id.to_owned(),
            strategy: ReplyStrategy::default(),
        }) as Arc<dyn Agent>)
    });
    let gateway =
        TestGateway::with_agents(Config::default(), kinds, vec![agent("memo", "recall")]).await;
    let mut client = gateway.connect().await;
    let mut say = async |msg_id: &str, user: &str, text: &str| {
        let mut message = private(msg_id, user, text);
        message["receiver_id"] = json!("memo");
        client.ask(&message).await["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(say("p1", "alice", "one").await, "h:");
    assert_eq!(say("p2", "alice", "two").await, "h:alice:one,<memo>");
    // At most three, the latest, oldest first.
    assert_eq!(
        say("p3", "alice", "three").await,
        "h:<memo>,alice:two,<memo>"
    );
    // Another user is another conversation.
    assert_eq!(say("q1", "bob", "hi").await, "h:");

    // In a group, everyone's messages are context, answered or not.
    let unaddressed = client.ask(&group("g1", "carol", "room", "lunch?")).await;
    assert_response(&unaddressed, "g1", 10);
    let mut mention = group("g2", "dave", "room", "@memo what was asked?");
    mention["receiver_id"] = json!(null);
    let response = client.ask(&mention).await;
    assert_response(&response, "g2", 0);
    assert_eq!(response["sender_id"], "memo");
    assert_eq!(response["content"], "h:carol:lunch?");
    gateway.stop().await;
}

#[tokio::test]
async fn an_agent_in_its_cooldown_is_silent_in_that_conversation_only() {
    let cooling = AgentRecord {
        id: "calm".into(),
        kind: "echo".into(),
        config: r#"{"strategy": {"cooldown_ms": 600000}}"#.into(),
    };
    let gateway = TestGateway::with_agents(Config::default(), kinds(), vec![cooling]).await;
    let mut client = gateway.connect().await;
    let first = client.ask(&to("calm", "c1", "alice")).await;
    assert_response(&first, "c1", 0);
    let again = client.ask(&to("calm", "c2", "alice")).await;
    assert_response(&again, "c2", 10);
    assert_eq!(again["content"], "cooldown");
    // Another conversation has its own cooldown, and a declined message does not extend one.
    assert_response(&client.ask(&to("calm", "c3", "bob")).await, "c3", 0);
    assert_response(&client.ask(&to("calm", "c4", "bob")).await, "c4", 10);
    // The default echo agent has no cooldown.
    assert_response(&client.ask(&private("e1", "alice", "hi")).await, "e1", 0);
    assert_response(&client.ask(&private("e2", "alice", "hi")).await, "e2", 0);
    gateway.stop().await;
}
