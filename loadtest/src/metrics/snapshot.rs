//! One look at the gateway processes (summed over the instances) and the host's TCP memory at
//! a moment of the run.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;

use super::proc::{read_cpu_seconds, read_rss, read_smaps_rollup, read_sockstat, TcpSockstat};

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Seconds since the run started.
    pub at_s: f64,
    /// Client streams open at that moment (from the workers' last progress).
    pub connected: i64,
    /// Summed over the instances, as every other process figure here.
    pub rss_bytes: u64,
    /// Each instance's RSS, to see how evenly the load spread.
    pub instance_rss_bytes: Vec<u64>,
    /// Selected `smaps_rollup` fields in bytes.
    pub smaps: BTreeMap<String, u64>,
    /// Host-wide kernel TCP sockets and memory (both ends of every loopback connection).
    pub tcp: TcpSockstat,
    pub cpu_s: f64,
    /// RSS of the load-client workers, summed (0 when not taken by the coordinator).
    pub client_rss_bytes: u64,
}

impl Snapshot {
    pub fn take(pids: &[u32], at_s: f64, connected: i64) -> Result<Self> {
        let instance_rss_bytes = pids
            .iter()
            .map(|&pid| read_rss(pid))
            .collect::<Result<Vec<_>>>()?;
        let mut smaps = BTreeMap::new();
        let mut cpu_s = 0.0;
        for &pid in pids {
            for (field, bytes) in read_smaps_rollup(pid)? {
                *smaps.entry(field).or_insert(0) += bytes;
            }
            cpu_s += read_cpu_seconds(pid)?;
        }
        Ok(Self {
            at_s,
            connected,
            rss_bytes: instance_rss_bytes.iter().sum(),
            instance_rss_bytes,
            smaps,
            tcp: read_sockstat()?,
            cpu_s,
            client_rss_bytes: 0,
        })
    }
}

/// A cheap point for the RSS-against-connections chart, taken several times a second.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RampPoint {
    pub at_s: f64,
    pub connected: i64,
    pub rss_bytes: u64,
}
