//! Round tick positions and labels, and time to pixels.

/// The round step (1, 2, 2.5 or 5 times a power of ten) closest to `target` intervals over
/// `lo..=hi`.
pub(super) fn tick_step(lo: f64, hi: f64, target: usize) -> f64 {
    let raw = (hi - lo).max(f64::EPSILON) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|f| f * mag)
        .min_by(|a, b| (a / raw).ln().abs().total_cmp(&(b / raw).ln().abs()))
        .unwrap_or(mag)
}

/// The multiples of `step` in `lo..=hi`.
pub(super) fn ticks_of(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// Round tick positions covering `lo..=hi` with about `target` intervals; their step too.
pub(super) fn ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, f64) {
    let step = tick_step(lo, hi, target);
    (ticks_of(lo, hi, step), step)
}

/// A tick's label with as many decimals as its step needs.
pub(super) fn tick_label(v: f64, step: f64) -> String {
    let decimals = (0..6)
        .find(|d| {
            let scaled = step * 10f64.powi(*d);
            (scaled - scaled.round()).abs() < 1e-6 * scaled.max(1.0)
        })
        .unwrap_or(6) as usize;
    let text = format!("{v:.decimals$}");
    if text
        .trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        "0".into()
    } else {
        text
    }
}

/// The pixel column of time `t` on an axis from `lo..hi` drawn from pixel `left` to `right`.
pub(super) fn x_pixel(t: f64, (lo, hi): (f64, f64), (left, right): (i32, i32)) -> i32 {
    left + ((t - lo) / (hi - lo) * f64::from(right - left)).round() as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        let (t, step) = ticks(0.0, 315.0, 6);
        assert_eq!(step, 50.0);
        assert_eq!(t, vec![0.0, 50.0, 100.0, 150.0, 200.0, 250.0, 300.0]);
        let (t, step) = ticks(-0.1, 3.6, 7);
        assert_eq!(step, 0.5);
        assert_eq!(t.first(), Some(&0.0));
        assert_eq!(tick_label(2.5, 0.5), "2.5");
        assert_eq!(tick_label(0.25, 0.25), "0.25");
        assert_eq!(tick_label(300.0, 50.0), "300");
        assert_eq!(tick_label(-0.0, 0.5), "0");
    }
}
