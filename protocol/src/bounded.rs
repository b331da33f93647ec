//! Deserialising sequences without trusting their length prefix.
//!
//! serde's own `Vec<T>` implementation preallocates `min(hint, 1 MiB / size_of::<T>())`
//! elements, where `hint` is the element count the encoding claims (checked in serde
//! 1.0.229, `private::size_hint::cautious`). rmp-serde 1.3.1 passes a msgpack array's 32-bit
//! length straight through as that hint (`SeqAccess::size_hint`), so a 10-byte frame
//! claiming 2^32 - 1 elements would make the decoder allocate 1 MiB, sixteen times
//! [`MAX_FRAME_LEN`](crate::wire::MAX_FRAME_LEN). And even without preallocation a list can
//! outgrow its frame: a 3-byte msgpack element may decode into a 48-byte struct.
//!
//! Every `Vec` field of a wire message therefore goes through [`vec`], which
//! - reserves at most [`PREALLOC_BYTES`] up front, whatever the input claims, and
//! - refuses more than `MAX_FRAME_LEN / size_of::<T>()` elements, growing the buffer so that
//!   its capacity never passes that bound.
//!
//! So no list buffer decoded from a frame is larger than the frame limit itself. (Before
//! serde runs, `wire::frame` also walks the msgpack structure and rejects a body whose
//! arrays claim more elements than it contains, so claimed lengths are at most the body
//! length; it is the in-memory size of honest elements that this module bounds.)

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, Error as _, SeqAccess, Visitor};

use crate::wire::MAX_FRAME_LEN;

/// The most bytes a claimed sequence length may make us reserve up front.
pub(crate) const PREALLOC_BYTES: usize = 4096;

/// The most elements of `T` a decoded list may hold: as many as fit in a frame's worth of
/// memory.
pub(crate) const fn max_elements<T>() -> usize {
    match MAX_FRAME_LEN.checked_div(std::mem::size_of::<T>()) {
        Some(n) => n,
        None => MAX_FRAME_LEN,
    }
}

/// `deserialize_with` helper: a `Vec<T>` whose buffer never exceeds
/// [`MAX_FRAME_LEN`](crate::wire::MAX_FRAME_LEN) bytes, whatever length the input claims.
pub(crate) fn vec<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct BoundedVec<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for BoundedVec<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a sequence of at most {} elements", max_elements::<T>())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let limit = max_elements::<T>();
            let size = std::mem::size_of::<T>().max(1);
            if let Some(claimed) = seq.size_hint() {
                if claimed > limit {
                    return Err(A::Error::custom(format_args!(
                        "list claims {claimed} elements, more than the {limit} a frame may carry"
                    )));
                }
            }
            let initial = seq.size_hint().unwrap_or(0).min(PREALLOC_BYTES / size);
            let mut out: Vec<T> = Vec::with_capacity(initial);
            while let Some(item) = seq.next_element()? {
                if out.len() == limit {
                    return Err(A::Error::custom(format_args!(
                        "list has more than the {limit} elements a frame may carry"
                    )));
                }
                if out.len() == out.capacity() {
                    let grown = (out.capacity() * 2).clamp(4, limit);
                    out.reserve_exact(grown - out.len());
                }
                out.push(item);
            }
            Ok(out)
        }
    }

    deserializer.deserialize_seq(BoundedVec(PhantomData))
}
