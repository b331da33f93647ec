//! Job tracking: the jobs and steps the SPANK plugin reports, the counters read at their
//! events, and one manifest per job written to the spool when it ends.
//!
//! - [`registry`]: the pure state machine of jobs and steps;
//! - [`reading`]: counters at an event's exact instant, interpolated between sampler ticks;
//! - [`facts`]: what ergond knows of the node (GPUs, zones, sockets) and how a job's GPUs match
//!   its devices;
//! - [`manifest`]: building a job's manifest (pure);
//! - [`spool`]: writing it atomically;
//! - [`report`]: the user's `--energy-report`, written as the user;
//! - [`tracker`]: the shell that answers requests and owns the threads below;
//! - [`state`]: what those threads share; [`commands`]: lifecycle events applied to the
//!   registry, from the socket or the plugin's queue;
//! - [`worker`]: the thread that performs the registry's actions in order;
//! - [`writers`]: the spool and report writer threads;
//! - [`attributor`]: the node's energy split between open jobs, interval by interval;
//! - [`journal`]: open jobs kept safe across restarts in `state_dir`;
//! - [`discovery`]: jobs already running when ergond starts, found in the cgroup tree;
//! - [`queue`]: the events the plugin could not deliver, replayed;

pub mod attributor;
pub mod commands;
pub mod discovery;
pub mod facts;
pub mod journal;
pub mod manifest;
pub mod queue;
pub mod reading;
pub mod recovery;
pub mod registry;
pub mod report;
pub mod spool;
pub mod state;
pub mod tracker;
pub mod worker;
pub mod writers;
