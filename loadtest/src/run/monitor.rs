//! Watching a run: ticks four times a second, polls the workers, samples the gateway's RSS
//! (summed over its instances) against open connections, prints the progress line, and
//! notices the gateway's exit.

use std::time::{Duration, Instant};

use crate::client::stats::Counters;
use crate::fleet::Fleet;
use crate::gateway::{Exit, Gateway};
use crate::metrics::proc::{read_cpu_seconds, read_rss};
use crate::metrics::snapshot::{RampPoint, Snapshot};
use crate::report::Cpu;

const TICK: Duration = Duration::from_millis(250);

/// One end of the CPU window.
pub struct WindowMark {
    pub at: Instant,
    /// Per instance; `None` without pids.
    pub instance_cpu_s: Option<Vec<f64>>,
    pub tokens: u64,
    pub client_cpu_s: f64,
    pub mock_cpu_s: Option<f64>,
    pub store_cpu_s: Option<f64>,
}

/// Samples the gateway and prints progress while waiting for a phase to end.
pub struct Monitor {
    pub fleet: Fleet,
    /// Every instance's pid (none when attached without `--pid`).
    pids: Vec<u32>,
    mock_pid: Option<u32>,
    store_pid: Option<u32>,
    t0: Instant,
    /// The run's time limit; `wait` sets `timed_out` when it passes.
    pub deadline: Instant,
    planned: u64,
    pub points: Vec<RampPoint>,
    pub peak_connected: i64,
    last_print: Instant,
    last_tokens: u64,
    pub timed_out: bool,
    pub exit: Option<Exit>,
    /// Set once SIGTERM was sent: the gateway's exit is watched from then on.
    pub sigterm_at: Option<Instant>,
}

impl Monitor {
    pub fn new(
        fleet: Fleet,
        gateway: &Gateway,
        t0: Instant,
        deadline: Instant,
        planned: u64,
    ) -> Self {
        Self {
            fleet,
            pids: gateway.info.pids(),
            mock_pid: gateway.info.mock_pid,
            store_pid: gateway.info.store.as_ref().and_then(|s| s.pid),
            t0,
            deadline,
            planned,
            points: Vec::new(),
            peak_connected: 0,
            last_print: Instant::now(),
            last_tokens: 0,
            timed_out: false,
            exit: None,
            sigterm_at: None,
        }
    }

    pub fn at_s(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// Ticks until `done(totals, monitor)` holds or `until` passes; false on the run's time limit.
    pub async fn wait(
        &mut self,
        phase: &str,
        until: Instant,
        mut done: impl FnMut(&Counters, &Monitor) -> bool,
        gateway: &mut Gateway,
    ) -> bool {
        let mut ticker = tokio::time::interval(TICK);
        loop {
            ticker.tick().await;
            self.fleet.poll();
            let totals = self.fleet.totals();
            self.observe(phase, &totals, gateway);
            if done(&totals, self) {
                return true;
            }
            if Instant::now() >= self.deadline {
                self.timed_out = true;
                return false;
            }
            if Instant::now() >= until {
                return true;
            }
        }
    }

    fn observe(&mut self, phase: &str, totals: &Counters, gateway: &mut Gateway) {
        self.peak_connected = self.peak_connected.max(totals.connected);
        let rss = (!self.pids.is_empty())
            .then(|| {
                self.pids
                    .iter()
                    .map(|&pid| read_rss(pid).ok())
                    .sum::<Option<u64>>()
            })
            .flatten();
        if let Some(rss_bytes) = rss {
            self.points.push(RampPoint {
                at_s: self.at_s(),
                connected: totals.connected,
                rss_bytes,
            });
        }
        if let (Some(since), None) = (self.sigterm_at, &self.exit) {
            if let Ok(Some(code)) = gateway.try_exit() {
                self.exit = Some(Exit {
                    code,
                    after_s: since.elapsed().as_secs_f64(),
                });
            }
        }
        let since = self.last_print.elapsed().as_secs_f64();
        if since >= 1.0 {
            let rate = (totals.tokens.saturating_sub(self.last_tokens)) as f64 / since;
            eprintln!(
                "[{:7.1}s] {phase:<10} open {}/{}  tokens {} (+{:.0}/s)  evicted {}  reconnects {}  errors {}  rss {}",
                self.at_s(),
                totals.connected,
                self.planned,
                totals.tokens,
                rate,
                totals.evictions,
                totals.reconnects,
                totals.connect_errors + totals.http_errors + totals.dropped_streams + totals.delivery_errors(),
                rss.map_or("–".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
            );
            self.last_print = Instant::now();
            self.last_tokens = totals.tokens;
        }
    }

    pub fn snapshot(&mut self) -> Option<Snapshot> {
        self.fleet.poll();
        let connected = self.fleet.totals().connected;
        let at = self.at_s();
        let client_rss_bytes = self.fleet.rss_bytes();
        (!self.pids.is_empty())
            .then(|| Snapshot::take(&self.pids, at, connected).ok())
            .flatten()
            .map(|s| Snapshot {
                client_rss_bytes,
                ..s
            })
    }

    /// One end of the CPU window: when, gateway CPU, tokens delivered, client CPU.
    pub fn window_mark(&self, tokens: u64) -> WindowMark {
        WindowMark {
            at: Instant::now(),
            instance_cpu_s: (!self.pids.is_empty())
                .then(|| {
                    self.pids
                        .iter()
                        .map(|&pid| read_cpu_seconds(pid).ok())
                        .collect()
                })
                .flatten(),
            tokens,
            client_cpu_s: self.fleet.cpu_seconds(),
            mock_cpu_s: self.mock_pid.and_then(|pid| read_cpu_seconds(pid).ok()),
            store_cpu_s: self.store_pid.and_then(|pid| read_cpu_seconds(pid).ok()),
        }
    }
}

impl WindowMark {
    /// Gateway CPU between two marks (summed, and per instance), with the client's and the
    /// mock's beside it.
    pub fn cpu_until(&self, end: &WindowMark) -> Option<Cpu> {
        let (start, end_s) = (self.instance_cpu_s.as_ref()?, end.instance_cpu_s.as_ref()?);
        let instance_cpu_s: Vec<f64> = start.iter().zip(end_s).map(|(s, e)| e - s).collect();
        Some(Cpu {
            client_cpu_s: end.client_cpu_s - self.client_cpu_s,
            mock_cpu_s: end.mock_cpu_s.zip(self.mock_cpu_s).map(|(e, s)| e - s),
            store_cpu_s: end.store_cpu_s.zip(self.store_cpu_s).map(|(e, s)| e - s),
            ..Cpu::new(
                end.at.duration_since(self.at).as_secs_f64(),
                &instance_cpu_s,
                end.tokens.saturating_sub(self.tokens),
            )
        })
    }
}

/// Every client is connected, or has already finished for good.
pub fn all_connected(t: &Counters, n: u64) -> bool {
    t.started >= n && t.connected.max(0) as u64 + t.ended >= n
}
