//! No single allocation made while reading a frame exceeds the frame limit, whatever the
//! frame claims. A counting global allocator records the largest allocation made on this
//! thread while tracking is on.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use ergon_protocol::*;

struct Counting;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

// SAFETY: forwards to the system allocator; only records sizes in const-initialised
// thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The largest single allocation `f` makes on this thread.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    f();
    TRACKING.with(|t| t.set(false));
    LARGEST.with(|l| l.get())
}

/// Slack for small fixed allocations (error messages and the like).
const SLACK: usize = 1024;

fn frame_of_body(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// `[1, {variant: {field: <claim>}}]` followed by `filler` bytes of padding elements.
fn claim(variant: &str, field: &str, header: &[u8], filler: &[u8]) -> Vec<u8> {
    let mut body = vec![0x92, 0x01, 0x81];
    body.push(0xa0 | variant.len() as u8);
    body.extend_from_slice(variant.as_bytes());
    body.push(0x81);
    body.push(0xa0 | field.len() as u8);
    body.extend_from_slice(field.as_bytes());
    body.extend_from_slice(header);
    body.extend_from_slice(filler);
    body
}

const ARRAY32_MAX: [u8; 5] = [0xdd, 0xff, 0xff, 0xff, 0xff];
const MAP32_MAX: [u8; 5] = [0xdf, 0xff, 0xff, 0xff, 0xff];
const STR32_MAX: [u8; 5] = [0xdb, 0xff, 0xff, 0xff, 0xff];
const BIN32_MAX: [u8; 5] = [0xc6, 0xff, 0xff, 0xff, 0xff];

fn adversarial_frames() -> Vec<(&'static str, Vec<u8>)> {
    let fill = |n: usize, b: u8| vec![b; n];
    let mut frames = vec![
        (
            "4 GiB length prefix",
            vec![0xff, 0xff, 0xff, 0xff, 0x92, 0x01],
        ),
        (
            "steps array32 claim, empty",
            frame_of_body(&claim("Job", "steps", &ARRAY32_MAX, &[])),
        ),
        (
            "steps array32 claim, small",
            frame_of_body(&claim("Job", "steps", &ARRAY32_MAX, &fill(100, 0x00))),
        ),
        (
            "gpus array32 claim",
            frame_of_body(&claim("JobStart", "gpus", &ARRAY32_MAX, &fill(10, 0x90))),
        ),
        (
            "cgroups array32 claim",
            frame_of_body(&claim(
                "StepStart",
                "cgroups",
                &ARRAY32_MAX,
                &fill(10, 0x92),
            )),
        ),
        (
            "map32 claim",
            frame_of_body(&claim("JobStart", "ids", &MAP32_MAX, &[])),
        ),
        (
            "str32 claim",
            frame_of_body(&claim("Hello", "client", &STR32_MAX, b"abc")),
        ),
        (
            "bin32 claim",
            frame_of_body(&claim("Hello", "client", &BIN32_MAX, b"abc")),
        ),
        (
            "top-level array32 claim",
            frame_of_body(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01]),
        ),
    ];
    // Full frames of tiny elements: the decoded list must not outgrow the frame.
    let body_room = MAX_FRAME_LEN - 64;
    // 3-byte CgroupPath elements ([ "", "" ]) decode to 48-byte structs.
    let mut cgroups = vec![0xdd, 0, 0, 0, 0];
    let n = body_room / 3;
    cgroups[1..5].copy_from_slice(&(n as u32).to_be_bytes());
    for _ in 0..n {
        cgroups.extend_from_slice(&[0x92, 0xa0, 0xa0]);
    }
    frames.push((
        "frame full of 3-byte cgroups",
        frame_of_body(&claim("StepStart", "cgroups", &cgroups, &[])),
    ));
    // 1-byte StepId elements (raw ints) decode to 8-byte enums.
    let mut steps = vec![0xdd, 0, 0, 0, 0];
    steps[1..5].copy_from_slice(&(body_room as u32).to_be_bytes());
    steps.extend(std::iter::repeat_n(0x05, body_room));
    frames.push((
        "frame full of 1-byte steps",
        frame_of_body(&claim("Job", "steps", &steps, &[])),
    ));
    // A cpulist of 2-byte elements.
    let list: String = (0..body_room / 2).map(|_| "1,").collect();
    let mut cpus = vec![0xdb];
    cpus.extend_from_slice(&((list.len() - 1) as u32).to_be_bytes());
    cpus.extend_from_slice(&list.as_bytes()[..list.len() - 1]);
    frames.push((
        "frame-sized cpulist",
        frame_of_body(&claim("JobStart", "cpus", &cpus, &[])),
    ));
    frames
}

#[test]
fn decoding_adversarial_frames_stays_within_the_frame_limit() {
    for (what, frame) in adversarial_frames() {
        let mut result_kinds = Vec::new();
        let largest = largest_allocation(|| {
            result_kinds.push(read_frame::<_, Request>(&mut &frame[..]).is_ok());
            result_kinds.push(read_frame::<_, Reply>(&mut &frame[..]).is_ok());
        });
        assert!(
            largest <= MAX_FRAME_LEN + SLACK,
            "{what}: largest allocation {largest} bytes exceeds {} + {SLACK}",
            MAX_FRAME_LEN
        );
        assert_eq!(
            result_kinds,
            [false, false],
            "{what}: adversarial frame decoded"
        );
    }
}

#[test]
fn random_frames_stay_within_the_frame_limit() {
    // A small xorshift generator: deterministic, no dependencies.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..300 {
        let len = (next() % 4096) as usize;
        let mut body = vec![0x92, 0x01];
        body.extend((0..len).map(|_| next() as u8));
        let frame = frame_of_body(&body);
        let largest = largest_allocation(|| {
            let _ = read_frame::<_, Request>(&mut &frame[..]);
            let _ = read_frame::<_, Reply>(&mut &frame[..]);
        });
        assert!(
            largest <= MAX_FRAME_LEN + SLACK,
            "largest allocation {largest}"
        );
    }
}

/// The instrument works, and the guard matters: a plain `Vec` field decoded by serde's own
/// implementation preallocates 1 MiB from a 10-byte input claiming 2^32 - 1 elements.
#[test]
fn the_counter_detects_unbounded_preallocation() {
    let body = [0xdd, 0xff, 0xff, 0xff, 0xff, 0x01, 0x02];
    let largest = largest_allocation(|| {
        let _ = rmp_serde::from_slice::<Vec<u64>>(&body);
    });
    assert!(
        largest > MAX_FRAME_LEN,
        "expected serde's 1 MiB preallocation, saw {largest}"
    );
}

#[test]
fn a_legitimate_full_frame_is_read() {
    // Sanity: the bound does not come from refusing everything large.
    let msg = Request::Hello {
        client: "x".repeat(MAX_FRAME_LEN - 64),
    };
    let frame = encode_frame(&msg).unwrap();
    let mut back = None;
    let largest =
        largest_allocation(|| back = Some(read_frame::<_, Request>(&mut &frame[..]).unwrap()));
    assert_eq!(back, Some(msg));
    assert!(largest <= MAX_FRAME_LEN + SLACK, "{largest}");
}
