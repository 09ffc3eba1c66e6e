//! Reconnect delays: exponential growth with full jitter, and the small PRNG that feeds it.

use std::time::Duration;

/// The delay before reconnect attempt `attempt` (0 for the first retry).
///
/// The ceiling doubles with every attempt, starting at `min` and capped at `max`; the delay is
/// drawn uniformly between `min` and that ceiling ("full jitter", so that a pool whose
/// connections all dropped at once does not come back in lockstep), using `random` in `[0, 1)`.
/// It is never below `min`, so a refusing gateway is never hammered.
///
/// ```
/// use std::time::Duration;
/// use iagent_client::backoff;
///
/// let (min, max) = (Duration::from_millis(100), Duration::from_secs(10));
/// assert_eq!(backoff(0, min, max, 0.99), min);
/// assert!(backoff(3, min, max, 0.5) <= Duration::from_millis(800));
/// assert!(backoff(40, min, max, 0.999_999) <= max);
/// ```
pub fn backoff(attempt: u32, min: Duration, max: Duration, random: f64) -> Duration {
    let max = max.max(min);
    // 2^20 times the minimum is far beyond any sensible maximum: cap the exponent so the
    // multiplication cannot overflow.
    let factor = 1u32 << attempt.min(20);
    let ceiling = min.saturating_mul(factor).min(max);
    let random = if random.is_finite() {
        random.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let spread = ceiling.saturating_sub(min);
    (min + spread.mul_f64(random)).min(ceiling)
}

/// A small seedable PRNG (SplitMix64): jitter needs spread, not cryptographic strength.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator seeded from the operating system; a fixed seed if that fails (jitter then
    /// still spreads the connections of one pool, as each has its own stream position).
    pub(crate) fn from_entropy() -> Self {
        Self::new(getrandom::u64().unwrap_or(0x9E37_79B9_7F4A_7C15))
    }

    /// The next number in `[0, 1)`.
    pub(crate) fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // The top 53 bits make an exactly representable fraction.
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    #[test]
    fn stays_within_min_and_max() {
        let mut rng = Rng::new(7);
        for attempt in 0..64 {
            for _ in 0..100 {
                let delay = backoff(attempt, MIN, MAX, rng.next_f64());
                assert!(delay >= MIN, "{delay:?} below min at attempt {attempt}");
                assert!(delay <= MAX, "{delay:?} above max at attempt {attempt}");
            }
        }
    }

    #[test]
    fn ceiling_doubles_with_each_attempt() {
        assert_eq!(backoff(0, MIN, MAX, 1.0), MIN);
        assert_eq!(backoff(1, MIN, MAX, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(2, MIN, MAX, 1.0), Duration::from_millis(400));
        assert_eq!(backoff(5, MIN, MAX, 1.0), Duration::from_millis(3_200));
        // Low draws stay near the minimum whatever the attempt.
        assert_eq!(backoff(5, MIN, MAX, 0.0), MIN);
        assert_eq!(
            backoff(3, MIN, MAX, 0.5),
            MIN + Duration::from_millis(350),
            "half way between min and the 800 ms ceiling"
        );
    }

    #[test]
    fn is_capped_at_max() {
        assert_eq!(backoff(7, MIN, MAX, 1.0), MAX);
        assert_eq!(backoff(u32::MAX, MIN, MAX, 1.0), MAX);
        assert_eq!(backoff(u32::MAX, MIN, MAX, f64::NAN), MIN);
        // A max below min is read as min.
        assert_eq!(backoff(3, MIN, Duration::ZERO, 1.0), MIN);
    }

    #[test]
    fn rng_is_seedable_and_in_range() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        for _ in 0..1_000 {
            let x = a.next_f64();
            assert_eq!(x, b.next_f64());
            assert!((0.0..1.0).contains(&x));
        }
        let mean = (0..10_000).map(|_| a.next_f64()).sum::<f64>() / 10_000.0;
        assert!((0.45..0.55).contains(&mean), "mean {mean}");
    }
}
