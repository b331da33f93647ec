//! The contract every part of ergon shares.
//!
//! ergon measures the energy of Slurm jobs. Its parts run in different processes, on
//! different hosts and possibly at different versions: the SPANK plugin inside slurmd and
//! slurmstepd, the node daemon ergond, and the accounting tool `ergon` on a management host.
//! This crate is what they agree on, and nothing else:
//!
//! - [`wire`]: the messages the plugin sends ergond over a Unix socket, and their framing;
//! - [`manifest`]: the per-job, per-node JSON energy manifest ergond writes to its spool and
//!   the accounting tool reads;
//! - [`record`]: the short `ergon1 …` segment stored in a sacct comment field;
//! - [`format`]: how energies, powers, durations and fractions are shown to people, the same in
//!   ergond's report, `ergon report` and `ergon plot`;
//! - [`durable`]: replacing a file atomically and durably, as ergond writes the spool's
//!   manifests and `ergon` its state;
//! - `testing` (feature `testing`, for tests only): `Manifest::example()` and a manifest
//!   builder.
//!
//! Besides [`durable`], it does no I/O beyond `std::io::{Read, Write}` on streams it is handed
//! (plus tokio equivalents behind the `tokio` feature), so every part can depend on it,
//! including the plugin, which must not start an async runtime.
//!
//! ```
//! use ergon_protocol::{read_frame, write_frame, Reply, Request};
//!
//! // A client writes a request; the server reads it from its end of the socket.
//! let mut socket = Vec::new();
//! write_frame(&mut socket, &Request::QueryJob { job_id: 1234 })?;
//! let request: Request = read_frame(&mut socket.as_slice())?;
//! assert_eq!(request, Request::QueryJob { job_id: 1234 });
//!
//! // Every request gets exactly one reply.
//! let mut socket = Vec::new();
//! write_frame(&mut socket, &Reply::Pong)?;
//! assert_eq!(read_frame::<_, Reply>(&mut socket.as_slice())?, Reply::Pong);
//! # Ok::<(), ergon_protocol::FrameError>(())
//! ```

#![warn(missing_docs)]
#![deny(unsafe_code)]

mod bounded;
pub mod durable;
pub mod format;
pub mod hostlist;
pub mod manifest;
pub mod privacy;
pub mod record;
#[cfg(feature = "testing")]
pub mod testing;
pub mod wire;

pub use manifest::{
    AttributionInfo, ComponentCoverage, Coverage, EnergyMethod, Gap, GapEstimate, GpuEfficiency,
    GpuEnergy, GpuMig, JobInfo, Manifest, ManifestError, MigInstanceRef, MigShareMethod,
    NodeContext, PowerTrace, SensorInfo, SensorKind, ShareMethod, SocketEnergy, StepEnergy,
    ThrottleSeconds, Totals, TraceSeries, WallEnergy, WallInterval, WallMeter, XidEvent,
    MANIFEST_SCHEMA_VERSION, MANIFEST_SCHEMA_VERSION_COVERAGE, MANIFEST_SCHEMA_VERSION_EFFICIENCY,
    MANIFEST_SCHEMA_VERSION_MAX, MANIFEST_SCHEMA_VERSION_MIG, MANIFEST_SCHEMA_VERSION_MIN,
    MANIFEST_SCHEMA_VERSION_NODES,
};
pub use record::{find_in_field, merge_into_field, strip_from_field, JobRecord, RecordError};
pub use wire::{
    decode_body, encode_frame, parse_proc_cgroup, read_frame, read_frame_with_limit, write_frame,
    CgroupParseError, CgroupPath, CpuSet, CpuSetError, ErrorCode, FrameError, GpuAlloc, JobEnd,
    JobIds, JobSnapshot, JobStart, MigAlloc, Reply, ReportFormat, ReportFormatError, Request,
    StepEnd, StepId, StepIdError, StepStart, Timestamp, MAX_FRAME_LEN, PROTOCOL_VERSION,
};
#[cfg(feature = "tokio")]
pub use wire::{read_frame_async, read_frame_async_with_limit, write_frame_async};
