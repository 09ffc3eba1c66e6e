//! The one-line progress display on stderr: elapsed and total time, round trips so far, the
//! current rate and the errors, a few times a second. Shown when stderr is a terminal (redrawn
//! in place) or when asked for (one line per update, for logs); never on stdout, which carries
//! only the results.

use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Counters;

/// How often the line is updated.
const EVERY: Duration = Duration::from_millis(250);

/// Where the line goes, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Progress {
    Hidden,
    /// Redrawn in place with `\r`.
    Terminal,
    /// A new line per update: stderr is a file or a pipe and the user asked for it.
    Lines,
}

impl Progress {
    /// In place on a terminal, as lines elsewhere if `asked`, else nothing.
    pub(super) fn new(asked: bool) -> Self {
        if std::io::stderr().is_terminal() {
            Self::Terminal
        } else if asked {
            Self::Lines
        } else {
            Self::Hidden
        }
    }

    /// Waits until `until`, updating the line meanwhile. `start` and `total` are those of the
    /// whole run, warm-up included.
    pub(super) async fn wait(
        self,
        counters: &Counters,
        start: Instant,
        total: Duration,
        until: Instant,
    ) {
        let mut last = (Instant::now(), counters.replies.load(Ordering::Relaxed));
        loop {
            let now = Instant::now();
            if now >= until {
                return;
            }
            tokio::time::sleep(EVERY.min(until - now)).await;
            if self == Self::Hidden {
                continue;
            }
            let (now, replies) = (Instant::now(), counters.replies.load(Ordering::Relaxed));
            let interval = now.duration_since(last.0).as_secs_f64();
            let rate = if interval > 0.0 {
                (replies - last.1) as f64 / interval
            } else {
                0.0
            };
            last = (now, replies);
            let text = line(
                now.duration_since(start),
                total,
                replies,
                rate,
                counters.not_ok.load(Ordering::Relaxed),
            );
            let mut stderr = std::io::stderr().lock();
            // A progress line that cannot be written is not worth failing the run for.
            match self {
                Self::Terminal => write!(stderr, "\r{text}\x1b[K").ok(),
                Self::Lines => writeln!(stderr, "{text}").ok(),
                Self::Hidden => None,
            };
            stderr.flush().ok();
        }
    }

    /// Removes the line from the terminal before the results are printed.
    pub(super) fn finish(self) {
        if self == Self::Terminal {
            eprint!("\r\x1b[K");
        }
    }
}

/// The text of one update.
fn line(elapsed: Duration, total: Duration, replies: u64, rate: f64, errors: u64) -> String {
    format!(
        "  {:5.1}/{:.1} s  {replies:>10} round trips  {rate:>9.0}/s  {errors} errors",
        elapsed.as_secs_f64(),
        total.as_secs_f64(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_time_round_trips_rate_and_errors() {
        let text = line(
            Duration::from_millis(3_300),
            Duration::from_secs(10),
            123_456,
            23_456.4,
            2,
        );
        assert_eq!(
            text,
            "    3.3/10.0 s      123456 round trips      23456/s  2 errors"
        );
    }
}
