//! Readers for the `/proc` files the load test measures the gateway with. Each parser takes the
//! file's text so it can be tested on fixtures; the `read_*` functions add the path.

use std::collections::BTreeMap;
use std::fs;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Fields of `/proc/PID/smaps_rollup` worth reporting (all in bytes).
const SMAPS_FIELDS: &[&str] = &[
    "Rss",
    "Pss",
    "Pss_Anon",
    "Pss_File",
    "Anonymous",
    "Private_Dirty",
    "Private_Clean",
    "Shared_Clean",
    "Swap",
];

fn read(path: &str) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("read {path}"))
}

/// `VmRSS` from `/proc/PID/status`, in bytes.
pub fn parse_status_rss(status: &str) -> Result<u64> {
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line (process gone or a kernel thread)")?;
    kib_value(line)
}

pub fn read_rss(pid: u32) -> Result<u64> {
    parse_status_rss(&read(&format!("/proc/{pid}/status"))?)
}

/// The `Key:   N kB` lines of `smaps_rollup` we report, in bytes.
pub fn parse_smaps_rollup(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (key, _) = line.split_once(':')?;
            SMAPS_FIELDS.contains(&key).then_some(())?;
            Some((key.to_string(), kib_value(line).ok()?))
        })
        .collect()
}

pub fn read_smaps_rollup(pid: u32) -> Result<BTreeMap<String, u64>> {
    Ok(parse_smaps_rollup(&read(&format!(
        "/proc/{pid}/smaps_rollup"
    ))?))
}

fn kib_value(line: &str) -> Result<u64> {
    let mut words = line.split_whitespace().skip(1);
    let (Some(number), Some("kB")) = (words.next(), words.next()) else {
        bail!("expected `Key: N kB`, got {line:?}");
    };
    let kib: u64 = number
        .parse()
        .with_context(|| format!("bad number in {line:?}"))?;
    Ok(kib * 1024)
}

/// utime + stime from `/proc/PID/stat`, in clock ticks. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Result<u64> {
    let after_comm = stat
        .rfind(')')
        .map(|at| &stat[at + 1..])
        .context("no `)` in /proc/PID/stat")?;
    // After the command: state is field 3, so utime (14) and stime (15) are indexes 11 and 12.
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let tick = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .context("/proc/PID/stat too short")?
            .parse()
            .context("bad utime/stime in /proc/PID/stat")
    };
    Ok(tick(11)? + tick(12)?)
}

/// The gateway's user + system CPU time in seconds.
pub fn read_cpu_seconds(pid: u32) -> Result<f64> {
    let ticks = parse_stat_cpu_ticks(&read(&format!("/proc/{pid}/stat"))?)?;
    Ok(ticks as f64 / clock_ticks_per_second())
}

/// The calling thread's user + system CPU time in seconds (clock-tick resolution).
pub fn read_thread_cpu_seconds() -> Result<f64> {
    let ticks = parse_stat_cpu_ticks(&read("/proc/thread-self/stat")?)?;
    Ok(ticks as f64 / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// The `TCP:` line of `/proc/net/sockstat`: kernel-side socket counts and memory. Memory is
/// for all TCP sockets of the host (ours and the gateway's), which is why it is reported
/// separately from the gateway's RSS.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpSockstat {
    pub inuse: u64,
    pub orphan: u64,
    pub tw: u64,
    pub alloc: u64,
    /// `mem` is in pages; this is bytes.
    pub mem_bytes: u64,
}

pub fn parse_sockstat(text: &str) -> Result<TcpSockstat> {
    let line = text
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .context("no TCP line in sockstat")?;
    let words: Vec<&str> = line.split_whitespace().skip(1).collect();
    let mut stat = TcpSockstat::default();
    for pair in words.chunks(2) {
        let [key, value] = pair else { continue };
        let value: u64 = value
            .parse()
            .with_context(|| format!("bad sockstat value in {line:?}"))?;
        match *key {
            "inuse" => stat.inuse = value,
            "orphan" => stat.orphan = value,
            "tw" => stat.tw = value,
            "alloc" => stat.alloc = value,
            "mem" => stat.mem_bytes = value * page_size(),
            _ => {}
        }
    }
    Ok(stat)
}

pub fn read_sockstat() -> Result<TcpSockstat> {
    parse_sockstat(&read("/proc/net/sockstat")?)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

/// Soft and hard "Max open files" from `/proc/PID/limits` (`None` = unlimited).
pub fn parse_nofile_limits(limits: &str) -> Result<(Option<u64>, Option<u64>)> {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no `Max open files` line")?;
    let mut words = line["Max open files".len()..].split_whitespace();
    let mut next = || -> Result<Option<u64>> {
        match words.next() {
            Some("unlimited") => Ok(None),
            Some(n) => Ok(Some(n.parse().context("bad open-files limit")?)),
            None => bail!("short `Max open files` line"),
        }
    };
    Ok((next()?, next()?))
}

pub fn read_nofile_limits(pid: u32) -> Result<(Option<u64>, Option<u64>)> {
    parse_nofile_limits(&read(&format!("/proc/{pid}/limits"))?)
}

/// File descriptors the process holds now.
pub fn open_fds(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/fd");
    Ok(fs::read_dir(&dir)
        .with_context(|| format!("list {dir}"))?
        .count() as u64)
}

/// A sysctl value by its dotted name, e.g. `net.core.somaxconn`.
pub fn read_sysctl(name: &str) -> Result<String> {
    Ok(read(&format!("/proc/sys/{}", name.replace('.', "/")))?
        .trim()
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vmrss_from_status() {
        let status = "Name:\ttokenfan\nVmPeak:\t  999 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_status_rss(status).unwrap(), 12345 * 1024);
        assert!(parse_status_rss("Name:\tkthreadd\n").is_err());
    }

    #[test]
    fn reads_chosen_smaps_rollup_fields() {
        let text = "55d0c0000000-7ffd00000000 ---p 00000000 00:00 0  [rollup]\n\
Rss:               10240 kB\nPss:                9000 kB\nPss_Anon:           8000 kB\n\
Anonymous:          8000 kB\nLazyFree:              0 kB\nSwap:                  0 kB\n";
        let fields = parse_smaps_rollup(text);
        assert_eq!(fields["Rss"], 10240 * 1024);
        assert_eq!(fields["Anonymous"], 8000 * 1024);
        assert!(!fields.contains_key("LazyFree"));
        assert_eq!(fields.len(), 5);
    }

    #[test]
    fn cpu_ticks_count_fields_after_the_command_name() {
        let stat = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 3 0 100 1000000 250 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat).unwrap(), 325);
        assert!(parse_stat_cpu_ticks("1 (x) S 1").is_err());
    }

    #[test]
    fn sockstat_tcp_line_with_memory_in_pages() {
        let text =
            "sockets: used 300\nTCP: inuse 20 orphan 1 tw 3 alloc 25 mem 10\nUDP: inuse 1 mem 0\n";
        let stat = parse_sockstat(text).unwrap();
        assert_eq!(
            (stat.inuse, stat.orphan, stat.tw, stat.alloc),
            (20, 1, 3, 25)
        );
        assert_eq!(stat.mem_bytes, 10 * page_size());
    }

    #[test]
    fn nofile_limits_soft_and_hard() {
        let limits =
            "Limit                     Soft Limit           Hard Limit           Units     \n\
Max processes             95000                95000                processes \n\
Max open files            1024                 20000                files     \n";
        assert_eq!(
            parse_nofile_limits(limits).unwrap(),
            (Some(1024), Some(20000))
        );
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_nofile_limits(unlimited).unwrap(), (None, None));
    }

    #[test]
    fn reads_own_process_files() {
        let pid = std::process::id();
        assert!(read_rss(pid).unwrap() > 0);
        assert!(read_cpu_seconds(pid).unwrap() >= 0.0);
        assert!(open_fds(pid).unwrap() >= 3);
        assert!(read_nofile_limits(pid).unwrap().0.is_some());
        assert!(read_sysctl("net.core.somaxconn")
            .unwrap()
            .parse::<u64>()
            .is_ok());
    }
}
