//! The walls a connection count runs into on one host: open-file limits (ours and the
//! gateway's), ephemeral ports, accept backlog, system-wide files. Checked before a run so a
//! too-large N fails with a clear message instead of a pile of EMFILE errors.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::Serialize;

use super::proc::{open_fds, read_nofile_limits, read_sysctl};
use crate::client::connect::source_count;

/// File descriptors a worker keeps for itself (stdio, epoll, timers) besides client sockets.
pub const WORKER_FD_RESERVE: u64 = 256;
/// Headroom the gateway keeps beyond what it holds now and its upstream connections.
pub const GATEWAY_FD_MARGIN: u64 = 64;

/// Raises this process's soft RLIMIT_NOFILE to the hard limit (children inherit it).
pub fn raise_nofile() -> Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read a properly initialised rlimit we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        bail!("setrlimit: {}", std::io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

#[derive(Debug, Default, Serialize)]
pub struct Preflight {
    pub sysctls: BTreeMap<String, String>,
    pub warnings: Vec<String>,
    pub errors: Vec<String>,
}

/// Checks the host can carry `connections` loopback connections (both ends live here).
pub fn preflight(connections: u64) -> Preflight {
    let mut out = Preflight::default();
    for name in [
        "net.ipv4.ip_local_port_range",
        "net.core.somaxconn",
        "fs.file-max",
        "fs.nr_open",
        "net.ipv4.tcp_mem",
    ] {
        match read_sysctl(name) {
            Ok(value) => {
                out.sysctls.insert(name.to_string(), value);
            }
            Err(e) => out.warnings.push(format!("cannot read {name}: {e:#}")),
        }
    }
    let number = |name: &str, index: usize| -> Option<u64> {
        out.sysctls
            .get(name)?
            .split_whitespace()
            .nth(index)?
            .parse()
            .ok()
    };
    if let (Some(low), Some(high)) = (
        number("net.ipv4.ip_local_port_range", 0),
        number("net.ipv4.ip_local_port_range", 1),
    ) {
        let ports = (high + 1).saturating_sub(low) * u64::from(source_count());
        if connections > ports {
            out.errors.push(format!(
                "{connections} connections need more source ports than {ports} \
                 ({} ephemeral ports × {} source addresses): widen it with \
                 `sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\"`",
                high + 1 - low,
                source_count()
            ));
        }
    }
    if let Some(backlog) = number("net.core.somaxconn", 0) {
        if backlog < 4096 {
            out.warnings.push(format!(
                "net.core.somaxconn is {backlog}: a fast ramp overflows the accept queue and \
                 connects are retried after ≥1 s; `sysctl -w net.core.somaxconn=65535`"
            ));
        }
    }
    if let Some(files) = number("fs.file-max", 0) {
        let needed = connections * 2 + 10_000;
        if files < needed {
            out.errors.push(format!(
                "fs.file-max is {files} but both ends of {connections} connections need \
                 ~{needed}: `sysctl -w fs.file-max={}`",
                needed * 2
            ));
        }
    }
    out
}

/// How many client connections one gateway process can accept here.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayCapacity {
    pub nofile_soft: Option<u64>,
    pub nofile_hard: Option<u64>,
    pub fds_in_use: u64,
    /// File descriptors set aside for upstream connections (one per running generation).
    pub upstream_fds: u64,
    pub max_connections: Option<u64>,
}

pub fn gateway_capacity(pid: u32, upstream_fds: u64) -> Result<GatewayCapacity> {
    let (soft, hard) = read_nofile_limits(pid)?;
    let fds_in_use = open_fds(pid)?;
    Ok(GatewayCapacity {
        nofile_soft: soft,
        nofile_hard: hard,
        fds_in_use,
        upstream_fds,
        max_connections: soft
            .map(|s| s.saturating_sub(fds_in_use + upstream_fds + GATEWAY_FD_MARGIN)),
    })
}

impl GatewayCapacity {
    /// The message for `load` connections on one gateway above what it can hold; `rerun` is
    /// the N of the whole run that fits (the same as its max with one gateway).
    pub fn wall_message(&self, pid: u32, load: u64, rerun: u64) -> String {
        let max = self.max_connections.unwrap_or(u64::MAX);
        format!(
            "{load} connections would go to gateway pid {pid}, but it can hold at most {max}: \
             its RLIMIT_NOFILE is {} (hard {}), it already holds {} fds, and {} are kept for \
             upstream streams plus {GATEWAY_FD_MARGIN} spare. Where the hard limit cannot be \
             raised (20,000 on this project's build machines), one gateway process tops out \
             near 19,500 connections. Rerun with --connections {rerun}, or add --cap to cap \
             automatically, or spread the viewers over more instances (`cluster --instances`). \
             Where the limit can be raised: `ulimit -n 1048576` (and fs.nr_open ≥ that) before starting the \
             gateway and this tool.",
            fmt_limit(self.nofile_soft),
            fmt_limit(self.nofile_hard),
            self.fds_in_use,
            self.upstream_fds
        )
    }
}

/// Where a run whose clients connect first to instance k `loads[k]` times goes over an
/// instance's wall: that instance and the N, scaled down from `requested` in proportion, that
/// keeps every instance under its wall. `None` when every instance can hold its share.
pub fn over_the_wall(
    capacities: &[GatewayCapacity],
    loads: &[u64],
    requested: u64,
) -> Option<(usize, u64)> {
    let (worst, share) = capacities
        .iter()
        .zip(loads)
        .enumerate()
        .filter_map(|(k, (cap, &load))| {
            let max = cap.max_connections?;
            (load > max).then(|| (k, max as f64 / load as f64))
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))?;
    Some((worst, (requested as f64 * share).floor() as u64))
}

fn fmt_limit(limit: Option<u64>) -> String {
    limit.map_or_else(|| "unlimited".to_string(), |l| l.to_string())
}

/// Worker processes needed so no worker exceeds its own open-file limit.
pub fn workers_needed(connections: u64, own_nofile: u64) -> u64 {
    let per_worker = own_nofile.saturating_sub(WORKER_FD_RESERVE).max(1);
    connections.div_ceil(per_worker).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_needed_respects_the_per_process_limit() {
        assert_eq!(workers_needed(19_000, 20_000), 1);
        assert_eq!(workers_needed(20_000, 20_000), 2);
        assert_eq!(workers_needed(1_000_000, 1_048_576), 1);
        assert_eq!(workers_needed(0, 20_000), 1);
    }

    #[test]
    fn preflight_passes_small_runs_and_flags_impossible_ones() {
        assert!(preflight(100).errors.is_empty());
        let huge = preflight(1_000_000_000);
        assert!(huge.errors.iter().any(|e| e.contains("source ports")));
    }

    #[test]
    fn each_instance_is_held_to_its_own_wall() {
        let cap = |max| GatewayCapacity {
            nofile_soft: Some(20_000),
            nofile_hard: Some(20_000),
            fds_in_use: 20,
            upstream_fds: 100,
            max_connections: Some(max),
        };
        let caps = [cap(19_000), cap(19_000), cap(19_000)];
        // 51,000 over three instances is 17,000 each: under every wall, unlike one gateway's.
        assert_eq!(
            over_the_wall(&caps, &[17_000, 17_000, 17_000], 51_000),
            None
        );
        // One instance with 20,000 of 57,000: N shrinks until it holds 19,000.
        assert_eq!(
            over_the_wall(&caps, &[18_500, 20_000, 18_500], 57_000),
            Some((1, 54_150))
        );
        let unlimited = GatewayCapacity {
            max_connections: None,
            ..cap(0)
        };
        assert_eq!(over_the_wall(&[unlimited], &[1_000_000], 1_000_000), None);
    }

    #[test]
    fn capacity_of_this_process_is_below_its_limit() {
        let cap = gateway_capacity(std::process::id(), 10).unwrap();
        let soft = cap.nofile_soft.unwrap();
        assert!(cap.max_connections.unwrap() < soft);
        let message = cap.wall_message(1, soft, 1234);
        assert!(message.contains("--cap") && message.contains("--connections 1234"));
    }
}
