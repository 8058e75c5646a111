//! One look at the gateway process and the host's TCP memory at a moment of the run.

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
    pub rss_bytes: u64,
    /// Selected `smaps_rollup` fields in bytes.
    pub smaps: BTreeMap<String, u64>,
    /// Host-wide kernel TCP sockets and memory (both ends of every loopback connection).
    pub tcp: TcpSockstat,
    pub cpu_s: f64,
    /// RSS of the load-client workers, summed (0 when not taken by the coordinator).
    pub client_rss_bytes: u64,
}

impl Snapshot {
    pub fn take(pid: u32, at_s: f64, connected: i64) -> Result<Self> {
        Ok(Self {
            at_s,
            connected,
            rss_bytes: read_rss(pid)?,
            smaps: read_smaps_rollup(pid)?,
            tcp: read_sockstat()?,
            cpu_s: read_cpu_seconds(pid)?,
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
