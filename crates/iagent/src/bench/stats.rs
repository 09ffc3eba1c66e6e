//! Latency percentiles, by the nearest-rank method: every figure reported is a latency that was
//! actually measured, never an interpolation between two.

use serde::Serialize;

/// p50, p99, p99.9 and the maximum of a set of samples, in milliseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
pub(super) struct Percentiles {
    pub(super) p50: f64,
    pub(super) p99: f64,
    pub(super) p999: f64,
    pub(super) max: f64,
}

impl Percentiles {
    /// The percentiles of samples in microseconds; all zero when there are none.
    pub(super) fn of_micros(mut samples: Vec<u32>) -> Self {
        samples.sort_unstable();
        let at = |q: f64| {
            samples
                .get(rank(samples.len(), q))
                .map_or(0.0, |us| f64::from(*us) / 1000.0)
        };
        Self {
            p50: at(0.5),
            p99: at(0.99),
            p999: at(0.999),
            max: at(1.0),
        }
    }
}

/// The index, in `len` sorted samples, of the smallest sample that at least a share `q` of all
/// samples do not exceed (the nearest rank, `ceil(q * len)`, counted from 1).
fn rank(len: usize, q: f64) -> usize {
    ((q * len as f64).ceil() as usize)
        .saturating_sub(1)
        .min(len.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_ranks_of_the_samples() {
        // 1..=1000 µs, shuffled: the sort is the function's job.
        let samples: Vec<u32> = (1..=1000).map(|i| (i * 7919) % 1000 + 1).collect();
        let p = Percentiles::of_micros(samples);
        assert_eq!(
            p,
            Percentiles {
                p50: 0.5,
                p99: 0.99,
                p999: 0.999,
                max: 1.0
            }
        );
    }

    #[test]
    fn a_single_slow_sample_shows_in_the_tail_only_when_it_is_that_rare() {
        let mut samples = vec![100; 999];
        samples.push(50_000);
        let p = Percentiles::of_micros(samples);
        assert_eq!((p.p50, p.p99, p.p999, p.max), (0.1, 0.1, 0.1, 50.0));
        let mut samples = vec![100; 99];
        samples.push(50_000);
        let p = Percentiles::of_micros(samples);
        assert_eq!((p.p99, p.p999), (0.1, 50.0));
    }

    #[test]
    fn few_or_no_samples_give_real_samples_or_zeros() {
        assert_eq!(Percentiles::of_micros(Vec::new()), Percentiles::default());
        let p = Percentiles::of_micros(vec![3000]);
        assert_eq!((p.p50, p.p99, p.p999, p.max), (3.0, 3.0, 3.0, 3.0));
        let p = Percentiles::of_micros(vec![2000, 1000]);
        assert_eq!((p.p50, p.max), (1.0, 2.0));
    }
}
