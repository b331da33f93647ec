//! The one percentile ergond reports: nearest rank, over the read latencies and tick lateness
//! of its sampler health (`/metrics`), `ergond probe`, and the benchmarks.

/// Nearest-rank `p`th percentile (0 < p ≤ 100) of `sorted` (ascending): the smallest value
/// with at least p % of the values at or below it; 0 when empty.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 99.9), 100);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[1, 2, 3], 0.0), 1);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
