//! What the binary's tests share: the binary's path, how long to wait, and a reader of a child
//! process's output lines.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::Duration;

/// The `iagent` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_iagent");
/// How long any one wait (start-up, a line, an exit) may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// Lines of a child's stream, as they come, and all of them read so far.
pub struct Lines {
    incoming: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    pub fn of(stream: impl std::io::Read + Send + 'static) -> Self {
        let (tx, incoming) = mpsc::channel();
        std::thread::spawn(move || {
            // Read to the end even after the receiver is gone, so that the child never blocks on
            // a full pipe; lines nobody waits for any more are dropped.
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                tx.send(line).ok();
            }
        });
        Self {
            incoming,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str) -> String {
        loop {
            let line = self
                .incoming
                .recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("no line with {needle:?}"));
            self.seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// The lines read so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Every line, once the process has exited.
    pub fn all(mut self) -> Vec<String> {
        self.read_rest();
        self.seen
    }

    /// Every line, once the process has exited, joined: for the message of a failed check on
    /// how it exited, which says nothing of why without them.
    pub fn text(&mut self) -> String {
        self.read_rest().join("\n")
    }

    /// Reads the lines left until the process's output ends; returns every line.
    fn read_rest(&mut self) -> &[String] {
        self.seen.extend(self.incoming.iter());
        &self.seen
    }
}
