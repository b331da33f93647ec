//! Slurm's host lists: `SLURM_JOB_NODELIST` as the prolog sees it (`gpu[01-03,07],login1`),
//! expanded into node names in Slurm's order.
//!
//! The forms Slurm writes: names separated by commas; a name may hold one or more bracketed
//! ranges (`n[1-3]`, `rack[1-2]-n[01-04]`, the product in order), each range a comma-separated
//! list of numbers or `lo-hi` spans whose zero padding is kept (`[08-10]` → 08, 09, 10).
//! Anything else is refused, never guessed, and the expansion is bounded by [`MAX_NODES`].

use std::fmt;

/// The most names an expansion may produce: more than any Slurm cluster has nodes.
pub const MAX_NODES: usize = 65_536;

/// Why a host list could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostlistError(String);

impl fmt::Display for HostlistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host list: {}", self.0)
    }
}

impl std::error::Error for HostlistError {}

fn err(what: impl Into<String>) -> HostlistError {
    HostlistError(what.into())
}

/// Split at the commas that are outside brackets.
fn top_level(list: &str) -> Result<Vec<&str>, HostlistError> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth == 0 => depth = 1,
            '[' => return Err(err(format!("nested '[' in {list:?}"))),
            ']' if depth == 1 => depth = 0,
            ']' => return Err(err(format!("unmatched ']' in {list:?}"))),
            ',' if depth == 0 => {
                out.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(err(format!("unclosed '[' in {list:?}")));
    }
    out.push(&list[start..]);
    Ok(out)
}

/// The numbers of one bracket, e.g. `01-03,7`, as strings with their padding.
fn range(spec: &str, budget: usize) -> Result<Vec<String>, HostlistError> {
    let mut out = Vec::new();
    for part in spec.split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let digits =
            |s: &str| !s.is_empty() && s.len() <= 9 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(lo) || !digits(hi) {
            return Err(err(format!("bad range {part:?} in [{spec}]")));
        }
        let (a, b): (u64, u64) = (lo.parse().unwrap_or(0), hi.parse().unwrap_or(0));
        if b < a {
            return Err(err(format!("range {part:?} runs backwards")));
        }
        if (b - a) as usize + out.len() >= budget {
            return Err(err(format!("more than {MAX_NODES} nodes")));
        }
        let width = lo.len();
        for n in a..=b {
            out.push(format!("{n:0width$}"));
        }
    }
    Ok(out)
}

/// Expand a host list into its node names, in order.
pub fn expand(list: &str) -> Result<Vec<String>, HostlistError> {
    let list = list.trim();
    if list.is_empty() {
        return Err(err("empty"));
    }
    let mut out: Vec<String> = Vec::new();
    for item in top_level(list)? {
        if item.is_empty() {
            return Err(err(format!("empty name in {list:?}")));
        }
        // The product of the item's literal parts and ranges, left to right.
        let mut names = vec![String::new()];
        let mut rest = item;
        while !rest.is_empty() {
            let (lit, tail) = match rest.find('[') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, ""),
            };
            for n in &mut names {
                n.push_str(lit);
            }
            if tail.is_empty() {
                break;
            }
            let close = tail
                .find(']')
                .ok_or_else(|| err(format!("unclosed '[' in {item:?}")))?;
            let nums = range(&tail[1..close], MAX_NODES)?;
            if names.len().saturating_mul(nums.len()) + out.len() > MAX_NODES {
                return Err(err(format!("more than {MAX_NODES} nodes")));
            }
            names = names
                .iter()
                .flat_map(|n| nums.iter().map(move |x| format!("{n}{x}")))
                .collect();
            rest = &tail[close + 1..];
        }
        if names
            .iter()
            .any(|n| n.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(err(format!("blank or control character in {item:?}")));
        }
        out.extend(names);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_slurms_forms_in_order() {
        let e = |s: &str| expand(s).unwrap();
        assert_eq!(e("mn1"), ["mn1"]);
        assert_eq!(e("mn[1-3]"), ["mn1", "mn2", "mn3"]);
        assert_eq!(e("mn[1,3]"), ["mn1", "mn3"]);
        assert_eq!(
            e("gpu[08-10],login1"),
            ["gpu08", "gpu09", "gpu10", "login1"]
        );
        assert_eq!(e("r[1-2]-n[1-2]"), ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]);
        assert_eq!(e("a,b[1-2],c"), ["a", "b1", "b2", "c"]);
    }

    #[test]
    fn refuses_what_is_not_a_host_list() {
        for bad in [
            "",
            "mn[1-",
            "mn]1",
            "mn[[1]]",
            "mn[3-1]",
            "mn[a-b]",
            "a,,b",
            "mn[1-99999999]",
            "a b",
        ] {
            assert!(expand(bad).is_err(), "{bad:?}");
        }
        assert!(expand("n[0-65535]").is_ok());
        assert!(expand("n[0-65536]").is_err());
        assert!(expand("r[1-300]-n[1-300]").is_err());
    }
}
