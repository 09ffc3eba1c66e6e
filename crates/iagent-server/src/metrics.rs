//! Prometheus metrics, kept in atomics and written in the text exposition format on demand.
//!
//! Per-app series are labelled with the app's name, never its token. The set of apps is bounded
//! by the store, so label cardinality is too.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use iagent_protocol::RespCode;

use crate::apps::AppState;

/// Upper bounds of the processing-latency buckets, in seconds: from 100 µs (the target p99 is
/// 1 ms) up to the default agent deadline, where slow LLMs and webhooks land.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 30.0,
];

/// Counters of one app.
#[derive(Debug, Default)]
pub(crate) struct AppCounters {
    pub(crate) messages_in: AtomicU64,
    pub(crate) responses: [AtomicU64; 4],
    pub(crate) duplicates: AtomicU64,
    pub(crate) outbox_expired: AtomicU64,
    pub(crate) rerouted: AtomicU64,
    /// Copies of responses sent to the other connections their message came in on.
    pub(crate) copies: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) pushed: AtomicU64,
}

impl AppCounters {
    pub(crate) fn response(&self, code: RespCode) {
        let slot = match code {
            RespCode::Ok => 0,
            RespCode::NoReply => 1,
            RespCode::Illegal => 2,
            RespCode::Failed => 3,
        };
        self.responses[slot].fetch_add(1, Ordering::Relaxed);
    }
}

/// Gateway-wide metrics.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    pub(crate) auth_failures: AtomicU64,
    pub(crate) auth_throttled: AtomicU64,
    pub(crate) origin_refused: AtomicU64,
    pub(crate) http_connections_refused: AtomicU64,
    pub(crate) store_errors: AtomicU64,
}

impl Metrics {
    /// Records how long a message took from its frame to its response.
    pub(crate) fn observe_latency(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(bucket) = LATENCY_BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.latency_sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// The exposition text for these metrics and the given apps.
    pub(crate) fn render(&self, apps: &[std::sync::Arc<AppState>]) -> String {
        let mut out = String::with_capacity(4096);
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut family =
            |name: &str,
             kind: &str,
             help: &str,
             series: &mut dyn Iterator<Item = (String, u64)>| {
                // Writing to a String cannot fail.
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for (labels, value) in series {
                    let _ = writeln!(out, "{name}{labels} {value}");
                }
            };
        let app_label = |app: &AppState| format!("{{app=\"{}\"}}", app.name);
        family(
            "iagent_connections",
            "gauge",
            "Open WebSocket connections, per app.",
            &mut apps
                .iter()
                .map(|a| (app_label(a), a.connection_count() as u64)),
        );
        family(
            "iagent_connections_refused_total",
            "counter",
            "WebSocket upgrades refused because the app was at its connection limit (429), per app.",
            &mut apps
                .iter()
                .map(|a| (app_label(a), load(&a.counters.connections_refused))),
        );
        family(
            "iagent_messages_in_total",
            "counter",
            "Frames received, per app (valid or not, duplicates included).",
            &mut apps
                .iter()
                .map(|a| (app_label(a), load(&a.counters.messages_in))),
        );
        family(
            "iagent_responses_total",
            "counter",
            "Terminal responses made, per app and resp_code.",
            &mut apps.iter().flat_map(|a| {
                [0, 10, 40, 50]
                    .into_iter()
                    .zip(&a.counters.responses)
                    .map(move |(code, count)| {
                        (
                            format!("{{app=\"{}\",resp_code=\"{code}\"}}", a.name),
                            load(count),
                        )
                    })
            }),
        );
        family(
            "iagent_in_flight",
            "gauge",
            "Messages being processed, per app.",
            &mut apps.iter().map(|a| (app_label(a), a.in_flight() as u64)),
        );
        family(
            "iagent_deferred",
            "gauge",
            "Messages waiting for the reply their agent deferred (a webhook's 202), per app.",
            &mut apps
                .iter()
                .map(|a| (app_label(a), a.deferred_count() as u64)),
        );
        family(
            "iagent_pushed_total",
            "counter",
            "Messages agents started with POST /api/v1/messages, per app.",
            &mut apps
                .iter()
                .map(|a| (app_label(a), load(&a.counters.pushed))),
        );
        family(
            "iagent_duplicates_total",
            "counter",
            "Messages whose msg_id was seen before and that were not processed again, per app.",
            &mut apps
                .iter()
                .map(|a| (app_label(a), load(&a.counters.duplicates))),
        );
        family(
            "iagent_rerouted_total",
            "counter",
            "Responses that could not go to their origin connection and went to another one or \
             the outbox, per app.",
            &mut apps
                .iter()
                .map(|a| (app_label(a), load(&a.counters.rerouted))),
        );
        family(
            "iagent_response_copies_total",
            "counter",
            "Copies of responses sent to another open connection their message was resent on \
             while it was processed, besides the response itself, per app.",
            &mut apps
                .iter()
                .map(|a| (app_label(a), load(&a.counters.copies))),
        );
        family(
            "iagent_outbox_depth",
            "gauge",
            "Responses waiting in the outbox for a connection, per app.",
            &mut apps.iter().map(|a| (app_label(a), a.outbox.depth())),
        );
        family(
            "iagent_outbox_expired_total",
            "counter",
            "Outbox entries removed undelivered after their time to live, per app.",
            &mut apps
                .iter()
                .map(|a| (app_label(a), load(&a.counters.outbox_expired))),
        );
        family(
            "iagent_auth_failures_total",
            "counter",
            "WebSocket upgrades refused for a missing, unknown or revoked token.",
            &mut std::iter::once((String::new(), load(&self.auth_failures))),
        );
        family(
            "iagent_auth_throttled_total",
            "counter",
            "WebSocket upgrades refused (429) because their address failed authentication too often.",
            &mut std::iter::once((String::new(), load(&self.auth_throttled))),
        );
        family(
            "iagent_origin_refused_total",
            "counter",
            "WebSocket upgrades refused (403) for an Origin not in the allow-list.",
            &mut std::iter::once((String::new(), load(&self.origin_refused))),
        );
        family(
            "iagent_http_connections_refused_total",
            "counter",
            "TCP connections closed at once because max_http_connections were open.",
            &mut std::iter::once((String::new(), load(&self.http_connections_refused))),
        );
        family(
            "iagent_store_errors_total",
            "counter",
            "Store operations that failed.",
            &mut std::iter::once((String::new(), load(&self.store_errors))),
        );
        let _ = writeln!(
            out,
            "# HELP iagent_processing_seconds Time from a message's frame to its response.\n\
             # TYPE iagent_processing_seconds histogram"
        );
        let mut cumulative = 0;
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            cumulative += load(count);
            let _ = writeln!(
                out,
                "iagent_processing_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = load(&self.latency_count);
        let _ = writeln!(
            out,
            "iagent_processing_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let sum = load(&self.latency_sum_micros) as f64 / 1e6;
        let _ = writeln!(
            out,
            "iagent_processing_seconds_sum {sum}\niagent_processing_seconds_count {count}"
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_cumulative_buckets() {
        let metrics = Metrics::default();
        metrics.observe_latency(Duration::from_micros(300));
        metrics.observe_latency(Duration::from_secs(60));
        let text = metrics.render(&[]);
        assert!(
            text.contains("iagent_processing_seconds_bucket{le=\"0.00025\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("iagent_processing_seconds_bucket{le=\"0.0005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("iagent_processing_seconds_bucket{le=\"30\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("iagent_processing_seconds_bucket{le=\"+Inf\"} 2"),
            "{text}"
        );
        assert!(text.contains("iagent_processing_seconds_count 2"), "{text}");
    }
}
