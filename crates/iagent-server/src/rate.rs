//! A token-bucket rate limit: up to `per_second` messages per second on average, with bursts of
//! up to one second's worth.

use std::sync::Mutex;
use std::time::Instant;

use crate::apps::lock;

/// One app's message rate limit.
#[derive(Debug)]
pub(crate) struct RateLimit {
    per_second: f64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl RateLimit {
    /// A limit of `per_second` messages per second; `None` for 0, which means unlimited.
    pub(crate) fn new(per_second: u32) -> Option<Self> {
        (per_second > 0).then(|| {
            let per_second = f64::from(per_second);
            let bucket = Bucket {
                tokens: per_second,
                refilled: Instant::now(),
            };
            Self {
                per_second,
                bucket: Mutex::new(bucket),
            }
        })
    }

    /// Takes one message's token; `false` when the app is over its rate.
    pub(crate) fn admit(&self) -> bool {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> bool {
        let mut bucket = lock(&self.bucket);
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.per_second);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The limit, for the 50 response's cause.
    pub(crate) fn per_second(&self) -> f64 {
        self.per_second
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bursts_up_to_one_second_then_refills_at_the_rate() {
        let limit = RateLimit::new(10).expect("a limit");
        let start = Instant::now();
        assert_eq!((0..15).filter(|_| limit.admit_at(start)).count(), 10);
        assert!(
            !limit.admit_at(start + Duration::from_millis(50)),
            "half a token is not one"
        );
        assert!(limit.admit_at(start + Duration::from_millis(100)));
        assert!(!limit.admit_at(start + Duration::from_millis(100)));
        let later = start + Duration::from_secs(60);
        assert_eq!(
            (0..15).filter(|_| limit.admit_at(later)).count(),
            10,
            "never more than a burst"
        );
    }

    #[test]
    fn zero_means_unlimited() {
        assert!(RateLimit::new(0).is_none());
    }
}
