//! What the benchmark reads about the server process from `/proc`: its CPU time
//! (`/proc/PID/stat`) and its resident memory (`/proc/PID/status`).

use anyhow::{Context, bail};

/// CPU time a process spent, in seconds: in its own code and in the kernel on its behalf.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct CpuTime {
    pub(super) user: f64,
    pub(super) system: f64,
}

impl CpuTime {
    pub(super) fn total(self) -> f64 {
        self.user + self.system
    }
}

impl std::ops::Sub for CpuTime {
    type Output = Self;

    fn sub(self, earlier: Self) -> Self {
        Self {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }
}

/// The process's user and system CPU time.
pub(super) fn cpu_time(pid: u32) -> anyhow::Result<CpuTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("no process {pid}"))?;
    parse_cpu_time(&stat).with_context(|| format!("unexpected /proc/{pid}/stat: {stat}"))
}

/// The process's resident set size (`VmRSS`), in KiB.
pub(super) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("no process {pid}"))?;
    parse_rss_kib(&status).with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// utime and stime from the text of `/proc/PID/stat`, in seconds.
fn parse_cpu_time(stat: &str) -> anyhow::Result<CpuTime> {
    // Fields after the command name, which may hold spaces and parentheses itself: it ends at
    // the last ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        bail!("no command name");
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of proc(5), i.e. 11 and 12 after the name.
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("too few fields")?
            .parse::<u64>()
            .context("a CPU time is not a number")? as f64)
    };
    Ok(CpuTime {
        user: ticks(11)? / CLOCK_TICKS_PER_SECOND,
        system: ticks(12)? / CLOCK_TICKS_PER_SECOND,
    })
}

/// USER_HZ, the unit of the CPU times in `/proc`: the kernel's ABI fixes it at 100.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// The `VmRSS:` line of `/proc/PID/status`, in KiB.
fn parse_rss_kib(status: &str) -> anyhow::Result<u64> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .context("no VmRSS line")?;
    let kib = line.trim().trim_end_matches("kB").trim();
    kib.parse().context("VmRSS is not a number")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_utime_and_stime_even_after_an_odd_command_name() {
        let stat = "4242 (iagent (x) y) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 9 0 \
                    100 200000000 3000 18446744073709551615";
        let time = parse_cpu_time(stat).expect("parses");
        assert_eq!((time.user, time.system, time.total()), (2.5, 0.75, 3.25));
        assert!(parse_cpu_time("4242 (iagent) S 1").is_err());
    }

    #[test]
    fn rss_is_read_from_its_line_in_kib() {
        let status =
            "Name:\tiagent\nVmPeak:\t  900000 kB\nVmRSS:\t   11368 kB\nRssAnon:\t 5000 kB\n";
        assert_eq!(parse_rss_kib(status).expect("parses"), 11_368);
        assert!(parse_rss_kib("Name:\tkthreadd\n").is_err());
    }

    #[test]
    fn this_process_can_be_read() {
        let pid = std::process::id();
        assert!(rss_kib(pid).expect("own status") > 0);
        assert!(cpu_time(pid).expect("own stat").total() >= 0.0);
    }
}
