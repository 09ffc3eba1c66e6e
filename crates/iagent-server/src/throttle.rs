//! Slowing down token guessing: an address whose upgrades failed authentication too often within
//! a window is refused (429) until the window ends, before its token is even looked up.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::apps::lock;

/// Authentication failures per address within a window.
#[derive(Debug)]
pub(crate) struct AuthThrottle {
    limit: u32,
    window: Duration,
    max_tracked: usize,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    since: Instant,
}

impl AuthThrottle {
    /// Blocks an address after `limit` failures within `window`; tracks at most `max_tracked`
    /// addresses, so a flood from many addresses cannot grow the table without bound.
    pub(crate) fn new(limit: u32, window: Duration, max_tracked: usize) -> Self {
        Self {
            limit,
            window,
            max_tracked,
            failures: Mutex::default(),
        }
    }

    /// How long `addr` must wait, if it is blocked.
    pub(crate) fn blocked(&self, addr: IpAddr) -> Option<Duration> {
        self.blocked_at(addr, Instant::now())
    }

    /// Records a failed authentication from `addr`.
    pub(crate) fn failed(&self, addr: IpAddr) {
        self.failed_at(addr, Instant::now());
    }

    fn blocked_at(&self, addr: IpAddr, now: Instant) -> Option<Duration> {
        let failures = *lock(&self.failures).get(&addr)?;
        let elapsed = now.saturating_duration_since(failures.since);
        (failures.count >= self.limit && elapsed < self.window).then(|| self.window - elapsed)
    }

    fn failed_at(&self, addr: IpAddr, now: Instant) {
        let mut table = lock(&self.failures);
        if !table.contains_key(&addr) && table.len() >= self.max_tracked {
            let window = self.window;
            table.retain(|_, failures| now.saturating_duration_since(failures.since) < window);
            if table.len() >= self.max_tracked {
                // Every tracked address is still within its window: the newest ones go
                // untracked until some expire, rather than the table growing.
                tracing::warn!(
                    tracked = table.len(),
                    "auth failure table full; address not tracked"
                );
                return;
            }
        }
        let failures = table.entry(addr).or_insert(Failures {
            count: 0,
            since: now,
        });
        if now.saturating_duration_since(failures.since) >= self.window {
            *failures = Failures {
                count: 0,
                since: now,
            };
        }
        failures.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn an_address_is_blocked_after_its_limit_until_the_window_ends() {
        let throttle = AuthThrottle::new(3, Duration::from_secs(60), 100);
        let start = Instant::now();
        for _ in 0..2 {
            throttle.failed_at(A, start);
        }
        assert_eq!(throttle.blocked_at(A, start), None, "under the limit");
        throttle.failed_at(A, start);
        assert_eq!(
            throttle.blocked_at(A, start + Duration::from_secs(10)),
            Some(Duration::from_secs(50))
        );
        assert_eq!(
            throttle.blocked_at(B, start),
            None,
            "other addresses are not affected"
        );
        assert_eq!(
            throttle.blocked_at(A, start + Duration::from_secs(60)),
            None,
            "the window ended"
        );
        throttle.failed_at(A, start + Duration::from_secs(61));
        assert_eq!(
            throttle.blocked_at(A, start + Duration::from_secs(61)),
            None,
            "a new window starts"
        );
    }

    #[test]
    fn the_table_is_bounded() {
        let throttle = AuthThrottle::new(1, Duration::from_secs(60), 1);
        let start = Instant::now();
        throttle.failed_at(A, start);
        throttle.failed_at(B, start);
        assert!(throttle.blocked_at(A, start).is_some());
        assert_eq!(
            throttle.blocked_at(B, start),
            None,
            "not tracked while the table is full"
        );
        throttle.failed_at(B, start + Duration::from_secs(61));
        assert!(
            throttle
                .blocked_at(B, start + Duration::from_secs(61))
                .is_some(),
            "expired entries make room"
        );
    }
}
