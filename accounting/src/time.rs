//! Times as people give them to `ergon` (`--since`, `--until`, series files) and as it prints
//! them: UTC, no time-zone database. A leaf: the records database, the summaries and the carbon
//! factors all use it.

/// A time for `ergon jobs --since/--until`, as Unix ns: `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM` or
/// `YYYY-MM-DDTHH:MM:SS` (UTC; a space may stand for the `T`), or `@SECONDS` since the epoch.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{s:?} is not a time: give YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS] (UTC) or @UNIX_SECONDS"
        )
    };
    if let Some(secs) = s.strip_prefix('@') {
        return secs
            .parse::<u64>()
            .ok()
            .and_then(|v| v.checked_mul(1_000_000_000))
            .ok_or_else(bad);
    }
    let (date, time) = match s.split_once(['T', ' ']) {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let num = |p: &str, lo: i64, hi: i64| -> Result<i64, String> {
        let all_digits = !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        p.parse::<i64>()
            .ok()
            .filter(|v| all_digits && (lo..=hi).contains(v))
            .ok_or_else(bad)
    };
    let d: Vec<&str> = date.split('-').collect();
    let [y, m, day] = d[..] else {
        return Err(bad());
    };
    let (y, m, day) = (num(y, 1970, 9999)?, num(m, 1, 12)?, num(day, 1, 31)?);
    let (mut hh, mut mm, mut ss) = (0, 0, 0);
    if let Some(t) = time {
        let t: Vec<&str> = t.trim_end_matches('Z').split(':').collect();
        match t[..] {
            [h, mi] => (hh, mm) = (num(h, 0, 23)?, num(mi, 0, 59)?),
            [h, mi, se] => (hh, mm, ss) = (num(h, 0, 23)?, num(mi, 0, 59)?, num(se, 0, 60)?),
            _ => return Err(bad()),
        }
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs)
        .map(|s| s * 1_000_000_000)
        .map_err(|_| bad())
}

/// `YYYY-MM-DDTHH:MM:SSZ` of Unix ns.
pub fn format_time(unix_ns: u64) -> String {
    let secs = (unix_ns / 1_000_000_000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
