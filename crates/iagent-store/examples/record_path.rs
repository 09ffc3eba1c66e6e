//! The store's share of the message path, measured on its own: `record`, the one write a
//! message answered by a repeatable agent (the echo agent) costs, issued by many concurrent
//! callers the way the gateway's conversations issue it, with no network and no agent. With
//! `claim` as the third argument, each message is claimed, then completed, as a message to a
//! webhook or LLM agent is (two writes).
//!
//! Prints records per second and the process's CPU seconds per 100 000 records. The
//! gateway's benchmark (`iagent bench`) measures the whole path; this one isolates the store,
//! whose figures move by a few percent where the whole path's drift by more.
//!
//! ```text
//! taskset -c 0 cargo run --release -p iagent-store --example record_path -- [SECONDS] [CALLERS] [record|claim]
//! ```
//!
//! Linux only: CPU time is read from `/proc/self/stat`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use iagent_protocol::{ChatType, ContentType, Message, RespCode, SenderType};
use iagent_store::{Claim, Completion, HistoryEntry, Options, SqliteStore, Store};

/// Conversations the callers spread their messages over, as the gateway benchmark's users.
const CONVERSATIONS: u64 = 10_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().map_or(Ok(8), |arg| arg.parse())?;
    let callers: u64 = args.next().map_or(Ok(512), |arg| arg.parse())?;
    let claims = match args.next().as_deref() {
        None | Some("record") => false,
        Some("claim") => true,
        Some(other) => return Err(format!("record or claim, not {other}").into()),
    };
    let dir = tempfile::tempdir()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    runtime.block_on(async {
        let store = Arc::new(SqliteStore::open(dir.path(), Options::default())?);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..callers)
            .map(|caller| {
                let (store, stop, done) = (store.clone(), stop.clone(), done.clone());
                tokio::spawn(async move {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let completion = completion(caller, n);
                        if claims {
                            let message = completion.history()[0].message.clone();
                            let claim = store.claim("bench", completion.msg_id(), message, 0).await;
                            assert!(matches!(claim, Ok(Claim::New)), "{claim:?}");
                            store.complete(completion).await.expect("completed");
                        } else {
                            let claim = store.record(completion, 0).await;
                            assert!(matches!(claim, Ok(Claim::New)), "{claim:?}");
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                    }
                })
            })
            .collect();
        // The first second fills caches and the WAL; it is not counted.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (start, records, cpu) = (Instant::now(), done.load(Ordering::Relaxed), cpu_seconds()?);
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let records = done.load(Ordering::Relaxed) - records;
        let (elapsed, cpu) = (start.elapsed().as_secs_f64(), cpu_seconds()? - cpu);
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await?;
        }
        let what = if claims {
            "messages claimed and completed"
        } else {
            "records"
        };
        println!(
            "{records} {what} in {elapsed:.1} s: {:.0}/s, {:.3} CPU-s per 100k",
            records as f64 / elapsed,
            cpu / records as f64 * 100_000.0
        );
        Ok(())
    })
}

/// The `n`th message of `caller`, answered, as the echo agent's completion is: the message and
/// its reply handed over as messages, as the gateway hands them, which the store packs from
/// their fields.
fn completion(caller: u64, n: u64) -> Completion {
    let msg_id = format!("m-{caller}-{n}");
    let user = format!("user-{}", (caller * 7919 + n) % CONVERSATIONS);
    let message = Message {
        chat_type: ChatType::Private,
        msg_id: msg_id.clone(),
        ref_msg_id: None,
        timestamp: 1_796_233_539_832,
        group_id: None,
        sender_type: SenderType::User,
        sender_id: user.clone(),
        receiver_id: None,
        resp_code: RespCode::Ok,
        content_type: ContentType::Text,
        content: format!("hello, agent; message {n}"),
    };
    let reply = Message {
        msg_id: format!("r-{caller}-{n}"),
        ref_msg_id: Some(msg_id.clone()),
        timestamp: 1_796_233_539_840,
        sender_type: SenderType::Agent,
        sender_id: "echo".into(),
        receiver_id: Some(user.clone()),
        ..message.clone()
    };
    let entry = HistoryEntry {
        conversation: format!("p:{user}:echo").into(),
        at_ms: 0,
        message: message.into(),
        reply: None,
    };
    Completion::replied("bench", msg_id, entry, reply)
}

/// CPU seconds (user and system) the process has used so far.
fn cpu_seconds() -> Result<f64, Box<dyn std::error::Error>> {
    /// Clock ticks per second of `/proc/self/stat`'s times, as Linux reports them to processes.
    const TICKS_PER_SECOND: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').ok_or("bad /proc/self/stat")? + 2..]
        .split(' ')
        .collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / TICKS_PER_SECOND)
}
