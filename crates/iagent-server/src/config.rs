//! The gateway's settings: every limit and timeout, named, with its default and what happens
//! when it is reached. `iagent config` prints this as a commented TOML file.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The smallest request-head buffer the HTTP implementation accepts.
const MIN_HEADER_BYTES: usize = 8192;

/// Everything the server needs to know besides its listener and store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Sizes and counts.
    pub limits: Limits,
    /// How long things may take.
    pub timeouts: Timeouts,
    /// How long records are kept.
    pub retention: Retention,
    /// Who may connect.
    pub security: Security,
    /// TLS, when the gateway terminates it itself.
    pub tls: Tls,
}

/// TLS termination. Both files or neither: with neither, the gateway speaks plain HTTP (put a
/// proxy that terminates TLS in front of it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// PEM file with the certificate chain, leaf first.
    pub cert_file: std::path::PathBuf,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: std::path::PathBuf,
}

impl Tls {
    /// Whether TLS is configured.
    pub fn enabled(&self) -> bool {
        !self.cert_file.as_os_str().is_empty()
    }
}

/// Sizes and counts. Each says what happens when it is reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest WebSocket message accepted, in bytes. Over it the connection is closed with 1009:
    /// this is protocol abuse, not a bad message, because the frame was never read whole.
    pub max_frame_bytes: usize,
    /// How many bytes a connection reads from its socket at a time. Its read buffer is this
    /// big even while it is idle, so this is most of what an idle connection costs; larger
    /// frames are read in several steps.
    pub read_buffer_bytes: usize,
    /// Largest text `content`, in bytes. Over it the message is answered with 40.
    pub max_text_bytes: usize,
    /// Open connections per app. Over it the upgrade is refused with 429 and `Retry-After`.
    pub max_connections_per_app: usize,
    /// Messages of one app being processed at once. At it a further message is answered with 50
    /// (`overloaded`) and not recorded, so the backend may resend it later.
    pub max_in_flight_per_app: usize,
    /// Messages of one sender (`sender_id`) of an app being processed at once. At it a further
    /// message from that sender is answered with 50 and not recorded, so one noisy end user
    /// cannot take a connection's in-flight places from the others.
    pub max_in_flight_per_sender: usize,
    /// Messages per second one app may send, on average, with bursts of one second's worth.
    /// Over it a message is answered with 50 (`rate limited`) and not recorded. 0: no limit.
    pub max_messages_per_second_per_app: u32,
    /// Messages of one connection being processed at once. At it the gateway stops reading that
    /// connection until a response is out (back-pressure, nothing is refused).
    pub max_in_flight_per_connection: usize,
    /// Frames waiting to be written to one connection. When full, responses for that connection
    /// wait (and so does reading from it), or go to another connection of the app.
    pub outbound_queue: usize,
    /// Outbox entries read per step when an app's outbox is delivered.
    pub outbox_batch: u32,
    /// Messages of one app waiting for a pushed reply. At it, a further agent that defers is
    /// answered with 50 instead.
    pub max_deferred_per_app: usize,
    /// Largest file an app may upload, in bytes. Over it the upload is refused with 413.
    pub max_file_bytes: usize,
    /// Largest HTTP request head (request line and headers), in bytes; at least 8192. Over it
    /// the request is answered with 431 and the connection closed.
    pub max_header_bytes: usize,
    /// Most headers in one HTTP request. Over it the request is answered with 431.
    pub max_headers: usize,
    /// TCP connections still speaking HTTP (not yet upgraded, health checks, metrics). Over it
    /// a new connection is closed at once.
    pub max_http_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            read_buffer_bytes: 8 * 1024,
            max_text_bytes: iagent_protocol::Limits::DEFAULT_MAX_TEXT_BYTES,
            max_connections_per_app: 64,
            max_in_flight_per_app: 10_000,
            max_in_flight_per_sender: 64,
            max_messages_per_second_per_app: 0,
            max_in_flight_per_connection: 512,
            outbound_queue: 1024,
            outbox_batch: 256,
            max_deferred_per_app: 10_000,
            max_file_bytes: 10 * 1024 * 1024,
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            max_http_connections: 1024,
        }
    }
}

/// How long things may take, in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// How often every connection is pinged.
    pub ping_interval_ms: u64,
    /// A connection that has sent nothing (not even a pong) for this many ping intervals is
    /// closed as dead; its undelivered responses go to another connection or the outbox.
    pub dead_after_pings: u32,
    /// A write that has not completed after this long marks the connection dead: the peer has
    /// stopped reading, and its responses are better off elsewhere.
    pub write_timeout_ms: u64,
    /// How long an agent may take to answer. Past it the message is answered with 50.
    pub agent_deadline_ms: u64,
    /// How often the gateway looks for agents added, changed or removed by the CLI (or another
    /// process) and rebuilds the agents of the apps concerned.
    pub agent_reload_ms: u64,
    /// How long an agent that deferred its reply (a webhook answering 202) has to push it. Past
    /// it the message is answered with 50.
    pub deferred_reply_ms: u64,
    /// How long a client may take to send a request's head. Past it the connection is closed,
    /// so clients that trickle their headers cannot hold connections open.
    pub header_read_ms: u64,
    /// On shutdown, how long work in flight may still take. Past it, agent calls are abandoned
    /// and their messages answered with 50; then every connection is closed with 1012.
    pub shutdown_grace_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            ping_interval_ms: 20_000,
            dead_after_pings: 3,
            write_timeout_ms: 60_000,
            agent_deadline_ms: 30_000,
            header_read_ms: 10_000,
            agent_reload_ms: 2_000,
            deferred_reply_ms: 300_000,
            shutdown_grace_ms: 10_000,
        }
    }
}

impl Timeouts {
    /// How often connections are pinged.
    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }

    /// How long a silent connection lives.
    pub fn dead_after(&self) -> Duration {
        self.ping_interval() * self.dead_after_pings
    }

    /// How long one write may take.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    /// How long an agent may take.
    pub fn agent_deadline(&self) -> Duration {
        Duration::from_millis(self.agent_deadline_ms)
    }

    /// How long a request head may take to arrive.
    pub fn header_read(&self) -> Duration {
        Duration::from_millis(self.header_read_ms)
    }

    /// How long shutdown waits for work in flight.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

/// How long records are kept, in seconds. Expired records are purged every `purge_interval_secs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// How long a `msg_id` is remembered: a resend within it gets the stored response, after it
    /// the message is processed as new.
    pub dedup_window_secs: u64,
    /// How long a response waits in the outbox for a connection of its app. Past it the entry is
    /// removed, counted in `iagent_outbox_expired_total` and logged.
    pub outbox_ttl_secs: u64,
    /// How long conversation history is kept.
    pub history_ttl_secs: u64,
    /// How long uploaded files are kept. Past it a file is removed, and messages naming it are
    /// illegal (40).
    pub file_ttl_secs: u64,
    /// How often expired records are purged.
    pub purge_interval_secs: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            dedup_window_secs: 24 * 3600,
            outbox_ttl_secs: 24 * 3600,
            history_ttl_secs: 7 * 24 * 3600,
            file_ttl_secs: 30 * 24 * 3600,
            purge_interval_secs: 60,
        }
    }
}

/// Who may connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Security {
    /// Origins allowed to open WebSockets (`https://app.example.com`). A request with an
    /// `Origin` header not in the list is refused with 403; requests without one (servers) are
    /// always allowed. Empty: every origin is allowed.
    pub allowed_origins: Vec<String>,
    /// Failed token checks from one address within the window after which that address is
    /// refused with 429 until the window ends, before its token is even looked up.
    pub auth_failures_per_window: u32,
    /// The window of `auth_failures_per_window`, in seconds.
    pub auth_failure_window_secs: u64,
    /// Addresses whose failures are tracked at once. When full, addresses outside the window are
    /// forgotten first; if all are within it, new addresses are not tracked.
    pub max_tracked_addresses: usize,
}

impl Default for Security {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            auth_failures_per_window: 10,
            auth_failure_window_secs: 60,
            max_tracked_addresses: 10_000,
        }
    }
}

impl Config {
    /// Checks the settings against each other; returns every problem at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let mut positive = |name: &str, value: u64| {
            if value == 0 {
                problems.push(format!("{name} must be greater than 0"));
            }
        };
        let (l, t, r) = (&self.limits, &self.timeouts, &self.retention);
        positive("limits.max_frame_bytes", l.max_frame_bytes as u64);
        positive("limits.read_buffer_bytes", l.read_buffer_bytes as u64);
        positive("limits.max_text_bytes", l.max_text_bytes as u64);
        positive(
            "limits.max_connections_per_app",
            l.max_connections_per_app as u64,
        );
        positive(
            "limits.max_in_flight_per_app",
            l.max_in_flight_per_app as u64,
        );
        positive(
            "limits.max_in_flight_per_sender",
            l.max_in_flight_per_sender as u64,
        );
        positive(
            "limits.max_in_flight_per_connection",
            l.max_in_flight_per_connection as u64,
        );
        positive("limits.outbound_queue", l.outbound_queue as u64);
        positive("limits.outbox_batch", u64::from(l.outbox_batch));
        positive("timeouts.ping_interval_ms", t.ping_interval_ms);
        positive("timeouts.dead_after_pings", u64::from(t.dead_after_pings));
        positive("timeouts.write_timeout_ms", t.write_timeout_ms);
        positive("timeouts.agent_deadline_ms", t.agent_deadline_ms);
        positive("retention.dedup_window_secs", r.dedup_window_secs);
        positive("retention.outbox_ttl_secs", r.outbox_ttl_secs);
        positive("retention.history_ttl_secs", r.history_ttl_secs);
        positive("retention.purge_interval_secs", r.purge_interval_secs);
        positive("limits.max_headers", l.max_headers as u64);
        positive("limits.max_file_bytes", l.max_file_bytes as u64);
        positive("limits.max_deferred_per_app", l.max_deferred_per_app as u64);
        positive("retention.file_ttl_secs", r.file_ttl_secs);
        positive("limits.max_http_connections", l.max_http_connections as u64);
        positive("timeouts.header_read_ms", t.header_read_ms);
        positive("timeouts.agent_reload_ms", t.agent_reload_ms);
        positive("timeouts.deferred_reply_ms", t.deferred_reply_ms);
        let security = &self.security;
        positive(
            "security.auth_failures_per_window",
            u64::from(security.auth_failures_per_window),
        );
        positive(
            "security.auth_failure_window_secs",
            security.auth_failure_window_secs,
        );
        positive(
            "security.max_tracked_addresses",
            security.max_tracked_addresses as u64,
        );
        if self.tls.cert_file.as_os_str().is_empty() != self.tls.key_file.as_os_str().is_empty() {
            problems.push("tls.cert_file and tls.key_file must be set together".to_owned());
        }
        if l.max_header_bytes < MIN_HEADER_BYTES {
            problems.push(format!(
                "limits.max_header_bytes ({}) must be at least {MIN_HEADER_BYTES}",
                l.max_header_bytes
            ));
        }
        if l.max_text_bytes > l.max_frame_bytes {
            problems.push(format!(
                "limits.max_text_bytes ({}) must not exceed limits.max_frame_bytes ({})",
                l.max_text_bytes, l.max_frame_bytes
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The protocol limits validation applies.
    pub fn protocol_limits(&self) -> iagent_protocol::Limits {
        iagent_protocol::Limits {
            max_text_bytes: self.limits.max_text_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Config::default().validate(), Ok(()));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut config = Config::default();
        config.limits.max_frame_bytes = 100;
        config.timeouts.ping_interval_ms = 0;
        let problems = config.validate().expect_err("invalid");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("ping_interval_ms")));
        assert!(problems.iter().any(|p| p.contains("max_text_bytes")));
    }
}
