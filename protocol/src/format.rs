//! How every part shows an energy, a power, a duration and a fraction to people: ergond's
//! `--energy-report`, `ergon report` and `ergon plot` all call these, so the same job reads the
//! same everywhere. (Machine-readable outputs — manifests, records, JSON — carry the numbers
//! themselves.)
//!
//! ```
//! use ergon_protocol::format;
//! assert_eq!(format::energy(1751.868), "1.75 kJ");
//! assert_eq!(format::power(189.24), "189.2 W");
//! assert_eq!(format::duration(65.0), "1 min 5 s");
//! assert_eq!(format::percent(0.997), "99.7%");
//! ```

/// An energy with a unit chosen for it and three significant digits: `751 J`, `1.80 kJ`,
/// `12.5 MJ`, `3.20 GJ`; below 1 J two decimals (`0.50 J`); `n/a` for a value that is not
/// finite.
pub fn energy(joules: f64) -> String {
    if !joules.is_finite() {
        return "n/a".into();
    }
    if joules == 0.0 {
        return "0 J".into();
    }
    let sign = if joules < 0.0 { "-" } else { "" };
    let j = joules.abs();
    const UNITS: [(&str, f64); 5] = [
        ("J", 1.0),
        ("kJ", 1e3),
        ("MJ", 1e6),
        ("GJ", 1e9),
        ("TJ", 1e12),
    ];
    for (i, (unit, factor)) in UNITS.iter().enumerate() {
        let v = j / factor;
        let decimals = if v >= 99.95 {
            0
        } else if v >= 9.995 {
            1
        } else {
            2
        };
        let text = format!("{v:.decimals$}");
        // Rounding may reach 1000 (999.7 J → "1000"): that is the next unit's "1.00".
        let rounded: f64 = text.parse().unwrap_or(v);
        if rounded < 1000.0 || i == UNITS.len() - 1 {
            return format!("{sign}{text} {unit}");
        }
    }
    unreachable!("the last unit always returns")
}

/// A power in watts with one decimal: `189.2 W`.
pub fn power(watts: f64) -> String {
    format!("{watts:.1} W")
}

/// A duration, rounded to what a person reads: `9.5 s` under a minute, `1 min 5 s` under an
/// hour, `2 h 05 min` beyond.
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 59.95 {
        format!("{s:.1} s")
    } else if s < 3599.5 {
        let s = s.round() as u64;
        format!("{} min {} s", s / 60, s % 60)
    } else {
        let m = (s / 60.0).round() as u64;
        format!("{} h {:02} min", m / 60, m % 60)
    }
}

/// A fraction (0..=1) as a percentage with one decimal: `99.7%`.
pub fn percent(fraction: f64) -> String {
    format!("{:.1}%", fraction * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn energy_units() {
        assert_eq!(energy(0.0), "0 J");
        assert_eq!(energy(0.5), "0.50 J");
        assert_eq!(energy(4.2), "4.20 J");
        assert_eq!(energy(12.34), "12.3 J");
        assert_eq!(energy(751.29), "751 J");
        assert_eq!(energy(999.4), "999 J");
        assert_eq!(energy(999.7), "1.00 kJ");
        assert_eq!(energy(1800.0), "1.80 kJ");
        assert_eq!(energy(1751.868), "1.75 kJ");
        assert_eq!(energy(18_040.0), "18.0 kJ");
        assert_eq!(energy(180_400.0), "180 kJ");
        assert_eq!(energy(999_999.0), "1.00 MJ");
        assert_eq!(energy(3.6e6), "3.60 MJ");
        assert_eq!(energy(12.5e6), "12.5 MJ");
        assert_eq!(energy(6.05e10), "60.5 GJ");
        assert_eq!(energy(-1500.0), "-1.50 kJ");
        assert_eq!(energy(f64::NAN), "n/a");
        assert_eq!(energy(f64::INFINITY), "n/a");
    }

    #[test]
    fn durations_round_at_each_unit() {
        assert_eq!(duration(0.0), "0.0 s");
        assert_eq!(duration(-1.0), "0.0 s");
        assert_eq!(duration(9.54), "9.5 s");
        assert_eq!(duration(59.94), "59.9 s");
        // Never "60.0 s" nor "1 min 60 s".
        assert_eq!(duration(59.96), "1 min 0 s");
        assert_eq!(duration(65.0), "1 min 5 s");
        assert_eq!(duration(3599.4), "59 min 59 s");
        assert_eq!(duration(3599.6), "1 h 00 min");
        assert_eq!(duration(7500.0), "2 h 05 min");
    }

    #[test]
    fn power_and_percent() {
        assert_eq!(power(412.0), "412.0 W");
        assert_eq!(power(0.04), "0.0 W");
        assert_eq!(percent(1.0), "100.0%");
        assert_eq!(percent(0.905), "90.5%");
    }
}
