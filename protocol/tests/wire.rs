//! Frames: round trips of every message, framing errors, forward compatibility, and
//! hostile input.

mod common;

use std::io::{self, Cursor, Read};

use common::*;
use ergon_protocol::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use serde::Serialize;

fn round_trip<T>(msg: &T) -> T
where
    T: Serialize + serde::de::DeserializeOwned + std::fmt::Debug + PartialEq,
{
    let frame = encode_frame(msg).unwrap();
    let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(len, frame.len() - 4, "length prefix must announce the body");
    let from_body: T = decode_body(&frame[4..]).unwrap();
    assert_eq!(&from_body, msg);

    let mut written = Vec::new();
    write_frame(&mut written, msg).unwrap();
    assert_eq!(
        written, frame,
        "write_frame must write exactly encode_frame's bytes"
    );
    let mut cursor = Cursor::new(written);
    let back: T = read_frame(&mut cursor).unwrap();
    assert_eq!(
        cursor.position() as usize,
        frame.len(),
        "read_frame must consume exactly one frame"
    );
    back
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn requests_round_trip(req in request()) {
        prop_assert_eq!(round_trip(&req), req);
    }

    #[test]
    fn replies_round_trip(rep in reply()) {
        prop_assert_eq!(round_trip(&rep), rep);
    }

    #[test]
    fn a_stream_of_frames_reads_back_in_order(reqs in prop::collection::vec(request(), 0..6)) {
        let mut stream = Vec::new();
        for r in &reqs {
            write_frame(&mut stream, r).unwrap();
        }
        let mut cursor = Cursor::new(stream);
        for r in &reqs {
            prop_assert_eq!(&read_frame::<_, Request>(&mut cursor).unwrap(), r);
        }
        prop_assert!(matches!(read_frame::<_, Request>(&mut cursor), Err(FrameError::Closed)));
    }
}

/// Every variant, explicitly, so that adding one without a strategy is noticed here.
#[test]
fn every_variant_round_trips() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let start = job_start().new_tree(&mut runner).unwrap().current();
    let step = step_start().new_tree(&mut runner).unwrap().current();
    let snapshot = job_snapshot().new_tree(&mut runner).unwrap().current();
    let requests = [
        Request::Hello {
            client: "spank_ergon 0.1.0".into(),
        },
        Request::JobStart(start),
        Request::JobEnd(JobEnd {
            cluster: None,
            job_id: 5,
            node: "n1".into(),
            time: Timestamp::from_unix_ns(9),
        }),
        Request::StepStart(step),
        Request::StepEnd(StepEnd {
            cluster: None,
            job_id: 5,
            step: StepId::Batch,
            node: "n1".into(),
            exit_status: Some(-9),
            time: Timestamp::now(),
        }),
        Request::QueryJob { job_id: 5 },
        Request::Ping,
    ];
    for r in &requests {
        assert_eq!(&round_trip(r), r);
    }
    let replies = [
        Reply::Hello {
            server: "ergond 0.1.0".into(),
            version: PROTOCOL_VERSION,
        },
        Reply::Ok,
        Reply::error(
            ErrorCode::PermissionDenied,
            "uid 1000 may not send JobStart",
        ),
        Reply::Job(snapshot),
        Reply::Pong,
    ];
    for r in &replies {
        assert_eq!(&round_trip(r), r);
    }
    for code in [
        ErrorCode::Malformed,
        ErrorCode::UnsupportedVersion,
        ErrorCode::PermissionDenied,
        ErrorCode::UnknownJob,
        ErrorCode::Busy,
        ErrorCode::Internal,
        ErrorCode::Unknown,
    ] {
        let r = Reply::error(code, "x");
        assert_eq!(round_trip(&r), r);
    }
}

/// Pins the documented layout: `[version, message]`, unit variants as bare strings.
#[test]
fn frame_layout_is_as_documented() {
    let frame = encode_frame(&Request::Ping).unwrap();
    assert_eq!(
        frame,
        [&[0, 0, 0, 7, 0x92, 0x01, 0xa4][..], b"Ping"].concat()
    );
    let frame = encode_frame(&Request::QueryJob { job_id: 5 }).unwrap();
    // {"QueryJob": {"job_id": 5}}: struct fields are named.
    let body = &frame[4..];
    assert_eq!(&body[..3], &[0x92, 0x01, 0x81]);
    assert!(body.windows(6).any(|w| w == b"job_id"));
}

#[cfg(feature = "tokio")]
mod async_frames {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn async_round_trips_match_blocking() {
        let rt = runtime();
        proptest!(config(48), |(req in request(), rep in reply())| {
            let (req_back, rep_back, written) = rt.block_on(async {
                let mut buf = Vec::new();
                write_frame_async(&mut buf, &req).await.unwrap();
                write_frame_async(&mut buf, &rep).await.unwrap();
                let mut rd = &buf[..];
                let a: Request = read_frame_async(&mut rd).await.unwrap();
                let b: Reply = read_frame_async(&mut rd).await.unwrap();
                assert!(matches!(read_frame_async::<_, Reply>(&mut rd).await, Err(FrameError::Closed)));
                (a, b, buf)
            });
            prop_assert_eq!(req_back, req.clone());
            prop_assert_eq!(rep_back, rep.clone());
            let mut blocking = encode_frame(&req).unwrap();
            blocking.extend(encode_frame(&rep).unwrap());
            prop_assert_eq!(written, blocking);
        });
    }

    #[test]
    fn async_errors_match_blocking() {
        let rt = runtime();
        rt.block_on(async {
            let huge = [0xffu8, 0xff, 0xff, 0xff, 1, 2, 3];
            let mut rd = &huge[..];
            match read_frame_async::<_, Request>(&mut rd).await {
                Err(FrameError::Oversize { len, max }) => {
                    assert_eq!((len, max), (u32::MAX as usize, MAX_FRAME_LEN))
                }
                other => panic!("expected Oversize, got {other:?}"),
            }
            assert_eq!(rd.len(), 3, "nothing past the prefix may be read");

            let frame = encode_frame(&Request::Ping).unwrap();
            let mut rd = &frame[..frame.len() - 2];
            match read_frame_async::<_, Request>(&mut rd).await {
                Err(FrameError::ShortRead { expected, got }) => assert_eq!((expected, got), (7, 5)),
                other => panic!("expected ShortRead, got {other:?}"),
            }
            let mut rd = &frame[..2];
            assert!(matches!(
                read_frame_async::<_, Request>(&mut rd).await,
                Err(FrameError::ShortRead {
                    expected: 4,
                    got: 2
                })
            ));
            let mut rd = &frame[..];
            assert!(matches!(
                read_frame_async_with_limit::<_, Request>(&mut rd, 6).await,
                Err(FrameError::Oversize { len: 7, max: 6 })
            ));

            let (mut client, _server) = tokio::io::duplex(64);
            let waited = tokio::time::timeout(
                std::time::Duration::from_millis(20),
                read_frame_async::<_, Reply>(&mut client),
            )
            .await;
            assert!(
                waited.is_err(),
                "a silent peer must block until the caller's timeout"
            );
        });
    }
}

/// A reader that serves `data` and records how many bytes were taken from it.
struct Tracked<'a> {
    data: &'a [u8],
    taken: usize,
}

impl Read for Tracked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.data.len() - self.taken);
        buf[..n].copy_from_slice(&self.data[self.taken..self.taken + n]);
        self.taken += n;
        Ok(n)
    }
}

#[test]
fn oversize_length_is_rejected_before_reading_the_body() {
    // Claims 4 GiB - 1 and then has a little data that must not be touched.
    let data = [0xff, 0xff, 0xff, 0xff, 0x92, 0x01, 0xc0];
    let mut rd = Tracked {
        data: &data,
        taken: 0,
    };
    match read_frame::<_, Request>(&mut rd) {
        Err(FrameError::Oversize { len, max }) => {
            assert_eq!((len, max), (u32::MAX as usize, MAX_FRAME_LEN))
        }
        other => panic!("expected Oversize, got {other:?}"),
    }
    assert_eq!(rd.taken, 4);

    let just_over = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
    assert!(matches!(
        read_frame::<_, Request>(&mut &just_over[..]),
        Err(FrameError::Oversize { len, .. }) if len == MAX_FRAME_LEN + 1
    ));
}

#[test]
fn custom_limit_applies() {
    let frame = encode_frame(&Request::Ping).unwrap();
    assert!(matches!(
        read_frame_with_limit::<_, Request>(&mut &frame[..], 6),
        Err(FrameError::Oversize { len: 7, max: 6 })
    ));
    assert_eq!(
        read_frame_with_limit::<_, Request>(&mut &frame[..], 7).unwrap(),
        Request::Ping
    );
}

#[test]
fn oversize_message_is_refused_by_the_sender() {
    let huge = Request::Hello {
        client: "x".repeat(MAX_FRAME_LEN),
    };
    match encode_frame(&huge) {
        Err(FrameError::Oversize { len, max }) => {
            assert!(len > MAX_FRAME_LEN);
            assert_eq!(max, MAX_FRAME_LEN);
        }
        other => panic!("expected Oversize, got {other:?}"),
    }
    let mut sink = Vec::new();
    assert!(write_frame(&mut sink, &huge).is_err());
    assert!(
        sink.is_empty(),
        "nothing may be written for a refused frame"
    );
    // The largest message that fits is accepted at both ends.
    let overhead = encode_frame(&Request::Hello {
        client: String::new(),
    })
    .unwrap()
    .len()
        - 4;
    let fits = Request::Hello {
        client: "x".repeat(MAX_FRAME_LEN - overhead - 4),
    };
    let frame = encode_frame(&fits).unwrap();
    assert_eq!(read_frame::<_, Request>(&mut &frame[..]).unwrap(), fits);
}

#[test]
fn truncation_reports_counts() {
    let msg = Request::StepEnd(StepEnd {
        cluster: None,
        job_id: 77,
        step: StepId::Numbered(3),
        node: "node-1".into(),
        exit_status: None,
        time: Timestamp::from_unix_ns(1),
    });
    let frame = encode_frame(&msg).unwrap();
    let body_len = frame.len() - 4;
    assert!(matches!(
        read_frame::<_, Request>(&mut &frame[..0]),
        Err(FrameError::Closed)
    ));
    for cut in 1..4 {
        match read_frame::<_, Request>(&mut &frame[..cut]) {
            Err(FrameError::ShortRead { expected: 4, got }) => assert_eq!(got, cut),
            other => panic!("cut {cut}: expected ShortRead, got {other:?}"),
        }
    }
    for cut in 4..frame.len() {
        match read_frame::<_, Request>(&mut &frame[..cut]) {
            Err(FrameError::ShortRead { expected, got }) => {
                assert_eq!((expected, got), (body_len, cut - 4))
            }
            other => panic!("cut {cut}: expected ShortRead, got {other:?}"),
        }
    }
}

fn frame_of_body(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

#[test]
fn unknown_version_is_reported_before_the_message_is_looked_at() {
    let v2 = rmp_serde::to_vec_named(&(2u16, Request::Ping)).unwrap();
    match read_frame::<_, Request>(&mut &frame_of_body(&v2)[..]) {
        Err(FrameError::UnknownVersion { got, supported }) => {
            assert_eq!((got, supported), (2, PROTOCOL_VERSION))
        }
        other => panic!("expected UnknownVersion, got {other:?}"),
    }
    // Version 0 with a message that is not even valid msgpack.
    assert!(matches!(
        decode_body::<Request>(&[0x92, 0x00, 0xc1, 0xc1]),
        Err(FrameError::UnknownVersion {
            got: 0,
            supported: 1
        })
    ));
    // A version beyond u16 is still "unknown version", saturated.
    assert!(matches!(
        decode_body::<Request>(&[0x92, 0xce, 0, 1, 0, 0, 0xc0]),
        Err(FrameError::UnknownVersion { got: u16::MAX, .. })
    ));
    let err = decode_body::<Request>(&[0x92, 0x02, 0xc0])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("version 2") && err.contains("version 1"),
        "{err}"
    );
}

#[test]
fn garbage_is_undecodable() {
    let cases: &[&[u8]] = &[
        &[],                                               // empty body
        &[0xc1],                                           // reserved marker
        &[0x01],                                           // not an array
        &[0x93, 0x01, 0xc0, 0xc0],                         // three elements
        &[0x92, 0xa1, b'1', 0xc0],                         // version is a string
        &[0x92, 0xff, 0xc0],                               // negative version
        &[0x92, 0x01],                                     // no message
        &[0x92, 0x01, 0xa4, b'P', b'o', b'n', b'g'], // a Reply variant where a Request is expected
        &[0x92, 0x01, 0xa4, b'P', b'i', b'n', b'g', 0xc0], // trailing byte
        &[
            0x92, 0x01, 0x81, 0xa8, b'J', b'o', b'b', b'S', b't', b'a', b'r', b't', 0x80,
        ], // missing fields
        &[0x92, 0x01, 0xdb, 0xff, 0xff, 0xff, 0xff], // str32 claiming 4 GiB
    ];
    for body in cases {
        match read_frame::<_, Request>(&mut &frame_of_body(body)[..]) {
            Err(FrameError::Undecodable(reason)) => assert!(!reason.is_empty()),
            other => panic!("{body:x?}: expected Undecodable, got {other:?}"),
        }
    }
}

#[test]
fn deep_nesting_is_refused_without_exhausting_the_stack() {
    // {"Hello": {"client": [[[[…]]]]}}, 10 000 levels deep.
    let mut body = vec![0x92, 0x01, 0x81, 0xa5];
    body.extend_from_slice(b"Hello");
    body.extend_from_slice(&[0x81, 0xa6]);
    body.extend_from_slice(b"client");
    body.extend(std::iter::repeat_n(0x91, 10_000));
    body.push(0xc0);
    assert!(matches!(
        decode_body::<Request>(&body),
        Err(FrameError::Undecodable(_))
    ));
    // Unknown fields are skipped with the same depth limit.
    let mut body = vec![0x92, 0x01, 0x81, 0xa8];
    body.extend_from_slice(b"QueryJob");
    body.extend_from_slice(&[0x82, 0xa6]);
    body.extend_from_slice(b"job_id");
    body.extend_from_slice(&[0x05, 0xa3]);
    body.extend_from_slice(b"new");
    body.extend(std::iter::repeat_n(0x91, 10_000));
    body.push(0xc0);
    assert!(matches!(
        decode_body::<Request>(&body),
        Err(FrameError::Undecodable(_))
    ));
}

struct Failing(io::ErrorKind);

impl Read for Failing {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(self.0.into())
    }
}

#[test]
fn io_errors_and_timeouts_are_io() {
    let e = read_frame::<_, Reply>(&mut Failing(io::ErrorKind::WouldBlock)).unwrap_err();
    assert!(matches!(e, FrameError::Io(_)) && e.is_timeout(), "{e:?}");
    let e = read_frame::<_, Reply>(&mut Failing(io::ErrorKind::TimedOut)).unwrap_err();
    assert!(e.is_timeout());
    let e = read_frame::<_, Reply>(&mut Failing(io::ErrorKind::ConnectionReset)).unwrap_err();
    assert!(matches!(e, FrameError::Io(_)) && !e.is_timeout());

    // A timeout in the middle of the body is still an Io timeout, not a ShortRead.
    let frame = encode_frame(&Request::Ping).unwrap();
    let mut rd = (&frame[..6]).chain(Failing(io::ErrorKind::WouldBlock));
    assert!(read_frame::<_, Request>(&mut rd).unwrap_err().is_timeout());

    // Interrupted reads are retried.
    struct InterruptOnce<'a>(bool, &'a [u8]);
    impl Read for InterruptOnce<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if std::mem::replace(&mut self.0, false) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            self.1.read(buf)
        }
    }
    assert_eq!(
        read_frame::<_, Request>(&mut InterruptOnce(true, &frame)).unwrap(),
        Request::Ping
    );
}

#[test]
fn one_byte_at_a_time_works() {
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(1).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    let msg = Reply::error(ErrorCode::Busy, "shutting down");
    let frame = encode_frame(&msg).unwrap();
    assert_eq!(read_frame::<_, Reply>(&mut Trickle(&frame)).unwrap(), msg);
}

/// What a newer peer might send: an extra field, an unknown error code.
#[test]
fn newer_peers_fields_and_codes_are_tolerated() {
    #[derive(Serialize)]
    struct JobEndV1Plus {
        job_id: u32,
        node: String,
        time: u64,
        energy_hint: Vec<u32>,
    }
    #[derive(Serialize)]
    enum NewerRequest {
        JobEnd(JobEndV1Plus),
    }
    let frame = encode_frame(&NewerRequest::JobEnd(JobEndV1Plus {
        job_id: 3,
        node: "n".into(),
        time: 10,
        energy_hint: vec![1, 2, 3],
    }))
    .unwrap();
    assert_eq!(
        read_frame::<_, Request>(&mut &frame[..]).unwrap(),
        Request::JobEnd(JobEnd {
            cluster: None,
            job_id: 3,
            node: "n".into(),
            time: Timestamp::from_unix_ns(10)
        })
    );

    #[derive(Serialize)]
    enum NewerReply {
        Error { code: String, reason: String },
    }
    let frame = encode_frame(&NewerReply::Error {
        code: "Overheated".into(),
        reason: "r".into(),
    })
    .unwrap();
    assert_eq!(
        read_frame::<_, Reply>(&mut &frame[..]).unwrap(),
        Reply::Error {
            code: ErrorCode::Unknown,
            reason: "r".into()
        }
    );

    // An older peer that omits optional fields.
    #[derive(Serialize)]
    struct OldStepStart {
        job_id: u32,
        step: String,
        uid: u32,
        node: String,
        time: u64,
    }
    #[derive(Serialize)]
    enum OldRequest {
        StepStart(OldStepStart),
    }
    let frame = encode_frame(&OldRequest::StepStart(OldStepStart {
        job_id: 1,
        step: "extern".into(),
        uid: 0,
        node: "n".into(),
        time: 5,
    }))
    .unwrap();
    match read_frame::<_, Request>(&mut &frame[..]).unwrap() {
        Request::StepStart(s) => {
            assert_eq!(s.step, StepId::Extern);
            assert!(s.cgroups.is_empty() && s.pid.is_none() && s.tasks.is_none());
            assert!(s.cluster.is_none() && s.cpus.is_empty());
        }
        other => panic!("expected StepStart, got {other:?}"),
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// Arbitrary bytes, up to 100 KiB, never make the reader panic.
    #[test]
    fn arbitrary_streams_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..100 * 1024)) {
        let mut rd = &bytes[..];
        // Read frames until an error, as a server would.
        for _ in 0..64 {
            if read_frame::<_, Request>(&mut rd).is_err() {
                break;
            }
        }
        let _ = read_frame::<_, Reply>(&mut &bytes[..]);
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// A valid length prefix, the right version, then random message bytes.
    #[test]
    fn random_bodies_never_panic(tail in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut body = vec![0x92, 0x01];
        body.extend_from_slice(&tail);
        let frame = frame_of_body(&body);
        let _ = read_frame::<_, Request>(&mut &frame[..]);
        let _ = read_frame::<_, Reply>(&mut &frame[..]);
        let _ = read_frame::<_, Request>(&mut &frame_of_body(&tail)[..]);
    }

    /// Valid frames with a few bytes changed never panic, and decode to something or fail.
    #[test]
    fn mutated_frames_never_panic(
        req in request(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut frame = encode_frame(&req).unwrap();
        for (i, b) in flips {
            let i = 4 + i.index(frame.len() - 4);
            frame[i] = b;
        }
        let _ = read_frame::<_, Request>(&mut &frame[..]);
    }
}

/// A MIG allocation round-trips; an allocation from a plugin without MIG support (no `mig`
/// key) decodes as a whole GPU, and a whole GPU is encoded without the key.
#[test]
fn mig_allocations_are_optional_on_the_wire() {
    let mig = GpuAlloc {
        index: 3,
        minor: Some(0),
        mig: Some(MigAlloc {
            gpu_instance_id: 2,
            compute_instance_id: Some(0),
        }),
    };
    assert_eq!(round_trip(&mig), mig);
    #[derive(Serialize)]
    struct OldGpuAlloc {
        index: u32,
        minor: Option<u32>,
    }
    let frame = encode_frame(&OldGpuAlloc {
        index: 1,
        minor: Some(4),
    })
    .unwrap();
    let back: GpuAlloc = decode_body(&frame[4..]).unwrap();
    assert_eq!(
        back,
        GpuAlloc {
            index: 1,
            minor: Some(4),
            mig: None
        }
    );
    let whole = encode_frame(&back).unwrap();
    assert_eq!(whole, frame, "a whole GPU is written as before MIG support");
}
