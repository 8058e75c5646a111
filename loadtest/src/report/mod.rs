//! The result of a run: one serde struct written as JSON, rendered as a Markdown summary, and
//! drawn as SVG charts beside the JSON.

pub mod chart;
pub mod chatpath;
pub mod cluster;
pub mod soak;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::client::stats::Counters;
use crate::gateway::{Exit, GatewayInfo};
use crate::metrics::latency::{BySide, LatencySummary};
use crate::metrics::limits::{GatewayCapacity, Preflight};
use crate::metrics::redis::StoreUse;
use crate::metrics::snapshot::{RampPoint, Snapshot};
use crate::scenario::Scenario;

#[derive(Debug, Serialize)]
pub struct RunResult {
    pub scenario: Scenario,
    pub command: String,
    pub started_utc: String,
    pub machine: Machine,
    pub gateway: GatewayInfo,
    /// One per instance.
    pub capacity: Vec<GatewayCapacity>,
    pub preflight: Preflight,
    pub warnings: Vec<String>,
    pub connections: Connections,
    pub ramp: Ramp,
    pub delivery: Counters,
    /// Every client got every token once, in order, and (where expected) its terminal event.
    pub zero_loss: bool,
    pub latency: LatencySummary,
    /// With several instances: viewers on the generation's owner and on other instances.
    pub latency_by_side: Option<BySide<LatencySummary>>,
    /// `chatpath`: the direct streams, what the gateway adds, the relay floor.
    pub chatpath: Option<chatpath::ChatPath>,
    /// The shared store's calls and memory, when the run started one.
    pub store: Option<StoreUse>,
    /// (quantile, µs) points of the latency distribution, as drawn in the chart.
    pub latency_curve: Vec<(f64, u64)>,
    pub memory: Option<Memory>,
    pub cpu: Option<Cpu>,
    pub drain: Option<Drain>,
    pub soak: Option<soak::Soak>,
    pub ramp_points: Vec<RampPoint>,
    pub timed_out: bool,
    pub duration_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub mem_total_bytes: Option<u64>,
    pub kernel: Option<String>,
    pub note: &'static str,
}

impl Machine {
    pub fn this() -> Self {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            mem_total_bytes: meminfo
                .lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .map(|kib| kib * 1024),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|s| s.trim().to_string()),
            note: "load client, mock upstream and gateway share this machine's cores",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Connections {
    /// N the scenario asked for, before any cap.
    pub requested: u64,
    /// N actually run.
    pub planned: u64,
    pub capped: bool,
    pub workers: u64,
    pub peak_connected: i64,
}

#[derive(Debug, Serialize)]
pub struct Ramp {
    pub duration_s: f64,
    pub rate_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Memory {
    /// After generations were created, before any subscriber connected.
    pub before: Snapshot,
    /// With every client connected (taken after a short settle).
    pub steady: Option<Snapshot>,
    /// After every client left.
    pub after: Option<Snapshot>,
    /// (steady RSS − before RSS) / connections open at the steady snapshot.
    pub rss_per_connection_bytes: Option<f64>,
    /// Same for `smaps_rollup` Anonymous (heap), which excludes shared file pages.
    pub anon_per_connection_bytes: Option<f64>,
    /// Host kernel TCP memory delta per connection (both ends, so an upper bound for one side).
    pub kernel_tcp_per_connection_bytes: Option<f64>,
    /// The load client's RSS per open connection at the steady snapshot (whole processes).
    pub client_rss_per_connection_bytes: Option<f64>,
}

impl Memory {
    pub fn new(before: Snapshot, steady: Option<Snapshot>, after: Option<Snapshot>) -> Self {
        let per = |f: &dyn Fn(&Snapshot) -> u64| {
            let steady = steady.as_ref()?;
            let n = steady.connected - before.connected;
            (n > 0).then(|| (f(steady) as f64 - f(&before) as f64) / n as f64)
        };
        let anon = |s: &Snapshot| s.smaps.get("Anonymous").copied().unwrap_or(0);
        Self {
            rss_per_connection_bytes: per(&|s| s.rss_bytes),
            anon_per_connection_bytes: per(&anon),
            kernel_tcp_per_connection_bytes: per(&|s| s.tcp.mem_bytes),
            client_rss_per_connection_bytes: steady
                .as_ref()
                .filter(|s| s.connected > 0)
                .map(|s| s.client_rss_bytes as f64 / s.connected as f64),
            before,
            steady,
            after,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Cpu {
    /// From "every client connected" to "the last client finished" (or the hold's end).
    pub window_s: f64,
    /// Summed over the instances.
    pub cpu_s: f64,
    /// Each instance's CPU seconds over the window.
    pub instance_cpu_s: Vec<f64>,
    pub token_events: u64,
    pub us_per_event: Option<f64>,
    pub cpu_s_per_million_events: Option<f64>,
    /// Gateway CPU over the window as a share of one core.
    pub cores_busy: f64,
    /// CPU seconds of the load-client workers over the same window (same machine).
    pub client_cpu_s: f64,
    /// CPU seconds of the spawned mock LLM over the same window.
    pub mock_cpu_s: Option<f64>,
    /// CPU seconds of the spawned redis-server over the same window.
    pub store_cpu_s: Option<f64>,
}

impl Cpu {
    pub fn new(window_s: f64, instance_cpu_s: &[f64], token_events: u64) -> Self {
        let cpu_s: f64 = instance_cpu_s.iter().sum();
        let per_event = (token_events > 0).then(|| cpu_s / token_events as f64);
        Self {
            window_s,
            cpu_s,
            instance_cpu_s: instance_cpu_s.to_vec(),
            token_events,
            us_per_event: per_event.map(|s| s * 1e6),
            cpu_s_per_million_events: per_event.map(|s| s * 1e6),
            cores_busy: if window_s > 0.0 {
                cpu_s / window_s
            } else {
                0.0
            },
            client_cpu_s: 0.0,
            mock_cpu_s: None,
            store_cpu_s: None,
        }
    }

    /// Two windows as one: the soak's rounds, without the settles between them.
    pub fn plus(self, other: Cpu) -> Cpu {
        let instance_cpu_s: Vec<f64> = (self.instance_cpu_s.iter())
            .zip(&other.instance_cpu_s)
            .map(|(a, b)| a + b)
            .collect();
        Cpu {
            client_cpu_s: self.client_cpu_s + other.client_cpu_s,
            mock_cpu_s: self.mock_cpu_s.zip(other.mock_cpu_s).map(|(a, b)| a + b),
            store_cpu_s: self.store_cpu_s.zip(other.store_cpu_s).map(|(a, b)| a + b),
            ..Cpu::new(
                self.window_s + other.window_s,
                &instance_cpu_s,
                self.token_events + other.token_events,
            )
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Drain {
    pub sigterm_at_s: f64,
    /// From SIGTERM until the last client saw `done`, `error` or `reconnect`.
    pub all_clients_notified_after_s: Option<f64>,
    pub exit: Option<Exit>,
    pub clients_done: u64,
    pub clients_told_to_reconnect: u64,
    /// Tokens missing from generations a client saw finish (`done`); must be 0.
    pub lost_tokens_in_finished: u64,
    /// Other instances on the shared store served on: the draining one's viewers resumed there.
    pub hands_over: bool,
    /// Per viewer handed over: from its last token on the draining instance to its next token
    /// from another (µs).
    pub handover_gap: Option<LatencySummary>,
    /// Generations by `owner:status` in the store once the run is over.
    pub generations: BTreeMap<String, u64>,
}

pub(crate) fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

pub(crate) fn kb(bytes: Option<f64>) -> String {
    bytes.map_or_else(|| "–".into(), |b| format!("{:.2} KB", b / 1000.0))
}

impl RunResult {
    /// The checks that failed: delivery (`zero_loss`) in every scenario, evictions where the
    /// scenario allows none, the soak's others.
    pub fn failures(&self) -> Vec<&'static str> {
        if let Some(soak) = &self.soak {
            return soak.failures();
        }
        let mut failed = Vec::new();
        if !self.zero_loss {
            failed.push("delivery");
        }
        if self.scenario.allows_no_eviction() && self.delivery.evictions > 0 {
            failed.push("evictions");
        }
        failed
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let d = &self.delivery;
        let c = &self.connections;
        let _ = writeln!(
            md,
            "## tokenfan load test: `{:?}` — {} connections\n",
            self.scenario.name, c.planned
        );
        let _ = writeln!(
            md,
            "`{}`  ({}, {} cores)\n",
            self.command, self.started_utc, self.machine.cores
        );
        let _ = writeln!(md, "| metric | value |\n|---|---|");
        let mut row = |k: &str, v: String| {
            let _ = writeln!(md, "| {k} | {v} |");
        };
        row(
            "connections (peak open / planned / requested)",
            format!(
                "{} / {} / {}{}",
                c.peak_connected,
                c.planned,
                c.requested,
                if c.capped { " (capped)" } else { "" }
            ),
        );
        row("client workers", c.workers.to_string());
        let r = &self.ramp;
        row(
            "ramp",
            format!("{:.1} s ({:.0} conn/s)", r.duration_s, r.rate_per_s),
        );
        row(
            "token events delivered (live / replayed)",
            format!("{} ({} / {})", d.tokens, d.live_tokens, d.replayed_tokens),
        );
        row(
            "zero loss",
            format!(
                "{} (duplicates {}, missing {}, lost {}, done mismatches {}, protocol errors {})",
                if self.zero_loss { "yes" } else { "NO" },
                d.duplicate_tokens,
                d.missing_tokens,
                d.lost_tokens,
                d.done_mismatches,
                d.protocol_errors
            ),
        );
        row(
            "done / generation errors",
            format!("{} / {}", d.done, d.generation_errors),
        );
        row(
            "endings other than planned / error ids ≠ tokens received",
            format!("{} / {}", d.unexpected_endings, d.error_mismatches),
        );
        row(
            "evictions / shutdown reconnects / reconnects",
            format!(
                "{} / {} / {}",
                d.evictions, d.shutdown_reconnects, d.reconnects
            ),
        );
        row(
            "connect errors / HTTP errors / streams cut without terminal event / gave up",
            format!(
                "{} / {} / {} / {}",
                d.connect_errors, d.http_errors, d.dropped_streams, d.gave_up
            ),
        );
        let l = &self.latency;
        row(
            "latency p50 / p90 / p99 / p99.9 / max",
            format!(
                "{} / {} / {} / {} / {} (n = {})",
                ms(l.p50_us),
                ms(l.p90_us),
                ms(l.p99_us),
                ms(l.p999_us),
                ms(l.max_us),
                l.count
            ),
        );
        if let Some(m) = &self.memory {
            let rss = |s: &Option<Snapshot>| s.as_ref().map_or("–".into(), |s| mib(s.rss_bytes));
            row(
                "gateway RSS before / steady / after",
                format!(
                    "{} / {} / {}",
                    mib(m.before.rss_bytes),
                    rss(&m.steady),
                    rss(&m.after)
                ),
            );
            row("gateway RSS per connection", kb(m.rss_per_connection_bytes));
            row(
                "gateway anonymous memory per connection",
                kb(m.anon_per_connection_bytes),
            );
            row(
                "host kernel TCP memory per connection (both ends)",
                kb(m.kernel_tcp_per_connection_bytes),
            );
            row(
                "load client RSS per connection (whole worker processes)",
                kb(m.client_rss_per_connection_bytes),
            );
        }
        if let Some(cpu) = &self.cpu {
            row(
                "gateway CPU over window",
                format!(
                    "{:.2} s in {:.1} s ({:.2} cores); load client {:.2} s, mock {}",
                    cpu.cpu_s,
                    cpu.window_s,
                    cpu.cores_busy,
                    cpu.client_cpu_s,
                    cpu.mock_cpu_s.map_or("–".into(), |s| format!("{s:.2} s"))
                ),
            );
            row(
                "gateway CPU per delivered event",
                cpu.us_per_event.map_or("–".into(), |us| {
                    format!("{us:.2} µs ({us:.2} s per million events)")
                }),
            );
        }
        for (k, v) in chatpath::rows(self) {
            row(&k, v);
        }
        for (k, v) in cluster::rows(self) {
            row(&k, v);
        }
        if let Some(drain) = &self.drain {
            row(
                "drain: all clients notified after SIGTERM",
                drain
                    .all_clients_notified_after_s
                    .map_or("–".into(), |s| format!("{s:.2} s")),
            );
            row(
                "drain: gateway exit",
                drain
                    .exit
                    .as_ref()
                    .map_or("did not exit in time".into(), |e| {
                        let code = e
                            .code
                            .map_or("unknown (signal or attached)".into(), |c| c.to_string());
                        format!("after {:.2} s, code {code}", e.after_s)
                    }),
            );
            row(
                "drain: done / told to reconnect / tokens lost in finished generations",
                format!(
                    "{} / {} / {}",
                    drain.clients_done,
                    drain.clients_told_to_reconnect,
                    drain.lost_tokens_in_finished
                ),
            );
        }
        if let Some(gap) = self.drain.as_ref().and_then(|d| d.handover_gap.as_ref()) {
            row(
                "drain: hand-over gap p50 / p99 / max (viewers)",
                format!(
                    "{} / {} / {} ({})",
                    ms(gap.p50_us),
                    ms(gap.p99_us),
                    ms(gap.max_us),
                    gap.count
                ),
            );
        }
        if let Some(drain) = self.drain.as_ref().filter(|d| !d.generations.is_empty()) {
            let statuses: Vec<_> = (drain.generations.iter())
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            row("drain: generations by owner:status", statuses.join(", "));
        }
        if let Some(soak) = &self.soak {
            for (k, v) in soak.rows() {
                row(&k, v);
            }
        }
        row(
            "run time",
            format!(
                "{:.1} s{}",
                self.duration_s,
                if self.timed_out {
                    " (hit time limit)"
                } else {
                    ""
                }
            ),
        );
        for w in self.preflight.warnings.iter().chain(&self.warnings) {
            let _ = writeln!(md, "\n> warning: {w}");
        }
        md
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time, without a date crate (Howard Hinnant's algorithm).
pub fn utc_timestamp(unix_s: u64) -> String {
    let days = (unix_s / 86_400) as i64;
    let secs = unix_s % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_timestamps() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(1_795_651_200), "2026-11-26T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400 + 3661), "2000-02-29T01:01:01Z");
    }

    #[test]
    fn cpu_per_event() {
        let cpu = Cpu::new(10.0, &[2.0], 1_000_000);
        assert_eq!(cpu.us_per_event, Some(2.0));
        assert_eq!(cpu.cpu_s_per_million_events, Some(2.0));
        assert_eq!(cpu.cores_busy, 0.2);
        assert_eq!(Cpu::new(1.0, &[1.0], 0).us_per_event, None);
        let both = Cpu::new(10.0, &[2.0], 1_000_000).plus(Cpu::new(10.0, &[6.0], 1_000_000));
        assert_eq!((both.window_s, both.us_per_event), (20.0, Some(4.0)));
        let cluster = Cpu::new(10.0, &[1.0, 3.0], 1_000_000);
        assert_eq!((cluster.cpu_s, cluster.us_per_event), (4.0, Some(4.0)));
    }
}
