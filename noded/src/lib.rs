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

pub mod attribution;
pub mod clock;
pub mod config;
pub mod counter;
pub mod inventory;
pub mod jobs;
pub mod metrics;
pub mod probe;
pub mod sampler;
pub mod server;
pub mod service;
pub mod snapshot;
pub mod sources;
pub mod systemd;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod update_clock;
