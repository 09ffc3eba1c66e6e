//! The `serve` settings: a TOML file (every key optional, unknown keys rejected), then the
//! command-line flags on top.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use iagent_store::Durability;
use serde::{Deserialize, Serialize};

/// Where the gateway keeps its data when told nothing.
pub(crate) const DEFAULT_DATA_DIR: &str = "./iagent-data";
/// Where the gateway listens when told nothing: loopback only, so a first start exposes nothing.
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// The configuration file.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct File {
    serve: Serve,
    #[serde(flatten)]
    server: iagent_server::Config,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    agents: Vec<AgentDeclaration>,
}

/// An agent the configuration file declares (`[[agents]]`); stored at every start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentDeclaration {
    /// The app it belongs to; it must exist.
    pub(crate) app: String,
    /// Its id.
    pub(crate) id: String,
    /// Its kind.
    pub(crate) kind: String,
    /// Its configuration, as a TOML table (the JSON object of `iagent agent add --config`).
    #[serde(default)]
    pub(crate) config: toml::Table,
    /// Whether it is the app's default agent.
    #[serde(default)]
    pub(crate) default: bool,
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Serve {
    listen: SocketAddr,
    data_dir: PathBuf,
    durability: DurabilitySetting,
    history_merge_rows: usize,
    dedup_merge_rows: usize,
    dedup_filter_mib: usize,
    store_cache_mib: usize,
    store_mmap_mib: usize,
    store_queue: usize,
    store_entry_log_kib: usize,
    purge_slice_rows: usize,
}

impl Default for Serve {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| unreachable!("a valid address")),
            data_dir: DEFAULT_DATA_DIR.into(),
            durability: DurabilitySetting::Process,
            history_merge_rows: iagent_store::DEFAULT_HISTORY_MERGE_ROWS,
            dedup_merge_rows: iagent_store::DEFAULT_DEDUP_MERGE_ROWS,
            dedup_filter_mib: iagent_store::DEFAULT_DEDUP_FILTER_MIB,
            store_cache_mib: iagent_store::DEFAULT_CACHE_MIB,
            store_mmap_mib: iagent_store::DEFAULT_MMAP_MIB,
            store_queue: iagent_store::DEFAULT_QUEUE_CAPACITY,
            store_entry_log_kib: iagent_store::DEFAULT_ENTRY_LOG_KIB,
            purge_slice_rows: iagent_store::DEFAULT_PURGE_SLICE_ROWS,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum DurabilitySetting {
    Process,
    Power,
}

/// What `serve` runs with.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) listen: SocketAddr,
    pub(crate) data_dir: PathBuf,
    pub(crate) store: iagent_store::Options,
    pub(crate) server: iagent_server::Config,
    pub(crate) agents: Vec<AgentDeclaration>,
}

impl Settings {
    /// Reads the file (if any) and applies the flags over it.
    pub(crate) fn load(
        file: Option<&Path>,
        listen: Option<SocketAddr>,
        data: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let file: File = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("cannot read the configuration file {}", path.display())
                })?;
                toml::from_str(&text)
                    .with_context(|| format!("invalid configuration file {}", path.display()))?
            }
            None => File::default(),
        };
        Ok(Self {
            listen: listen.unwrap_or(file.serve.listen),
            data_dir: data.unwrap_or(file.serve.data_dir),
            store: iagent_store::Options {
                durability: match file.serve.durability {
                    DurabilitySetting::Process => Durability::Process,
                    DurabilitySetting::Power => Durability::Power,
                },
                history_merge_rows: file.serve.history_merge_rows,
                dedup_merge_rows: file.serve.dedup_merge_rows,
                dedup_filter_mib: file.serve.dedup_filter_mib,
                cache_mib: file.serve.store_cache_mib,
                mmap_mib: file.serve.store_mmap_mib,
                queue_capacity: file.serve.store_queue,
                entry_log_kib: file.serve.store_entry_log_kib,
                purge_slice_rows: file.serve.purge_slice_rows,
            },
            server: file.server,
            agents: file.agents,
        })
    }
}

/// One comment per key: what it is, and what happens when it is reached.
const COMMENTS: &[(&str, &str)] = &[
    ("listen", "Address the gateway listens on."),
    (
        "data_dir",
        "Directory of the SQLite database; created if missing.",
    ),
    (
        "durability",
        "\"process\": commits survive the process being killed (WAL, synchronous=NORMAL).\n\
         \"power\": every commit is fsynced and also survives a power loss (synchronous=FULL).",
    ),
    (
        "history_merge_rows",
        "History rows indexed in memory before they are merged into the database's conversation\n\
         index. At it: one merge, which delays the next store commit by its length.",
    ),
    (
        "dedup_merge_rows",
        "Dedup rows whose keys are held in memory before they are merged into the database's\n\
         key table. At it: one merge, which delays the next store commit by its length.",
    ),
    (
        "dedup_filter_mib",
        "Memory, in MiB, of the filter that spares a new msg_id its look-up in the key table\n\
         (about 6.7 million keys at 8); 0 turns it off. Past its keys: more msg_ids are looked\n\
         up, none is missed.",
    ),
    (
        "store_cache_mib",
        "Most memory, in MiB, the database's page cache takes: the pages a transaction writes,\n\
         and those read past store_mmap_mib. At it: the least recently used pages are dropped,\n\
         and read again from the mapping (or the operating system) when next needed.",
    ),
    (
        "store_mmap_mib",
        "Most of the database file, in MiB, read through a memory mapping (address space: the\n\
         pages are the operating system's file cache); 0 turns it off. Past it: pages are read\n\
         with system calls into the page cache.",
    ),
    (
        "store_queue",
        "Store jobs (claims, completions, reads) taken at once, queued or being committed.\n\
         At it: further messages wait for a place before they are processed.",
    ),
    (
        "store_entry_log_kib",
        "History entries, in KiB, answered from the entry log (one write per batch of\n\
         messages that only append entries, such as the echo's) before they are written into\n\
         the database in one transaction; 0 writes every batch into the database. At it: the\n\
         entries are written into the database, and the log emptied.",
    ),
    (
        "purge_slice_rows",
        "Expired rows of each kind (dedup records, their keys, history entries) one\n\
         transaction of a purge removes. At it: the transaction commits, store commits waiting\n\
         go in, and the purge goes on in the next.",
    ),
    (
        "max_frame_bytes",
        "Largest WebSocket message. Over it: the connection is closed with 1009.",
    ),
    (
        "read_buffer_bytes",
        "Bytes a connection reads at a time; an idle connection holds a buffer this big.",
    ),
    (
        "max_text_bytes",
        "Largest text content. Over it: the message is answered with 40.",
    ),
    (
        "max_connections_per_app",
        "Open connections per app. Over it: the upgrade gets 429 with Retry-After.",
    ),
    (
        "max_in_flight_per_app",
        "Messages of one app in processing. At it: further messages get 50 (overloaded); resend later.",
    ),
    (
        "max_in_flight_per_sender",
        "Messages of one sender_id in processing. At it: further messages of that sender get 50; resend later.",
    ),
    (
        "max_messages_per_second_per_app",
        "Messages per second per app (bursts of one second's worth). Over it: 50 (rate limited). 0: no limit.",
    ),
    (
        "max_in_flight_per_connection",
        "Messages of one connection in processing. At it: the connection is not read until one is answered.",
    ),
    (
        "outbound_queue",
        "Frames waiting to be written to one connection. Full: responses wait or go to another connection.",
    ),
    (
        "outbox_batch",
        "Outbox entries read per step when delivering an app's outbox.",
    ),
    (
        "max_header_bytes",
        "Largest HTTP request head (at least 8192). Over it: 431 and the connection closed.",
    ),
    (
        "max_headers",
        "Most headers in one HTTP request. Over it: 431.",
    ),
    (
        "max_http_connections",
        "TCP connections still speaking HTTP (not upgraded). Over it: a new one is closed at once.",
    ),
    (
        "header_read_ms",
        "How long a request head may take to arrive. Past it: the connection is closed.",
    ),
    (
        "allowed_origins",
        "Origins allowed to open WebSockets, e.g. [\"https://app.example.com\"]. Another Origin: 403.\n\
         Requests without an Origin header (servers) are always allowed. Empty: any origin.",
    ),
    (
        "auth_failures_per_window",
        "Failed token checks from one address after which it gets 429 until the window ends.",
    ),
    (
        "auth_failure_window_secs",
        "The window of auth_failures_per_window.",
    ),
    (
        "max_tracked_addresses",
        "Addresses whose failed token checks are tracked at once.",
    ),
    (
        "cert_file",
        "TLS: PEM certificate chain, leaf first. Set with key_file to serve wss:// directly;\n\
         leave both empty to speak plain HTTP behind a proxy that terminates TLS.",
    ),
    (
        "key_file",
        "TLS: PEM private key of the certificate (PKCS#8, PKCS#1 or SEC1).",
    ),
    (
        "max_file_bytes",
        "Largest file an app may upload. Over it: 413.",
    ),
    (
        "file_ttl_secs",
        "How long uploaded files are kept; messages naming an expired file get 40.",
    ),
    (
        "agent_reload_ms",
        "How often a running gateway picks up agents changed with `iagent agent`.",
    ),
    (
        "max_deferred_per_app",
        "Messages of one app waiting for a deferred (pushed) reply. At it: further deferrals get 50.",
    ),
    (
        "deferred_reply_ms",
        "How long an agent that deferred its reply (202) has to push it. Past it: 50.",
    ),
    ("ping_interval_ms", "How often every connection is pinged."),
    (
        "dead_after_pings",
        "Ping intervals of silence after which a connection is closed as dead.",
    ),
    (
        "write_timeout_ms",
        "A write taking longer marks the connection dead; its responses go elsewhere.",
    ),
    (
        "agent_deadline_ms",
        "How long an agent may take. Past it: 50.",
    ),
    (
        "shutdown_grace_ms",
        "On shutdown, how long work in flight may finish. Past it: agent calls are abandoned (50).",
    ),
    (
        "dedup_window_secs",
        "How long a msg_id is remembered; a resend within it gets the stored response.",
    ),
    (
        "outbox_ttl_secs",
        "How long a response waits in the outbox. Past it: removed, counted and logged.",
    ),
    ("history_ttl_secs", "How long conversation history is kept."),
    (
        "purge_interval_secs",
        "How often expired records are removed.",
    ),
];

/// The default configuration as a commented TOML file.
pub(crate) fn default_file() -> String {
    let text = toml::to_string(&File::default())
        .unwrap_or_else(|err| unreachable!("defaults serialize: {err}"));
    let mut out =
        String::from("# iagent configuration. Every key is optional; shown are the defaults.\n");
    for line in text.lines() {
        let key = line.split_once(" = ").map(|(key, _)| key.trim());
        if let Some((_, comment)) =
            key.and_then(|key| COMMENTS.iter().find(|(name, _)| *name == key))
        {
            for comment_line in comment.lines() {
                out.push_str("# ");
                out.push_str(comment_line);
                out.push('\n');
            }
        }
        if line.starts_with('[') && !out.ends_with("\n\n") {
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(AGENTS_EXAMPLE);
    out
}

/// How agents are declared, for the printed default file (there are none by default).
const AGENTS_EXAMPLE: &str = "
# Agents declared here are stored (added or replaced) at every start; the app must exist.
# Their config is the kind's configuration (docs/agents.md) as a TOML table. For example:
#
# [[agents]]
# app = \"default\"
# id = \"helper\"
# kind = \"rules\"
# default = false
# config = { rules = [{ keywords = [\"price\"], reply = \"See example.com/prices\" }], fallback = \"Sorry?\" }
#
# A model behind an OpenAI-compatible endpoint; the key is read from the named variable:
# [[agents]]
# app = \"default\"
# id = \"assistant\"
# kind = \"openai\"
# config = { model = \"gpt-4o-mini\", api_key_env = \"OPENAI_API_KEY\", system_prompt = \"Answer briefly.\", history = 20 }
#
# The app's own HTTP service, called with signed POSTs; the secret is in the named variable:
# [[agents]]
# app = \"default\"
# id = \"orders\"
# kind = \"webhook\"
# config = { url = \"https://hooks.example.com/iagent\", secret_env = \"IAGENT_WEBHOOK_SECRET\", timeout_ms = 10000 }
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_parses_back_to_the_defaults_and_comments_every_key() {
        let text = default_file();
        let parsed: File = toml::from_str(&text).expect("the printed defaults parse");
        assert_eq!(parsed, File::default());
        for line in text
            .lines()
            .filter(|line| line.contains(" = ") && !line.starts_with('#'))
        {
            let key = line.split(" = ").next().unwrap_or_default();
            assert!(
                COMMENTS.iter().any(|(name, _)| *name == key),
                "no comment for {key}"
            );
        }
    }

    #[test]
    fn the_commented_agent_examples_parse_and_build() {
        let uncommented: String = AGENTS_EXAMPLE
            .lines()
            .filter_map(|line| line.strip_prefix("# "))
            .filter(|line| line.starts_with('[') || line.contains(" = "))
            .map(|line| format!("{line}\n"))
            .collect();
        let parsed: File = toml::from_str(&uncommented).expect("the examples parse");
        let kinds: Vec<&str> = parsed.agents.iter().map(|a| a.kind.as_str()).collect();
        assert_eq!(kinds, ["rules", "openai", "webhook"]);
        for agent in &parsed.agents {
            let config = serde_json::to_string(&agent.config).expect("JSON");
            iagent_server::Kinds::builtin()
                .build(&agent.id, &agent.kind, &config)
                .unwrap_or_else(|err| panic!("{err}"));
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<File>("[limits]\nmax_frame_byte = 1\n")
            .expect_err("a typo is an error");
        assert!(err.to_string().contains("max_frame_byte"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("iagent.toml");
        std::fs::write(
            &path,
            "[serve]\nlisten = \"127.0.0.1:9000\"\n[limits]\nmax_text_bytes = 100\n",
        )
        .expect("write");
        let settings = Settings::load(Some(&path), None, Some("/tmp/x".into())).expect("loads");
        assert_eq!(settings.listen.port(), 9000);
        assert_eq!(settings.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(settings.server.limits.max_text_bytes, 100);
    }

    #[test]
    fn the_store_keys_reach_the_store_options() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("iagent.toml");
        std::fs::write(
            &path,
            "[serve]\ndurability = \"power\"\nhistory_merge_rows = 7\ndedup_merge_rows = 9\n\
             dedup_filter_mib = 13\nstore_cache_mib = 3\nstore_mmap_mib = 11\nstore_queue = 5\n\
             store_entry_log_kib = 17\npurge_slice_rows = 19\n",
        )
        .expect("write");
        let store = Settings::load(Some(&path), None, None)
            .expect("loads")
            .store;
        assert_eq!(
            store,
            iagent_store::Options {
                durability: Durability::Power,
                history_merge_rows: 7,
                dedup_merge_rows: 9,
                cache_mib: 3,
                mmap_mib: 11,
                dedup_filter_mib: 13,
                queue_capacity: 5,
                entry_log_kib: 17,
                purge_slice_rows: 19,
            }
        );
    }
}
