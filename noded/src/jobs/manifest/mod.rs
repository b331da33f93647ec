//! Rendering a job's [`Manifest`](ergon_protocol::Manifest): the attributor's result for the
//! job (every energy figure, MIG and shared GPUs included, comes from it: there is one energy
//! path), the facts of its registry entry (ids, owner, times, steps, gaps) and of the node, and
//! the sampler's traces (for the power trace and peaks). Pure: no I/O, no clock.
//!
//! # What is attributed (model `exclusive-gpu+cgroup-cpu-time`, docs/attribution.md)
//!
//! The [`super::attributor::Attributor`] splits the node's energy interval by interval: a GPU
//! allocated to the job alone gets all of its energy (idle included); a GPU several jobs
//! claim is split equally and marked `shared` (estimated); each socket's package and DRAM
//! energy is split by the jobs' cgroup CPU time (active part) and allocated CPUs (idle part).
//! The manifest carries the job's share per GPU and per socket, the totals, and the node's
//! measured, idle and unattributed energy over the job's interval (`node_context`).
//!
//! When the attributor has no result for the job (ergond never took a reading while it ran),
//! every energy is `null` (not measured, never 0), the coverage 0 and the model
//! [`UNATTRIBUTED_MODEL`].
//!
//! A job whose start ergond did not see (it was down) gets coverage 0 with one gap over its
//! known interval, its owner as `uid` 4294967295 / user `"unknown"` unless a step told it, and
//! no GPU energy (its allocation is unknown).
//!
//! The submodules import one another (never this module), in this order only: `span` (the job's interval and trace bins), `gpus`, `sockets`, `coverage`, then
//! `build`, which assembles the manifest from them.

mod build;
mod coverage;
mod gpus;
mod sockets;
mod span;

pub use super::facts::{gpu_key, gpu_positions, match_gpus, GpuFact, MatchedBy, NodeFacts};
pub use build::{build, wall_section, UNATTRIBUTED_MODEL, UNKNOWN_UID};
pub use span::{MAX_TRACE_POINTS, MIN_TRACE_BIN_NS};

#[cfg(test)]
mod tests;
