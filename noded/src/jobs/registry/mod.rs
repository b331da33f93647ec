//! [`JobRegistry`]: the jobs and steps running on this node, built from the SPANK plugin's
//! events. Pure state machine: it performs no I/O and reads no clock. Each event returns the
//! [`Action`]s the I/O shell ([`super::worker`]) must perform (close an attribution interval
//! at the event's instant, watch or unwatch a cgroup, write the manifest).
//!
//! Events arrive in any order and may be missing (ergond restarted, a hook failed): a step or
//! job end for a job ergond never saw start creates the job with `start_seen = false`, so what
//! is known is still recorded and the manifest marks the coverage partial. Nothing here panics
//! on hostile or inconsistent input; memory is bounded by [`Limits`].
//!
//! - `job`: what the registry holds: jobs, their steps, the instants of their events, what
//!   start-up discovery found;
//! - `table`: the job table: open jobs, their limits ([`Limits`], [`Refusal`]), the finished
//!   jobs remembered, what the journal, recovery and queries read and change;
//! - `steps`: a job's steps: created on their first event, the cgroup watched for each;
//! - `events`: the events applied (discovery, JobStart, StepStart, StepEnd, JobEnd) and the
//!   [`Action`]s each returns.
//!
//! The submodules import one another in that order only (`events` → `steps` → `table` →
//! `job`), never this module.

mod events;
#[cfg(test)]
mod fixtures;
mod job;
mod steps;
mod table;

pub use events::{Action, Mark};
pub use job::{Discovered, EventTime, Job, Step, DISCOVERED_GAP};
pub use steps::step_cgroup;
pub use table::{JobRegistry, Limits, Refusal, CLOSED_REMEMBERED};
