//! Proves the SQLite store's behaviour through the [`Store`] trait, against a real database in a
//! temporary directory: apps and their validation, tokens (lookup, rotation, revocation, and that
//! only their SHA-256 hashes ever reach the database files), the dedup record of `msg_id`s
//! (claim, complete, unanswered), message texts stored packed and read back whole, the outbox
//! (push, peek, remove, depths, isolation between apps), purging of expired records, durability
//! across a reopen and the checkpoints that copy commits into the main file, and the batching:
//! concurrent claims of one `msg_id` yield exactly one `New`, more writes at once than a batch
//! holds are all committed, a failing job does not take its batch down with it, a write whose
//! caller gives up is committed all the same, one that finds the database locked waits for it
//! without holding up its caller's thread, and one over the store's capacity waits for a place.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use iagent_protocol::Message;
use iagent_store::{
    AgentRecord, Claim, Completion, HistoryEntry, MessageText, Options, PurgeBefore, SqliteStore,
    Store, StoreError, Unanswered, token,
};
use tokio::task::JoinSet;

const NOW: i64 = 1_700_000_000_000;

fn open(dir: &Path) -> SqliteStore {
    SqliteStore::open(dir, Options::default()).expect("open the store")
}

/// A store in a fresh temporary directory; the directory lives as long as the returned guard.
fn fresh() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = open(dir.path());
    (dir, store)
}

/// Every byte the database has on disk: the main file and, if present, its write-ahead log.
fn database_bytes(store: &SqliteStore) -> Vec<u8> {
    let mut bytes = std::fs::read(store.path()).expect("read the database file");
    let mut wal = store.path().as_os_str().to_owned();
    wal.push("-wal");
    if let Ok(log) = std::fs::read(&wal) {
        bytes.extend_from_slice(&log);
    }
    bytes
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

fn completion(app: &str, msg_id: &str, response: &str, history: Vec<HistoryEntry>) -> Completion {
    Completion::new(app, msg_id, response, history)
}

fn history(conversation: &str, at_ms: i64, message: &str) -> HistoryEntry {
    HistoryEntry {
        conversation: conversation.into(),
        at_ms,
        message: message.into(),
        reply: None,
    }
}

fn sorted<T: Ord>(mut items: Vec<T>) -> Vec<T> {
    items.sort();
    items
}

// ---------------------------------------------------------------------------------------------
// Apps
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn create_app_returns_the_app_with_echo_default_and_a_prefixed_token() {
    let (_dir, store) = fresh();
    let (app, token) = store.create_app("shop", NOW).await.unwrap();
    assert_eq!(app.name, "shop");
    assert_eq!(app.created_ms, NOW);
    assert_eq!(app.default_agent, "echo");
    assert_eq!(app.live_tokens, 1);
    assert!(
        token.expose().starts_with("iat_"),
        "token has the iat_ prefix"
    );
    assert_eq!(token.expose().len(), "iat_".len() + 64);

    let listed = store.list_apps().await.unwrap();
    assert_eq!(listed, vec![app]);
}

#[tokio::test]
async fn creating_an_app_twice_fails_with_app_exists() {
    let (_dir, store) = fresh();
    let (_, first) = store.create_app("shop", NOW).await.unwrap();
    let err = store.create_app("shop", NOW + 1).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::AppExists(name) if name == "shop"),
        "got {err:?}"
    );
    // The failed attempt changed nothing: one app, its first token still the one that works.
    let apps = store.list_apps().await.unwrap();
    assert_eq!(apps.len(), 1);
    assert_eq!(apps[0].created_ms, NOW);
    assert_eq!(apps[0].live_tokens, 1);
    let found = store.app_for_token(first.expose()).await.unwrap();
    assert_eq!(found.map(|app| app.name), Some("shop".to_owned()));
}

#[tokio::test]
async fn invalid_app_names_are_refused() {
    let (_dir, store) = fresh();
    let too_long = "a".repeat(65);
    for name in [
        "",
        "Upper",
        "a b",
        "caf\u{e9}",
        "dot.ted",
        too_long.as_str(),
    ] {
        let err = store.create_app(name, NOW).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidAppName(got) if got == name),
            "{name:?}: got {err:?}"
        );
    }
    assert!(store.list_apps().await.unwrap().is_empty());

    // The edges of the valid range are accepted.
    let longest = "z".repeat(64);
    for name in ["a", "a-b_c-0-9", longest.as_str()] {
        let (app, _) = store.create_app(name, NOW).await.unwrap();
        assert_eq!(app.name, name);
    }
}

#[tokio::test]
async fn list_apps_is_sorted_by_name() {
    let (_dir, store) = fresh();
    for name in ["mango", "apple", "zebra", "banana", "a-1"] {
        store.create_app(name, NOW).await.unwrap();
    }
    let names: Vec<String> = store
        .list_apps()
        .await
        .unwrap()
        .into_iter()
        .map(|app| app.name)
        .collect();
    assert_eq!(names, ["a-1", "apple", "banana", "mango", "zebra"]);
}

#[tokio::test]
async fn a_new_app_has_the_echo_agent() {
    let (_dir, store) = fresh();
    store.create_app("shop", NOW).await.unwrap();
    store.create_app("other", NOW).await.unwrap();
    let agents = store.agents("shop").await.unwrap();
    assert_eq!(
        agents,
        vec![AgentRecord {
            id: "echo".into(),
            kind: "echo".into(),
            config: "{}".into(),
        }]
    );
    assert!(store.agents("nobody").await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn app_for_token_finds_the_owner_and_nothing_for_a_wrong_token() {
    let (_dir, store) = fresh();
    let (shop, shop_token) = store.create_app("shop", NOW).await.unwrap();
    let (blog, blog_token) = store.create_app("blog", NOW).await.unwrap();

    assert_eq!(
        store.app_for_token(shop_token.expose()).await.unwrap(),
        Some(shop)
    );
    assert_eq!(
        store.app_for_token(blog_token.expose()).await.unwrap(),
        Some(blog)
    );
    let wrong = format!("iat_{}", "0".repeat(64));
    assert_eq!(store.app_for_token(&wrong).await.unwrap(), None);
    assert_eq!(store.app_for_token("").await.unwrap(), None);
    // A token differing in its last character is not the token.
    let mut almost = shop_token.expose().to_owned();
    let last = almost.pop().unwrap();
    almost.push(if last == '0' { '1' } else { '0' });
    assert_eq!(store.app_for_token(&almost).await.unwrap(), None);
}

#[tokio::test]
async fn rotate_token_retires_the_old_token_and_issues_a_working_one() {
    let (_dir, store) = fresh();
    let (_, old) = store.create_app("shop", NOW).await.unwrap();
    let (_, other) = store.create_app("other", NOW).await.unwrap();

    let new = store.rotate_token("shop", NOW + 1).await.unwrap();
    assert_ne!(new, old);
    assert!(new.expose().starts_with("iat_"));
    assert_eq!(store.app_for_token(old.expose()).await.unwrap(), None);
    let found = store.app_for_token(new.expose()).await.unwrap().unwrap();
    assert_eq!(found.name, "shop");
    assert_eq!(found.live_tokens, 1);
    // Another app's token is untouched.
    let found = store.app_for_token(other.expose()).await.unwrap().unwrap();
    assert_eq!(found.name, "other");
}

#[tokio::test]
async fn revoke_tokens_counts_the_live_ones_and_they_stop_working() {
    let (_dir, store) = fresh();
    let (_, token) = store.create_app("shop", NOW).await.unwrap();
    let (_, other) = store.create_app("other", NOW).await.unwrap();

    assert_eq!(store.revoke_tokens("shop", NOW + 1).await.unwrap(), 1);
    assert_eq!(store.app_for_token(token.expose()).await.unwrap(), None);
    let apps = store.list_apps().await.unwrap();
    let shop = apps.iter().find(|app| app.name == "shop").unwrap();
    assert_eq!(shop.live_tokens, 0);
    // Nothing left to revoke.
    assert_eq!(store.revoke_tokens("shop", NOW + 2).await.unwrap(), 0);
    // The other app keeps its token.
    assert!(store.app_for_token(other.expose()).await.unwrap().is_some());

    // After a rotation there is again exactly one live token to revoke.
    let rotated = store.rotate_token("shop", NOW + 3).await.unwrap();
    assert!(
        store
            .app_for_token(rotated.expose())
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(store.revoke_tokens("shop", NOW + 4).await.unwrap(), 1);
    assert_eq!(store.app_for_token(rotated.expose()).await.unwrap(), None);
}

#[tokio::test]
async fn token_operations_on_an_unknown_app_fail() {
    let (_dir, store) = fresh();
    store.create_app("shop", NOW).await.unwrap();
    let err = store.rotate_token("ghost", NOW).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::UnknownApp(name) if name == "ghost"),
        "got {err:?}"
    );
    let err = store.revoke_tokens("ghost", NOW).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::UnknownApp(name) if name == "ghost"),
        "got {err:?}"
    );
    // The failed rotation issued no token for anyone.
    let apps = store.list_apps().await.unwrap();
    assert_eq!(apps.len(), 1);
    assert_eq!(apps[0].live_tokens, 1);
}

#[tokio::test]
async fn the_database_holds_token_hashes_never_token_text() {
    let (_dir, store) = fresh();
    let (_, first) = store.create_app("shop", NOW).await.unwrap();
    let second = store.rotate_token("shop", NOW + 1).await.unwrap();
    let (_, third) = store.create_app("blog", NOW + 2).await.unwrap();
    store.revoke_tokens("blog", NOW + 3).await.unwrap();
    // The store still answers, so everything above is committed.
    assert!(
        store
            .app_for_token(second.expose())
            .await
            .unwrap()
            .is_some()
    );

    let check = |bytes: &[u8]| {
        for token in [&first, &second, &third] {
            let text = token.expose();
            assert!(
                !contains(bytes, text.as_bytes()),
                "a token's text is in the database"
            );
            // Nor the random part alone, nor its hex-encoded hash.
            assert!(!contains(bytes, &text.as_bytes()["iat_".len()..]));
            assert!(!contains(bytes, token::hex(&token::hash(text)).as_bytes()));
            assert!(
                contains(bytes, &token::hash(text)),
                "a token's SHA-256 is stored"
            );
        }
    };
    check(&database_bytes(&store));

    // Also once the store is closed and its log checkpointed into the main file.
    let path = store.path().to_owned();
    drop(store);
    let store = open(path.parent().unwrap());
    check(&database_bytes(&store));
}

// ---------------------------------------------------------------------------------------------
// Claim and complete
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn claim_is_new_then_pending_then_answered() {
    let (_dir, store) = fresh();
    let claim =
        |msg_id: &'static str| store.claim("shop", msg_id, format!("in-{msg_id}").into(), NOW);

    assert_eq!(claim("m1").await.unwrap(), Claim::New);
    assert_eq!(claim("m1").await.unwrap(), Claim::Pending);
    assert_eq!(claim("m1").await.unwrap(), Claim::Pending);

    store
        .complete(completion("shop", "m1", r#"{"resp_code":0}"#, vec![]))
        .await
        .unwrap();
    assert_eq!(
        claim("m1").await.unwrap(),
        Claim::Answered(r#"{"resp_code":0}"#.into())
    );
    // Answered stays answered.
    assert_eq!(
        claim("m1").await.unwrap(),
        Claim::Answered(r#"{"resp_code":0}"#.into())
    );
    // Another msg_id of the same app is its own.
    assert_eq!(claim("m2").await.unwrap(), Claim::New);
}

/// An echo's completion: one history entry whose reply is the response itself.
fn echoed(msg_id: &str, at_ms: i64) -> Completion {
    let entry = history("c", at_ms, &format!("message {msg_id}"));
    Completion::replied("shop", msg_id, entry, format!("response to {msg_id}"))
}

/// A data directory serves one store at a time: a second is refused, naming the directory,
/// while one opened shared administers apps beside it and refuses what relies on the serving
/// store's tails. A store dropped has committed everything and let go of the directory, its
/// writer thread's merges included: the next opens at once and finds every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_serves_one_store_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    // A merge after every commit, so that the writer thread has work when the store goes.
    let options = Options {
        dedup_merge_rows: 1,
        history_merge_rows: 1,
        ..Options::default()
    };
    let store = Arc::new(SqliteStore::open(dir.path(), options).unwrap());
    match SqliteStore::open(dir.path(), options) {
        Err(err @ StoreError::InUse(_)) => {
            assert!(err.to_string().contains(&dir.path().display().to_string()));
        }
        other => panic!("a second serving store: {other:?}"),
    }

    let shared = SqliteStore::open_shared(dir.path(), options).unwrap();
    let (_, token) = shared.create_app("shop", NOW).await.unwrap();
    let app = store.app_for_token(token.expose()).await.unwrap();
    assert_eq!(app.map(|app| app.name).as_deref(), Some("shop"));
    let refused = [
        shared.record(echoed("m0", NOW), NOW).await.err(),
        shared.claim("shop", "m0", "m".into(), NOW).await.err(),
        shared.complete(echoed("m0", NOW)).await.err(),
        shared.append_history("shop", vec![]).await.err(),
        shared.history("shop", "c", 10).await.err(),
        shared.defer("shop", "m0", "echo", NOW).await.err(),
        shared
            .purge(PurgeBefore {
                dedup: NOW,
                history: NOW,
                outbox: NOW,
                files: NOW,
            })
            .await
            .err(),
    ];
    for (n, refusal) in refused.into_iter().enumerate() {
        assert!(
            matches!(refusal, Some(StoreError::Shared)),
            "{n}: {refusal:?}"
        );
    }
    drop(shared);

    let mut writes = JoinSet::new();
    for n in 0..200 {
        let store = Arc::clone(&store);
        writes.spawn(async move { store.record(echoed(&format!("m{n}"), NOW), NOW).await });
    }
    while let Some(written) = writes.join_next().await {
        assert_eq!(written.unwrap().unwrap(), Claim::New);
    }
    drop(Arc::into_inner(store).expect("the last handle"));

    let reopened = SqliteStore::open(dir.path(), options).expect("the directory is free");
    for n in [0, 99, 199] {
        assert_echo_answered(&reopened, &format!("m{n}")).await;
    }
}

/// Asserts that a resend of `msg_id` gets the response [`echoed`] stored for it.
async fn assert_echo_answered(store: &SqliteStore, msg_id: &str) {
    let again = store
        .claim("shop", msg_id, "again".into(), NOW)
        .await
        .unwrap();
    assert_eq!(again, Claim::Answered(format!("response to {msg_id}")));
}

/// Has the store write what its entry log holds into the database: every transaction does so
/// first, and reading the apps is one.
async fn write_entry_log(store: &SqliteStore) {
    store.list_apps().await.expect("a transaction");
}

/// How many times `text` is stored, over every column of the dedup and history tables. The
/// newest entries may be in the entry log still: see [`write_entry_log`].
fn copies_stored(dir: &Path, text: &str) -> i64 {
    let path = dir.join("iagent.sqlite3");
    let conn = rusqlite::Connection::open(&path).unwrap();
    let rows: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM messages WHERE response = ?1 OR inbound = ?1",
            [text],
            |row| row.get(0),
        )
        .unwrap();
    let entries = SqliteStore::stored_entries(&path).unwrap();
    let in_entries = entries
        .iter()
        .filter(|entry| entry.message == text || entry.reply.as_deref() == Some(text))
        .count();
    rows + in_entries as i64
}

#[tokio::test]
async fn a_response_that_is_its_entrys_reply_is_stored_once_and_served_to_resends() {
    let (dir, store) = fresh();
    assert_eq!(
        store.record(echoed("m1", NOW), NOW).await.unwrap(),
        Claim::New
    );
    write_entry_log(&store).await;
    assert_eq!(copies_stored(dir.path(), "response to m1"), 1);
    assert_echo_answered(&store, "m1").await;
    assert_eq!(
        store.record(echoed("m1", NOW), NOW).await.unwrap(),
        Claim::Answered("response to m1".into())
    );
    assert!(store.unanswered().await.unwrap().is_empty());
    assert!(store.deferred().await.unwrap().is_empty());
    assert_eq!(
        store.history("shop", "c", 10).await.unwrap(),
        ["message m1", "response to m1"]
    );
    // A response that is not a reply (a 10, say) is stored in a dedup row.
    let declined = completion("shop", "m2", "not replying", vec![history("c", NOW, "m2")]);
    store.record(declined, NOW).await.unwrap();
    assert_eq!(
        store
            .claim("shop", "m2", "again".into(), NOW)
            .await
            .unwrap(),
        Claim::Answered("not replying".into())
    );
}

#[tokio::test]
async fn a_write_whose_caller_gives_up_once_it_is_queued_is_committed_all_the_same() {
    let (dir, store) = fresh();
    let mut write = store.record(echoed("m1", NOW), NOW);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(
        write.as_mut().poll(&mut cx).is_pending(),
        "queued, and waiting for the batch"
    );
    drop(write);
    // Nothing else goes through the store: had the job stayed queued, nobody would commit it.
    assert_echo_answered(&store, "m1").await;
    write_entry_log(&store).await;
    assert_eq!(copies_stored(dir.path(), "response to m1"), 1);
}

/// Another connection holding the write lock, and the claim of `m1` written meanwhile, given
/// the time to find the lock held; the lock is released by committing the connection.
async fn write_under_another_lock(
    store: &Arc<SqliteStore>,
) -> (
    rusqlite::Connection,
    tokio::task::JoinHandle<Result<Claim, StoreError>>,
) {
    let other = rusqlite::Connection::open(store.path()).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let write = tokio::spawn({
        let store = store.clone();
        async move { store.claim("shop", "m1", "inbound m1".into(), NOW).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    (other, write)
}

#[tokio::test]
async fn a_write_that_finds_the_database_locked_is_committed_once_the_lock_is_released() {
    let (_dir, store) = fresh();
    let store = Arc::new(store);
    // The caller's thread (this one) found the lock held and went on: it is free to let the
    // write wait here, and to release the lock.
    let (other, write) = write_under_another_lock(&store).await;
    assert!(!write.is_finished(), "committed under another's lock");
    other.execute_batch("COMMIT").unwrap();
    assert_eq!(write.await.unwrap().unwrap(), Claim::New);
    let again = store.claim("shop", "m1", "again".into(), NOW).await;
    assert_eq!(again.unwrap(), Claim::Pending);
}

#[tokio::test]
async fn an_echo_is_answered_from_the_entry_log_while_another_connection_holds_the_lock() {
    let (dir, store) = fresh();
    let other = rusqlite::Connection::open(store.path()).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let echo = store.record(echoed("m1", NOW), NOW);
    let answered = tokio::time::timeout(std::time::Duration::from_secs(5), echo).await;
    assert_eq!(
        answered.expect("answered under the lock").unwrap(),
        Claim::New
    );
    // A resend is answered from the entry the log holds.
    assert_eq!(
        store.record(echoed("m1", NOW), NOW).await.unwrap(),
        Claim::Answered("response to m1".into())
    );
    assert_eq!(copies_stored(dir.path(), "response to m1"), 0, "in the log");
    other.execute_batch("COMMIT").unwrap();
    assert_eq!(
        store.history("shop", "c", 10).await.unwrap(),
        ["message m1", "response to m1"]
    );
    drop(store);
    assert_eq!(
        copies_stored(dir.path(), "response to m1"),
        1,
        "written on close"
    );
    let log = std::fs::metadata(dir.path().join(iagent_store::ENTRY_LOG_FILES[0])).unwrap();
    assert_eq!(log.len(), 0, "emptied on close");
}

/// The files of the data directory `from` as a process killed now would leave them, copied
/// into `to`: what was written is in the operating system's hands, whether or not SQLite or
/// the entry log wrote it further. The WAL index (`-shm`) is left behind, as a reboot would
/// (SQLite rebuilds it from the WAL), and so is the directory's lock, which went with the
/// process.
fn as_if_killed(from: &Path, to: &Path) {
    for file in std::fs::read_dir(from).unwrap() {
        let file = file.unwrap();
        let name = file.file_name().into_string().unwrap();
        if file.file_type().unwrap().is_file()
            && !name.ends_with("-shm")
            && name != iagent_store::LOCK_FILE
        {
            std::fs::copy(file.path(), to.join(&name)).unwrap();
        }
    }
}

/// Echoes `m0` to `m{count - 1}`, in conversation `c`, each answered.
async fn echo_all(store: &SqliteStore, count: usize) -> Vec<String> {
    let msg_ids: Vec<String> = (0..count).map(|n| format!("m{n}")).collect();
    for msg_id in &msg_ids {
        let claim = store.record(echoed(msg_id, NOW), NOW).await.unwrap();
        assert_eq!(claim, Claim::New, "{msg_id}");
    }
    msg_ids
}

/// Each of `msg_ids` is answered with its echo, and the conversation's history holds them in
/// order.
async fn assert_echoes_kept(store: &SqliteStore, msg_ids: &[String]) {
    for msg_id in msg_ids {
        assert_eq!(
            store.record(echoed(msg_id, NOW), NOW).await.unwrap(),
            Claim::Answered(format!("response to {msg_id}")),
            "{msg_id}"
        );
    }
    let expected: Vec<String> = msg_ids
        .iter()
        .flat_map(|msg_id| [format!("message {msg_id}"), format!("response to {msg_id}")])
        .collect();
    assert_eq!(store.history("shop", "c", 100).await.unwrap(), expected);
}

#[tokio::test]
async fn echoes_answered_from_the_entry_log_survive_a_kill() {
    let (dir, store) = fresh();
    // Some entries written into the database by a transaction, the rest only in the log.
    let mut msg_ids = echo_all(&store, 3).await;
    write_entry_log(&store).await;
    for n in 3..8 {
        let msg_id = format!("m{n}");
        store.record(echoed(&msg_id, NOW), NOW).await.unwrap();
        msg_ids.push(msg_id);
    }
    let killed = tempfile::tempdir().unwrap();
    as_if_killed(dir.path(), killed.path());
    assert_eq!(
        copies_stored(killed.path(), "response to m7"),
        0,
        "in the log"
    );
    drop(store);

    let store = open(killed.path());
    assert_eq!(
        copies_stored(killed.path(), "response to m7"),
        1,
        "read back"
    );
    assert_echoes_kept(&store, &msg_ids).await;
    // New entries go on from the last one read back.
    store.record(echoed("m8", NOW), NOW).await.unwrap();
    msg_ids.push("m8".into());
    drop(store);
    let store = open(killed.path());
    assert_echoes_kept(&store, &msg_ids).await;
}

#[tokio::test]
async fn a_frame_cut_short_by_a_kill_is_dropped_and_the_frames_before_it_kept() {
    let (dir, store) = fresh();
    let msg_ids = echo_all(&store, 4).await;
    let killed = tempfile::tempdir().unwrap();
    as_if_killed(dir.path(), killed.path());
    store.record(echoed("cut", NOW), NOW).await.unwrap();
    drop(store);
    // The last frame as a kill in the middle of its write leaves it: its header and part of
    // its entries.
    let log = killed.path().join(iagent_store::ENTRY_LOG_FILES[0]);
    let whole = std::fs::metadata(&log).unwrap().len();
    let mut bytes = std::fs::read(&log).unwrap();
    bytes.extend_from_slice(&[
        0x2a, 0, 0, 0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, b'{',
    ]);
    std::fs::write(&log, &bytes).unwrap();

    let store = open(killed.path());
    assert_echoes_kept(&store, &msg_ids).await;
    assert_eq!(
        store.record(echoed("cut", NOW), NOW).await.unwrap(),
        Claim::New,
        "never answered"
    );
    drop(store);
    assert!(whole > 0);
    assert_eq!(std::fs::metadata(&log).unwrap().len(), 0, "emptied");
}

#[tokio::test]
async fn entries_the_log_still_holds_after_their_transaction_are_not_written_twice() {
    let (dir, store) = fresh();
    let msg_ids = echo_all(&store, 5).await;
    let log = dir.path().join(iagent_store::ENTRY_LOG_FILES[0]);
    let frames = std::fs::read(&log).unwrap();
    assert!(!frames.is_empty(), "the echoes are in the log");
    write_entry_log(&store).await;
    assert_eq!(std::fs::metadata(&log).unwrap().len(), 0, "emptied");
    // Killed after the transaction that wrote the entries committed, before the log was
    // emptied: the log holds them still.
    let killed = tempfile::tempdir().unwrap();
    as_if_killed(dir.path(), killed.path());
    std::fs::write(
        killed.path().join(iagent_store::ENTRY_LOG_FILES[0]),
        &frames,
    )
    .unwrap();
    drop(store);

    let store = open(killed.path());
    assert_echoes_kept(&store, &msg_ids).await;
    write_entry_log(&store).await;
    assert_eq!(copies_stored(killed.path(), "response to m0"), 1);
}

/// A store whose entry log holds at most 1 KiB, which a few dozen echoes fill several times.
fn with_a_small_log(dir: &Path) -> SqliteStore {
    let options = Options {
        entry_log_kib: 1,
        ..Options::default()
    };
    SqliteStore::open(dir, options).expect("open the store")
}

/// The length of each of the entry log's files in `dir`.
fn log_lens(dir: &Path) -> [u64; 2] {
    iagent_store::ENTRY_LOG_FILES.map(|name| std::fs::metadata(dir.join(name)).unwrap().len())
}

/// Waits, up to five seconds, until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{what} did not happen within five seconds");
}

/// Echoes `m{from}` to `m{to - 1}` one after the other, counting in `answered` those that were
/// answered, each as new.
fn echo_counted(
    store: &Arc<SqliteStore>,
    range: std::ops::Range<usize>,
    answered: &Arc<std::sync::atomic::AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    let (store, answered) = (store.clone(), answered.clone());
    tokio::spawn(async move {
        for n in range {
            let claim = store
                .record(echoed(&format!("m{n}"), NOW), NOW)
                .await
                .unwrap();
            assert_eq!(claim, Claim::New, "m{n}");
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    })
}

#[tokio::test]
async fn a_full_file_of_the_entry_log_is_written_into_the_database_while_echoes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = with_a_small_log(dir.path());
    let msg_ids = echo_all(&store, 45).await;
    // No transaction ran: only the log's files filling wrote the first echoes into the
    // database, on the writer thread.
    until("the first echo written", || {
        copies_stored(dir.path(), "response to m0") == 1
    })
    .await;
    for len in log_lens(dir.path()) {
        assert!(len < 2048, "a file of the log grew to {len} bytes");
    }
    assert_echoes_kept(&store, &msg_ids).await;
    write_entry_log(&store).await;
    assert_eq!(copies_stored(dir.path(), "response to m44"), 1);
    assert_eq!(log_lens(dir.path()), [0, 0], "emptied");
}

/// While the writer thread waits to write a full file of the log into the database (here for
/// another connection's lock; in a gateway, for the length of that write), echoes go on into
/// the other file, and wait only once that one is full too.
#[tokio::test]
async fn echoes_go_on_into_the_other_file_while_a_full_one_waits_for_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(with_a_small_log(dir.path()));
    let other = rusqlite::Connection::open(store.path()).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let echoes = echo_counted(&store, 0..45, &answered);
    until("echoes in the second file", || log_lens(dir.path())[1] > 0).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !echoes.is_finished(),
        "echoes went on past both files of the log full"
    );
    let [first, second] = log_lens(dir.path());
    assert!(
        first >= 1024 && second >= 1024,
        "{first} and {second} bytes"
    );
    assert_eq!(
        copies_stored(dir.path(), "response to m0"),
        0,
        "not written"
    );
    other.execute_batch("COMMIT").unwrap();
    echoes.await.unwrap();
    let msg_ids: Vec<String> = (0..45).map(|n| format!("m{n}")).collect();
    assert_echoes_kept(&store, &msg_ids).await;
}

/// A process killed with both files of the log holding entries (one full, its write into the
/// database not committed, the other taking echoes) loses none of them: they are read back
/// oldest first, whichever file holds the older ones, and each is written once.
#[tokio::test]
async fn echoes_in_both_files_of_the_entry_log_survive_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(with_a_small_log(dir.path()));
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Until the second file takes echoes and the first is emptied, its entries written: the
    // older entries will be in the second file.
    let mut next = 0;
    while log_lens(dir.path())[1] == 0 {
        assert!(next < 1_000, "the second file took no echo");
        echo_counted(&store, next..next + 1, &answered)
            .await
            .unwrap();
        next += 1;
    }
    until("the first file emptied", || log_lens(dir.path())[0] == 0).await;
    let other = rusqlite::Connection::open(store.path()).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let echoes = echo_counted(&store, next..next + 45, &answered);
    until("echoes in the first file again", || {
        log_lens(dir.path())[0] > 0
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!echoes.is_finished(), "both files are full");
    let killed = tempfile::tempdir().unwrap();
    as_if_killed(dir.path(), killed.path());
    let survived = answered.load(std::sync::atomic::Ordering::SeqCst);
    other.execute_batch("COMMIT").unwrap();
    echoes.await.unwrap();
    drop(store);

    let store = open(killed.path());
    let msg_ids: Vec<String> = (0..survived).map(|n| format!("m{n}")).collect();
    assert_echoes_kept(&store, &msg_ids).await;
    assert_eq!(
        store
            .record(echoed(&format!("m{survived}"), NOW), NOW)
            .await
            .unwrap(),
        Claim::New,
        "not answered before the kill"
    );
    write_entry_log(&store).await;
    for msg_id in &msg_ids {
        assert_eq!(
            copies_stored(killed.path(), &format!("response to {msg_id}")),
            1
        );
    }
}

#[tokio::test]
async fn a_failed_transaction_after_echoes_in_the_entry_log_keeps_them() {
    let (dir, store) = fresh();
    let msg_ids = echo_all(&store, 3).await;
    // A transaction whose job fails is rolled back: the echoes before it were answered, and
    // stay.
    let unknown = store
        .put_agent(
            "no-such-app",
            AgentRecord {
                id: "a".into(),
                kind: "echo".into(),
                config: "{}".into(),
            },
        )
        .await;
    assert!(
        matches!(unknown, Err(StoreError::UnknownApp(_))),
        "{unknown:?}"
    );
    assert_echoes_kept(&store, &msg_ids).await;
    drop(store);
    let store = open(dir.path());
    assert_echoes_kept(&store, &msg_ids).await;
}

#[tokio::test]
async fn a_write_over_the_capacity_waits_for_a_place_and_leaves_nothing_if_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        queue_capacity: 1,
        ..Options::default()
    };
    let store = Arc::new(SqliteStore::open(dir.path(), options).unwrap());
    // The only place, held while the write waits for the lock.
    let (other, first) = write_under_another_lock(&store).await;
    let mut second = store.record(echoed("m2", NOW), NOW);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(second.as_mut().poll(&mut cx).is_pending(), "no place yet");
    drop(second);
    other.execute_batch("COMMIT").unwrap();
    assert_eq!(first.await.unwrap().unwrap(), Claim::New);
    write_entry_log(&store).await;
    assert_eq!(
        copies_stored(dir.path(), "response to m2"),
        0,
        "given up before it had a place"
    );
}

#[tokio::test]
async fn a_record_outliving_its_history_entry_keeps_its_response() {
    let (dir, store) = fresh();
    store.record(echoed("old", NOW - 100), NOW).await.unwrap();
    store.record(echoed("new", NOW), NOW).await.unwrap();
    let history_only = |history| PurgeBefore {
        dedup: 0,
        history,
        outbox: 0,
        files: 0,
    };
    let purged = store.purge(history_only(NOW - 50)).await.unwrap();
    assert_eq!((purged.history, purged.dedup), (1, 0));
    assert_eq!(
        store.history("shop", "c", 10).await.unwrap(),
        ["message new", "response to new"]
    );
    // Both resends still get their response, and it is still stored once.
    for msg_id in ["old", "new"] {
        assert_eq!(
            store
                .claim("shop", msg_id, "again".into(), NOW)
                .await
                .unwrap(),
            Claim::Answered(format!("response to {msg_id}"))
        );
        assert_eq!(
            copies_stored(dir.path(), &format!("response to {msg_id}")),
            1
        );
    }
    assert!(store.unanswered().await.unwrap().is_empty());
    // Past the dedup window, both records go: the row the first became, and the entry.
    let purged = store
        .purge(PurgeBefore {
            dedup: NOW + 1,
            ..history_only(0)
        })
        .await
        .unwrap();
    assert_eq!(purged.dedup, 2);
    assert_eq!(
        store
            .claim("shop", "new", "again".into(), NOW)
            .await
            .unwrap(),
        Claim::New
    );
}

/// A message as the gateway writes it, and the echo's reply to it.
fn gateway_exchange(msg_id: &str) -> (String, String) {
    let message = format!(
        r#"{{"chat_type":1,"msg_id":"{msg_id}","timestamp":1796233539832,"sender_type":1,"sender_id":"u182","resp_code":0,"content_type":1,"content":"say \"{msg_id}\", {{ok}}"}}"#
    );
    let reply = format!(
        r#"{{"chat_type":1,"msg_id":"g-{msg_id}","ref_msg_id":"{msg_id}","timestamp":1796233539840,"sender_type":2,"sender_id":"echo","receiver_id":"u182","resp_code":0,"content_type":1,"content":"say \"{msg_id}\", {{ok}}"}}"#
    );
    (message, reply)
}

/// The two exchanges the packing tests record in conversation `c`, read back whole from its
/// history; returned for the tests to go on with.
async fn assert_both_exchanges_read_back(
    store: &SqliteStore,
) -> ((String, String), (String, String)) {
    let (first, second) = (
        gateway_exchange("b18ed80e-6-1"),
        gateway_exchange("b18ed80e-6-2"),
    );
    assert_eq!(
        store.history("shop", "c", 10).await.unwrap(),
        [&*first.0, &first.1, &second.0, &second.1]
    );
    (first, second)
}

/// A third exchange, claimed with its message given by `given` and completed with its
/// response given the same way: the unanswered message and the stored response read back as
/// their texts.
async fn assert_claimed_then_completed_read_back(
    store: &SqliteStore,
    given: impl Fn(&str) -> MessageText,
) {
    let (inbound, response) = gateway_exchange("b18ed80e-6-3");
    let claim = store.claim("shop", "b18ed80e-6-3", given(&inbound), NOW);
    assert_eq!(claim.await.unwrap(), Claim::New);
    let unanswered = store.unanswered().await.unwrap();
    assert_eq!(unanswered.len(), 1);
    assert_eq!(unanswered[0].inbound, inbound);
    let done = Completion::new("shop", "b18ed80e-6-3", given(&response), vec![]);
    store.complete(done).await.unwrap();
    assert_eq!(
        store
            .claim("shop", "b18ed80e-6-3", "again".into(), NOW)
            .await
            .unwrap(),
        Claim::Answered(response)
    );
}

#[tokio::test]
async fn message_texts_are_stored_packed_and_read_back_as_they_were() {
    let (dir, store) = fresh();
    let mut texts = 0;
    for (msg_id, at_ms) in [("b18ed80e-6-1", NOW - 100), ("b18ed80e-6-2", NOW)] {
        let (message, reply) = gateway_exchange(msg_id);
        texts += message.len() + reply.len();
        let echo = Completion::replied("shop", msg_id, history("c", at_ms, &message), reply);
        assert_eq!(store.record(echo, NOW).await.unwrap(), Claim::New);
    }
    write_entry_log(&store).await;
    let entries = SqliteStore::stored_entries(&dir.path().join("iagent.sqlite3")).unwrap();
    assert_eq!(entries.len(), 2);
    assert!(entries.iter().all(|entry| entry.packed), "{entries:?}");
    let stored: usize = entries.iter().map(|entry| entry.stored_bytes).sum();
    assert!(
        stored * 2 < texts,
        "{stored} bytes stored for {texts} of text"
    );

    let (first, second) = assert_both_exchanges_read_back(&store).await;
    // The first entry's record outlives it, in a dedup row of its own: still read back whole.
    let purged = store
        .purge(PurgeBefore {
            dedup: 0,
            history: NOW - 50,
            outbox: 0,
            files: 0,
        })
        .await
        .unwrap();
    assert_eq!(purged.history, 1);
    for (msg_id, reply) in [("b18ed80e-6-1", &first.1), ("b18ed80e-6-2", &second.1)] {
        assert_eq!(
            store
                .claim("shop", msg_id, "again".into(), NOW)
                .await
                .unwrap(),
            Claim::Answered(reply.clone())
        );
    }

    // A claimed message's inbound text, and its response once completed.
    assert_claimed_then_completed_read_back(&store, |text| text.into()).await;
}

/// The gateway hands the store the messages it processes, not their texts: each is stored in
/// the bytes its text would take, and reads back as that text, in the history, in a dedup row
/// and as an unanswered message.
#[tokio::test]
async fn messages_handed_over_as_messages_are_stored_as_their_texts() {
    let message = |text: &str| -> MessageText {
        Arc::new(serde_json::from_str::<Message>(text).expect("a message")).into()
    };
    let (dir, store) = fresh();
    for (msg_id, as_messages) in [("b18ed80e-6-1", false), ("b18ed80e-6-2", true)] {
        let (inbound, reply) = gateway_exchange(msg_id);
        let echo = if as_messages {
            let entry = HistoryEntry {
                message: message(&inbound),
                ..history("c", NOW, "")
            };
            Completion::replied("shop", msg_id, entry, message(&reply))
        } else {
            Completion::replied("shop", msg_id, history("c", NOW, &inbound), reply)
        };
        assert_eq!(store.record(echo, NOW).await.unwrap(), Claim::New);
    }
    write_entry_log(&store).await;
    let entries = SqliteStore::stored_entries(&dir.path().join("iagent.sqlite3")).unwrap();
    assert!(entries.iter().all(|entry| entry.packed), "{entries:?}");
    // The two exchanges differ in one digit of their `msg_id`, which the record's code stands
    // for: the same bytes each.
    assert_eq!(entries[0].stored_bytes, entries[1].stored_bytes);
    assert_both_exchanges_read_back(&store).await;

    assert_claimed_then_completed_read_back(&store, message).await;
}

#[tokio::test]
async fn record_writes_once_and_then_reports_what_is_stored() {
    let (_dir, store) = fresh();
    let said = |text: &str| vec![history("p:5:alice:echo", NOW, text)];
    assert_eq!(
        store
            .record(completion("shop", "m1", "first", said("hi")), NOW)
            .await
            .unwrap(),
        Claim::New
    );
    // A second record of the same msg_id writes nothing: neither response nor history.
    assert_eq!(
        store
            .record(completion("shop", "m1", "second", said("hi again")), NOW)
            .await
            .unwrap(),
        Claim::Answered("first".into())
    );
    assert_eq!(
        store.claim("shop", "m1", "in".into(), NOW).await.unwrap(),
        Claim::Answered("first".into())
    );
    assert_eq!(
        store.history("shop", "p:5:alice:echo", 10).await.unwrap(),
        vec!["hi".to_owned()]
    );
    // A recorded message is answered, so recovery has nothing to do for it.
    assert!(store.unanswered().await.unwrap().is_empty());

    // A message claimed (its agent still working) is reported pending, and stays unanswered.
    assert_eq!(
        store
            .claim("shop", "m2", "in-m2".into(), NOW)
            .await
            .unwrap(),
        Claim::New
    );
    assert_eq!(
        store
            .record(completion("shop", "m2", "late", vec![]), NOW)
            .await
            .unwrap(),
        Claim::Pending
    );
    assert_eq!(store.unanswered().await.unwrap().len(), 1);
}

#[tokio::test]
async fn the_same_msg_id_in_another_app_is_independent() {
    let (_dir, store) = fresh();
    assert_eq!(
        store.claim("shop", "m1", "a".into(), NOW).await.unwrap(),
        Claim::New
    );
    assert_eq!(
        store.claim("blog", "m1", "b".into(), NOW).await.unwrap(),
        Claim::New
    );
    store
        .complete(completion("shop", "m1", "shop-answer", vec![]))
        .await
        .unwrap();
    assert_eq!(
        store.claim("shop", "m1", "a".into(), NOW).await.unwrap(),
        Claim::Answered("shop-answer".into())
    );
    // Completing shop's m1 did not answer blog's.
    assert_eq!(
        store.claim("blog", "m1", "b".into(), NOW).await.unwrap(),
        Claim::Pending
    );
    assert_eq!(
        store.unanswered().await.unwrap(),
        vec![Unanswered {
            app: "blog".into(),
            inbound: "b".into(),
        }]
    );
}

#[tokio::test]
async fn unanswered_lists_exactly_the_claimed_and_uncompleted() {
    let (_dir, store) = fresh();
    assert!(store.unanswered().await.unwrap().is_empty());
    for (app, msg_id, at) in [
        ("shop", "m1", NOW),
        ("shop", "m2", NOW + 1),
        ("blog", "m1", NOW + 2),
        ("shop", "m3", NOW + 3),
    ] {
        let inbound = format!(r#"{{"app":"{app}","msg_id":"{msg_id}"}}"#);
        assert_eq!(
            store.claim(app, msg_id, inbound.into(), at).await.unwrap(),
            Claim::New
        );
    }
    // A duplicate claim does not replace the stored inbound text nor add an entry.
    assert_eq!(
        store
            .claim("shop", "m2", "replacement".into(), NOW + 9)
            .await
            .unwrap(),
        Claim::Pending
    );
    store
        .complete(completion("shop", "m2", "done", vec![]))
        .await
        .unwrap();

    let unanswered = store.unanswered().await.unwrap();
    let listed: Vec<(String, String)> = unanswered
        .into_iter()
        .map(|entry| (entry.app, entry.inbound))
        .collect();
    assert_eq!(
        sorted(listed),
        sorted(vec![
            ("shop".into(), r#"{"app":"shop","msg_id":"m1"}"#.into()),
            ("blog".into(), r#"{"app":"blog","msg_id":"m1"}"#.into()),
            ("shop".into(), r#"{"app":"shop","msg_id":"m3"}"#.into()),
        ])
    );
}

// ---------------------------------------------------------------------------------------------
// Outbox
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn outbox_push_returns_increasing_ids_and_peek_reads_oldest_first() {
    let (_dir, store) = fresh();
    let mut shop_ids = Vec::new();
    let mut blog_ids = Vec::new();
    for i in 0..6 {
        shop_ids.push(
            store
                .outbox_push("shop", format!("shop-{i}"), NOW, NOW + 1000)
                .await
                .unwrap(),
        );
        blog_ids.push(
            store
                .outbox_push("blog", format!("blog-{i}"), NOW, NOW + 1000)
                .await
                .unwrap(),
        );
    }
    let mut all: Vec<i64> = shop_ids.iter().chain(&blog_ids).copied().collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 12, "ids are unique across apps");
    assert!(shop_ids.windows(2).all(|pair| pair[0] < pair[1]));
    assert!(blog_ids.windows(2).all(|pair| pair[0] < pair[1]));
    assert!(shop_ids[0] < blog_ids[0] && blog_ids[0] < shop_ids[1]);

    // Everything of the app, oldest first, nothing of another app.
    let peeked = store.outbox_peek("shop", 0, 100).await.unwrap();
    let ids: Vec<i64> = peeked.iter().map(|entry| entry.id).collect();
    let messages: Vec<&str> = peeked.iter().map(|entry| entry.message.as_str()).collect();
    assert_eq!(ids, shop_ids);
    assert_eq!(
        messages,
        ["shop-0", "shop-1", "shop-2", "shop-3", "shop-4", "shop-5"]
    );

    // `limit` caps the count, `after` skips ids up to and including it.
    let first_two = store.outbox_peek("shop", 0, 2).await.unwrap();
    assert_eq!(
        first_two.iter().map(|entry| entry.id).collect::<Vec<_>>(),
        shop_ids[..2]
    );
    let next_two = store.outbox_peek("shop", shop_ids[1], 2).await.unwrap();
    assert_eq!(
        next_two.iter().map(|entry| entry.id).collect::<Vec<_>>(),
        shop_ids[2..4]
    );
    assert_eq!(next_two[0].message, "shop-2");
    // `after` between two ids of the app.
    let between = store.outbox_peek("shop", blog_ids[2], 100).await.unwrap();
    assert_eq!(
        between.iter().map(|entry| entry.id).collect::<Vec<_>>(),
        shop_ids[3..]
    );
    assert!(
        store
            .outbox_peek("shop", shop_ids[5], 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.outbox_peek("shop", 0, 0).await.unwrap().is_empty());
    assert!(store.outbox_peek("none", 0, 100).await.unwrap().is_empty());
}

#[tokio::test]
async fn outbox_remove_removes_only_the_named_ids_of_that_app() {
    let (_dir, store) = fresh();
    let a1 = store
        .outbox_push("shop", "a1".into(), NOW, NOW)
        .await
        .unwrap();
    let a2 = store
        .outbox_push("shop", "a2".into(), NOW, NOW)
        .await
        .unwrap();
    let a3 = store
        .outbox_push("shop", "a3".into(), NOW, NOW)
        .await
        .unwrap();
    let b1 = store
        .outbox_push("blog", "b1".into(), NOW, NOW)
        .await
        .unwrap();
    let b2 = store
        .outbox_push("blog", "b2".into(), NOW, NOW)
        .await
        .unwrap();

    // Naming blog's id with shop removes nothing of blog; unknown ids are ignored.
    store
        .outbox_remove("shop", vec![a1, a3, b1, 999_999])
        .await
        .unwrap();
    let shop: Vec<i64> = store
        .outbox_peek("shop", 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|entry| entry.id)
        .collect();
    assert_eq!(shop, [a2]);
    let blog: Vec<i64> = store
        .outbox_peek("blog", 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|entry| entry.id)
        .collect();
    assert_eq!(blog, [b1, b2]);
    assert_eq!(
        sorted(store.outbox_depths().await.unwrap()),
        [("blog".to_owned(), 2), ("shop".to_owned(), 1)]
    );

    // Removing with the right app does remove it; an empty list is a no-op.
    store.outbox_remove("blog", vec![b1]).await.unwrap();
    store.outbox_remove("blog", vec![]).await.unwrap();
    let blog = store.outbox_peek("blog", 0, 100).await.unwrap();
    assert_eq!(blog.len(), 1);
    assert_eq!(blog[0].id, b2);
    assert_eq!(blog[0].message, "b2");
}

#[tokio::test]
async fn outbox_depths_counts_per_app() {
    let (_dir, store) = fresh();
    assert!(store.outbox_depths().await.unwrap().is_empty());
    for (app, count) in [("shop", 3), ("blog", 1), ("news", 5)] {
        for i in 0..count {
            store
                .outbox_push(app, format!("{app}-{i}"), NOW, NOW + 10)
                .await
                .unwrap();
        }
    }
    assert_eq!(
        sorted(store.outbox_depths().await.unwrap()),
        [
            ("blog".to_owned(), 1),
            ("news".to_owned(), 5),
            ("shop".to_owned(), 3)
        ]
    );
    let blog = store.outbox_peek("blog", 0, 10).await.unwrap();
    store
        .outbox_remove("blog", blog.iter().map(|entry| entry.id).collect())
        .await
        .unwrap();
    // An emptied outbox is no longer listed.
    assert_eq!(
        sorted(store.outbox_depths().await.unwrap()),
        [("news".to_owned(), 5), ("shop".to_owned(), 3)]
    );
}

// ---------------------------------------------------------------------------------------------
// Purge
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn purge_forgets_old_answered_messages_but_keeps_pending_ones() {
    let (_dir, store) = fresh();
    let cut = NOW;
    // Old and answered: forgotten. Old and pending: kept. Recent and answered: kept.
    store
        .claim("shop", "old-done", "i1".into(), cut - 10)
        .await
        .unwrap();
    store
        .claim("shop", "old-pending", "i2".into(), cut - 10)
        .await
        .unwrap();
    store
        .claim("shop", "new-done", "i3".into(), cut)
        .await
        .unwrap();
    store
        .complete(completion("shop", "old-done", "r1", vec![]))
        .await
        .unwrap();
    store
        .complete(completion("shop", "new-done", "r3", vec![]))
        .await
        .unwrap();

    let purged = store
        .purge(PurgeBefore {
            dedup: cut,
            history: 0,
            outbox: 0,
            files: 0,
        })
        .await
        .unwrap();
    assert_eq!(purged.dedup, 1);
    assert_eq!(purged.history, 0);
    assert!(purged.outbox_expired.is_empty());

    assert_eq!(
        store
            .claim("shop", "old-done", "again".into(), cut + 1)
            .await
            .unwrap(),
        Claim::New,
        "a forgotten msg_id is new again"
    );
    assert_eq!(
        store
            .claim("shop", "old-pending", "again".into(), cut + 1)
            .await
            .unwrap(),
        Claim::Pending,
        "a pending message is kept regardless of age"
    );
    assert_eq!(
        store
            .claim("shop", "new-done", "again".into(), cut + 1)
            .await
            .unwrap(),
        Claim::Answered("r3".into())
    );
    // The pending one still awaits recovery, with its original inbound text.
    let unanswered = store.unanswered().await.unwrap();
    assert!(unanswered.contains(&Unanswered {
        app: "shop".into(),
        inbound: "i2".into(),
    }));

    // A purge far in the future still keeps pending messages.
    let purged = store
        .purge(PurgeBefore {
            dedup: i64::MAX,
            history: 0,
            outbox: 0,
            files: 0,
        })
        .await
        .unwrap();
    assert_eq!(purged.dedup, 1, "only new-done was answered and left");
    assert_eq!(
        store
            .claim("shop", "old-pending", "x".into(), cut + 2)
            .await
            .unwrap(),
        Claim::Pending
    );
}

#[tokio::test]
async fn purge_forgets_dedup_rows_oldest_first_up_to_the_first_inside_the_window() {
    let (_dir, store) = fresh();
    let cut = NOW;
    // "late" was stored after "inside" with an earlier clock reading (a write that waited): it
    // goes with its neighbours, never before them.
    for (msg_id, received_ms) in [("old", cut - 10), ("inside", cut), ("late", cut - 10)] {
        store
            .claim("shop", msg_id, "i".into(), received_ms)
            .await
            .unwrap();
        store
            .complete(completion("shop", msg_id, &format!("r-{msg_id}"), vec![]))
            .await
            .unwrap();
    }
    let dedup_before = |dedup| PurgeBefore {
        dedup,
        history: 0,
        outbox: 0,
        files: 0,
    };
    assert_eq!(store.purge(dedup_before(cut)).await.unwrap().dedup, 1);
    let resend = |msg_id: &'static str| store.claim("shop", msg_id, "again".into(), cut + 1);
    assert_eq!(resend("old").await.unwrap(), Claim::New);
    assert_eq!(
        resend("late").await.unwrap(),
        Claim::Answered("r-late".into())
    );
    assert_eq!(store.purge(dedup_before(cut + 1)).await.unwrap().dedup, 2);
    assert_eq!(resend("inside").await.unwrap(), Claim::New);
}

#[tokio::test]
async fn purge_removes_expired_outbox_entries_and_reports_them_per_app() {
    let (_dir, store) = fresh();
    let cut = NOW;
    for (app, expires) in [
        ("shop", cut - 5),
        ("shop", cut - 1),
        ("shop", cut),
        ("blog", cut - 100),
        ("blog", cut + 100),
        ("news", cut + 1),
    ] {
        store
            .outbox_push(app, format!("{app}@{expires}"), cut - 1000, expires)
            .await
            .unwrap();
    }
    let purged = store
        .purge(PurgeBefore {
            dedup: 0,
            history: 0,
            outbox: cut,
            files: 0,
        })
        .await
        .unwrap();
    assert_eq!(
        purged.outbox_expired,
        [("blog".to_owned(), 1), ("shop".to_owned(), 2)]
    );
    assert_eq!(purged.dedup, 0);
    assert_eq!(purged.history, 0);

    let messages = |entries: Vec<iagent_store::OutboxEntry>| {
        entries
            .into_iter()
            .map(|entry| entry.message)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        messages(store.outbox_peek("shop", 0, 10).await.unwrap()),
        [format!("shop@{cut}")]
    );
    assert_eq!(
        messages(store.outbox_peek("blog", 0, 10).await.unwrap()),
        [format!("blog@{}", cut + 100)]
    );
    assert_eq!(
        sorted(store.outbox_depths().await.unwrap()),
        [
            ("blog".to_owned(), 1),
            ("news".to_owned(), 1),
            ("shop".to_owned(), 1)
        ]
    );

    // Nothing left to expire at the same cut-off.
    let again = store
        .purge(PurgeBefore {
            dedup: 0,
            history: 0,
            outbox: cut,
            files: 0,
        })
        .await
        .unwrap();
    assert!(again.outbox_expired.is_empty());
}

#[tokio::test]
async fn purge_counts_history_before_the_cut_off() {
    let (_dir, store) = fresh();
    let cut = NOW;
    store.claim("shop", "m1", "i".into(), cut).await.unwrap();
    store.claim("blog", "m1", "i".into(), cut).await.unwrap();
    store
        .complete(completion(
            "shop",
            "m1",
            "r",
            vec![history("c1", cut - 20, "q"), history("c1", cut - 10, "a")],
        ))
        .await
        .unwrap();
    // Entries are purged oldest first, up to the first one inside the window.
    store
        .complete(completion(
            "blog",
            "m1",
            "r",
            vec![
                history("c9", cut - 1, "q"),
                history("c9", cut + 5, "kept"),
                history("c8", cut, "kept"),
            ],
        ))
        .await
        .unwrap();

    let purged = store
        .purge(PurgeBefore {
            dedup: 0,
            history: cut,
            outbox: 0,
            files: 0,
        })
        .await
        .unwrap();
    assert_eq!(purged.history, 3);
    assert_eq!(purged.dedup, 0, "the dedup cut-off is independent");
    // The removed ones are gone: the same cut-off finds nothing more, a later one the rest.
    let again = store
        .purge(PurgeBefore {
            dedup: 0,
            history: cut,
            outbox: 0,
            files: 0,
        })
        .await
        .unwrap();
    assert_eq!(again.history, 0);
    let rest = store
        .purge(PurgeBefore {
            dedup: 0,
            history: i64::MAX,
            outbox: 0,
            files: 0,
        })
        .await
        .unwrap();
    assert_eq!(rest.history, 2);
    // Dedup records are untouched by history purges.
    assert_eq!(
        store.claim("shop", "m1", "i".into(), cut).await.unwrap(),
        Claim::Answered("r".into())
    );
}

// ---------------------------------------------------------------------------------------------
// Durability
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn everything_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("nested").join("data");
    let store = open(&data);
    let (app, token) = store.create_app("shop", NOW).await.unwrap();
    store.claim("shop", "m1", "in-1".into(), NOW).await.unwrap();
    store.claim("shop", "m2", "in-2".into(), NOW).await.unwrap();
    store
        .complete(completion(
            "shop",
            "m1",
            "out-1",
            vec![history("c", NOW - 1, "h")],
        ))
        .await
        .unwrap();
    let id = store
        .outbox_push("shop", "queued".into(), NOW, NOW + 1000)
        .await
        .unwrap();
    drop(store);

    let store = open(&data);
    assert_eq!(store.list_apps().await.unwrap(), vec![app.clone()]);
    assert_eq!(
        store.app_for_token(token.expose()).await.unwrap(),
        Some(app)
    );
    assert_eq!(store.agents("shop").await.unwrap().len(), 1);
    assert_eq!(
        store.claim("shop", "m1", "x".into(), NOW).await.unwrap(),
        Claim::Answered("out-1".into())
    );
    assert_eq!(
        store.claim("shop", "m2", "x".into(), NOW).await.unwrap(),
        Claim::Pending
    );
    assert_eq!(
        store.unanswered().await.unwrap(),
        vec![Unanswered {
            app: "shop".into(),
            inbound: "in-2".into(),
        }]
    );
    let outbox = store.outbox_peek("shop", 0, 10).await.unwrap();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].id, id);
    assert_eq!(outbox[0].message, "queued");
    // The history entry is there too: a purge past it removes exactly one.
    let purged = store
        .purge(PurgeBefore {
            dedup: 0,
            history: NOW,
            outbox: 0,
            files: 0,
        })
        .await
        .unwrap();
    assert_eq!(purged.history, 1);
    // A new id after the reopen is above the surviving one.
    let next = store
        .outbox_push("shop", "later".into(), NOW, NOW + 1000)
        .await
        .unwrap();
    assert!(next > id);
}

#[tokio::test]
async fn commits_reach_the_main_database_file_while_the_store_stays_open() {
    let (dir, store) = fresh();
    for n in 0..10 {
        let msg_id = format!("m{n}");
        let said = vec![history("c", NOW, "hi")];
        store
            .record(completion("shop", &msg_id, "ok", said), NOW)
            .await
            .unwrap();
    }
    // The main file alone, without its WAL, as a copy: what has been checkpointed into it.
    let copy = dir.path().join("main-file-only.sqlite3");
    let checkpointed = || {
        std::fs::copy(store.path(), &copy).unwrap();
        let conn = rusqlite::Connection::open(&copy).unwrap();
        conn.query_row("SELECT COUNT(*) FROM messages", [], |row| {
            row.get::<_, i64>(0)
        })
        .unwrap_or(0)
    };
    // Ten small commits are far below the writer's own checkpoint bound: only the
    // checkpointer's thread copies them, within a few of its intervals.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while checkpointed() < 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "the commits never reached the main file"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Batching under concurrency
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn more_writes_at_once_than_a_batch_holds_are_all_committed() {
    let (dir, store) = fresh();
    let store = Arc::new(store);
    let writes = 2 * iagent_store::sqlite::MAX_BATCH + 1;
    let mut tasks = JoinSet::new();
    for i in 0..writes {
        let store = store.clone();
        tasks.spawn(async move { store.record(echoed(&format!("m{i}"), NOW), NOW).await });
    }
    // One caller commits for all the others: the jobs it could not take into its first batch
    // must not be left waiting for a committer that never comes.
    let all = tokio::time::timeout(std::time::Duration::from_secs(30), tasks.join_all())
        .await
        .expect("every write answered");
    assert!(all.into_iter().all(|claim| claim.unwrap() == Claim::New));
    drop(store);
    let store = open(dir.path());
    for i in [0, writes / 2, writes - 1] {
        assert_echo_answered(&store, &format!("m{i}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_yield_exactly_one_new_per_msg_id() {
    const DISTINCT: usize = 500;
    const DUPLICATES: usize = 500;
    const SUBSET: usize = 50;

    let (_dir, store) = fresh();
    let store = Arc::new(store);
    let mut tasks = JoinSet::new();
    // Interleave originals and duplicates so that both race in the same batches.
    for i in 0..DISTINCT.max(DUPLICATES) {
        if i < DISTINCT {
            let store = store.clone();
            tasks.spawn(async move {
                let msg_id = format!("m{i}");
                let claim = store
                    .claim("shop", &msg_id, format!("in-{i}").into(), NOW)
                    .await;
                (msg_id, claim)
            });
        }
        if i < DUPLICATES {
            let store = store.clone();
            let j = i % SUBSET;
            tasks.spawn(async move {
                let msg_id = format!("m{j}");
                let claim = store
                    .claim("shop", &msg_id, format!("in-{j}").into(), NOW)
                    .await;
                (msg_id, claim)
            });
        }
    }

    let mut new: HashMap<String, usize> = HashMap::new();
    let mut pending = 0;
    while let Some(joined) = tasks.join_next().await {
        let (msg_id, claim) = joined.expect("task");
        match claim.expect("claim") {
            Claim::New => *new.entry(msg_id).or_default() += 1,
            Claim::Pending => pending += 1,
            other @ Claim::Answered(_) => panic!("{msg_id}: unexpected {other:?}"),
        }
    }
    assert_eq!(new.len(), DISTINCT, "every msg_id was claimed as new once");
    assert!(
        new.values().all(|&count| count == 1),
        "some msg_id was new more than once"
    );
    assert_eq!(pending, DUPLICATES);
    assert_eq!(store.unanswered().await.unwrap().len(), DISTINCT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_does_not_poison_its_batch() {
    let (_dir, store) = fresh();
    let store = Arc::new(store);
    store.create_app("taken", NOW).await.unwrap();

    enum Outcome {
        Created(String, iagent_store::Token),
        Failed(StoreError),
    }
    let mut tasks = JoinSet::new();
    for i in 0..40 {
        let creator = store.clone();
        tasks.spawn(async move {
            let name = format!("app-{i:02}");
            match creator.create_app(&name, NOW).await {
                Ok((app, token)) => {
                    assert_eq!(app.name, name);
                    Outcome::Created(name, token)
                }
                Err(err) => panic!("{name}: {err:?}"),
            }
        });
        // Between the valid jobs: ones that fail in different ways.
        let failer = store.clone();
        tasks.spawn(async move {
            let result = match i % 4 {
                0 => failer.rotate_token("ghost", NOW).await.map(|_| ()),
                1 => failer.revoke_tokens("ghost", NOW).await.map(|_| ()),
                2 => failer.create_app("taken", NOW).await.map(|_| ()),
                _ => failer.create_app("Not Valid", NOW).await.map(|_| ()),
            };
            Outcome::Failed(result.expect_err("this job must fail"))
        });
    }

    let mut created = Vec::new();
    let mut failed = 0;
    while let Some(joined) = tasks.join_next().await {
        match joined.expect("no job panicked") {
            Outcome::Created(name, token) => created.push((name, token)),
            Outcome::Failed(err) => {
                assert!(
                    matches!(
                        err,
                        StoreError::UnknownApp(_)
                            | StoreError::AppExists(_)
                            | StoreError::InvalidAppName(_)
                    ),
                    "a failing job failed for its own reason, not the batch's: {err:?}"
                );
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 40);
    assert_eq!(created.len(), 40);

    let names: Vec<String> = store
        .list_apps()
        .await
        .unwrap()
        .into_iter()
        .map(|app| app.name)
        .collect();
    let mut expected: Vec<String> = (0..40).map(|i| format!("app-{i:02}")).collect();
    expected.push("taken".into());
    assert_eq!(names, expected);
    // Each created app is whole: its agent and its token were committed with it.
    for (name, token) in created {
        let app = store.app_for_token(token.expose()).await.unwrap();
        assert_eq!(app.map(|app| app.name), Some(name.clone()));
        assert_eq!(store.agents(&name).await.unwrap().len(), 1);
    }
}

/// The server tracks outbox entries in transit by id; an id handed out again after the newest
/// entry was removed would make a new entry look like one already on its way.
#[tokio::test]
async fn outbox_ids_are_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), Options::default()).unwrap();
    let first = store.outbox_push("shop", "a".into(), 0, 10).await.unwrap();
    let second = store.outbox_push("shop", "b".into(), 0, 10).await.unwrap();
    store.outbox_remove("shop", vec![second]).await.unwrap();
    let third = store.outbox_push("blog", "c".into(), 0, 10).await.unwrap();
    assert!(first < second && second < third, "{first} {second} {third}");
}

#[tokio::test]
async fn agents_are_added_replaced_and_made_default() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), Options::default()).unwrap();
    store.create_app("shop", 0).await.unwrap();
    let helper = |config: &str| iagent_store::AgentRecord {
        id: "helper".into(),
        kind: "echo".into(),
        config: config.into(),
    };
    store.put_agent("shop", helper("{}")).await.unwrap();
    store
        .put_agent("shop", helper(r#"{"strategy":{}}"#))
        .await
        .unwrap();
    let agents = store.agents("shop").await.unwrap();
    assert_eq!(agents.len(), 2, "{agents:?}");
    assert!(
        agents.contains(&helper(r#"{"strategy":{}}"#)),
        "replaced, not duplicated"
    );

    store.set_default_agent("shop", "helper").await.unwrap();
    assert_eq!(store.list_apps().await.unwrap()[0].default_agent, "helper");
    assert!(matches!(
        store.set_default_agent("shop", "nobody").await,
        Err(iagent_store::StoreError::UnknownAgent { .. })
    ));
    assert!(matches!(
        store.put_agent("nope", helper("{}")).await,
        Err(iagent_store::StoreError::UnknownApp(_))
    ));
    assert_eq!(store.list_apps().await.unwrap()[0].default_agent, "helper");
}

#[tokio::test]
async fn files_are_stored_per_app_and_purged_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), Options::default()).unwrap();
    store.create_app("shop", 0).await.unwrap();
    store.create_app("blog", 0).await.unwrap();
    let meta = store
        .put_file("shop", "image/png", vec![1, 2, 3], 1_000)
        .await
        .unwrap();
    assert!(iagent_store::is_file_id(&meta.id), "{}", meta.id);
    assert_eq!((meta.size, meta.content_type.as_str()), (3, "image/png"));

    let (read, bytes) = store
        .get_file("shop", &meta.id)
        .await
        .unwrap()
        .expect("stored");
    assert_eq!((read, bytes), (meta.clone(), vec![1, 2, 3]));
    assert_eq!(
        store.get_file("blog", &meta.id).await.unwrap(),
        None,
        "another app's file"
    );
    assert_eq!(
        store.get_file("shop", "../iagent.sqlite3").await.unwrap(),
        None
    );

    let ids = vec![
        meta.id.clone(),
        "f00000000000000000000000000000000".into(),
        "../x".into(),
    ];
    assert_eq!(
        store
            .first_missing_file("shop", ids)
            .await
            .unwrap()
            .as_deref(),
        Some("f00000000000000000000000000000000")
    );
    assert_eq!(
        store
            .first_missing_file("shop", vec![meta.id.clone()])
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .first_missing_file("blog", vec![meta.id.clone()])
            .await
            .unwrap(),
        Some(meta.id.clone())
    );
    assert!(matches!(
        store.put_file("nope", "image/png", vec![1], 0).await,
        Err(iagent_store::StoreError::UnknownApp(_))
    ));

    let on_disk = dir
        .path()
        .join(iagent_store::sqlite::FILES_DIR)
        .join(&meta.id);
    assert!(on_disk.exists());
    let before = |files| PurgeBefore {
        dedup: 0,
        history: 0,
        outbox: 0,
        files,
    };
    assert_eq!(
        store.purge(before(1_000)).await.unwrap().files,
        0,
        "not yet expired"
    );
    assert_eq!(store.purge(before(1_001)).await.unwrap().files, 1);
    assert!(!on_disk.exists(), "the bytes are gone with the row");
    assert_eq!(store.get_file("shop", &meta.id).await.unwrap(), None);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join(iagent_store::sqlite::FILES_DIR))
        .unwrap()
        .collect();
    assert!(
        leftovers.is_empty(),
        "no partial or orphaned files: {leftovers:?}"
    );
}

#[tokio::test]
async fn agent_changes_bump_the_version_and_the_default_cannot_be_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), Options::default()).unwrap();
    store.create_app("shop", 0).await.unwrap();
    let version = |apps: Vec<iagent_store::App>| apps[0].agents_version;
    let v0 = version(store.list_apps().await.unwrap());
    let bot = iagent_store::AgentRecord {
        id: "bot".into(),
        kind: "echo".into(),
        config: "{}".into(),
    };
    store.put_agent("shop", bot).await.unwrap();
    let v1 = version(store.list_apps().await.unwrap());
    assert!(v1 > v0);
    store.set_default_agent("shop", "bot").await.unwrap();
    let v2 = version(store.list_apps().await.unwrap());
    assert!(v2 > v1);
    assert!(matches!(
        store.remove_agent("shop", "bot").await,
        Err(iagent_store::StoreError::DefaultAgent { .. })
    ));
    store.remove_agent("shop", "echo").await.unwrap();
    assert!(version(store.list_apps().await.unwrap()) > v2);
    assert!(matches!(
        store.remove_agent("shop", "echo").await,
        Err(iagent_store::StoreError::UnknownAgent { .. })
    ));
    let ids: Vec<String> = store
        .agents("shop")
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(ids, ["bot"]);
    for bad in ["", "a b", "@bot", &"x".repeat(129)] {
        let agent = iagent_store::AgentRecord {
            id: bad.into(),
            kind: "echo".into(),
            config: "{}".into(),
        };
        assert!(
            matches!(
                store.put_agent("shop", agent).await,
                Err(iagent_store::StoreError::InvalidAgentId(_))
            ),
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn a_database_from_before_responses_were_stored_once_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(dir.path().join("iagent.sqlite3")).unwrap();
        conn.execute_batch(
            "CREATE TABLE messages (
                id INTEGER PRIMARY KEY,
                app TEXT NOT NULL,
                msg_id TEXT NOT NULL,
                received_ms INTEGER NOT NULL,
                inbound TEXT,
                response TEXT,
                deferred_until INTEGER,
                deferred_agent TEXT,
                UNIQUE (app, msg_id)
            );
            CREATE TABLE history (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                app TEXT NOT NULL,
                conversation TEXT NOT NULL,
                at_ms INTEGER NOT NULL,
                message TEXT NOT NULL,
                reply TEXT
            );
            CREATE TABLE history_index (
                app TEXT NOT NULL,
                conversation TEXT NOT NULL,
                id INTEGER NOT NULL,
                PRIMARY KEY (app, conversation, id)
            ) WITHOUT ROWID;
            CREATE TABLE store_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
            INSERT INTO store_meta VALUES ('history_indexed_through', 0);
            INSERT INTO messages (app, msg_id, received_ms, response) VALUES
                ('shop', 'before', 1, 'the response');
            INSERT INTO history (app, conversation, at_ms, message, reply) VALUES
                ('shop', 'c', 1, 'message before', 'the response');",
        )
        .unwrap();
    }
    let store = open(dir.path());
    assert_eq!(
        store
            .claim("shop", "before", "again".into(), NOW)
            .await
            .unwrap(),
        Claim::Answered("the response".into())
    );
    assert_eq!(
        store.record(echoed("after", NOW), NOW).await.unwrap(),
        Claim::New
    );
    write_entry_log(&store).await;
    assert_eq!(copies_stored(dir.path(), "response to after"), 1);
    drop(store);
    let store = open(dir.path());
    assert_eq!(
        store
            .claim("shop", "after", "again".into(), NOW)
            .await
            .unwrap(),
        Claim::Answered("response to after".into())
    );
    assert_eq!(
        store.history("shop", "c", 10).await.unwrap(),
        [
            "message before",
            "the response",
            "message after",
            "response to after"
        ]
    );
}

#[tokio::test]
async fn a_database_with_the_earlier_dedup_table_is_moved_over() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(dir.path().join("iagent.sqlite3")).unwrap();
        conn.execute_batch(
            "CREATE TABLE messages (
                app TEXT NOT NULL,
                msg_id TEXT NOT NULL,
                received_ms INTEGER NOT NULL,
                inbound TEXT,
                response TEXT,
                deferred_until INTEGER,
                deferred_agent TEXT,
                PRIMARY KEY (app, msg_id)
            ) WITHOUT ROWID;
            CREATE INDEX messages_received ON messages(received_ms);
            INSERT INTO messages VALUES
                ('shop', 'answered', 1, NULL, 'the response', NULL, NULL),
                ('shop', 'in-flight', 2, 'inbound-1', NULL, NULL, NULL),
                ('shop', 'waiting', 3, 'inbound-2', NULL, 99, 'hook');",
        )
        .unwrap();
    }
    let store = open(dir.path());
    assert_eq!(
        store
            .claim("shop", "answered", "again".into(), NOW)
            .await
            .unwrap(),
        Claim::Answered("the response".into())
    );
    assert_eq!(
        store
            .claim("shop", "in-flight", "again".into(), NOW)
            .await
            .unwrap(),
        Claim::Pending
    );
    assert_eq!(
        store.unanswered().await.unwrap(),
        vec![Unanswered {
            app: "shop".into(),
            inbound: "inbound-1".into(),
        }]
    );
    let deferred = store.deferred().await.unwrap();
    assert_eq!(deferred.len(), 1);
    assert_eq!(
        (deferred[0].agent.as_str(), deferred[0].until_ms),
        ("hook", 99)
    );
    assert_eq!(
        store
            .claim("shop", "new", "inbound-3".into(), NOW)
            .await
            .unwrap(),
        Claim::New
    );
    drop(store);
    // Moved once: a second open finds the new table and keeps it as it is.
    let store = open(dir.path());
    assert_eq!(
        store
            .claim("shop", "new", "again".into(), NOW)
            .await
            .unwrap(),
        Claim::Pending
    );
    assert_eq!(
        store
            .claim("shop", "answered", "again".into(), NOW)
            .await
            .unwrap(),
        Claim::Answered("the response".into())
    );
}
