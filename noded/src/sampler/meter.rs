//! [`NodeMeterHandle`]: the node meter ergond reads for attribution, on its own thread (a
//! [`MeterWorker`]), attached to the sampler so that readers find it next to the GPU and RAPL
//! series. It never runs on the GPU or RAPL threads: a BMC that takes seconds to answer delays
//! only its own thread.

use crate::snapshot::MeterSnapshot;
use crate::sources::meter::{
    interpolate_points, MeterKind, MeterPoint, MeterWorker, MetersConfig, NodeMeter, Quantity,
};
use std::time::Duration;

/// The node meter in use and its reader thread.
pub struct NodeMeterHandle {
    worker: MeterWorker,
    kind: MeterKind,
    source: String,
    resolution_ns: u64,
    period: Duration,
    accuracy_percent: f64,
}

impl std::fmt::Debug for NodeMeterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMeterHandle")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .field("period", &self.period)
            .finish()
    }
}

/// What the attribution needs to know about the meter in use.
#[derive(Debug, Clone, PartialEq)]
pub struct MeterInfo {
    /// Which kind.
    pub kind: MeterKind,
    /// Where its values come from (path or URL).
    pub source: String,
    /// Its resolution (update period), ns.
    pub resolution_ns: u64,
    /// Its stated accuracy, percent.
    pub accuracy_percent: f64,
}

impl NodeMeterHandle {
    /// Start reading `meter` as `cfg` says.
    pub fn start(meter: Box<dyn NodeMeter>, cfg: &MetersConfig) -> std::io::Result<Self> {
        let integ = cfg.integrator_config(meter.as_ref());
        let period = crate::sources::meter::read_period(cfg, meter.as_ref());
        let (kind, source, resolution_ns) = (meter.kind(), meter.source(), meter.resolution_ns());
        let worker = MeterWorker::spawn(meter, integ, period)?;
        Ok(Self {
            worker,
            kind,
            source,
            resolution_ns,
            period,
            accuracy_percent: cfg.accuracy_percent,
        })
    }

    /// The meter's identity and accuracy.
    pub fn info(&self) -> MeterInfo {
        MeterInfo {
            kind: self.kind,
            source: self.source.clone(),
            resolution_ns: self.resolution_ns,
            accuracy_percent: self.accuracy_percent,
        }
    }

    /// How long an event's reading waits for the meter to cover its instant: two read periods
    /// and the meter's resolution, plus a second, at most 15 s.
    pub fn wait_bound(&self) -> Duration {
        (self.period * 2 + Duration::from_nanos(self.resolution_ns) + Duration::from_secs(1))
            .min(Duration::from_secs(15))
    }

    /// Wait (at most `timeout`) until the meter's series covers `at_ns`; whether it does.
    pub fn wait_for(&self, at_ns: u64, timeout: Duration) -> bool {
        self.worker.wait_for_point_at(at_ns, timeout)
    }

    /// The newest instant the meter's series covers, if it is recent: not older than
    /// [`Self::wait_bound`] before `now_ns` (a stalled meter must not hold the attribution
    /// back).
    pub fn covered_recently(&self, now_ns: u64) -> Option<u64> {
        let t = self.worker.newest_point_ns()?;
        (now_ns.saturating_sub(t) <= self.wait_bound().as_nanos() as u64).then_some(t)
    }

    /// The meter's cumulative energy at `at_ns`, interpolated within one stretch of readings.
    pub fn energy_at(&self, at_ns: u64, buf: &mut Vec<MeterPoint>) -> Option<f64> {
        self.worker.points_since(
            at_ns.saturating_sub(self.wait_bound().as_nanos() as u64 * 4),
            buf,
        );
        interpolate_points(buf, at_ns)
    }

    /// For the node snapshot.
    pub fn snapshot(&self) -> MeterSnapshot {
        let st = self.worker.status();
        let mut pts = Vec::new();
        let newest = self.worker.newest_point_ns().unwrap_or(0);
        self.worker.points_since(newest.saturating_sub(1), &mut pts);
        let counter_power = match pts.as_slice() {
            [.., a, b] if a.segment == b.segment && b.at_ns > a.at_ns => {
                Some((b.energy_j - a.energy_j) / ((b.at_ns - a.at_ns) as f64 / 1e9))
            }
            _ => None,
        };
        MeterSnapshot {
            kind: self.kind,
            source: self.source.clone(),
            resolution_ns: self.resolution_ns,
            energy_j: st.totals.energy.joules,
            at_ns: pts.last().map_or(0, |p| p.at_ns),
            power_w: st.last_reading.and_then(|r| match r.quantity {
                Quantity::Power { watts } => Some(watts),
                Quantity::Energy { .. } => counter_power,
            }),
            reads: st.reads,
            read_errors: st.errors,
            rejected: st.totals.rejected,
            holes: st.totals.holes,
        }
    }
}
