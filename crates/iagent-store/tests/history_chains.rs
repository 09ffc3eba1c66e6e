//! History kept as chains (see the store's `sqlite::history` module): each entry names the one
//! before it in its conversation, and only the conversations' heads are indexed, in memory
//! after a watermark and merged every few rows. Reads must follow the chains across merges,
//! reopens, purges and migrations exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use iagent_store::{HistoryEntry, Options, PurgeBefore, SqliteStore, Store};

const NOW: i64 = 1_700_000_000_000;

/// A store whose purges go a chunk of entries and a conversation's head at a time, so that
/// every purge here is cut into slices.
fn open(dir: &Path, history_merge_rows: usize) -> SqliteStore {
    let options = Options {
        history_merge_rows,
        purge_slice_rows: 1,
        ..Options::default()
    };
    SqliteStore::open(dir, options).expect("open the store")
}

fn entry(conversation: &str, at_ms: i64, message: String) -> HistoryEntry {
    HistoryEntry {
        conversation: conversation.into(),
        at_ms,
        message: message.into(),
        reply: None,
    }
}

/// Appends `count` messages named `{app}/{conversation}/{n}` to each of `conversations`,
/// interleaved, one store job per message; returns what each conversation then holds.
async fn fill(
    store: &SqliteStore,
    app: &str,
    conversations: &[&str],
    count: usize,
) -> Vec<Vec<String>> {
    let mut expected = vec![Vec::new(); conversations.len()];
    for n in 0..count {
        for (held, conversation) in expected.iter_mut().zip(conversations) {
            let message = format!("{app}/{conversation}/{n}");
            store
                .append_history(app, vec![entry(conversation, NOW, message.clone())])
                .await
                .unwrap();
            held.push(message);
        }
    }
    expected
}

/// Purges history from before `cut` (nothing else); returns how many entries went.
async fn purge_history_before(store: &SqliteStore, cut: i64) -> u64 {
    let before = PurgeBefore {
        dedup: 0,
        history: cut,
        outbox: 0,
        files: 0,
    };
    store.purge(before).await.unwrap().history
}

/// Appends one message to a conversation of the app "shop".
async fn append(store: &SqliteStore, conversation: &str, at_ms: i64, message: String) {
    store
        .append_history("shop", vec![entry(conversation, at_ms, message)])
        .await
        .unwrap();
}

fn last(messages: &[String], limit: usize) -> Vec<String> {
    messages[messages.len().saturating_sub(limit)..].to_vec()
}

#[tokio::test]
async fn reads_join_merged_and_unmerged_entries_oldest_first_per_conversation() {
    let dir = tempfile::tempdir().unwrap();
    // Merged every 3 rows, so reads cross the merged part and the tail at every length.
    let store = open(dir.path(), 3);
    let shop = fill(&store, "shop", &["a", "b"], 10).await;
    // The same conversation key in another app is another conversation.
    let blog = fill(&store, "blog", &["a"], 4).await;
    for limit in [0, 1, 2, 3, 4, 7, 10, 50] {
        let a = store.history("shop", "a", limit).await.unwrap();
        assert_eq!(a, last(&shop[0], limit as usize), "shop/a, limit {limit}");
        let b = store.history("shop", "b", limit).await.unwrap();
        assert_eq!(b, last(&shop[1], limit as usize), "shop/b, limit {limit}");
        let other = store.history("blog", "a", limit).await.unwrap();
        assert_eq!(
            other,
            last(&blog[0], limit as usize),
            "blog/a, limit {limit}"
        );
    }
    assert!(store.history("shop", "c", 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn the_unmerged_tail_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 4);
    // 6 rows: one merge of 4, and 2 in the tail when the process goes.
    let mut expected = fill(&store, "shop", &["a", "b"], 3).await;
    drop(store);

    let store = open(dir.path(), 4);
    assert_eq!(store.history("shop", "a", 10).await.unwrap(), expected[0]);
    assert_eq!(store.history("shop", "b", 10).await.unwrap(), expected[1]);
    let more = fill(&store, "shop", &["a"], 5).await;
    expected[0].extend(more.into_iter().flatten());
    assert_eq!(store.history("shop", "a", 100).await.unwrap(), expected[0]);
    drop(store);

    // A larger merge size reads the same database just as well.
    let store = open(dir.path(), 1000);
    assert_eq!(store.history("shop", "a", 100).await.unwrap(), expected[0]);
}

/// The `history_heads` rows, as (conversation, head id).
fn heads(store: &SqliteStore) -> Vec<(String, i64)> {
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    conn.prepare("SELECT conversation, head FROM history_heads ORDER BY conversation")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test]
async fn a_purge_removes_the_oldest_entries_and_the_heads_of_conversations_it_empties() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 3);
    // Conversation "gone" has only old entries; "a" has old ones, then new ones.
    for (conversation, at_ms, message) in [
        ("a", NOW - 10_000, "a-old-1"),
        ("gone", NOW - 10_000, "gone-1"),
        ("a", NOW - 10_000, "a-old-2"),
        ("gone", NOW - 10_000, "gone-2"),
        ("a", NOW, "a-new-1"),
        ("b", NOW, "b-new"),
        ("a", NOW, "a-new-2"),
    ] {
        append(&store, conversation, at_ms, message.into()).await;
    }
    assert_eq!(purge_history_before(&store, NOW - 1).await, 4);
    let kept = ["a-new-1", "a-new-2"];
    assert_eq!(store.history("shop", "a", 10).await.unwrap(), kept);
    assert!(store.history("shop", "gone", 10).await.unwrap().is_empty());
    // "gone" was merged (its head is row 4, at or below the watermark of 6): its head row went
    // with its entries, so the table keeps one row per conversation that still has history.
    assert!(
        heads(&store)
            .iter()
            .all(|(conversation, _)| conversation != "gone")
    );
    drop(store);
    let store = open(dir.path(), 3);
    assert_eq!(store.history("shop", "a", 10).await.unwrap(), kept);
    assert_eq!(store.history("shop", "b", 10).await.unwrap(), ["b-new"]);
    append(&store, "gone", NOW, "gone-again".into()).await;
    assert_eq!(
        store.history("shop", "gone", 10).await.unwrap(),
        ["gone-again"]
    );
}

/// A purge goes a slice at a time, oldest entries first, and other work is done between its
/// slices: a read finds the oldest conversation emptied while the newest expired one is
/// still there. Done in one transaction, the purge had held every job up until all were
/// gone. A purge stopped there (its future dropped, as when its task is aborted) leaves what
/// the next one completes, and that is what one purge would have left.
#[tokio::test]
async fn a_purge_in_slices_lets_reads_in_between_and_one_stopped_halfway_is_completed() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(open(dir.path(), 3));
    // One job, so that the entries fill chunks in order: "first" has the oldest chunk's,
    // "last" the newest expired chunk's, "middle" the 98 chunks between them, and "kept"
    // the entries inside the window.
    const CHUNK: usize = 32;
    let chunks = 100;
    let conversation = |n: usize| match n / CHUNK {
        0 => "first",
        c if c == chunks - 1 => "last",
        _ => "middle",
    };
    let old = (0..chunks * CHUNK)
        .map(|n| entry(conversation(n), NOW - 10_000, format!("old-{n}")))
        .collect();
    store.append_history("shop", old).await.unwrap();
    append(&store, "kept", NOW, "new-1".into()).await;
    append(&store, "middle", NOW, "middle-new".into()).await;

    let purge = tokio::spawn({
        let store = std::sync::Arc::clone(&store);
        async move { purge_history_before(&store, NOW - 1).await }
    });
    while !store.history("shop", "first", 1).await.unwrap().is_empty() {}
    assert_eq!(
        store.history("shop", "last", 1).await.unwrap(),
        [format!("old-{}", chunks * CHUNK - 1)],
        "the purge's later slices have not run yet"
    );
    purge.abort();
    assert!(purge.await.unwrap_err().is_cancelled());
    let rest = purge_history_before(&store, NOW - 1).await;
    assert!(
        rest > 0 && rest < (chunks * CHUNK) as u64,
        "the stopped purge removed some, the next one the {rest} left"
    );

    for gone in ["first", "last"] {
        assert!(store.history("shop", gone, 10).await.unwrap().is_empty());
    }
    assert_eq!(
        store.history("shop", "middle", 10).await.unwrap(),
        ["middle-new"]
    );
    assert_eq!(store.history("shop", "kept", 10).await.unwrap(), ["new-1"]);
    // The heads of the conversations emptied went too, those of the others stayed.
    let conversations = |heads: Vec<(String, i64)>| -> Vec<String> {
        heads
            .into_iter()
            .map(|(conversation, _)| conversation)
            .collect()
    };
    assert!(
        conversations(heads(&store))
            .iter()
            .all(|conversation| !["first", "last"].contains(&conversation.as_str()))
    );
    drop(store);
    let store = open(dir.path(), 3);
    assert_eq!(
        store.history("shop", "middle", 10).await.unwrap(),
        ["middle-new"]
    );
    assert!(store.history("shop", "first", 10).await.unwrap().is_empty());
    assert_eq!(purge_history_before(&store, NOW - 1).await, 0);
}

#[tokio::test]
async fn a_purge_stops_at_the_first_entry_inside_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 100);
    // An entry stored out of time order (older than the one before it) is purged with its
    // neighbours, never before them: the entries a conversation keeps are its newest.
    for (at_ms, message) in [
        (NOW - 10_000, "old"),
        (NOW, "new-1"),
        (NOW - 10_000, "late"),
        (NOW, "new-2"),
    ] {
        append(&store, "a", at_ms, message.into()).await;
    }
    assert_eq!(purge_history_before(&store, NOW - 1).await, 1);
    assert_eq!(
        store.history("shop", "a", 10).await.unwrap(),
        ["new-1", "late", "new-2"]
    );
    assert_eq!(purge_history_before(&store, NOW + 1).await, 3);
    assert!(store.history("shop", "a", 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn ids_of_purged_rows_are_never_handed_out_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 2);
    // Both rows merged (the watermark is at 2), then purged: a table that reused their ids
    // would give id 1 to the next row, below the watermark, where a restart never looks for
    // a head.
    append(&store, "a", NOW - 10_000, "purged-a".into()).await;
    append(&store, "b", NOW - 10_000, "purged-b".into()).await;
    assert_eq!(purge_history_before(&store, NOW - 1).await, 2);
    append(&store, "a", NOW, "after".into()).await;
    drop(store);
    let store = open(dir.path(), 2);
    assert_eq!(store.history("shop", "a", 10).await.unwrap(), ["after"]);
    assert!(store.history("shop", "b", 10).await.unwrap().is_empty());
}

/// Whether the database still has a table or an index of this name.
fn has(store: &SqliteStore, name: &str) -> bool {
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = ?1)",
        [name],
        |row| row.get(0),
    )
    .unwrap()
}

#[tokio::test]
async fn a_database_of_an_entry_per_row_is_moved_into_chunks_with_its_records() {
    let dir = tempfile::tempdir().unwrap();
    {
        // The layout before chunks: 300 entries of two conversations, chained, one of them
        // the record of `m2` with its message packed (`{"chat_type":1,"msg_id":"m2"}`: the
        // name codes 1 and 2, and 12 for the record's own id), merged up to entry 3.
        let conn = rusqlite::Connection::open(dir.path().join("iagent.sqlite3")).unwrap();
        conn.execute_batch(
            "CREATE TABLE history (
                id INTEGER PRIMARY KEY,
                app TEXT NOT NULL,
                conversation TEXT NOT NULL,
                at_ms INTEGER NOT NULL,
                message TEXT NOT NULL,
                reply TEXT,
                msg_id TEXT,
                prev INTEGER
            );
            CREATE TABLE history_heads (
                app TEXT NOT NULL,
                conversation TEXT NOT NULL,
                head INTEGER NOT NULL,
                PRIMARY KEY (app, conversation)
            ) WITHOUT ROWID;
            CREATE TABLE store_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
            INSERT INTO history VALUES
                (1, 'shop', 'a', 1, 'a-1', NULL, NULL, NULL),
                (2, 'shop', 'b', 2, X'0131020C7D', 'response to m2', 'm2', NULL),
                (3, 'shop', 'a', 3, 'a-3', NULL, NULL, 1);
            INSERT INTO history_heads VALUES ('shop', 'a', 3), ('shop', 'b', 2);
            INSERT INTO store_meta VALUES ('history_heads_through', 3),
                ('message_keys_entries_through', 0);
            WITH RECURSIVE n(id) AS (SELECT 4 UNION ALL SELECT id + 1 FROM n WHERE id < 300)
            INSERT INTO history SELECT id, 'shop', 'a', id, 'a-' || id, NULL, NULL,
                CASE id WHEN 4 THEN 3 ELSE id - 1 END FROM n;",
        )
        .unwrap();
    }
    let store = open(dir.path(), 1_000_000);
    assert!(!has(&store, "history"));
    let expected_a: Vec<String> = (1..=300)
        .filter(|&n| n != 2)
        .map(|n| format!("a-{n}"))
        .collect();
    assert_eq!(store.history("shop", "a", 1000).await.unwrap(), expected_a);
    assert_eq!(
        store.history("shop", "b", 10).await.unwrap(),
        [r#"{"chat_type":1,"msg_id":"m2"}"#, "response to m2"]
    );
    assert_eq!(
        store
            .claim("shop", "m2", "again".into(), NOW)
            .await
            .unwrap(),
        iagent_store::Claim::Answered("response to m2".into())
    );
    let stored = SqliteStore::stored_entries(store.path()).unwrap();
    assert_eq!(stored.len(), 300);
    assert_eq!(stored[1].msg_id.as_deref(), Some("m2"));
    // Ids go on after the moved entries, and the chains with them, across a reopen.
    append(&store, "b", NOW, "b-new".into()).await;
    drop(store);
    let store = open(dir.path(), 1_000_000);
    assert_eq!(
        store.history("shop", "b", 10).await.unwrap(),
        [
            r#"{"chat_type":1,"msg_id":"m2"}"#,
            "response to m2",
            "b-new"
        ]
    );
    assert_eq!(
        store.history("shop", "a", 2).await.unwrap(),
        ["a-299", "a-300"]
    );
}

#[tokio::test]
async fn a_database_with_the_earlier_conversation_index_is_moved_over() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(dir.path().join("iagent.sqlite3")).unwrap();
        conn.execute_batch(
            "CREATE TABLE history (
                id INTEGER PRIMARY KEY,
                app TEXT NOT NULL,
                conversation TEXT NOT NULL,
                at_ms INTEGER NOT NULL,
                message TEXT NOT NULL
            );
            CREATE INDEX history_conversation ON history(app, conversation, id);
            CREATE INDEX history_at ON history(at_ms);
            INSERT INTO history (app, conversation, at_ms, message) VALUES
                ('shop', 'a', 1, 'old-1'), ('shop', 'b', 2, 'other'), ('shop', 'a', 3, 'old-2');",
        )
        .unwrap();
    }
    let store = open(dir.path(), 2);
    assert_eq!(
        store.history("shop", "a", 10).await.unwrap(),
        ["old-1", "old-2"]
    );
    // The indexes on the conversation and on time, each a page written per message, are gone.
    assert!(!has(&store, "history_conversation"));
    assert!(!has(&store, "history_at"));
    assert_eq!(heads(&store), [("a".to_owned(), 3), ("b".to_owned(), 2)]);
    append(&store, "a", NOW, "new".into()).await;
    drop(store);
    let store = open(dir.path(), 2);
    assert_eq!(
        store.history("shop", "a", 10).await.unwrap(),
        ["old-1", "old-2", "new"]
    );
    assert_eq!(store.history("shop", "b", 10).await.unwrap(), ["other"]);
}

#[tokio::test]
async fn a_batch_run_again_after_a_failing_job_keeps_each_entry_once() {
    let dir = tempfile::tempdir().unwrap();
    // Never merged: a merge would fold duplicated entries into one and hide them.
    let store = std::sync::Arc::new(open(dir.path(), 1_000_000));
    store.create_app("shop", NOW).await.unwrap();
    // Appends to four conversations, with failing jobs queued between them: batches that hold
    // a failing job are rolled back and run again, and the entries of their first run must
    // leave no trace in the in-memory index.
    let mut tasks = tokio::task::JoinSet::new();
    // A long first job keeps the writer busy while the others queue up behind it, so that
    // they share batches.
    let bulk = store.clone();
    tasks.spawn(async move {
        let entries = (0..20_000)
            .map(|n| entry("bulk", NOW, format!("bulk/{n}")))
            .collect();
        bulk.append_history("shop", entries).await.map(|()| false)
    });
    for n in 0..200 {
        let appender = store.clone();
        tasks.spawn(async move {
            let conversation = format!("c{}", n % 4);
            let message = format!("{conversation}/{n}");
            appender
                .append_history("shop", vec![entry(&conversation, NOW, message)])
                .await
                .map(|()| true)
        });
        let failer = store.clone();
        tasks.spawn(async move {
            let failed = failer.rotate_token("ghost", NOW).await;
            assert!(failed.is_err(), "no app named ghost");
            Ok(false)
        });
    }
    let mut appended = 0;
    while let Some(joined) = tasks.join_next().await {
        appended += usize::from(joined.unwrap().unwrap());
    }
    assert_eq!(appended, 200);
    let check = |store: std::sync::Arc<SqliteStore>| async move {
        for c in 0..4 {
            let conversation = format!("c{c}");
            let held = store.history("shop", &conversation, 1000).await.unwrap();
            let mut distinct = held.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(held.len(), 50, "{conversation}: {held:?}");
            assert_eq!(
                distinct.len(),
                50,
                "{conversation}: each entry once: {held:?}"
            );
            assert!(
                held.iter()
                    .all(|m| m.starts_with(&format!("{conversation}/")))
            );
        }
    };
    check(store.clone()).await;
    // Stored once too, not only read once: no entry of a rolled-back run is left behind.
    let stored = SqliteStore::stored_entries(store.path()).unwrap();
    let mut messages: Vec<&str> = stored.iter().map(|entry| entry.message.as_str()).collect();
    messages.sort_unstable();
    messages.dedup();
    assert_eq!((stored.len(), messages.len()), (20_200, 20_200));
    drop(store);
    check(std::sync::Arc::new(open(dir.path(), 1_000_000))).await;
}

#[tokio::test]
async fn an_entry_reads_back_as_its_message_then_its_reply_and_limits_count_messages() {
    let dir = tempfile::tempdir().unwrap();
    // A merge every 2 rows: the first entries are read from the index, the last from the tail.
    let store = open(dir.path(), 2);
    let exchanges = [("q1", Some("a1")), ("q2", None), ("q3", Some("a3"))];
    for (message, reply) in exchanges {
        let entry = HistoryEntry {
            reply: reply.map(Into::into),
            ..entry("a", NOW, message.into())
        };
        store.append_history("shop", vec![entry]).await.unwrap();
    }
    let all = ["q1", "a1", "q2", "q3", "a3"].map(str::to_owned);
    for limit in 0..=all.len() + 1 {
        let read = store.history("shop", "a", limit as u32).await.unwrap();
        assert_eq!(read, last(&all, limit), "limit {limit}");
    }
}

#[tokio::test]
async fn a_database_with_the_lazy_conversation_index_keeps_its_messages() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(dir.path().join("iagent.sqlite3")).unwrap();
        conn.execute_batch(
            "CREATE TABLE store_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
            CREATE TABLE history (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                app TEXT NOT NULL,
                conversation TEXT NOT NULL,
                at_ms INTEGER NOT NULL,
                message TEXT NOT NULL
            );
            CREATE INDEX history_at ON history(at_ms);
            CREATE TABLE history_index (
                app TEXT NOT NULL,
                conversation TEXT NOT NULL,
                id INTEGER NOT NULL,
                PRIMARY KEY (app, conversation, id)
            ) WITHOUT ROWID;
            INSERT INTO history (app, conversation, at_ms, message) VALUES
                ('shop', 'a', 1, 'question'), ('shop', 'a', 2, 'its reply'), ('shop', 'a', 3, 'unmerged');
            INSERT INTO history_index (app, conversation, id) VALUES ('shop', 'a', 1), ('shop', 'a', 2);
            INSERT INTO store_meta (key, value) VALUES ('history_indexed_through', 2);",
        )
        .unwrap();
    }
    let store = open(dir.path(), 100);
    assert!(!has(&store, "history_index"));
    let entry = HistoryEntry {
        reply: Some("new reply".into()),
        ..entry("a", NOW, "new".into())
    };
    store.append_history("shop", vec![entry]).await.unwrap();
    drop(store);
    let store = open(dir.path(), 100);
    assert_eq!(
        store.history("shop", "a", 10).await.unwrap(),
        ["question", "its reply", "unmerged", "new", "new reply"]
    );
}

/// Reads every conversation of "shop" back and compares it with what was appended.
async fn assert_reads(store: &SqliteStore, conversations: &[String], expected: &[Vec<String>]) {
    for (conversation, held) in conversations.iter().zip(expected) {
        let read = store.history("shop", conversation, 100).await.unwrap();
        assert_eq!(&read, held, "conversation {conversation}");
    }
}

/// Appends one message to each conversation, in order, one store job each.
async fn one_round(
    store: &SqliteStore,
    conversations: &[String],
    expected: &mut [Vec<String>],
    round: usize,
) {
    for (conversation, held) in conversations.iter().zip(expected.iter_mut()) {
        let message = format!("{conversation}/{round}");
        append(store, conversation, NOW, message.clone()).await;
        held.push(message);
    }
}

#[tokio::test]
async fn a_merge_of_more_heads_than_a_slice_keeps_every_conversation_readable() {
    let dir = tempfile::tempdir().unwrap();
    // Each merge has more heads than one slice writes, so it spans several batches, and reads
    // come in while it is under way.
    let merge_rows = iagent_store::HISTORY_MERGE_SLICE_ROWS * 3 / 2;
    let store = open(dir.path(), merge_rows);
    let conversations: Vec<String> = (0..merge_rows * 2).map(|n| format!("c{n}")).collect();
    let mut expected = vec![Vec::new(); conversations.len()];
    for round in 0..2 {
        one_round(&store, &conversations, &mut expected, round).await;
        assert_reads(&store, &conversations, &expected).await;
    }

    // Enough rows elsewhere for two more merges: the heads of `conversations` leave memory,
    // and every read of them goes to the table the slices wrote.
    let others: Vec<String> = (0..merge_rows).map(|n| format!("other{n}")).collect();
    let mut others_expected = vec![Vec::new(); others.len()];
    for round in 0..3 {
        one_round(&store, &others, &mut others_expected, round).await;
    }
    assert_reads(&store, &conversations, &expected).await;
    let written = heads(&store);
    for conversation in &conversations {
        assert!(
            written.iter().any(|(head, _)| head == conversation),
            "no head of {conversation} in history_heads"
        );
    }

    // A merge begins with the last of these rows; the process goes before it can be written.
    one_round(&store, &conversations[..merge_rows], &mut expected, 2).await;
    drop(store);
    let store = open(dir.path(), merge_rows);
    assert_reads(&store, &conversations, &expected).await;
    assert_reads(&store, &others, &others_expected).await;
}
