//! The closed loop driven through `iagent-client`, the SDK a backend uses: `connections x
//! window` senders share one client, each sending its next message when the last is answered.
//!
//! The ratios of `docs/performance.md` come from the raw connections, the one generator that
//! can drive both the gateway and the reference echo server; this run shows what the
//! backend's own side of the path (the SDK's matching, pooling and resends) adds on top.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Context;
use iagent_client::{Client, Config};
use iagent_protocol::{ChatType, ContentType, Message, RespCode, SenderType};

use super::connection::Outcome;
use super::frames::Frames;
use super::report::Load;
use super::{BenchArgs, Counters, Target, measure, summarize};

/// Runs the closed loop through one client of `--connections` pooled connections.
pub(super) async fn run(target: &Target, args: &BenchArgs) -> anyhow::Result<Load> {
    let token = target
        .token
        .clone()
        .context("--via-client needs the gateway's --token")?;
    let senders = args.connections * args.window;
    let mut config = Config::new(&target.url, token);
    config.connections = args.connections;
    config.max_in_flight = senders;
    // Pushed messages (none are expected) are dropped with the receiver.
    let (client, _pushed) = Client::connect(config)
        .await
        .with_context(|| format!("cannot connect to {}", args.url))?;
    let frames = Arc::new(Frames::new(
        args.size,
        args.users,
        args.group_share,
        senders,
    ));
    let counters = Arc::new(Counters::default());
    eprintln!(
        "iagent bench: through iagent-client, {} connections, {} users, {} in flight, {}-byte texts, {:.1} s (+{:.1} s warm-up)",
        args.connections, args.users, senders, args.size, args.duration, args.warmup
    );
    let start = Instant::now();
    let tasks: Vec<_> = (0..senders)
        .map(|sender| {
            tokio::spawn(send_until_stopped(
                sender,
                client.clone(),
                frames.clone(),
                counters.clone(),
            ))
        })
        .collect();
    let window = measure(args, &counters, start).await?;
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.context("a sender task failed")?);
    }
    client.shutdown().await;
    Ok(summarize(args, window, &counters, outcomes))
}

/// One sender: a message, its response, the next, until the run stops.
async fn send_until_stopped(
    sender: usize,
    client: Client,
    frames: Arc<Frames>,
    counters: Arc<Counters>,
) -> Outcome {
    let mut outcome = Outcome::default();
    let mut seq = 0;
    while !counters.stopped.load(Ordering::Relaxed) {
        let message = message(&frames, sender, seq);
        let group = message.chat_type == ChatType::Group;
        seq += 1;
        let measured = counters.measuring.load(Ordering::Relaxed);
        outcome.sent += u64::from(measured);
        let since = Instant::now();
        let Ok(response) = client.send(message).await else {
            outcome.unanswered += 1;
            continue;
        };
        counters.replies.fetch_add(1, Ordering::Relaxed);
        if response.resp_code != RespCode::Ok {
            counters.not_ok.fetch_add(1, Ordering::Relaxed);
        }
        if measured {
            counters.answered.fetch_add(1, Ordering::Relaxed);
            outcome
                .latencies_us
                .push(u32::try_from(since.elapsed().as_micros()).unwrap_or(u32::MAX));
            outcome.group += u64::from(group);
        }
    }
    outcome
}

/// Message `seq` of `sender`, the same message the raw connections send.
fn message(frames: &Frames, sender: usize, seq: u64) -> Message {
    let index = frames.index(sender, seq);
    let user = frames.user(index);
    let group = frames.is_group(index);
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    Message {
        chat_type: if group {
            ChatType::Group
        } else {
            ChatType::Private
        },
        msg_id: frames.msg_id(sender, seq),
        ref_msg_id: None,
        timestamp: i64::try_from(timestamp).unwrap_or(i64::MAX),
        group_id: group.then(|| Frames::group_id(user)),
        sender_type: SenderType::User,
        sender_id: format!("u{user}"),
        receiver_id: None,
        resp_code: RespCode::Ok,
        content_type: ContentType::Text,
        content: frames.content(index),
    }
}
