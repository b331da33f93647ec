//! `ergon`, ergon's accounting tool: it turns the per-node energy manifests ergond writes into one
//! record per job, writes a short record into sacct, and uploads job records to a site's data
//! stores, keeping a write-ahead log so that nothing is lost or silently dropped.
//!
//! - [`collect`]: read, verify, quarantine and combine manifests;
//! - [`job`]: the job record the other modules share;
//! - [`spool`]: listing the spool directories, the spool index's entries;
//! - [`state`]: the state directory (write-ahead log, bounds, run lock);
//! - [`ledger`]: the delivered jobs and their spool-index entries, out of the state file;
//! - [`sacct`]: the sacct record through sacctmgr, verified by read-back;
//! - [`consumed_energy`]: the job's own `ConsumedEnergy` set to ergon's figure (Slurm 25.11+);
//! - [`sinks`]: VictoriaMetrics (InfluxDB line protocol) and HTTPS JSON ingest, with retries;
//! - [`records`]: the job-records database (SQLite), a destination of `ergon run`, read by
//!   `ergon report` and `ergon jobs`;
//! - [`run`]: `ergon run`;
//! - [`report`]: `ergon report` and `ergon status`;
//! - [`prune`]: `ergon prune`, removing manifests every destination has;
//! - [`plot`]: `ergon plot`, a job's power over time as SVG or PNG;
//! - [`usage`]: bounded usage counters per cluster/partition/account/user for VictoriaMetrics;
//! - [`config`]: the config file, `/etc/ergon/accounting.toml`.

#![warn(missing_docs)]
#![deny(unsafe_code)]

pub mod carbon;
pub mod collect;
pub mod config;
pub mod consumed_energy;
pub mod footprint;
pub mod influx;
pub mod job;
pub mod ledger;
pub mod plot;
pub mod privacy;
pub mod prune;
pub mod records;
pub mod report;
pub mod run;
pub mod sacct;
pub mod sinks;
pub mod spool;
pub mod state;
pub mod summary;
pub mod time;
pub mod usage;
