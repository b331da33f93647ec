//! `ergon run`: collect → upload (and sacct), with the state as write-ahead log.
//!
//! By default collection and upload are **pipelined**: the spools are scanned with
//! [`crate::collect::scan_streaming`], which hands over each job as soon as all its manifests
//! have been read; every [`CHUNK`] jobs the new entries are appended to the state's journal and
//! fsynced (the write-ahead step), then handed to one uploader thread per sink, which sends them
//! in its own batches while the scan goes on. Results come back to this thread, which alone
//! changes the state, and are journalled too. sacct is written after the collection. With
//! [`RunOptions::sequential`] (and for `--dry-run`) a run collects everything first, saves the
//! whole state, then writes sacct and uploads: the path before pipelining.
//!
//! The submodules import one another (never this module), in this order only:
//!
//! - `summary`: what a run is asked ([`RunOptions`]) and what it did ([`RunSummary`],
//!   [`RunTimings`]);
//! - `common`: the sinks ([`build_sinks`]), a job's new state entry, the clock, progress bars;
//! - `saver`: saving the state and appending to its journal during a run;
//! - `sacct`: writing the records into sacct;
//! - `seal`: sealing the node directories of the sharded spool whose manifests are all
//!   delivered, so that later runs do not list them;
//! - `sequential`: the sequential run and `--dry-run`;
//! - `pipeline`: the pipelined run, its uploader threads and the collecting side;
//! - `driver`: [`run`]: sets up a run (lock, state, sinks), takes one path or the other,
//!   finishes it.

mod common;
mod driver;
mod pipeline;
mod sacct;
mod saver;
mod seal;
mod sequential;
mod summary;

pub use common::{build_sinks, SharedSink};
pub use driver::run;
pub use pipeline::{CHUNK, LANES};
pub use sacct::SACCT;
pub use summary::{RunOptions, RunSummary, RunTimings};
