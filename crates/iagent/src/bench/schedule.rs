//! The open loop's fixed schedule, and the thread that keeps it.
//!
//! Message `k`, counted over the whole pool, is due `k / rate` seconds after the start and goes
//! out on connection `k % connections`, whatever the responses do. Its latency is measured from
//! that due time, not from when it was actually written: a server that falls behind makes the
//! messages waiting behind it late, and that lateness is part of what a user sees (measuring
//! from the write would hide it, the "coordinated omission" of closed-loop generators).

use std::path::Path;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

/// One message the schedule asks a connection to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tick {
    /// The message's number on its connection.
    pub(super) seq: u64,
    /// When it was due: its latency is measured from here.
    pub(super) due: Instant,
    /// Whether it was due inside the measured window (after the warm-up).
    pub(super) measured: bool,
}

/// A total rate spread round-robin over a pool of connections.
#[derive(Debug, Clone, Copy)]
pub(super) struct Schedule {
    rate: f64,
    connections: usize,
}

impl Schedule {
    /// `rate` messages per second in total over `connections`; both must be positive.
    pub(super) fn new(rate: f64, connections: usize) -> Self {
        Self { rate, connections }
    }

    /// When message `index` is due, counted from the start. Computed from the index each time,
    /// never by adding intervals up, so rounding cannot drift the rate over a long run.
    pub(super) fn due(&self, index: u64) -> Duration {
        Duration::from_nanos((index as f64 * 1e9 / self.rate).round() as u64)
    }

    /// The connection that carries message `index`, and the message's number on it.
    pub(super) fn place(&self, index: u64) -> (usize, u64) {
        let connections = self.connections as u64;
        ((index % connections) as usize, index / connections)
    }

    /// The first message due at or after `offset`: the warm-up's messages are those before
    /// `first_due_at(warmup)`, the run's those before `first_due_at(warmup + duration)`.
    pub(super) fn first_due_at(&self, offset: Duration) -> u64 {
        let mut index = (offset.as_secs_f64() * self.rate).floor() as u64;
        // The estimate can be one off either way after rounding; settle it against `due`.
        while index > 0 && self.due(index - 1) >= offset {
            index -= 1;
        }
        while self.due(index) < offset {
            index += 1;
        }
        index
    }
}

/// Keeps the schedule on a thread of its own, from `start` for `warmup + duration`, handing
/// each message to its connection's writer; the writers' queues close when it ends.
///
/// A thread, not a tokio timer: tokio's timer wheel has millisecond resolution, which would add
/// up to a millisecond of the generator's own lateness to every latency measured from the
/// schedule. A sleeping thread wakes within tens of microseconds of the due time, once its
/// timer slack is taken away ([`tighten_timer_slack`]). It stops early if `stop` sends (or is
/// dropped), or if every writer has gone.
pub(super) fn keep(
    schedule: Schedule,
    start: Instant,
    warmup: Duration,
    duration: Duration,
    writers: Vec<UnboundedSender<Tick>>,
    stop: std::sync::mpsc::Receiver<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if let Err(err) = tighten_timer_slack() {
            eprintln!(
                "the schedule's sleeps keep the kernel's timer slack ({err}): latencies include up to its 50 µs more of the generator's own lateness"
            );
        }
        let first_measured = schedule.first_due_at(warmup);
        let end = schedule.first_due_at(warmup + duration);
        let mut open = writers.len();
        let mut writers: Vec<Option<UnboundedSender<Tick>>> =
            writers.into_iter().map(Some).collect();
        for index in 0..end {
            let due = start + schedule.due(index);
            let wait = due.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                match stop.recv_timeout(wait) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            let (connection, seq) = schedule.place(index);
            let Some(writer) = writers.get_mut(connection) else {
                continue;
            };
            let tick = Tick {
                seq,
                due,
                measured: index >= first_measured,
            };
            if writer.as_ref().is_some_and(|w| w.send(tick).is_err()) {
                // That connection failed; the others go on with their share.
                *writer = None;
                open -= 1;
                if open == 0 {
                    return;
                }
            }
        }
    })
}

/// Lets the calling thread's sleeps end as close to their deadline as the kernel can, instead
/// of up to its default timer slack of 50 µs later, which it takes to wake threads together.
/// With that slack the schedule's thread woke 78 µs after a message's due time at the median
/// and 271 µs at the p99, lateness that every latency measured from the schedule carried for
/// whichever server was measured (`BENCHMARKS.md`). A thread may set its own slack through
/// `/proc/TID/timerslack_ns` (Linux 4.6 and later), which needs no privilege and no unsafe code.
fn tighten_timer_slack() -> std::io::Result<()> {
    // `/proc/thread-self` links to `PID/task/TID`; `/proc/TID` is that thread's own directory.
    let thread = std::fs::read_link("/proc/thread-self")?;
    let tid = thread
        .file_name()
        .ok_or_else(|| std::io::Error::other("/proc/thread-self names no thread"))?;
    std::fs::write(Path::new("/proc").join(tid).join("timerslack_ns"), "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_due_at_exact_multiples_of_the_interval() {
        let schedule = Schedule::new(10_000.0, 8);
        assert_eq!(schedule.due(0), Duration::ZERO);
        assert_eq!(schedule.due(1), Duration::from_micros(100));
        assert_eq!(schedule.due(10_000), Duration::from_secs(1));
        // Far into a long run: no drift from summing intervals.
        assert_eq!(schedule.due(36_000_000), Duration::from_secs(3600));
        let odd = Schedule::new(3.0, 1);
        assert_eq!(odd.due(1), Duration::from_nanos(333_333_333));
        assert_eq!(odd.due(3), Duration::from_secs(1));
    }

    /// The slack of the thread reading it, as the kernel has it.
    fn own_timer_slack() -> String {
        let thread = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
        let tid = thread.file_name().expect("a thread id");
        std::fs::read_to_string(Path::new("/proc").join(tid).join("timerslack_ns"))
            .expect("the thread's timer slack")
    }

    #[test]
    fn the_schedule_thread_takes_its_own_timer_slack_away_and_no_other_threads() {
        let before = own_timer_slack();
        let (set, after) = std::thread::spawn(|| (tighten_timer_slack(), own_timer_slack()))
            .join()
            .expect("the thread ran");
        set.expect("the slack is set");
        assert_eq!(after.trim(), "1");
        assert_eq!(own_timer_slack(), before, "another thread's slack changed");
    }

    #[test]
    fn due_times_never_go_backwards() {
        let schedule = Schedule::new(7_777.7, 3);
        for index in 0..100_000 {
            assert!(schedule.due(index) <= schedule.due(index + 1), "{index}");
        }
    }

    #[test]
    fn connections_take_turns_and_number_their_own_messages() {
        let schedule = Schedule::new(100.0, 3);
        let places: Vec<_> = (0..7).map(|i| schedule.place(i)).collect();
        assert_eq!(
            places,
            [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (0, 2)]
        );
    }

    #[test]
    fn a_window_holds_rate_times_its_length_messages() {
        let schedule = Schedule::new(10_000.0, 8);
        let warmup = Duration::from_secs(2);
        let end = warmup + Duration::from_secs(8);
        assert_eq!(schedule.first_due_at(Duration::ZERO), 0);
        assert_eq!(schedule.first_due_at(warmup), 20_000);
        assert_eq!(
            schedule.first_due_at(end) - schedule.first_due_at(warmup),
            80_000
        );
        // A rate whose interval is not a whole number of nanoseconds.
        let odd = Schedule::new(3.0, 2);
        assert_eq!(odd.first_due_at(Duration::from_secs(1)), 3);
        assert_eq!(odd.first_due_at(Duration::from_nanos(333_333_334)), 2);
        for index in 0..1000 {
            assert_eq!(odd.first_due_at(odd.due(index)), index);
        }
    }

    #[test]
    fn the_thread_hands_every_message_to_its_connection_and_marks_the_measured_ones() {
        let schedule = Schedule::new(2_000.0, 2);
        let (tx0, mut rx0) = tokio::sync::mpsc::unbounded_channel();
        let (tx1, mut rx1) = tokio::sync::mpsc::unbounded_channel();
        let (_stop, stop) = std::sync::mpsc::channel();
        let start = Instant::now();
        keep(
            schedule,
            start,
            Duration::from_millis(10),
            Duration::from_millis(20),
            vec![tx0, tx1],
            stop,
        )
        .join()
        .expect("the schedule thread ends");
        // (pool-wide index, tick) of every message, from the connection it was handed to.
        let mut ticks = Vec::new();
        while let Ok(tick) = rx0.try_recv() {
            ticks.push((tick.seq * 2, tick));
        }
        while let Ok(tick) = rx1.try_recv() {
            ticks.push((tick.seq * 2 + 1, tick));
        }
        ticks.sort_by_key(|(index, _)| *index);
        // 30 ms at 2 per ms; the first 10 ms are the warm-up.
        assert_eq!(ticks.len(), 60);
        assert_eq!(ticks.iter().filter(|(_, t)| t.measured).count(), 40);
        for (i, (index, tick)) in ticks.iter().enumerate() {
            assert_eq!(*index, i as u64, "each message once, on its connection");
            assert_eq!(tick.due, start + schedule.due(i as u64));
            assert_eq!(tick.measured, i >= 20);
        }
        assert!(start.elapsed() >= schedule.due(59), "sent no message early");
    }
}
