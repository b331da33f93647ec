//! What ergond knows of the node and does not change while it runs — its GPUs (NVML index,
//! UUID, device minor, MIG layout), RAPL zones and CPU sockets — and how a job's allocated GPUs
//! (as the plugin names them) match its NVML devices. A leaf: the attributor, the registry's
//! consumers and the manifest all read it.

use ergon_protocol::{EnergyMethod, GpuAlloc, SensorInfo};

use crate::sources::rapl::ZoneKey;

/// One GPU of the node, by position in the sampler's snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuFact {
    /// NVML index.
    pub index: u32,
    /// NVML UUID.
    pub uuid: String,
    /// `/dev/nvidiaN` minor.
    pub minor: Option<u32>,
    /// PCI bus id.
    pub pci_bus_id: Option<String>,
    /// How its energy is measured.
    pub method: EnergyMethod,
    /// Its MIG instances, when it is in MIG mode.
    pub mig: Option<crate::sources::nvml::MigLayout>,
}

/// What does not change while ergond runs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeFacts {
    /// GPUs, by snapshot position.
    pub gpus: Vec<GpuFact>,
    /// RAPL zones, by snapshot position.
    pub zones: Vec<ZoneKey>,
    /// Sensors (NVML with its driver version, RAPL with its backend, cgroup version).
    pub sensors: Vec<SensorInfo>,
    /// CPU sockets and their logical CPUs (from `/sys/devices/system/cpu`).
    pub sockets: Vec<(u32, ergon_protocol::CpuSet)>,
    /// The node's memory, MiB (`MemTotal` in `/proc/meminfo`), when it could be read.
    pub memory_mib: Option<u64>,
}

/// `MemTotal` of a `/proc/meminfo` text, MiB.
pub fn mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let mut words = line.split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    (words.next() == Some("kB") && kib > 0).then_some(kib / 1024)
}

/// How an allocated GPU was matched to an NVML device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchedBy {
    /// By device minor: Slurm and NVML agree on it.
    Minor,
    /// By index, because the plugin sent no minor: right only when gres.conf lists the GPUs in
    /// NVML (PCI bus) order.
    Index,
}

/// Each allocated GPU with the position of its NVML device, if one matches.
pub fn match_gpus(
    allocs: &[GpuAlloc],
    gpus: &[GpuFact],
) -> Vec<(GpuAlloc, Option<(usize, MatchedBy)>)> {
    allocs
        .iter()
        .map(|a| {
            let m = match a.minor {
                Some(minor) => gpus
                    .iter()
                    .position(|g| g.minor == Some(minor))
                    .map(|p| (p, MatchedBy::Minor)),
                None => gpus
                    .iter()
                    .position(|g| g.index == a.index)
                    .map(|p| (p, MatchedBy::Index)),
            };
            (*a, m)
        })
        .collect()
}

/// The snapshot positions of the NVML devices `allocs` match, and the MIG instances among them
/// as (position, GPU instance id): what the attributor needs of a job's GPUs.
pub fn gpu_positions(allocs: &[GpuAlloc], gpus: &[GpuFact]) -> (Vec<usize>, Vec<(usize, u32)>) {
    let matched = match_gpus(allocs, gpus);
    let positions = matched
        .iter()
        .filter_map(|(_, m)| m.map(|(p, _)| p))
        .collect();
    let mig = matched
        .iter()
        .filter_map(|(a, m)| Some((m.as_ref()?.0, a.mig?.gpu_instance_id)))
        .collect();
    (positions, mig)
}

/// The key a GPU's share is kept under in the attribution (`JobShare::gpus`): its device
/// minor, or 1,000,000 + its NVML index when it has none.
pub fn gpu_key(g: &GpuFact) -> u32 {
    g.minor.unwrap_or(1_000_000 + g.index)
}

#[cfg(test)]
mod tests {
    use super::mem_total_mib;

    #[test]
    fn mem_total_is_read_in_mib() {
        let meminfo = "MemTotal:       24684544 kB\nMemFree:         6375936 kB\n";
        assert_eq!(mem_total_mib(meminfo), Some(24106));
        assert_eq!(mem_total_mib("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total_mib("MemTotal: lots\n"), None);
        assert_eq!(mem_total_mib("MemTotal: 1024 MB\n"), None);
        assert_eq!(mem_total_mib("MemTotal: 0 kB\n"), None);
    }
}
