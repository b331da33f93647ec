//! Job tracking: the jobs and steps the SPANK plugin reports, the counters read at their
//! events, and one manifest per job written to the spool when it ends.
//!
//! - [`registry`]: the pure state machine of jobs and steps;
//! - [`reading`]: counters at an event's exact instant, interpolated between sampler ticks;
//! - [`manifest`]: building a job's manifest (pure);
//! - [`spool`]: writing it atomically;
//! - [`tracker`]: the shell that ties them to the sampler and answers requests.
//!
//! Attribution is GPU-only for now (see [`manifest`]); restart safety and the user report are
//! not implemented yet.

pub mod manifest;
pub mod reading;
pub mod registry;
pub mod spool;
pub mod tracker;
