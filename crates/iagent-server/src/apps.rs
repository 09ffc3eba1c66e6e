//! Per-app state: the app's pool of connections, its agents, the messages it has in flight and
//! their conversation queues, and its outbox bookkeeping.
//!
//! Everything an app does touches only its own [`AppState`], which is how apps stay isolated:
//! a response is only ever routed through the pool of the app whose message it answers.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use iagent_agent::{Agent, Kinds};
use iagent_protocol::{ChatType, ContentType, Message, Violation};
use iagent_store::{AgentRecord, App};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::conversation::{ConversationKey, Job};
use crate::rate::RateLimit;
use crate::session::Outbound;

/// Identifies one connection for the life of the process.
pub(crate) type ConnId = u64;

/// A connection of an app, as the router sees it.
#[derive(Debug, Clone)]
pub(crate) struct PoolMember {
    pub(crate) id: ConnId,
    pub(crate) frames: mpsc::Sender<Outbound>,
    /// Whether it takes the pool's traffic (responses rerouted from other connections, the
    /// outbox). A direct connection (`pool=false`, for tools) gets only its own responses.
    pub(crate) shared: bool,
}

/// The agents of an app, and which one answers by default.
pub(crate) struct AgentSet {
    default: String,
    agents: IdMap<String, Arc<dyn Agent>>,
}

impl AgentSet {
    /// Builds the app's agents; one whose configuration is broken is left out and logged, so
    /// that it fails its own messages (unknown agent) rather than the whole app.
    pub(crate) fn build(app: &App, records: &[AgentRecord], kinds: &Kinds) -> Self {
        let agents = records
            .iter()
            .filter_map(
                |record| match kinds.build(&record.id, &record.kind, &record.config) {
                    Ok(agent) => Some((record.id.clone(), agent)),
                    Err(err) => {
                        tracing::error!(app = %app.name, error = %err, "agent left out");
                        None
                    }
                },
            )
            .collect();
        Self {
            default: app.default_agent.clone(),
            agents,
        }
    }

    /// Whether the app has an agent with this id.
    pub(crate) fn contains(&self, id: &str) -> bool {
        self.agents.contains_key(id)
    }

    /// The agent that answers `message` (`docs/protocol.md`, "Which agent answers").
    ///
    /// `Err(Some(_))` is a 40 (a private message to an agent the app does not have);
    /// `Err(None)` means the app's default agent is missing, a configuration fault (50).
    pub(crate) fn resolve(&self, message: &Message) -> Result<Arc<dyn Agent>, Option<Violation>> {
        let named = message.receiver_id.as_deref();
        let id = match (message.chat_type, named) {
            (ChatType::Private, Some(id)) => {
                return self
                    .agents
                    .get(id)
                    .cloned()
                    .ok_or_else(|| Some(Violation::UnknownAgent(id.into())));
            }
            (ChatType::Group, Some(id)) if self.contains(id) => id,
            (ChatType::Group, _) => self.mentioned(message).unwrap_or(&self.default),
            (ChatType::Private, None) => self.default.as_str(),
        };
        self.agents.get(id).cloned().ok_or(None)
    }

    /// The first of the app's agents that a text message mentions as `@id`, so that in a group
    /// the addressed agent answers rather than the default one.
    fn mentioned<'a>(&'a self, message: &'a Message) -> Option<&'a str> {
        if message.content_type != ContentType::Text {
            return None;
        }
        let is_id_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        message.content.match_indices('@').find_map(|(at, _)| {
            let rest = &message.content[at + 1..];
            let token = &rest[..rest.find(|c: char| !is_id_char(c)).unwrap_or(rest.len())];
            // "@helper." ends a sentence: the dot is not part of the id.
            [token, token.trim_end_matches('.')]
                .into_iter()
                .find(|id| self.contains(id))
        })
    }

    /// The default agent's id.
    pub(crate) fn default_id(&self) -> &str {
        &self.default
    }
}

/// Outbox bookkeeping of one app. The entries themselves live in the store.
#[derive(Debug, Default)]
pub(crate) struct OutboxState {
    /// Held by the one task draining the outbox, so entries go out once and in order.
    pub(crate) draining: tokio::sync::Mutex<()>,
    /// Set while a drain waits for its turn: one waiting drain covers every entry stored
    /// before it starts, so further requests need not queue another.
    pub(crate) queued: AtomicBool,
    /// Entries on their way out: a drain skips them.
    transit: Mutex<Transit>,
    depth: AtomicI64,
}

/// Outbox entries between a drain's read of the store and their removal from it.
#[derive(Debug, Default)]
pub(crate) struct Transit {
    /// Handed to a connection and not yet written and removed.
    sending: HashSet<i64>,
    /// Written and removed from the store since the drain last began a read of it: a read
    /// under way while an entry was removed may still list it.
    removed: HashSet<i64>,
}

impl Transit {
    /// Takes an entry a drain read for sending; `false` when it is on its way or gone already.
    pub(crate) fn claim(&mut self, id: i64) -> bool {
        !self.removed.contains(&id) && self.sending.insert(id)
    }

    /// The entry could not be handed over or written: it stays for the next drain.
    pub(crate) fn release(&mut self, id: i64) {
        self.sending.remove(&id);
    }

    /// The entry was written and removed from the store.
    pub(crate) fn removed(&mut self, id: i64) {
        self.sending.remove(&id);
        self.removed.insert(id);
    }

    /// A drain begins a read of the store, which cannot list what was removed before now.
    pub(crate) fn reading(&mut self) {
        self.removed.clear();
    }
}

impl OutboxState {
    /// Entries waiting, as far as this process knows.
    pub(crate) fn depth(&self) -> u64 {
        u64::try_from(self.depth.load(Ordering::Relaxed)).unwrap_or(0)
    }

    pub(crate) fn add_depth(&self, delta: i64) {
        self.depth.fetch_add(delta, Ordering::Relaxed);
    }

    pub(crate) fn transit(&self) -> MutexGuard<'_, Transit> {
        lock(&self.transit)
    }
}

/// A map keyed by ids that come with every message. Each message costs several look-ups in
/// these maps, and SipHash on its short keys was most of their cost; foldhash is a fraction
/// of it, seeded at random per process, and every map is bounded: by an in-flight limit, or
/// by the app's agents.
type IdMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The connections a message came in on while it was processed: where its response goes.
///
/// A backend that loses a connection resends what it has unanswered on another one, and the
/// gateway may read those frames in any order across connections: a resend written before
/// the connection was dropped can arrive after the one the backend now waits on. A response
/// written to a connection its backend has dropped is lost without the gateway knowing (the
/// write succeeds into the socket's buffer), so the response goes to every one of these
/// connections still open, not only to the one read last; backends key responses by
/// `ref_msg_id` and ignore a second one (`docs/protocol.md`). Connections that have closed are
/// let go at each resend, so it names at most the app's open connections.
#[derive(Debug, Clone)]
pub(crate) struct Origins {
    /// The connection the message was read on last.
    pub(crate) last: ConnId,
    /// The other connections it was read on, oldest first; empty unless it was resent on
    /// another connection while in processing.
    pub(crate) earlier: Vec<ConnId>,
}

impl Origins {
    fn new(conn: ConnId) -> Self {
        Self {
            last: conn,
            earlier: Vec::new(),
        }
    }

    /// The message was read again, on `conn`; `open` says which connections are still open.
    fn resent_on(&mut self, conn: ConnId, open: impl Fn(ConnId) -> bool) {
        if conn != self.last {
            let last = std::mem::replace(&mut self.last, conn);
            self.earlier.push(last);
            self.earlier
                .retain(|&earlier| earlier != conn && open(earlier));
        }
    }
}

/// The messages an app has in processing, by `msg_id` with where each one's response goes,
/// and counted by sender, and those whose agent deferred its reply. One lock covers both, so a
/// message moves from one to the other without a moment in which a resend would find it in
/// neither.
#[derive(Debug, Default)]
struct InFlight {
    by_msg: IdMap<Arc<str>, Origins>,
    by_sender: IdMap<String, usize>,
    deferred: IdMap<String, Deferred>,
}

impl InFlight {
    /// Ends `message`'s time in processing. Its sender is the one its `msg_id` was counted
    /// for: a message whose `msg_id` is in processing already is a duplicate, whatever its
    /// sender, and counted for nobody.
    fn finish(&mut self, message: &Message) -> Option<Origins> {
        let origins = self.by_msg.remove(message.msg_id.as_str())?;
        // Taken out and put back only if the sender has more in processing: nearly always the
        // count was one, and a look-up then a removal hashed the sender twice.
        if let Some((sender, count)) = self.by_sender.remove_entry(&message.sender_id)
            && count > 1
        {
            self.by_sender.insert(sender, count - 1);
        }
        Some(origins)
    }
}

/// A message whose agent will push its reply (`POST /api/v1/messages` with `ref_msg_id`).
/// It holds no in-flight place meanwhile: waiting on an agent's side must not stall the
/// connection or the sender.
#[derive(Debug, Clone)]
pub(crate) struct Deferred {
    /// The inbound message.
    pub(crate) message: Message,
    /// The agent that deferred; only it may push the reply.
    pub(crate) agent: String,
    /// Where the reply goes; `None` for a message restored at start-up, which came in on a
    /// connection of an earlier process.
    pub(crate) origins: Option<Origins>,
    /// When it is answered with 50 instead, in ms since the Unix epoch.
    pub(crate) until_ms: i64,
}

/// The in-flight limits [`AppState::begin`] applies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InFlightLimits {
    pub(crate) per_app: usize,
    pub(crate) per_sender: usize,
}

/// Everything the gateway holds for one app.
pub(crate) struct AppState {
    /// The app's name, its id in logs and metrics.
    pub(crate) name: Arc<str>,
    /// The app's agents.
    pub(crate) agents: RwLock<Arc<AgentSet>>,
    /// The store's `agents_version` the agents were built from.
    agents_version: AtomicU64,
    /// The open connections, in the order they opened.
    pool: Mutex<Vec<PoolMember>>,
    /// Connections admitted (upgrading or open), held against the per-app limit.
    admitted: AtomicUsize,
    /// Round-robin cursor for picking "another connection".
    cursor: AtomicUsize,
    /// Messages in flight: a duplicate arriving meanwhile is not processed twice.
    in_flight: Mutex<InFlight>,
    /// Per-conversation queues; a conversation is present exactly while its worker runs.
    conversations: Mutex<IdMap<ConversationKey, VecDeque<Job>>>,
    /// Outbox bookkeeping.
    pub(crate) outbox: OutboxState,
    /// The app's message rate limit, if it has one.
    pub(crate) rate: Option<RateLimit>,
    /// Counters for `/metrics`.
    pub(crate) counters: crate::metrics::AppCounters,
    /// The span every conversation worker of the app runs in. Made once: a span per worker
    /// cost an allocation and a registry entry for nearly every message.
    pub(crate) conversation_span: tracing::Span,
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it: every critical section
/// here leaves its map consistent at each step, so the data is still sound.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A place in an app's connection limit, given back when dropped.
pub(crate) struct Admission(Arc<AppState>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What became of a message offered to [`AppState::begin`].
pub(crate) enum Begin {
    /// Its processing is ours, and its conversation had none under way: the caller starts
    /// the conversation's worker with it. Handed back rather than queued, it costs its
    /// conversation no queue and its worker no look-up to take it.
    Start(Job),
    /// Its processing is ours: it waits in its conversation's queue.
    Queued,
    /// The same `msg_id` is being processed: its one response will follow on this connection.
    Duplicate,
    /// The app is at its in-flight limit.
    Overloaded(Job),
    /// The message's sender is at its in-flight limit.
    SenderBusy(Job),
}

impl AppState {
    pub(crate) fn new(app: &App, agents: AgentSet, rate: Option<RateLimit>) -> Self {
        Self {
            name: app.name.as_str().into(),
            agents: RwLock::new(Arc::new(agents)),
            agents_version: AtomicU64::new(app.agents_version),
            pool: Mutex::default(),
            admitted: AtomicUsize::new(0),
            cursor: AtomicUsize::new(0),
            in_flight: Mutex::default(),
            conversations: Mutex::default(),
            outbox: OutboxState::default(),
            rate,
            counters: crate::metrics::AppCounters::default(),
            // No parent: the app outlives whichever connection first made it.
            conversation_span: tracing::info_span!(parent: None, "conversation", app = %app.name),
        }
    }

    /// Whether the store's agents of this app have changed since they were built.
    pub(crate) fn agents_outdated(&self, app: &App) -> bool {
        self.agents_version.load(Ordering::Acquire) != app.agents_version
    }

    /// Swaps in agents rebuilt from the store. Messages already queued keep the agent they were
    /// given; the next ones get the new set.
    pub(crate) fn replace_agents(&self, agents: AgentSet, version: u64) {
        *self
            .agents
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(agents);
        self.agents_version.store(version, Ordering::Release);
    }

    /// The current agents.
    pub(crate) fn agents(&self) -> Arc<AgentSet> {
        self.agents
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Takes a place in the connection limit, or `None` when the app is at `max`.
    pub(crate) fn admit(self: &Arc<Self>, max: usize) -> Option<Admission> {
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Admission(self.clone()))
    }

    /// Adds an open connection to the pool.
    pub(crate) fn join(&self, member: PoolMember) {
        lock(&self.pool).push(member);
    }

    /// Removes a connection from the pool: nothing is routed to it any more.
    pub(crate) fn leave(&self, id: ConnId) {
        lock(&self.pool).retain(|member| member.id != id);
    }

    /// Open connections, counted by their places in the connection limit: a connection counts
    /// until it has finished closing, so a place frees exactly when the count drops.
    pub(crate) fn connection_count(&self) -> usize {
        self.admitted.load(Ordering::Acquire)
    }

    /// Whether a connection that takes the pool's traffic is open.
    pub(crate) fn has_shared_connections(&self) -> bool {
        lock(&self.pool).iter().any(|member| member.shared)
    }

    /// Queues `item` on connection `id` if it is open and its queue has room, without
    /// waiting; hands it back otherwise, `Full` or `Closed` (a connection no longer in the
    /// pool is closed). Nearly every response goes out this way, and a member copied out of
    /// the pool to wait on its queue costs its sender's clone and drop, two atomic updates
    /// each.
    pub(crate) fn try_send_to(
        &self,
        id: ConnId,
        item: Outbound,
    ) -> Result<(), TrySendError<Outbound>> {
        match lock(&self.pool).iter().find(|member| member.id == id) {
            Some(member) => member.frames.try_send(item),
            None => Err(TrySendError::Closed(item)),
        }
    }

    /// The connection with this id, if still in the pool.
    pub(crate) fn member(&self, id: ConnId) -> Option<PoolMember> {
        lock(&self.pool)
            .iter()
            .find(|member| member.id == id)
            .cloned()
    }

    /// The pool's shared connections other than `except`, starting at a rotating position so
    /// that rerouted traffic spreads over the pool.
    pub(crate) fn others(&self, except: Option<ConnId>) -> Vec<PoolMember> {
        let pool = lock(&self.pool);
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let len = pool.len();
        (0..len)
            .map(|i| &pool[(start + i) % len])
            .filter(|member| member.shared && Some(member.id) != except)
            .cloned()
            .collect()
    }

    /// Offers a valid message for processing: deduplicates it against the messages in flight,
    /// applies the in-flight limits, and queues it on its conversation, or hands it back to
    /// start the conversation's worker with when it has none.
    pub(crate) fn begin(&self, job: Job, origin: ConnId, limits: InFlightLimits) -> Begin {
        {
            let mut in_flight = lock(&self.in_flight);
            let InFlight {
                by_msg,
                by_sender,
                deferred,
            } = &mut *in_flight;
            // The pool's lock is never held while this one is taken.
            let open = |id| self.member(id).is_some();
            let full = by_msg.len() >= limits.per_app;
            // Each map is looked up once, by entry: the keys are kept for the message in flight
            // anyway (the `msg_id` is shared with its job), and a look-up then an insert hashed
            // each twice.
            let place = match by_msg.entry(Arc::clone(&job.msg_id)) {
                Entry::Occupied(mut origins) => {
                    origins.get_mut().resent_on(origin, open);
                    return Begin::Duplicate;
                }
                Entry::Vacant(place) => place,
            };
            if let Some(waiting) = deferred.get_mut(&job.message.msg_id) {
                match &mut waiting.origins {
                    Some(origins) => origins.resent_on(origin, open),
                    None => waiting.origins = Some(Origins::new(origin)),
                }
                return Begin::Duplicate;
            }
            if full {
                return Begin::Overloaded(job);
            }
            match by_sender.entry(job.message.sender_id.clone()) {
                Entry::Occupied(mut count) if *count.get() < limits.per_sender => {
                    *count.get_mut() += 1;
                }
                Entry::Vacant(count) if limits.per_sender > 0 => {
                    count.insert(1);
                }
                _ => return Begin::SenderBusy(job),
            }
            place.insert(Origins::new(origin));
        }
        match lock(&self.conversations).entry(job.conversation.clone()) {
            Entry::Occupied(mut queue) => {
                queue.get_mut().push_back(job);
                Begin::Queued
            }
            Entry::Vacant(slot) => {
                // An empty queue: the conversation has a worker, and nothing waits for it.
                slot.insert(VecDeque::new());
                Begin::Start(job)
            }
        }
    }

    /// The next message of a conversation, or `None` when it is done (and then forgotten, so
    /// that the next message starts a new worker).
    pub(crate) fn next_job(&self, key: &ConversationKey) -> Option<Job> {
        match lock(&self.conversations).entry(key.clone()) {
            Entry::Occupied(mut queue) => {
                let job = queue.get_mut().pop_front();
                if job.is_none() {
                    queue.remove();
                }
                job
            }
            Entry::Vacant(_) => None,
        }
    }

    /// Ends a message's time in flight; returns where its response goes.
    pub(crate) fn finish(&self, message: &Message) -> Option<Origins> {
        lock(&self.in_flight).finish(message)
    }

    /// Moves a message from processing to waiting for its pushed reply; `false` (and nothing
    /// moved) when the app already has `max` deferred messages.
    pub(crate) fn defer(&self, message: &Message, agent: &str, until_ms: i64, max: usize) -> bool {
        let mut in_flight = lock(&self.in_flight);
        if in_flight.deferred.len() >= max {
            return false;
        }
        let origins = in_flight.finish(message);
        let deferred = Deferred {
            message: message.clone(),
            agent: agent.to_owned(),
            origins,
            until_ms,
        };
        in_flight.deferred.insert(message.msg_id.clone(), deferred);
        true
    }

    /// Puts back a message that was waiting for its reply when the gateway last stopped.
    pub(crate) fn restore_deferred(&self, deferred: Deferred) {
        lock(&self.in_flight)
            .deferred
            .insert(deferred.message.msg_id.clone(), deferred);
    }

    /// The message waiting for a pushed reply with this id, if any.
    pub(crate) fn deferred(&self, msg_id: &str) -> Option<Deferred> {
        lock(&self.in_flight).deferred.get(msg_id).cloned()
    }

    /// Takes a waiting message, to answer it; `None` if it was answered meanwhile.
    pub(crate) fn take_deferred(&self, msg_id: &str) -> Option<Deferred> {
        lock(&self.in_flight).deferred.remove(msg_id)
    }

    /// How many messages wait for a pushed reply.
    pub(crate) fn deferred_count(&self) -> usize {
        lock(&self.in_flight).deferred.len()
    }

    /// Takes every waiting message whose deadline has passed.
    pub(crate) fn take_expired(&self, now_ms: i64) -> Vec<Deferred> {
        let mut in_flight = lock(&self.in_flight);
        let expired: Vec<String> = in_flight
            .deferred
            .values()
            .filter(|d| d.until_ms <= now_ms)
            .map(|d| d.message.msg_id.clone())
            .collect();
        expired
            .iter()
            .filter_map(|id| in_flight.deferred.remove(id))
            .collect()
    }

    /// How many messages are in flight.
    pub(crate) fn in_flight(&self) -> usize {
        lock(&self.in_flight).by_msg.len()
    }
}

/// All apps the gateway has seen, by name.
#[derive(Default)]
pub(crate) struct Apps {
    apps: RwLock<HashMap<String, Arc<AppState>>>,
}

impl Apps {
    pub(crate) fn get(&self, name: &str) -> Option<Arc<AppState>> {
        self.apps
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// Adds an app's state, unless one is there already (the first one in wins); returns the
    /// state in use.
    pub(crate) fn insert(&self, state: AppState) -> Arc<AppState> {
        let mut apps = self
            .apps
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        apps.entry(state.name.to_string())
            .or_insert_with(|| Arc::new(state))
            .clone()
    }

    pub(crate) fn all(&self) -> Vec<Arc<AppState>> {
        let apps = self
            .apps
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut all: Vec<_> = apps.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

#[cfg(test)]
mod tests {
    use iagent_protocol::{ChatType, ContentType, Message, RespCode, SenderType};

    use super::{InFlight, Origins, Transit};

    /// A sender's count goes down by one as each of its messages finishes, and the sender is
    /// forgotten with its last; a message not in processing changes no count.
    #[test]
    fn a_sender_is_counted_down_message_by_message() {
        let message = |msg_id: &str, sender: &str| Message {
            chat_type: ChatType::Private,
            msg_id: msg_id.into(),
            ref_msg_id: None,
            timestamp: 0,
            group_id: None,
            sender_type: SenderType::User,
            sender_id: sender.into(),
            receiver_id: None,
            resp_code: RespCode::Ok,
            content_type: ContentType::Text,
            content: String::new(),
        };
        let mut in_flight = InFlight::default();
        for msg_id in ["m1", "m2", "m3"] {
            in_flight.by_msg.insert(msg_id.into(), Origins::new(1));
        }
        in_flight.by_sender.insert("alice".into(), 3);
        let count = |in_flight: &InFlight| in_flight.by_sender.get("alice").copied();
        assert!(in_flight.finish(&message("m2", "alice")).is_some());
        assert_eq!(count(&in_flight), Some(2));
        assert!(in_flight.finish(&message("m2", "alice")).is_none());
        assert_eq!(count(&in_flight), Some(2));
        assert!(in_flight.finish(&message("m1", "alice")).is_some());
        assert_eq!(count(&in_flight), Some(1));
        assert!(in_flight.finish(&message("m3", "alice")).is_some());
        assert_eq!(count(&in_flight), None);
    }

    /// Each open connection is named once, the one read last apart from the rest, whatever
    /// order and how often the resends come in; closed ones are let go.
    #[test]
    fn origins_name_each_open_connection_once_the_last_read_apart() {
        let all_open = |_| true;
        let mut origins = Origins::new(1);
        origins.resent_on(1, all_open);
        assert_eq!((origins.last, origins.earlier.clone()), (1, vec![]));
        for conn in [2, 3, 2, 2] {
            origins.resent_on(conn, all_open);
        }
        assert_eq!((origins.last, origins.earlier.clone()), (2, vec![1, 3]));
        origins.resent_on(1, all_open);
        assert_eq!((origins.last, origins.earlier.clone()), (1, vec![3, 2]));
        origins.resent_on(4, |conn| conn != 3 && conn != 1);
        assert_eq!((origins.last, origins.earlier), (4, vec![2]));
    }

    #[test]
    fn an_entry_removed_during_a_read_is_not_sent_again_by_that_read() {
        let mut transit = Transit::default();
        transit.reading();
        // The read lists entry 1, which a connection is writing: skipped.
        assert!(transit.claim(1));
        assert!(!transit.claim(1), "on its way already");
        // Entry 2 was written and removed while a second read was under way, which lists it.
        transit.reading();
        transit.removed(2);
        assert!(!transit.claim(2), "removed during the read that listed it");
        // An entry whose hand-over failed stays for the next drain.
        transit.release(1);
        assert!(transit.claim(1));
        // A new read cannot list what was removed before it began.
        transit.reading();
        assert!(transit.removed.is_empty(), "nothing grows across reads");
    }
}
