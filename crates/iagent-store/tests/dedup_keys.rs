//! The dedup record's keys (see the store's `sqlite::dedup` module): kept in memory after a
//! watermark, then written into `message_keys` as a sorted run, a slice at a time. A `msg_id`
//! must be found wherever its key is (tail, run or table), across reopens, purges, rollbacks
//! and migrations, and a purged one must be new again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use iagent_store::{Claim, Completion, HistoryEntry, Options, PurgeBefore, SqliteStore, Store};

const NOW: i64 = 1_700_000_000_000;

fn open(dir: &Path, dedup_merge_rows: usize) -> SqliteStore {
    let options = Options {
        dedup_merge_rows,
        ..Options::default()
    };
    SqliteStore::open(dir, options).expect("open the store")
}

/// An echo's completion of `msg_id` in `app`.
fn echoed(app: &str, msg_id: &str) -> Completion {
    let response = format!("{app}: response to {msg_id}");
    Completion {
        app: app.into(),
        msg_id: msg_id.into(),
        response: response.clone(),
        history: vec![HistoryEntry {
            conversation: "c".into(),
            at_ms: NOW,
            message: format!("{app}: message {msg_id}"),
            reply: Some(response),
        }],
    }
}

/// Records `count` messages in each app, interleaved, one job each; returns their `msg_id`s.
async fn record(store: &SqliteStore, apps: &[&str], prefix: &str, count: usize) -> Vec<String> {
    let mut msg_ids = Vec::new();
    for n in 0..count {
        // Senders counting up in ranges of their own, as iagent-client's do.
        let msg_id = format!("{prefix}-{}-{n}", n % 7);
        for app in apps {
            let claim = store.record(echoed(app, &msg_id), NOW).await.unwrap();
            assert_eq!(claim, Claim::New, "{app}/{msg_id}");
        }
        msg_ids.push(msg_id);
    }
    msg_ids
}

/// Asserts that a resend of every one of `msg_ids` gets its stored response.
async fn assert_answered(store: &SqliteStore, apps: &[&str], msg_ids: &[String]) {
    for msg_id in msg_ids {
        for app in apps {
            let again = store.claim(app, msg_id, "again".into(), NOW).await.unwrap();
            let expected = Claim::Answered(format!("{app}: response to {msg_id}"));
            assert_eq!(again, expected, "{app}/{msg_id}");
        }
    }
}

/// The number of rows of `message_keys`, and the watermark.
fn keys_table(store: &SqliteStore) -> (i64, Option<i64>) {
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    let rows = conn
        .query_row("SELECT COUNT(*) FROM message_keys", [], |row| row.get(0))
        .unwrap();
    let through = conn
        .query_row(
            "SELECT value FROM store_meta WHERE key = 'message_keys_through'",
            [],
            |row| row.get(0),
        )
        .ok();
    (rows, through)
}

fn dedup_before(dedup: i64) -> PurgeBefore {
    PurgeBefore {
        dedup,
        history: 0,
        outbox: 0,
        files: 0,
    }
}

#[tokio::test]
async fn a_msg_id_is_found_in_the_tail_the_run_and_the_table_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let apps = ["shop", "bank"];
    // 2 600 rows per run: every run is written in three slices, one after each batch, so some
    // keys are in the table, some in the run, some in the tail when they are resent.
    let store = open(dir.path(), 2600);
    let first = record(&store, &apps, "a", 3000).await;
    let (written, through) = keys_table(&store);
    assert!(written > 0, "a run was written into the table");
    assert!(through.is_some());
    assert_answered(&store, &apps, &first).await;
    drop(store);

    // A reopen reads the tail back from the rows after the watermark.
    let store = open(dir.path(), 2600);
    assert_answered(&store, &apps, &first).await;
    let second = record(&store, &apps, "b", 500).await;
    assert_answered(&store, &apps, &second).await;
    drop(store);

    // Another merge size reads the same database just as well, and a merge of everything
    // leaves every key in the table.
    let store = open(dir.path(), 1);
    assert_answered(&store, &apps, &first).await;
    assert_answered(&store, &apps, &second).await;
    for round in 0..10 {
        record(&store, &apps, &format!("c{round}"), 1).await;
    }
    let (written, _) = keys_table(&store);
    assert!(written >= (2 * (3000 + 500)) as i64, "{written} keys");
}

#[tokio::test]
async fn a_purge_takes_the_keys_of_the_rows_it_removes_and_their_msg_ids_are_new_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 2);
    let old = record(&store, &["shop"], "old", 10).await;
    // Stored before the cut, claimed and never answered: kept, with its key.
    store
        .claim("shop", "pending", "inbound".into(), NOW - 10)
        .await
        .unwrap();
    let (keys_before, _) = keys_table(&store);
    assert!(keys_before >= 10, "{keys_before} keys merged");
    let purged = store.purge(dedup_before(NOW + 1)).await.unwrap().dedup;
    assert_eq!(purged, 10);
    let (keys_after, _) = keys_table(&store);
    assert!(
        keys_after <= 1,
        "only the pending message's key may stay: {keys_after}"
    );
    assert_eq!(
        store
            .claim("shop", "pending", "again".into(), NOW)
            .await
            .unwrap(),
        Claim::Pending
    );
    for msg_id in &old {
        let again = store.record(echoed("shop", msg_id), NOW).await.unwrap();
        assert_eq!(again, Claim::New, "{msg_id} was purged");
    }
    assert_answered(&store, &["shop"], &old).await;
}

#[tokio::test]
async fn a_purge_reaching_into_the_tail_forgets_its_keys_too() {
    let dir = tempfile::tempdir().unwrap();
    // Never merged: every key is in the tail.
    let store = open(dir.path(), 1_000_000);
    let old = record(&store, &["shop"], "old", 5).await;
    assert_eq!(store.purge(dedup_before(NOW + 1)).await.unwrap().dedup, 5);
    for msg_id in &old {
        let again = store
            .claim("shop", msg_id, "again".into(), NOW + 2)
            .await
            .unwrap();
        assert_eq!(again, Claim::New, "{msg_id} was purged");
    }
}

#[tokio::test]
async fn ids_of_purged_rows_are_never_handed_out_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1);
    record(&store, &["shop"], "old", 4).await;
    let max_id = |store: &SqliteStore| -> i64 {
        let conn = rusqlite::Connection::open(store.path()).unwrap();
        conn.query_row("SELECT COALESCE(MAX(id), 0) FROM messages", [], |row| {
            row.get(0)
        })
        .unwrap()
    };
    let last = max_id(&store);
    assert_eq!(store.purge(dedup_before(NOW + 1)).await.unwrap().dedup, 4);
    assert_eq!(max_id(&store), 0, "the table is empty");
    drop(store);
    // Not even after a reopen, when the table cannot tell: the watermark can.
    let store = open(dir.path(), 1);
    let again = record(&store, &["shop"], "new", 2).await;
    assert!(
        max_id(&store) > last,
        "new rows are numbered after the purged ones"
    );
    assert_answered(&store, &["shop"], &again).await;
}

#[tokio::test]
async fn a_batch_run_again_after_a_failing_job_leaves_no_key_of_its_first_run() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(open(dir.path(), 1_000_000));
    // Failing jobs queued between the records: batches that hold one are rolled back and run
    // again, and a key of the rolled-back run must not make its message look seen already.
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..300 {
        let recorder = store.clone();
        tasks.spawn(async move {
            let msg_id = format!("m{n}");
            let claim = recorder.record(echoed("shop", &msg_id), NOW).await;
            assert_eq!(claim.unwrap(), Claim::New, "{msg_id}");
        });
        let failer = store.clone();
        tasks.spawn(async move {
            assert!(failer.rotate_token("ghost", NOW).await.is_err());
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
    let msg_ids: Vec<String> = (0..300).map(|n| format!("m{n}")).collect();
    assert_answered(&store, &["shop"], &msg_ids).await;
}

/// Whether the database has an index on `messages`.
fn messages_indexes(store: &SqliteStore) -> Vec<String> {
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    conn.prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages'")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test]
async fn a_database_with_the_unique_msg_id_index_is_moved_over() {
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
            INSERT INTO messages (id, app, msg_id, received_ms, inbound, response) VALUES
                (7, 'shop', 'answered', 1, NULL, 'stored response'),
                (9, 'shop', 'open', 2, '{\"msg_id\":\"open\"}', NULL);",
        )
        .unwrap();
    }
    let store = open(dir.path(), 2);
    assert!(messages_indexes(&store).is_empty(), "no index on msg_id");
    assert_eq!(keys_table(&store), (2, Some(9)));
    assert_eq!(
        store
            .claim("shop", "answered", "again".into(), NOW)
            .await
            .unwrap(),
        Claim::Answered("stored response".into())
    );
    let unanswered = store.unanswered().await.unwrap();
    assert_eq!(unanswered.len(), 1);
    assert_eq!(unanswered[0].inbound, "{\"msg_id\":\"open\"}");
    // The rows kept their ids, and new ones come after them.
    let fresh = record(&store, &["shop"], "new", 1).await;
    drop(store);
    let store = open(dir.path(), 2);
    assert_answered(&store, &["shop"], &fresh).await;
    assert_eq!(
        store
            .claim("shop", "open", "again".into(), NOW)
            .await
            .unwrap(),
        Claim::Pending
    );
}
