//! ergond, the per-node daemon of ergon: the measurement layer (energy counters, hardware
//! sources), the [`sampler`] threads, Prometheus [`metrics`], the SPANK plugin's socket
//! [`server`], job tracking ([`jobs`]: per-job GPU, CPU and DRAM attribution, manifests, the
//! restart journal, jobs found running at start-up, the user's report) and the node [`service`]
//! with its [`systemd`] integration.
//!
//! The library is split so that pure logic ([`counter`]) is separate from the code that touches
//! hardware ([`sources`]); every hardware root is a parameter, which is how tests point the
//! sources at generated trees and at a fake NVML library.

#![warn(missing_docs)]
#![deny(unsafe_code)]

pub mod accept;
pub mod attribution;
pub mod clock;
pub mod config;
pub mod counter;
pub mod gpustats;
pub mod inventory;
pub mod jobs;
pub mod metrics;
pub mod probe;
pub mod sampler;
pub mod server;
pub mod service;
pub mod snapshot;
pub mod sources;
pub mod stats;
// The system calls neither std nor nix wraps safely: the crate's unsafe code, with NVML's raw
// handles (`sources::nvml`).
#[allow(unsafe_code)]
mod sys;
pub mod systemd;
pub mod update_clock;
