//! Conversations: each conversation's messages are processed one at a time, in arrival order,
//! by a worker that exists only while the conversation has work; different conversations run
//! concurrently.
//!
//! Processing one message: claim its `msg_id` in the store (a message seen before is not
//! processed again), ask the reply strategy, call the agent under its deadline, store the
//! response with the history it adds, then route the response. A repeatable agent (see
//! [`Agent::repeatable`]) is asked before anything is written, and the message is then claimed
//! and answered in one write: one store job per message instead of two.

use std::sync::Arc;
use std::time::Instant;

use iagent_agent::{Agent, AgentError, BoxFuture, MAX_HISTORY, NoReply, Reply, Replying, Turn};
use iagent_protocol::{ChatType, Message, RespCode};
use iagent_store::{Claim, Completion, HistoryEntry, MessageText};
use tokio::sync::OwnedSemaphorePermit;

use crate::apps::{AppState, Deferred};
use crate::delivery;
use crate::files::AppFiles;
use crate::gateway::Gateway;
use crate::ids::now_ms;

/// A conversation: private chat = (user, agent) within the app, group chat = the group.
///
/// Held as the key under which the store keeps the conversation's history, made once per
/// message: the queue map hashes and compares one string, and the queue and the worker share
/// it without copying.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ConversationKey(Arc<str>);

impl ConversationKey {
    pub(crate) fn of(message: &Message, agent: &str) -> Self {
        match (message.chat_type, &message.group_id) {
            (ChatType::Group, Some(group)) => Self::group(group),
            _ => Self::private(&message.sender_id, agent),
        }
    }

    /// The private chat of `user` with `agent`. The user id's length is spelled out, so no
    /// choice of ids makes two conversations share a key. Put together without `format!`,
    /// whose machinery was 2% of the runtime thread's time, for one key per message.
    pub(crate) fn private(user: &str, agent: &str) -> Self {
        let mut len = itoa::Buffer::new();
        Self(shared_concat(&[
            "p:",
            len.format(user.len()),
            ":",
            user,
            ":",
            agent,
        ]))
    }

    /// The chat of a group.
    pub(crate) fn group(group: &str) -> Self {
        Self(shared_concat(&["g:", group]))
    }

    /// The key under which the store keeps the conversation's history.
    pub(crate) fn storage_key(&self) -> &str {
        &self.0
    }

    /// The same key, for the store's history entries: shared, not copied.
    pub(crate) fn shared(&self) -> Arc<str> {
        Arc::clone(&self.0)
    }
}

/// `parts` one after the other, as one shared string made with one allocation, where
/// `concat` and then `Arc::from` made two: put together on the stack when they fit in its
/// 64 bytes, as nearly every conversation's key does.
fn shared_concat(parts: &[&str]) -> Arc<str> {
    const ON_STACK: usize = 64;
    let len = parts.iter().map(|part| part.len()).sum::<usize>();
    if len > ON_STACK {
        return parts.concat().into();
    }
    let mut joined = [0; ON_STACK];
    let mut at = 0;
    for part in parts {
        joined[at..at + part.len()].copy_from_slice(part.as_bytes());
        at += part.len();
    }
    // Whole strings one after the other are UTF-8: the other branch is never taken.
    std::str::from_utf8(&joined[..len]).map_or_else(|_| parts.concat().into(), Arc::from)
}

/// A valid message waiting for its conversation's worker.
pub(crate) struct Job {
    pub(crate) message: Message,
    /// The message's `msg_id`, made once and shared: the key of its place in flight and of its
    /// record in the store.
    pub(crate) msg_id: Arc<str>,
    pub(crate) agent: Arc<dyn Agent>,
    pub(crate) conversation: ConversationKey,
    /// When its frame arrived: the start of the processing-latency measurement.
    pub(crate) received: Instant,
    /// Its place in the origin connection's in-flight limit, given back once the response is
    /// on its way.
    pub(crate) permit: OwnedSemaphorePermit,
}

/// Processes `first`, then works through its conversation's queue until it is empty.
///
/// Most conversations have one message in flight, so a task is spawned for nearly every
/// message. The task holds pointers only: each message's processing is boxed, the first one
/// before the task is made, so that the task's state is 56 bytes. Spawning a task and
/// finishing it copy that state several times: when it held the first job in three places
/// (736 bytes), the copies were 6.2% of the runtime thread's time at saturation, and 1.8%
/// since.
///
/// The boxed processing is kept under 1 KiB (752 bytes): the allocator's fast path ends there
/// (mimalloc's small blocks), and a processing of 1 528 bytes cost its box some 280
/// instructions more. So the rare paths (a claim before a pushed reply, an agent that does not
/// answer at once, the copies of a resent message's response, the outbox) are boxed where they
/// are taken, and [`process`] and [`Processing::record`] do their synchronous work before
/// their futures, whose state would otherwise keep their arguments (a `Job` holds its message,
/// 160 bytes) across every await.
pub(crate) fn run(
    gateway: Arc<Gateway>,
    app: Arc<AppState>,
    first: Job,
) -> impl Future<Output = ()> + Send + 'static {
    let key = first.conversation.clone();
    let first = Box::pin(process(Arc::clone(&gateway), Arc::clone(&app), first));
    async move {
        first.await;
        loop {
            // Taken out of its `Option` here, not in a `while let`, whose temporary would
            // keep a job's room in the task across the await.
            let Some(job) = app.next_job(&key) else {
                return;
            };
            Box::pin(process(Arc::clone(&gateway), Arc::clone(&app), job)).await;
        }
    }
}

fn process(
    gateway: Arc<Gateway>,
    app: Arc<AppState>,
    job: Job,
) -> impl Future<Output = ()> + Send + 'static {
    let Job {
        message,
        msg_id,
        agent,
        conversation,
        received,
        permit,
    } = job;
    // Shared with the store, which keeps it packed from its fields: its text is never written.
    let message = Arc::new(message);
    async move {
        let (gateway, app) = (&gateway, &app);
        let turn = Processing {
            gateway,
            app,
            agent: agent.as_ref(),
            conversation: &conversation,
            message: &message,
            msg_id: &msg_id,
        };
        let frame = if agent.repeatable() {
            turn.answer_then_record().await
        } else {
            Box::pin(turn.claim_then_answer()).await
        };
        if frame.as_ref().is_some_and(|frame| frame.answered_here) {
            gateway.metrics.observe_latency(received.elapsed());
        }
        let origins = app.finish(&message);
        if let Some(frame) = frame {
            delivery::deliver_answer(gateway, app, frame.text.into(), origins).await;
        }
        drop(permit);
    }
}

/// A response frame to route, and whether this process made it (rather than replaying a
/// stored one), which is what the processing-latency histogram measures.
struct Outcome {
    text: String,
    answered_here: bool,
}

/// One message being processed, and what it is processed with.
struct Processing<'a> {
    gateway: &'a Gateway,
    app: &'a AppState,
    agent: &'a dyn Agent,
    conversation: &'a ConversationKey,
    /// Stored for recovery while unanswered, and in the history.
    message: &'a Arc<Message>,
    /// Its `msg_id`, shared with its place in flight.
    msg_id: &'a Arc<str>,
}

impl Processing<'_> {
    /// The path for agents that act on the world: the message is claimed first, so that a
    /// crash while the agent works leaves a record for the restart to answer with 50.
    async fn claim_then_answer(self) -> Option<Outcome> {
        if let Err(earlier) = self.claim().await {
            return earlier;
        }
        match self.ask().await {
            Answer::Now(response) => Some(self.complete(response).await),
            Answer::Later => self.wait_for_push().await,
        }
    }

    /// The path for repeatable agents (see [`Agent::repeatable`]): asked first, then the
    /// message is recorded with its answer in one write, half the writes of claim-then-answer.
    async fn answer_then_record(self) -> Option<Outcome> {
        let response = match self.ask().await {
            Answer::Now(response) => response,
            // A reply to come waits on a claim, as any agent's does. Rare, and boxed: its
            // futures would make every message's task larger (see [`run`]).
            Answer::Later => return Box::pin(self.claim_then_wait()).await,
        };
        self.record(response).await
    }

    /// Records the message with its `response`, which is its answer unless the message was
    /// answered before.
    ///
    /// The frame is written and the store's job made before the future: an `async fn` keeps
    /// its arguments and its locals in its state across the await (the response alone is 160
    /// bytes), and the state is part of every message's task.
    fn record(self, response: Message) -> impl Future<Output = Option<Outcome>> {
        let text = response.to_json();
        let (code, made_ms) = (response.resp_code, response.timestamp);
        let completion = completion(
            &self.app.name,
            self.conversation,
            self.message,
            Arc::clone(self.msg_id),
            response,
        );
        // Stored as received when its response was made, the moment its history entry
        // carries: a clock read fewer a message.
        let stored = self.gateway.store.record(completion, made_ms);
        async move {
            match stored.await {
                Ok(Claim::New) => {}
                Err(err) => {
                    // The answer still goes out; a resend of this msg_id is asked again, which
                    // a repeatable agent answers the same way.
                    self.gateway.store_failed("record", &err);
                }
                // A msg_id answered (or claimed) before: its first response stands.
                earlier => return self.settle(earlier, "record").err().flatten(),
            }
            self.app.counters.response(code);
            Some(Outcome {
                text,
                answered_here: true,
            })
        }
    }

    /// Claims the message, then parks it until its agent pushes the reply.
    async fn claim_then_wait(self) -> Option<Outcome> {
        match self.claim().await {
            Ok(()) => self.wait_for_push().await,
            Err(earlier) => earlier,
        }
    }

    /// Claims the message: `Ok` when it is new here, else what a message seen before gets.
    async fn claim(&self) -> Result<(), Option<Outcome>> {
        let claim = self.gateway.store.claim(
            &self.app.name,
            &self.message.msg_id,
            MessageText::Message(Arc::clone(self.message)),
            now_ms(),
        );
        self.settle(claim.await, "claim")
    }

    async fn ask(&self) -> Answer {
        answer(
            self.gateway,
            self.app,
            self.conversation,
            self.agent,
            self.message,
        )
        .await
    }

    /// Goes on (`Ok`) with a message claimed for the first time; otherwise (`Err`) says what a
    /// message seen before gets: its stored response, nothing while it is pending elsewhere,
    /// or a 50 when the store could not say.
    fn settle(
        &self,
        claim: Result<Claim, iagent_store::StoreError>,
        operation: &'static str,
    ) -> Result<(), Option<Outcome>> {
        let duplicate = || {
            self.app
                .counters
                .duplicates
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        };
        match claim {
            Ok(Claim::New) => Ok(()),
            Ok(Claim::Answered(text)) => {
                duplicate();
                Err(Some(Outcome {
                    text,
                    answered_here: false,
                }))
            }
            Ok(Claim::Pending) => {
                // Claimed, unanswered, and not in flight here: another gateway node has it, and
                // its one response will be routed from there.
                duplicate();
                tracing::warn!(msg_id = %self.message.msg_id, "message is pending elsewhere; not processed again");
                Err(None)
            }
            Err(err) => {
                self.gateway.store_failed(operation, &err);
                let cause = "the gateway could not record the message (storage unavailable); it was not processed";
                let response = self.message.text_response(
                    self.gateway.ids.next(),
                    self.agent.id(),
                    RespCode::Failed,
                    cause,
                );
                self.app.counters.response(RespCode::Failed);
                Err(Some(Outcome {
                    text: response.to_json(),
                    answered_here: false,
                }))
            }
        }
    }

    /// Parks a claimed message until its agent pushes the reply; a 50 now if it cannot wait.
    async fn wait_for_push(self) -> Option<Outcome> {
        match defer(self.gateway, self.app, self.message, self.agent.id()).await {
            // The message now waits for its pushed reply, holding no in-flight place.
            Ok(()) => None,
            Err(response) => Some(self.complete(response).await),
        }
    }

    async fn complete(self, response: Message) -> Outcome {
        let text = complete(
            self.gateway,
            self.app,
            self.conversation,
            self.message,
            Arc::clone(self.msg_id),
            response,
        )
        .await;
        Outcome {
            text,
            answered_here: true,
        }
    }
}

/// Stores a message's response with the history it adds, counts it, and returns its frame.
/// `msg_id` is the message's, shared (see [`Job::msg_id`]).
pub(crate) async fn complete(
    gateway: &Gateway,
    app: &AppState,
    conversation: &ConversationKey,
    message: &Arc<Message>,
    msg_id: Arc<str>,
    response: Message,
) -> String {
    let frame = response.to_json();
    let code = response.resp_code;
    let completion = completion(&app.name, conversation, message, msg_id, response);
    if let Err(err) = gateway.store.complete(completion).await {
        // The response still goes out; only a resend of this msg_id would be processed again
        // (and after a restart, answered with 50).
        gateway.store_failed("complete", &err);
    }
    app.counters.response(code);
    frame
}

/// A message's terminal response with the history it adds, as the store takes them. A reply
/// is the response and the entry's reply at once, and is stored once. Both messages are
/// handed over as they are: the store packs them from their fields.
fn completion(
    app: &Arc<str>,
    conversation: &ConversationKey,
    message: &Arc<Message>,
    msg_id: Arc<str>,
    response: Message,
) -> Completion {
    let entry = HistoryEntry {
        conversation: conversation.shared(),
        // The gateway's clock, not the sender's: retention must not be the backend's to set.
        at_ms: response.timestamp,
        message: MessageText::Message(Arc::clone(message)),
        reply: None,
    };
    let app = Arc::clone(app);
    if response.resp_code == RespCode::Ok {
        Completion::replied(app, msg_id, entry, response)
    } else {
        Completion::new(app, msg_id, response, vec![entry])
    }
}

/// What an agent's turn comes to.
enum Answer {
    /// The response, to send now.
    Now(Message),
    /// The agent will push its reply.
    Later,
}

/// Records that `message` waits for its agent to push a reply, until the deadline; a 50 when
/// that cannot be recorded or the app has too many messages waiting already.
async fn defer(
    gateway: &Gateway,
    app: &AppState,
    message: &Message,
    agent_id: &str,
) -> Result<(), Message> {
    let (timeouts, limits) = (&gateway.config.timeouts, &gateway.config.limits);
    let wait = i64::try_from(timeouts.deferred_reply_ms).unwrap_or(i64::MAX);
    let until_ms = now_ms().saturating_add(wait);
    let refuse = |cause: String| {
        message.text_response(gateway.ids.next(), agent_id, RespCode::Failed, cause)
    };
    if let Err(err) = gateway
        .store
        .defer(&app.name, &message.msg_id, agent_id, until_ms)
        .await
    {
        gateway.store_failed("defer", &err);
        return Err(refuse(
            "the gateway could not record the deferred reply (storage unavailable)".into(),
        ));
    }
    if !app.defer(message, agent_id, until_ms, limits.max_deferred_per_app) {
        let cause = format!(
            "agent {agent_id} deferred its reply, but the app has {} messages waiting for pushed replies, its limit",
            limits.max_deferred_per_app
        );
        return Err(refuse(cause));
    }
    Ok(())
}

/// Answers a message that waited for a pushed reply (with that reply, or with a 50 when its
/// deadline passed), and routes the answer where the message came from.
pub(crate) async fn answer_deferred(
    gateway: &Arc<Gateway>,
    app: &Arc<AppState>,
    deferred: Deferred,
    response: Message,
) {
    let conversation = ConversationKey::of(&deferred.message, &deferred.agent);
    let msg_id = Arc::from(deferred.message.msg_id.as_str());
    let message = Arc::new(deferred.message);
    let frame = complete(gateway, app, &conversation, &message, msg_id, response).await;
    delivery::deliver_answer(gateway, app, frame.into(), deferred.origins).await;
}

/// The agent's answer to `message`: 0 with the reply, 10 with the strategy's or the agent's
/// reason, 50 with the agent's failure, or a reply to come.
async fn answer(
    gateway: &Gateway,
    app: &AppState,
    conversation: &ConversationKey,
    agent: &dyn Agent,
    message: &Message,
) -> Answer {
    let respond = |code: RespCode, cause: &str| {
        Answer::Now(message.text_response(gateway.ids.next(), agent.id(), code, cause))
    };
    if let Err(no_reply) = agent.strategy().decide(message, agent.id()) {
        return respond(RespCode::NoReply, no_reply.code());
    }
    let history = match earlier_messages(gateway, app, conversation, agent).await {
        Ok(history) => history,
        Err(err) => {
            gateway.store_failed("history", &err);
            let cause =
                "the gateway could not read the conversation's history (storage unavailable)";
            return respond(RespCode::Failed, cause);
        }
    };
    // With no earlier messages there is nothing to cool down from, and no clock to read:
    // most agents are given none.
    if !history.is_empty()
        && agent
            .strategy()
            .cooling_down(&history, agent.id(), now_ms())
    {
        return respond(RespCode::NoReply, NoReply::Cooldown.code());
    }
    // A cooldown reads more history than the agent is given.
    let history = &history[history.len().saturating_sub(agent.history_len())..];
    let files = AppFiles {
        gateway,
        app: &app.name,
    };
    let turn = Turn {
        message,
        history,
        files: &files,
    };
    // An answer made at once (the built-in kinds' are) is neither given a deadline, which
    // reads the clock, nor raced against the shutdown, whose future would join its token's
    // waiters and leave again.
    let outcome = match agent.reply(turn) {
        Replying::Now(outcome) => outcome,
        // Boxed: the deadline's timer and the shutdown's waiter would make every message's
        // task larger (see [`run`]), and an agent that keeps its caller waiting takes far
        // longer than an allocation.
        Replying::Later(reply) => Box::pin(wait_for_reply(gateway, agent, reply)).await,
    };
    match outcome {
        Ok(Reply::Content {
            content_type,
            content,
        }) => {
            let meta = gateway.ids.next();
            Answer::Now(message.response(meta, agent.id(), RespCode::Ok, content_type, content))
        }
        Ok(Reply::Declined(reason)) => respond(RespCode::NoReply, &reason),
        Ok(Reply::Deferred) => Answer::Later,
        Err(err) => respond(RespCode::Failed, &err.to_string()),
    }
}

/// The rest of an agent's reply that did not come at once: under the agent's deadline, and
/// given up at the end of the shutdown's grace period.
async fn wait_for_reply(
    gateway: &Gateway,
    agent: &dyn Agent,
    reply: BoxFuture<'_, Result<Reply, AgentError>>,
) -> Result<Reply, AgentError> {
    let deadline = gateway.config.timeouts.agent_deadline();
    tokio::select! {
        biased;
        outcome = tokio::time::timeout(deadline, reply) => outcome.unwrap_or_else(|_| {
            Err(AgentError::Timeout { agent: agent.id().to_owned(), deadline })
        }),
        () = gateway.abandon.cancelled() => Err(AgentError::Failed {
            agent: agent.id().to_owned(),
            cause: "the gateway shut down before the agent answered".into(),
        }),
    }
}

/// The conversation's last messages, oldest first, as many as the agent wants (none for most
/// kinds, which then cost no read), or [`MAX_HISTORY`] when its cooldown needs them. Sequential processing per conversation means every earlier
/// message is already stored.
async fn earlier_messages(
    gateway: &Gateway,
    app: &AppState,
    conversation: &ConversationKey,
    agent: &dyn Agent,
) -> Result<Vec<Message>, iagent_store::StoreError> {
    let wanted = if agent.strategy().cooldown_ms > 0 {
        MAX_HISTORY
    } else {
        agent.history_len().min(MAX_HISTORY)
    };
    if wanted == 0 {
        return Ok(Vec::new());
    }
    let limit = u32::try_from(wanted).unwrap_or(u32::MAX);
    let stored = gateway
        .store
        .history(&app.name, conversation.storage_key(), limit)
        .await?;
    Ok(stored
        .iter()
        .filter_map(|text| serde_json::from_str(text).ok())
        .collect())
}

/// Answers, with 50, every message a previous process claimed and never answered, so that each
/// still gets its one response (in the outbox) and a resend gets the same one.
pub(crate) async fn recover_unanswered(
    gateway: &Arc<Gateway>,
) -> Result<usize, iagent_store::StoreError> {
    let unanswered = gateway.store.unanswered().await?;
    let count = unanswered.len();
    for entry in unanswered {
        let message = serde_json::from_str::<Message>(&entry.inbound);
        let (Some(app), Ok(message)) = (gateway.apps.get(&entry.app), message) else {
            tracing::error!(app = %entry.app, "unreadable unanswered message left as is");
            continue;
        };
        let agents = app.agents();
        let agent_id = agents.resolve(&message).map_or_else(
            |_| agents.default_id().to_owned(),
            |agent| agent.id().to_owned(),
        );
        let cause = "the gateway restarted before this message was answered; it was not processed";
        let response =
            message.text_response(gateway.ids.next(), &agent_id, RespCode::Failed, cause);
        let conversation = ConversationKey::of(&message, &agent_id);
        let msg_id = Arc::from(message.msg_id.as_str());
        let message = Arc::new(message);
        let frame = complete(gateway, &app, &conversation, &message, msg_id, response).await;
        // No connection is open yet: this lands in the outbox.
        delivery::deliver(gateway, &app, frame.into(), None).await;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use iagent_protocol::{ContentType, SenderType};

    use super::*;

    /// The size of what `make` returns, found without calling it.
    fn returned_size<A, B, C, R>(_make: fn(A, B, C) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Each message's processing is boxed, and a box over 1 KiB leaves the allocator's fast
    /// path (see [`run`]): a future awaited on the common path that grows it past that must be
    /// boxed where it is taken instead, as the rare paths are.
    #[test]
    fn a_message_s_processing_fits_the_allocator_s_small_blocks() {
        let size = returned_size(process as fn(_, _, _) -> _);
        assert!(size <= 1024, "{size} bytes");
    }

    #[test]
    fn storage_keys_of_different_conversations_differ() {
        let a = ConversationKey::private("a:b", "c");
        let b = ConversationKey::private("a", "b:c");
        assert_ne!(a.storage_key(), b.storage_key());
        assert_ne!(ConversationKey::group("x").storage_key(), a.storage_key());
    }

    /// Stored histories are found by these keys: they must not change from one version to
    /// the next.
    #[test]
    fn storage_keys_keep_their_stored_form() {
        let private = ConversationKey::private("user-12345678901", "echo");
        assert_eq!(private.storage_key(), "p:16:user-12345678901:echo");
        assert_eq!(ConversationKey::group("team").storage_key(), "g:team");
        // Keys longer than the stack's room are put together on the heap, the same.
        let (user, group) = ("ü".repeat(40), "g".repeat(128));
        let long = ConversationKey::private(&user, "echo");
        assert_eq!(long.storage_key(), format!("p:80:{user}:echo"));
        let long = ConversationKey::group(&group);
        assert_eq!(long.storage_key(), format!("g:{group}"));
    }

    #[test]
    fn a_history_entry_is_dated_by_the_gateway_not_by_the_sender() {
        // A backend's clock (or a forged timestamp) must not decide how long history is kept.
        let sent = Message {
            chat_type: ChatType::Private,
            msg_id: "m1".into(),
            ref_msg_id: None,
            timestamp: 0,
            group_id: None,
            sender_type: SenderType::User,
            sender_id: "u1".into(),
            receiver_id: Some("echo".into()),
            resp_code: RespCode::Ok,
            content_type: ContentType::Text,
            content: "hi".into(),
        };
        let reply = Message {
            msg_id: "r1".into(),
            ref_msg_id: Some("m1".into()),
            timestamp: 1_700_000_000_000,
            sender_type: SenderType::Agent,
            sender_id: "echo".into(),
            receiver_id: Some("u1".into()),
            ..sent.clone()
        };
        let key = ConversationKey::of(&sent, "echo");
        let app = Arc::from("shop");
        let sent = Arc::new(sent);
        let done = completion(&app, &key, &sent, "m1".into(), reply.clone());
        assert_eq!(done.history().len(), 1);
        assert_eq!(done.history()[0].at_ms, reply.timestamp);
        assert_eq!(done.history()[0].conversation, key.shared());
        assert_eq!(
            done.history()[0].message,
            MessageText::Message(sent.clone())
        );
        // A reply is the response and the entry's reply at once, carried once.
        assert!(done.reply_entry().is_some());
        let handed = MessageText::from(reply.clone());
        assert_eq!(done.history()[0].reply.as_ref(), Some(&handed));
        assert_eq!(done.response(), &handed);

        // A 10 is the message's response, and no reply in its history.
        let declined = Message {
            resp_code: RespCode::NoReply,
            ..reply
        };
        let done = completion(&app, &key, &sent, "m1".into(), declined.clone());
        assert!(done.reply_entry().is_none());
        assert_eq!(done.history()[0].reply, None);
        assert_eq!(done.response(), &MessageText::from(declined));
    }
}
