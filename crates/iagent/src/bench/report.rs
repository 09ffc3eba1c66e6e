//! What a run measured, as printed on stdout and written as JSON (`--json`).

use serde::Serialize;

use super::stats::Percentiles;

/// One run's results: either a load's or a memory measurement's.
#[derive(Debug, Serialize)]
pub(super) struct Report {
    /// `gateway`, or `reference` for an echo server (`--reference`).
    pub(super) server: &'static str,
    /// `raw` (the benchmark's own connections) or `client` (the iagent-client pool).
    pub(super) driver: &'static str,
    /// Flattened, so that a load's figures sit at the top level of the JSON.
    #[serde(flatten)]
    pub(super) load: Option<Load>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) memory: Option<Memory>,
}

/// What a load measured.
#[derive(Debug, Serialize)]
pub(super) struct Load {
    /// `closed` (a window of messages in flight) or `open` (a fixed rate).
    #[serde(rename = "loop")]
    pub(super) loop_kind: &'static str,
    /// Open loop: the messages per second asked for.
    pub(super) rate: Option<f64>,
    pub(super) connections: usize,
    pub(super) users: usize,
    /// Closed loop: messages in flight per connection.
    pub(super) window: Option<usize>,
    pub(super) size: usize,
    /// The share of group messages asked for.
    pub(super) group_share: f64,
    /// The measured window's length.
    pub(super) seconds: f64,
    /// Messages sent in the measured window.
    pub(super) sent: u64,
    /// Messages sent in the measured window and answered.
    pub(super) round_trips: u64,
    pub(super) round_trips_per_second: f64,
    /// How many of the round trips were group messages.
    pub(super) group_round_trips: u64,
    /// Closed loop: from each write; open loop: from each message's scheduled time.
    pub(super) latency_ms: Percentiles,
    /// Open loop: how late the generator wrote messages after their scheduled time (its own
    /// share of the latency).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) send_lag_ms: Option<Percentiles>,
    pub(super) errors: Errors,
    pub(super) server_cpu_seconds_per_100k: Option<f64>,
    /// The part of it the kernel spent on the server's behalf (system calls, its sockets),
    /// which tells the server's own work from what its traffic costs the kernel.
    pub(super) server_system_cpu_seconds_per_100k: Option<f64>,
    /// The generator's own CPU time per second of the measured window: near 1 on a generator
    /// pinned to one core, it is the generator, not the server, that limits the figures.
    pub(super) generator_cores: f64,
}

/// What went wrong, over the whole run (warm-up included).
#[derive(Debug, Default, Serialize)]
pub(super) struct Errors {
    /// Responses with resp_code 10, 40 or 50.
    pub(super) not_ok: u64,
    /// Messages never answered.
    pub(super) unanswered: u64,
}

/// What the server's memory grew by.
#[derive(Debug, Serialize)]
pub(super) struct Memory {
    pub(super) idle_connections: usize,
    pub(super) conversations: usize,
    /// Resident memory before, with the idle connections open, and after the conversations.
    pub(super) rss_kib: Rss,
    pub(super) kib_per_idle_connection: f64,
    pub(super) kib_per_conversation: f64,
    pub(super) errors: Errors,
}

/// The server's resident memory at each step, in KiB.
#[derive(Debug, Serialize)]
pub(super) struct Rss {
    pub(super) baseline: u64,
    pub(super) idle_connections_open: u64,
    /// After the second warm-up round of other conversations.
    pub(super) conversations_warm: u64,
    pub(super) conversations_done: u64,
}

impl Memory {
    /// The figures from the three readings.
    pub(super) fn new(count: usize, rss_kib: Rss, errors: Errors) -> Self {
        let per = |before: u64, after: u64| (after as f64 - before as f64) / count.max(1) as f64;
        Self {
            idle_connections: count,
            conversations: count,
            kib_per_idle_connection: per(rss_kib.baseline, rss_kib.idle_connections_open),
            kib_per_conversation: per(rss_kib.conversations_warm, rss_kib.conversations_done),
            rss_kib,
            errors,
        }
    }
}

impl Report {
    /// Whether every message got a 0 response.
    pub(super) fn clean(&self) -> bool {
        let errors = [
            self.load.as_ref().map(|load| &load.errors),
            self.memory.as_ref().map(|memory| &memory.errors),
        ];
        errors
            .into_iter()
            .flatten()
            .all(|errors| errors.not_ok == 0 && errors.unanswered == 0)
    }

    /// The human-readable results, for stdout.
    pub(super) fn text(&self) -> String {
        let mut out = String::new();
        if let Some(load) = &self.load {
            out += &format!(
                "round trips:  {} in {:.1} s = {:.0}/s ({} group)\n",
                load.round_trips, load.seconds, load.round_trips_per_second, load.group_round_trips
            );
            let from = match load.rate {
                Some(rate) => format!("open loop at {rate:.0}/s, from the scheduled send"),
                None => "closed loop".to_owned(),
            };
            out += &format!(
                "latency:      {}   ({from})\n",
                percentiles(&load.latency_ms)
            );
            if let Some(lag) = &load.send_lag_ms {
                out += &format!("send lag:     {}\n", percentiles(lag));
            }
            out += &errors(&load.errors);
            if let Some(cpu) = load.server_cpu_seconds_per_100k {
                out += &format!("server CPU:   {cpu:.3} s per 100k round trips");
                if let Some(system) = load.server_system_cpu_seconds_per_100k {
                    out += &format!(" ({system:.3} of it in the kernel)");
                }
                out += "\n";
            }
            out += &format!("generator:    {:.2} cores busy\n", load.generator_cores);
        }
        if let Some(memory) = &self.memory {
            let mib = |kib: u64| kib as f64 / 1024.0;
            out += &format!(
                "memory:       {:.1} MiB at rest, {:.1} MiB with {} idle connections, {:.1} MiB after {} conversations\n",
                mib(memory.rss_kib.baseline),
                mib(memory.rss_kib.idle_connections_open),
                memory.idle_connections,
                mib(memory.rss_kib.conversations_done),
                memory.conversations,
            );
            out += &format!(
                "per idle connection: {:.2} KiB   per conversation: {:.2} KiB\n",
                memory.kib_per_idle_connection, memory.kib_per_conversation
            );
            out += &errors(&memory.errors);
        }
        out
    }
}

fn percentiles(p: &Percentiles) -> String {
    format!(
        "p50 {:.3} ms   p99 {:.3} ms   p99.9 {:.3} ms   max {:.3} ms",
        p.p50, p.p99, p.p999, p.max
    )
}

fn errors(errors: &Errors) -> String {
    format!(
        "errors:       {} not ok, {} unanswered\n",
        errors.not_ok, errors.unanswered
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_per_item_is_the_growth_over_the_count() {
        let memory = Memory::new(
            1000,
            Rss {
                baseline: 10_000,
                idle_connections_open: 22_000,
                conversations_warm: 24_000,
                conversations_done: 24_500,
            },
            Errors::default(),
        );
        assert_eq!(memory.kib_per_idle_connection, 12.0);
        assert_eq!(memory.kib_per_conversation, 0.5);
        // Memory can shrink between readings (the allocator returned some): shown, not hidden.
        let shrunk = Memory::new(
            10,
            Rss {
                baseline: 100,
                idle_connections_open: 90,
                conversations_warm: 90,
                conversations_done: 90,
            },
            Errors::default(),
        );
        assert_eq!(shrunk.kib_per_idle_connection, -1.0);
    }
}
