//! The dedup record's keys (see the store's `sqlite::dedup` module): kept in memory after a
//! watermark, then merged into sorted blocks as a run, a slice at a time. A `msg_id` must be
//! found wherever its key is (tail, run or table), whichever kind of record it names
//! (a dedup row, or the history entry of an echo), across reopens, purges, rollbacks and
//! migrations, and a purged one must be new again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use iagent_store::{Claim, Completion, HistoryEntry, Options, PurgeBefore, SqliteStore, Store};

const NOW: i64 = 1_700_000_000_000;

/// A store whose purges go a row and a key at a time, so that every purge here is cut into
/// slices.
fn open(dir: &Path, dedup_merge_rows: usize) -> SqliteStore {
    let options = Options {
        dedup_merge_rows,
        purge_slice_rows: 1,
        ..Options::default()
    };
    SqliteStore::open(dir, options).expect("open the store")
}

/// An echo's completion of `msg_id` in `app`: its history entry is its record.
fn echoed(app: &str, msg_id: &str) -> Completion {
    completed(app, msg_id, NOW, true)
}

/// A completion of `msg_id` in `app` stored at `at_ms`; its record is its history entry when
/// the response is the entry's reply (`in_entry`), else a dedup row.
fn completed(app: &str, msg_id: &str, at_ms: i64, in_entry: bool) -> Completion {
    let response = format!("{app}: response to {msg_id}");
    let entry = HistoryEntry {
        conversation: "c".into(),
        at_ms,
        message: format!("{app}: message {msg_id}").into(),
        reply: None,
    };
    if in_entry {
        Completion::replied(app, msg_id, entry, response)
    } else {
        Completion::new(app, msg_id, response, vec![entry])
    }
}

/// Records `count` messages in each app, interleaved, one job each, every other one in its
/// history entry; returns their `msg_id`s.
async fn record(store: &SqliteStore, apps: &[&str], prefix: &str, count: usize) -> Vec<String> {
    let mut msg_ids = Vec::new();
    for n in 0..count {
        // Senders counting up in ranges of their own, as iagent-client's do.
        let msg_id = format!("{prefix}-{}-{n}", n % 7);
        for app in apps {
            let completion = completed(app, &msg_id, NOW, n % 2 == 0);
            let claim = store.record(completion, NOW).await.unwrap();
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

/// The number of merged keys, and the watermark.
fn keys_table(store: &SqliteStore) -> (i64, Option<i64>) {
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    let rows = conn
        .query_row(
            "SELECT COALESCE(SUM(keys), 0) FROM message_key_blocks",
            [],
            |row| row.get(0),
        )
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

/// Whether the purged rows' keys were merged (the watermark is past them) or were still in the
/// tail (nothing but the purge itself can tell where the ids had got to).
#[tokio::test]
async fn ids_of_purged_rows_are_never_handed_out_again() {
    for merge_rows in [1, 1_000_000] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), merge_rows);
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
        // Not even after a reopen, when the table cannot tell.
        let store = open(dir.path(), merge_rows);
        let again = record(&store, &["shop"], "new", 2).await;
        assert!(
            max_id(&store) > last,
            "new rows are numbered after the purged ones (merge_rows {merge_rows})"
        );
        assert_answered(&store, &["shop"], &again).await;
    }
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

/// Echoes recorded together, hundreds to a batch: each new one is recorded, a resend of one
/// whose key is merged gets its record, and a `msg_id` twice in one batch is recorded once.
#[tokio::test]
async fn echoes_recorded_together_each_get_their_own_claim() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(open(dir.path(), 1));
    let old: Vec<String> = (0..40).map(|n| format!("old-{n}")).collect();
    for msg_id in &old {
        let claim = store.record(echoed("shop", msg_id), NOW).await.unwrap();
        assert_eq!(claim, Claim::New);
    }
    // Merged after each batch, by the writer thread: a batch queues behind the slice owed
    // before it, so one more write finds every old key merged.
    let claim = store
        .record(echoed("shop", "after-old"), NOW)
        .await
        .unwrap();
    assert_eq!(claim, Claim::New);
    assert!(keys_table(&store).0 >= 40, "the old keys are merged");

    for with_resends in [false, true] {
        // The second time with resends of merged keys among the new ones.
        let mut tasks = tokio::task::JoinSet::new();
        let mut spawn = |msg_id: String| {
            let store = store.clone();
            tasks.spawn(async move {
                let claim = store.record(echoed("shop", &msg_id), NOW).await.unwrap();
                (msg_id, claim)
            });
        };
        for n in 0..300 {
            spawn(format!("new-{with_resends}-{n}"));
            if with_resends && n % 10 == 0 {
                spawn(old[n / 10].clone());
            }
        }
        let twice = format!("twice-{with_resends}");
        spawn(twice.clone());
        spawn(twice.clone());
        let mut claims = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            claims.push(joined.unwrap());
        }
        let mut twice_claims = Vec::new();
        for (msg_id, claim) in claims {
            if msg_id == twice {
                twice_claims.push(claim);
            } else if msg_id.starts_with("old-") {
                let expected = Claim::Answered(format!("shop: response to {msg_id}"));
                assert_eq!(claim, expected, "{msg_id}");
            } else {
                assert_eq!(claim, Claim::New, "{msg_id}");
            }
        }
        twice_claims.sort_by_key(|claim| claim != &Claim::New);
        assert_eq!(
            twice_claims,
            [
                Claim::New,
                Claim::Answered(format!("shop: response to {twice}"))
            ]
        );
        let new: Vec<String> = (0..300)
            .map(|n| format!("new-{with_resends}-{n}"))
            .collect();
        assert_answered(&store, &["shop"], &new).await;
    }
    assert_answered(&store, &["shop"], &old).await;
    // Every echo's entry once: 40 old and the one after them, 2 x 300 new, each `twice` once.
    let entries = SqliteStore::stored_entries(store.path()).unwrap();
    assert_eq!(entries.len(), 40 + 1 + 600 + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_merged_in_steps_between_concurrent_batches_are_all_found() {
    let dir = tempfile::tempdir().unwrap();
    // Runs of 600 keys, written a step of 128 at a time; 4 000 records from 200 callers keep
    // handing batches to the writer thread while it merges, so its slices end early and
    // commit with them.
    let store = std::sync::Arc::new(open(dir.path(), 600));
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..200 {
        let store = store.clone();
        tasks.spawn(async move {
            let mut msg_ids = Vec::new();
            for n in 0..20 {
                let msg_id = format!("s{caller}-{n}");
                let claim = store.record(echoed("shop", &msg_id), NOW).await.unwrap();
                assert_eq!(claim, Claim::New, "{msg_id}");
                msg_ids.push(msg_id);
            }
            msg_ids
        });
    }
    let mut msg_ids = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        msg_ids.extend(joined.unwrap());
    }
    // Runs were merged meanwhile; the last may still be in the tail, or under way.
    assert!(keys_table(&store).0 >= 1_200, "{:?}", keys_table(&store));
    assert_answered(&store, &["shop"], &msg_ids).await;
    drop(store);
    let store = open(dir.path(), 600);
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

/// A database whose merged keys are a row each in `message_keys`, as before the blocks, has
/// them moved into blocks at its first open: every key is found, the purge finds them, and
/// the table is gone.
#[tokio::test]
async fn a_database_with_a_row_per_merged_key_is_moved_into_blocks() {
    let dir = tempfile::tempdir().unwrap();
    // Made by this version, then given the table of keys as the last one had it: keyed by
    // `msg_id` first, every row's key merged.
    drop(open(dir.path(), 2));
    let msg_ids: Vec<String> = (0..3_000).map(|n| format!("old-{}-{n}", n % 5)).collect();
    {
        let conn = rusqlite::Connection::open(dir.path().join("iagent.sqlite3")).unwrap();
        conn.execute_batch(
            "CREATE TABLE message_keys (
                app TEXT NOT NULL,
                msg_id TEXT NOT NULL,
                id INTEGER NOT NULL,
                PRIMARY KEY (msg_id, app)
            ) WITHOUT ROWID;",
        )
        .unwrap();
        for (id, msg_id) in (1..).zip(&msg_ids) {
            conn.execute(
                "INSERT INTO messages (id, app, msg_id, received_ms, response)
                 VALUES (?1, 'shop', ?2, ?3, ?4)",
                rusqlite::params![id, msg_id, NOW - 10, format!("shop: response to {msg_id}")],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO message_keys (app, msg_id, id) VALUES ('shop', ?1, ?2)",
                rusqlite::params![msg_id, id],
            )
            .unwrap();
        }
        conn.execute(
            "INSERT OR REPLACE INTO store_meta (key, value) VALUES ('message_keys_through', ?1)",
            [msg_ids.len() as i64],
        )
        .unwrap();
    }
    for reopen in 0..2 {
        let store = open(dir.path(), 2);
        assert!(!has_table(&store, "message_keys"), "reopen {reopen}");
        assert_eq!(keys_table(&store), (3_000, Some(3_000)), "reopen {reopen}");
        assert_answered(&store, &["shop"], &msg_ids).await;
    }
    let store = open(dir.path(), 2);
    let purged = store.purge(dedup_before(NOW)).await.unwrap().dedup;
    assert_eq!(purged, 3_000);
    assert_eq!(keys_table(&store).0, 0, "the purge took the moved keys");
    // The first five `msg_id`s again, each recorded as new (`record` asserts it).
    record(&store, &["shop"], "old", 5).await;
}

/// How many records the store's database holds as dedup rows, and how many as history
/// entries. The newest entries of an open store may be in its entry log, not in the
/// database: written there by any transaction (a purge's), and when it closes.
fn records(store: &SqliteStore) -> (i64, i64) {
    records_at(store.path())
}

/// How many records the closed store's database at `path` holds, as [`records`] counts them.
fn records_at(path: &std::path::Path) -> (i64, i64) {
    let conn = rusqlite::Connection::open(path).unwrap();
    let rows = conn
        .query_row("SELECT COUNT(*) FROM messages", [], |row| row.get(0))
        .unwrap();
    let entries = SqliteStore::stored_entries(path).unwrap();
    let in_entries = entries
        .iter()
        .filter(|entry| entry.msg_id.is_some())
        .count();
    (rows, in_entries as i64)
}

#[tokio::test]
async fn an_echo_is_recorded_by_its_history_entry_alone() {
    for merge_rows in [1, 1_000_000] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), merge_rows);
        let msg_ids: Vec<String> = (0..6).map(|n| format!("m{n}")).collect();
        for msg_id in &msg_ids {
            let claim = store.record(echoed("shop", msg_id), NOW).await.unwrap();
            assert_eq!(claim, Claim::New);
        }
        assert_answered(&store, &["shop"], &msg_ids).await;
        let path = store.path().to_owned();
        drop(store);
        assert_eq!(records_at(&path), (0, 6), "merge_rows {merge_rows}");
        let store = open(dir.path(), merge_rows);
        assert_answered(&store, &["shop"], &msg_ids).await;
        assert_eq!(
            store.record(echoed("shop", "m0"), NOW).await.unwrap(),
            Claim::Answered("shop: response to m0".into()),
            "written once"
        );
        drop(store);
        assert_eq!(records_at(&path), (0, 6));
    }
}

#[tokio::test]
async fn a_dedup_purge_forgets_the_records_of_entries_and_keeps_the_entries() {
    for merge_rows in [1, 3, 1_000_000] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), merge_rows);
        let old: Vec<String> = (0..5).map(|n| format!("old{n}")).collect();
        for msg_id in &old {
            let completion = completed("shop", msg_id, NOW - 100, true);
            store.record(completion, NOW - 100).await.unwrap();
        }
        let new = record(&store, &["shop"], "new", 4).await;
        let purged = store.purge(dedup_before(NOW - 50)).await.unwrap();
        assert_eq!(purged.dedup, 5, "merge_rows {merge_rows}");
        assert_eq!(
            store.history("shop", "c", 100).await.unwrap().len(),
            2 * 5 + 4 + 2,
            "every entry stays: 5 old and 2 new exchanges, 2 messages without a reply"
        );
        drop(store);
        let store = open(dir.path(), merge_rows);
        assert_answered(&store, &["shop"], &new).await;
        for msg_id in &old {
            let again = store.claim("shop", msg_id, "again".into(), NOW).await;
            assert_eq!(
                again.unwrap(),
                Claim::New,
                "{msg_id}, merge_rows {merge_rows}"
            );
        }
    }
}

#[tokio::test]
async fn a_history_purge_keeps_the_records_of_its_entries_inside_the_dedup_window() {
    for merge_rows in [1, 3, 1_000_000] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), merge_rows);
        let msg_ids = record(&store, &["shop", "bank"], "m", 10).await;
        let history_before = |history| PurgeBefore {
            history,
            ..dedup_before(0)
        };
        let purged = store.purge(history_before(NOW + 1)).await.unwrap();
        assert_eq!((purged.history, purged.dedup), (20, 0));
        assert!(store.history("shop", "c", 10).await.unwrap().is_empty());
        assert_eq!(records(&store), (20, 0), "merge_rows {merge_rows}");
        assert_answered(&store, &["shop", "bank"], &msg_ids).await;
        drop(store);
        let store = open(dir.path(), merge_rows);
        assert_answered(&store, &["shop", "bank"], &msg_ids).await;
        assert_eq!(store.purge(dedup_before(NOW + 1)).await.unwrap().dedup, 20);
        let again = store.claim("shop", &msg_ids[0], "again".into(), NOW).await;
        assert_eq!(again.unwrap(), Claim::New);
    }
}

/// A history purge whose entries' keys are all merged moves their records into dedup rows
/// without reading the tail back: the rows' keys join the tail as a new row's do, and a
/// resend finds them there, before any reopen or merge.
#[tokio::test]
async fn records_moved_out_of_merged_entries_are_found_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1);
    let mut old = Vec::new();
    for n in 0..10 {
        let msg_id = format!("old-{n}");
        let completion = completed("shop", &msg_id, NOW - 10_000, true);
        assert_eq!(store.record(completion, NOW).await.unwrap(), Claim::New);
        old.push(msg_id);
    }
    // Newer entries, whose batches let the merges of the old keys finish: the purge stays
    // below the watermark.
    let new = record(&store, &["shop"], "new", 40).await;
    let entries_through = || -> i64 {
        let conn = rusqlite::Connection::open(store.path()).unwrap();
        conn.query_row(
            "SELECT value FROM store_meta WHERE key = 'message_keys_entries_through'",
            [],
            |row| row.get(0),
        )
        .unwrap()
    };
    assert!(entries_through() > 10, "the old entries' keys are merged");
    let purged = store
        .purge(PurgeBefore {
            history: NOW - 1,
            ..dedup_before(0)
        })
        .await
        .unwrap();
    assert_eq!(purged.history, 10);
    assert_answered(&store, &["shop"], &old).await;
    assert_answered(&store, &["shop"], &new).await;
}

#[tokio::test]
async fn entries_after_purges_that_emptied_the_history_are_found_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1_000_000);
    for n in 0..3 {
        store
            .record(echoed("shop", &format!("old{n}")), NOW)
            .await
            .unwrap();
    }
    // The dedup window passes the entries, then the history's retention takes them all.
    store.purge(dedup_before(NOW + 1)).await.unwrap();
    let everything = PurgeBefore {
        history: NOW + 1,
        ..dedup_before(NOW + 1)
    };
    store.purge(everything).await.unwrap();
    assert_eq!(records(&store), (0, 0));
    drop(store);
    // A new entry must not take an id the window has passed: a reopen would skip its key.
    let store = open(dir.path(), 1_000_000);
    let fresh = ["fresh".to_owned()];
    store.record(echoed("shop", &fresh[0]), NOW).await.unwrap();
    drop(store);
    let store = open(dir.path(), 1_000_000);
    assert_answered(&store, &["shop"], &fresh).await;
}

/// Whether `table` has the column `column`.
fn has_column(store: &SqliteStore, table: &str, column: &str) -> bool {
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2)",
        [table, column],
        |row| row.get(0),
    )
    .unwrap()
}

/// Whether the database has the table `name`.
fn has_table(store: &SqliteStore, name: &str) -> bool {
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
        [name],
        |row| row.get(0),
    )
    .unwrap()
}

#[tokio::test]
async fn a_database_whose_dedup_rows_named_their_entries_is_folded_into_them() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(dir.path().join("iagent.sqlite3")).unwrap();
        // The layout before: an echo's dedup row named its entry (`history_id`), which named
        // it back (`message_id`). Keys of rows 1 and 2 are merged; rows 3 and 4 are after the
        // watermark, and entry 2 after the heads' one.
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
                history_id INTEGER
            );
            CREATE TABLE history (
                id INTEGER PRIMARY KEY,
                app TEXT NOT NULL,
                conversation TEXT NOT NULL,
                at_ms INTEGER NOT NULL,
                message TEXT NOT NULL,
                reply TEXT,
                message_id INTEGER,
                prev INTEGER
            );
            CREATE TABLE history_heads (
                app TEXT NOT NULL,
                conversation TEXT NOT NULL,
                head INTEGER NOT NULL,
                PRIMARY KEY (app, conversation)
            ) WITHOUT ROWID;
            CREATE TABLE message_keys (
                app TEXT NOT NULL,
                msg_id TEXT NOT NULL,
                id INTEGER NOT NULL,
                PRIMARY KEY (app, msg_id)
            ) WITHOUT ROWID;
            CREATE TABLE store_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
            INSERT INTO messages (id, app, msg_id, received_ms, inbound, response, history_id)
                VALUES (1, 'shop', 'merged', 1, NULL, NULL, 1),
                       (2, 'shop', 'declined', 1, NULL, 'not replying', NULL),
                       (3, 'shop', 'tail', 1, NULL, NULL, 2),
                       (4, 'shop', 'open', 1, '{\"msg_id\":\"open\"}', NULL, NULL);
            INSERT INTO history (id, app, conversation, at_ms, message, reply, message_id, prev)
                VALUES (1, 'shop', 'c', 1, 'message merged', 'response merged', 1, NULL),
                       (2, 'shop', 'c', 1, 'message tail', 'response tail', 3, 1);
            INSERT INTO history_heads VALUES ('shop', 'c', 1);
            INSERT INTO message_keys VALUES ('shop', 'merged', 1), ('shop', 'declined', 2);
            INSERT INTO store_meta VALUES ('message_keys_through', 2),
                                          ('history_heads_through', 1);",
        )
        .unwrap();
    }
    let expected = [
        ("merged", Claim::Answered("response merged".into())),
        ("tail", Claim::Answered("response tail".into())),
        ("declined", Claim::Answered("not replying".into())),
        ("open", Claim::Pending),
    ];
    for reopen in 0..2 {
        let store = open(dir.path(), 1_000_000);
        assert!(!has_column(&store, "messages", "history_id"));
        assert!(!has_column(&store, "history", "message_id"));
        // The rows' keys moved into blocks, and the folded entries' keys merged with them.
        assert!(!has_table(&store, "message_keys"), "reopen {reopen}");
        assert_eq!(keys_table(&store), (3, Some(2)), "reopen {reopen}");
        assert_eq!(records(&store), (2, 2), "reopen {reopen}");
        for (msg_id, claim) in &expected {
            let again = store.claim("shop", msg_id, "again".into(), NOW).await;
            assert_eq!(&again.unwrap(), claim, "{msg_id}, reopen {reopen}");
        }
        assert_eq!(store.unanswered().await.unwrap().len(), 1);
        assert_eq!(
            store.history("shop", "c", 10).await.unwrap(),
            [
                "message merged",
                "response merged",
                "message tail",
                "response tail"
            ]
        );
    }
}
