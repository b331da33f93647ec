//! [`CpuSet`]: the CPUs allocated to a job, in Linux cpulist form.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A set of CPU ids, as Slurm's cpuset cgroup and `/sys/.../cpulist` files write them:
/// `"0-3,8,10-11"`.
///
/// ergond shares a socket's RAPL energy among the jobs on it, so it needs to know which CPUs
/// a job holds. The set is stored as sorted, merged, inclusive ranges rather than one entry
/// per CPU: memory is proportional to the length of the text, never to the numbers in it
/// (`"0-4294967295"` is one range, not four billion ids), which matters when the text
/// arrives from another process.
///
/// Serialised as the cpulist string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct CpuSet {
    /// Disjoint, non-adjacent inclusive ranges in increasing order.
    ranges: Vec<(u32, u32)>,
}

/// Why a cpulist string could not be parsed; see [`CpuSet::parse`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuSetError {
    /// Two commas with nothing between them, or a leading/trailing comma.
    #[error("invalid cpu list {list:?}: empty element; expected e.g. \"0-3,8,10-11\"")]
    EmptyElement {
        /// The whole list being parsed.
        list: String,
    },
    /// An element that is not `N` or `N-M` with decimal `u32`s.
    #[error("invalid cpu list {list:?}: {element:?} is not a CPU number or range N-M")]
    InvalidElement {
        /// The whole list being parsed.
        list: String,
        /// The offending element.
        element: String,
    },
    /// More comma-separated elements than [`CpuSet::MAX_ELEMENTS`].
    #[error("invalid cpu list: {count} elements, more than the {max} accepted; ranges such as \"0-63\" count as one")]
    TooManyElements {
        /// How many elements the list has.
        count: usize,
        /// [`CpuSet::MAX_ELEMENTS`].
        max: usize,
    },
    /// A range whose end is below its start.
    #[error("invalid cpu list {list:?}: range {start}-{end} runs backwards")]
    ReversedRange {
        /// The whole list being parsed.
        list: String,
        /// The range's first CPU.
        start: u32,
        /// The range's last CPU.
        end: u32,
    },
}

fn parse_cpu(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl CpuSet {
    /// The most comma-separated elements [`CpuSet::parse`] accepts: 8192, so that the parsed
    /// ranges of a list received in a frame never take more memory than the frame limit.
    /// A kernel- or Slurm-written list of any real machine has far fewer, since consecutive
    /// CPUs are written as one range.
    pub const MAX_ELEMENTS: usize = crate::wire::MAX_FRAME_LEN / std::mem::size_of::<(u32, u32)>();

    /// The empty set.
    pub const fn new() -> Self {
        Self { ranges: Vec::new() }
    }

    /// Parse a Linux cpulist such as `"0-3,8,10-11"`.
    ///
    /// Surrounding whitespace is ignored (sysfs files end in a newline) and an empty or
    /// all-whitespace string is the empty set, as an empty `cpuset.cpus` file means.
    /// Elements may come in any order and overlap; the result is normalised. The kernel's
    /// stride syntax (`0-7:2/4`) is not accepted: Slurm does not write it.
    pub fn parse(text: &str) -> Result<Self, CpuSetError> {
        let list = text.trim();
        if list.is_empty() {
            return Ok(Self::new());
        }
        let count = list.split(',').count();
        if count > Self::MAX_ELEMENTS {
            return Err(CpuSetError::TooManyElements {
                count,
                max: Self::MAX_ELEMENTS,
            });
        }
        let mut ranges = Vec::with_capacity(count);
        for element in list.split(',') {
            if element.is_empty() {
                return Err(CpuSetError::EmptyElement {
                    list: list.to_owned(),
                });
            }
            let invalid = || CpuSetError::InvalidElement {
                list: list.to_owned(),
                element: element.to_owned(),
            };
            let (start, end) = match element.split_once('-') {
                Some((a, b)) => (
                    parse_cpu(a).ok_or_else(invalid)?,
                    parse_cpu(b).ok_or_else(invalid)?,
                ),
                None => {
                    let n = parse_cpu(element).ok_or_else(invalid)?;
                    (n, n)
                }
            };
            if end < start {
                return Err(CpuSetError::ReversedRange {
                    list: list.to_owned(),
                    start,
                    end,
                });
            }
            ranges.push((start, end));
        }
        Ok(Self::from_ranges(ranges))
    }

    /// Sort and merge overlapping or adjacent ranges.
    fn from_ranges(mut ranges: Vec<(u32, u32)>) -> Self {
        ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if u64::from(start) <= u64::from(last.1) + 1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        Self { ranges: merged }
    }

    /// Whether `cpu` is in the set.
    pub fn contains(&self, cpu: u32) -> bool {
        let i = self.ranges.partition_point(|&(_, end)| end < cpu);
        self.ranges.get(i).is_some_and(|&(start, _)| start <= cpu)
    }

    /// How many CPUs the set holds.
    pub fn len(&self) -> usize {
        self.ranges.iter().map(|&(s, e)| (e - s) as usize + 1).sum()
    }

    /// Whether the set holds no CPU.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The CPU ids in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.ranges.iter().flat_map(|&(s, e)| s..=e)
    }

    /// The set as sorted, merged, inclusive `(first, last)` ranges.
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }

    /// Add one CPU.
    pub fn insert(&mut self, cpu: u32) {
        if !self.contains(cpu) {
            let mut ranges = std::mem::take(&mut self.ranges);
            ranges.push((cpu, cpu));
            *self = Self::from_ranges(ranges);
        }
    }
}

impl FromIterator<u32> for CpuSet {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        Self::from_ranges(iter.into_iter().map(|c| (c, c)).collect())
    }
}

impl FromStr for CpuSet {
    type Err = CpuSetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for CpuSet {
    /// The canonical cpulist: sorted, merged, `N` for a single CPU, `N-M` for two or more.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(start, end)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

impl Serialize for CpuSet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CpuSet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CpuListVisitor;

        impl Visitor<'_> for CpuListVisitor {
            type Value = CpuSet;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a cpu list string such as \"0-3,8\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<CpuSet, E> {
                CpuSet::parse(v).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(CpuListVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_canonical_form() {
        let set = CpuSet::parse("0-3,8,10-11").unwrap();
        assert_eq!(set.to_string(), "0-3,8,10-11");
        assert_eq!(set.len(), 7);
        assert!(set.contains(0) && set.contains(3) && set.contains(8) && set.contains(11));
        assert!(!set.contains(4) && !set.contains(9) && !set.contains(12));
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0, 1, 2, 3, 8, 10, 11]);
    }

    #[test]
    fn normalises_order_overlap_and_adjacency() {
        let set = CpuSet::parse("8,3-5,0-2,4,9\n").unwrap();
        assert_eq!(set.to_string(), "0-5,8-9");
        assert_eq!(set.ranges(), &[(0, 5), (8, 9)]);
    }

    #[test]
    fn empty_text_is_empty_set() {
        assert!(CpuSet::parse("").unwrap().is_empty());
        assert!(CpuSet::parse(" \n").unwrap().is_empty());
        assert_eq!(CpuSet::new().to_string(), "");
    }

    #[test]
    fn huge_range_is_cheap() {
        let set = CpuSet::parse("0-4294967295").unwrap();
        assert_eq!(set.len(), 1 << 32);
        assert!(set.contains(u32::MAX));
        assert_eq!(set.ranges().len(), 1);
    }

    #[test]
    fn rejects_malformed_lists_with_typed_errors() {
        assert!(matches!(
            CpuSet::parse("1,,2"),
            Err(CpuSetError::EmptyElement { .. })
        ));
        assert!(matches!(
            CpuSet::parse("1,"),
            Err(CpuSetError::EmptyElement { .. })
        ));
        assert!(matches!(
            CpuSet::parse("5-2"),
            Err(CpuSetError::ReversedRange {
                start: 5,
                end: 2,
                ..
            })
        ));
        for bad in [
            "a",
            "1-",
            "-1",
            "1-2-3",
            "0-7:2/4",
            "+1",
            "1 ,2",
            "4294967296",
        ] {
            assert!(
                matches!(CpuSet::parse(bad), Err(CpuSetError::InvalidElement { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn element_count_is_bounded() {
        let ok = vec!["1"; CpuSet::MAX_ELEMENTS].join(",");
        assert_eq!(CpuSet::parse(&ok).unwrap().to_string(), "1");
        let too_many = vec!["1"; CpuSet::MAX_ELEMENTS + 1].join(",");
        assert!(matches!(
            CpuSet::parse(&too_many),
            Err(CpuSetError::TooManyElements { count, max: 8192 }) if count == 8193
        ));
    }

    #[test]
    fn insert_and_from_iter_normalise() {
        let mut set: CpuSet = [3, 1, 2, 7].into_iter().collect();
        assert_eq!(set.to_string(), "1-3,7");
        set.insert(5);
        set.insert(6);
        set.insert(2);
        assert_eq!(set.to_string(), "1-3,5-7");
        set.insert(4);
        assert_eq!(set.to_string(), "1-7");
    }

    #[test]
    fn serialises_as_string() {
        let set = CpuSet::parse("0-1,4").unwrap();
        assert_eq!(serde_json::to_string(&set).unwrap(), "\"0-1,4\"");
        assert_eq!(serde_json::from_str::<CpuSet>("\"4,0-1\"").unwrap(), set);
    }
}
