//! The fixed-capacity ring buffer behind every trace and latency window.

/// Fill value of unwritten ring-buffer slots (non-zero, so that filling touches every page).
pub(super) const UNSET: u64 = u64::MAX;

/// Fixed-capacity ring buffer: the newest `capacity` values, oldest overwritten.
#[derive(Debug, Clone)]
pub(super) struct Ring<T> {
    pub(super) buf: Vec<T>,
    pub(super) len: usize,
    pub(super) next: usize,
}

impl<T: Copy> Ring<T> {
    /// Every slot is written now (with `fill`), so the memory is resident from the start.
    pub(super) fn new(capacity: usize, fill: T) -> Self {
        Self {
            buf: vec![fill; capacity.max(1)],
            len: 0,
            next: 0,
        }
    }

    pub(super) fn push(&mut self, v: T) {
        self.buf[self.next] = v;
        self.next = (self.next + 1) % self.buf.len();
        self.len = (self.len + 1).min(self.buf.len());
    }

    /// Oldest first, into `out` (cleared first).
    pub(super) fn copy_into(&self, out: &mut Vec<T>) {
        out.clear();
        let cap = self.buf.len();
        let start = (self.next + cap - self.len) % cap;
        out.extend((0..self.len).map(|i| self.buf[(start + i) % cap]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_values_in_order() {
        let mut r = Ring::new(3, 0u64);
        let mut out = Vec::new();
        r.copy_into(&mut out);
        assert!(out.is_empty());
        for v in 1..=2 {
            r.push(v);
        }
        r.copy_into(&mut out);
        assert_eq!(out, [1, 2]);
        for v in 3..=7 {
            r.push(v);
        }
        r.copy_into(&mut out);
        assert_eq!(out, [5, 6, 7]);
        assert_eq!(r.buf.len(), 3);
    }
}
