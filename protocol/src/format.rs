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

/// Grams of CO2e for people: `850 g`, `12.4 kg`, `3.21 t` (the accounting's figures and the
/// user's report's estimate alike).
pub fn co2e(grams: f64) -> String {
    let g = grams.abs();
    if g >= 1e6 {
        format!("{:.2} t", grams / 1e6)
    } else if g >= 1e3 {
        format!("{:.2} kg", grams / 1e3)
    } else {
        format!("{grams:.1} g")
    }
}

/// A utilisation in percent, as people read it: `37 %`, `0.4 %` under 1 %.
pub fn util_pct(pct: f64) -> String {
    if pct < 1.0 && pct > 0.0 {
        format!("{pct:.1} %")
    } else {
        format!("{pct:.0} %")
    }
}

/// A number of bytes in binary units: `3.0 GiB`, `512 MiB`.
pub fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", b / (1u64 << 20) as f64)
    }
}

const NOT_REPORTED: &str = "not reported";

/// A threshold in percent: `5 %`, `2.5 %`.
fn threshold_pct(pct: f64) -> String {
    if pct.fract() == 0.0 {
        format!("{pct:.0} %")
    } else {
        format!("{pct} %")
    }
}

/// A GPU's activity and health over a job in three lines (activity, throttling, errors); what
/// the GPU or driver does not report is named as such, never shown as 0.
pub fn gpu_efficiency(e: &crate::GpuEfficiency) -> [String; 3] {
    let mut shown = Vec::new();
    let mut missing = Vec::new();
    let mut part = |name: &'static str, v: Option<String>| match v {
        Some(v) => shown.push(v),
        None => missing.push(name),
    };
    part(
        "SM utilisation",
        e.sm_util_avg_pct
            .map(|u| format!("average SM utilisation {}", util_pct(u))),
    );
    part(
        "memory used",
        e.memory_used_max_bytes
            .map(|b| format!("memory used at most {}", bytes(b))),
    );
    part(
        "temperature",
        e.temperature_max_c
            .map(|c| format!("temperature at most {c} °C")),
    );
    part(
        "SM clock",
        e.sm_clock_avg_mhz
            .map(|c| format!("average SM clock {c:.0} MHz")),
    );
    part(
        "memory clock",
        e.mem_clock_avg_mhz
            .map(|c| format!("average memory clock {c:.0} MHz")),
    );
    let mut activity = shown.join(", ");
    if !missing.is_empty() {
        if !activity.is_empty() {
            activity.push_str("; ");
        }
        activity.push_str(&format!("{NOT_REPORTED}: {}", missing.join(", ")));
    }
    if e.partial {
        activity.push_str(&format!(
            " (partial: sampled {} of the job)",
            duration(e.sampled_s)
        ));
    }
    let reported = e.throttle_s.reported();
    let throttled = if reported.is_empty() {
        format!("throttling {NOT_REPORTED}")
    } else {
        let total: f64 = reported.iter().map(|(_, v)| v).sum();
        let parts: Vec<String> = reported
            .iter()
            .map(|(n, v)| format!("{} {}", n.replace('_', " "), duration(*v)))
            .collect();
        format!("throttled {} ({})", duration(total), parts.join(", "))
    };
    let ecc = match (e.ecc_corrected, e.ecc_uncorrected) {
        (None, None) => format!("ECC errors {NOT_REPORTED}"),
        (c, u) => {
            let n = |v: Option<u64>| v.map_or_else(|| NOT_REPORTED.to_owned(), |v| v.to_string());
            format!("ECC errors {} corrected, {} uncorrected", n(c), n(u))
        }
    };
    let xids = match (&e.xid_count, &e.xids) {
        (None, _) | (_, None) => format!("Xid events {NOT_REPORTED}"),
        (Some(0), _) => "no Xid event".to_owned(),
        (Some(n), Some(list)) => {
            let ids: Vec<String> = list.iter().map(|x| x.xid.to_string()).collect();
            format!("{n} Xid event(s): {}", ids.join(", "))
        }
    };
    [activity, throttled, format!("{ecc}; {xids}")]
}

/// What the job's idle allocated GPUs cost: one line per idle GPU (`gpu2: 1 % average SM
/// utilisation, 412 kJ spent idle`) and a last line with their share of the job's energy;
/// empty when no GPU sat idle. `gpus` are `(name, efficiency, energy)`.
pub fn idle_gpus<'a>(
    gpus: impl IntoIterator<Item = (String, &'a crate::GpuEfficiency, Option<f64>)>,
    job_energy_j: f64,
) -> Vec<String> {
    let mut lines = Vec::new();
    let mut idle_j = 0.0;
    let mut threshold = None;
    for (name, e, energy) in gpus {
        if e.idle != Some(true) {
            continue;
        }
        threshold = Some(e.idle_threshold_pct);
        idle_j += energy.unwrap_or(0.0);
        lines.push(format!(
            "{name}: {} average SM utilisation, {} spent idle",
            e.sm_util_avg_pct
                .map_or_else(|| NOT_REPORTED.to_owned(), util_pct),
            energy.map_or_else(|| "energy not measured".to_owned(), self::energy)
        ));
    }
    if let Some(t) = threshold {
        let share = if job_energy_j > 0.0 {
            format!(" ({})", percent(idle_j / job_energy_j))
        } else {
            String::new()
        };
        lines.push(format!(
            "{} of the job's {}{share} went to allocated GPUs that sat idle (average SM utilisation below {})",
            energy(idle_j),
            energy(job_energy_j),
            threshold_pct(t)
        ));
    }
    lines
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
