//! The coordinator: checks limits, starts (or attaches to) the gateway, creates generations,
//! spreads the clients over worker processes, watches the run phase by phase while sampling the
//! gateway, and assembles the result.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use tokio::task::JoinSet;

use crate::client::http::request;
use crate::client::stats::Counters;
use crate::client::subscriber::{unix_micros, MIN_READ_BUFFER};
use crate::fleet::Fleet;
use crate::gateway::{Exit, Gateway};
use crate::metrics::latency::{new_histogram, quantile_curve, LatencySummary};
use crate::metrics::limits::{
    gateway_capacity, preflight, raise_nofile, workers_needed, GATEWAY_FD_MARGIN,
};
use crate::metrics::proc::{read_cpu_seconds, read_rss};
use crate::metrics::snapshot::{RampPoint, Snapshot};
use crate::report::{chart, Connections, Cpu, Drain, Machine, Memory, Ramp, RunResult};
use crate::scenario::{Ending, Overrides, Plan, Scenario, ScenarioName};
use crate::worker::{StallSpec, WorkerSpec};

const TICK: Duration = Duration::from_millis(250);
const SETTLE: Duration = Duration::from_secs(2);
/// Concurrent `POST /v1/generations` while setting up.
const CREATE_CONCURRENCY: usize = 64;
/// Assumed creation rate, used only to plan when the first token should be emitted.
const CREATE_PER_S: f64 = 1000.0;

#[derive(Debug, Args)]
pub struct RunArgs {
    #[arg(value_enum)]
    pub scenario: ScenarioName,
    #[command(flatten)]
    pub overrides: Overrides,
    /// Client worker processes; raised automatically so each stays under its open-file limit.
    #[arg(long)]
    pub workers: Option<u64>,
    /// Cap N at what one gateway process can hold here instead of failing.
    #[arg(long)]
    pub cap: bool,
    /// tokenfan binary to spawn (as `serve` and, separately, `mock-upstream`).
    #[arg(long, default_value = "target/release/tokenfan")]
    pub gateway_bin: PathBuf,
    /// Extra flag for the spawned `tokenfan serve`, repeatable: `--gateway-arg=--channel-capacity=32`.
    #[arg(long = "gateway-arg", allow_hyphen_values = true)]
    pub gateway_args: Vec<String>,
    /// Target a running gateway (`http://127.0.0.1:8080`) instead of spawning one.
    #[arg(long)]
    pub url: Option<String>,
    /// PID of the `--url` gateway, for memory and CPU figures (and SIGTERM in `drain`).
    #[arg(long, requires = "url")]
    pub pid: Option<u32>,
    /// JSON result path; charts are written beside it (`NAME.rss.svg`, `NAME.latency.svg`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed for drawn knobs (tokens per generation, subscribers per generation, stall subset).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Runs one scenario to completion (or its time limit) and returns the result.
pub async fn run(args: &RunArgs, command: String) -> Result<RunResult> {
    let t0 = Instant::now();
    let started_utc = crate::report::utc_timestamp(unix_micros() / 1_000_000);
    let scenario = Scenario::resolve(args.scenario, &args.overrides)?;
    let mut plan = Plan::build(&scenario, args.seed)?;
    let requested = plan.connections();
    let mut warnings = Vec::new();

    let (own_nofile, _) = raise_nofile()?;
    let checks = preflight(requested);
    if !checks.errors.is_empty() {
        bail!(
            "this host cannot carry the run:\n  {}",
            checks.errors.join("\n  ")
        );
    }
    for w in &checks.warnings {
        eprintln!("warning: {w}");
    }

    let log_prefix = output_stem(args)?;
    let mut gateway = match &args.url {
        Some(url) => Gateway::attach(url, args.pid).await?,
        None => {
            let extra = spawn_args(&scenario, &args.gateway_args, own_nofile);
            Gateway::spawn(&args.gateway_bin, &extra, &log_prefix).await?
        }
    };
    let pid = gateway.info.pid;
    let mut capacity = None;
    if let Some(pid) = pid {
        let cap = gateway_capacity(pid, scenario.generations)?;
        if let Some(max) = cap.max_connections.filter(|&max| requested > max) {
            let message = cap.wall_message(pid, requested);
            if !args.cap {
                gateway.stop().await;
                bail!(message);
            }
            eprintln!("warning: {message}\nwarning: capping at {max} connections (--cap)");
            warnings.push(format!("capped at {max}: {message}"));
            plan.cap(max);
        }
        capacity = Some(cap);
    } else {
        warnings.push("no gateway pid: memory and CPU were not measured".into());
    }
    let n = plan.connections();
    let workers = args
        .workers
        .unwrap_or(1)
        .max(workers_needed(n, own_nofile))
        .min(n.max(1));

    let result = measure(&scenario, &plan, &mut gateway, workers, t0).await;
    let gateway_info = gateway.info.clone();
    gateway.stop().await;
    let outcome = result?;
    warnings.extend(outcome.warnings.iter().cloned());
    let result = RunResult {
        zero_loss: outcome.zero_loss(),
        scenario,
        command,
        started_utc,
        machine: Machine::this(),
        gateway: gateway_info,
        capacity,
        preflight: checks,
        warnings,
        connections: Connections {
            requested,
            planned: n,
            capped: n < requested,
            workers,
            peak_connected: outcome.peak_connected,
        },
        ramp: outcome.ramp,
        delivery: outcome.totals,
        latency: outcome.latency,
        latency_curve: outcome.latency_curve,
        memory: outcome
            .before
            .map(|b| Memory::new(b, outcome.steady, outcome.after)),
        cpu: outcome.cpu,
        drain: outcome.drain,
        ramp_points: outcome.points,
        timed_out: outcome.timed_out,
        duration_s: t0.elapsed().as_secs_f64(),
    };
    write_outputs(args, &result, &log_prefix)?;
    Ok(result)
}

/// Flags for a spawned gateway: the scenario's, then the user's, after defaults that keep
/// admission control out of the measurement — creation is not rate limited, and the connection
/// limit is the open-files wall rather than the gateway's conservative default reserve. A
/// default is left out when the scenario or user sets the same flag.
fn spawn_args(scenario: &Scenario, user: &[String], nofile: u64) -> Vec<String> {
    // Never below the cap `gateway_capacity` computes (which also subtracts the fds in use).
    let max_connections = nofile.saturating_sub(scenario.generations + GATEWAY_FD_MARGIN);
    let defaults = [
        format!("--create-rate={}", 1_000_000),
        format!("--create-burst={}", 1_000_000),
        format!("--max-connections={max_connections}"),
    ];
    let given: Vec<&String> = scenario.gateway_args.iter().chain(user).collect();
    let flag = |arg: &str| arg.split('=').next().unwrap_or(arg).to_string();
    let mut args: Vec<String> = defaults
        .into_iter()
        .filter(|d| !given.iter().any(|g| flag(g) == flag(d)))
        .collect();
    args.extend(given.into_iter().cloned());
    args
}

/// Everything measured while the clients ran.
struct Outcome {
    ending: Ending,
    planned: u64,
    totals: Counters,
    latency: LatencySummary,
    latency_curve: Vec<(f64, u64)>,
    before: Option<Snapshot>,
    steady: Option<Snapshot>,
    after: Option<Snapshot>,
    ramp: Option<Ramp>,
    cpu: Option<Cpu>,
    drain: Option<Drain>,
    points: Vec<RampPoint>,
    peak_connected: i64,
    timed_out: bool,
    warnings: Vec<String>,
}

struct WindowMark {
    at: Instant,
    gateway_cpu_s: Option<f64>,
    tokens: u64,
    client_cpu_s: f64,
    mock_cpu_s: Option<f64>,
}

/// Samples the gateway and prints progress while waiting for a phase to end.
struct Monitor {
    fleet: Fleet,
    pid: Option<u32>,
    mock_pid: Option<u32>,
    t0: Instant,
    deadline: Instant,
    planned: u64,
    points: Vec<RampPoint>,
    peak_connected: i64,
    last_print: Instant,
    last_tokens: u64,
    timed_out: bool,
    exit: Option<Exit>,
    /// Set once SIGTERM was sent: the gateway's exit is watched from then on.
    sigterm_at: Option<Instant>,
}

impl Monitor {
    fn at_s(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// Ticks until `done(totals, monitor)` holds or `until` passes; false on the run's time limit.
    async fn wait(
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
        let rss = self.pid.and_then(|pid| read_rss(pid).ok());
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

    fn snapshot(&mut self) -> Option<Snapshot> {
        self.fleet.poll();
        let connected = self.fleet.totals().connected;
        let at = self.at_s();
        let client_rss_bytes = self.fleet.rss_bytes();
        self.pid
            .and_then(|pid| Snapshot::take(pid, at, connected).ok())
            .map(|s| Snapshot {
                client_rss_bytes,
                ..s
            })
    }

    /// One end of the CPU window: when, gateway CPU, tokens delivered, client CPU.
    fn window_mark(&self, tokens: u64) -> WindowMark {
        WindowMark {
            at: Instant::now(),
            gateway_cpu_s: self.pid.and_then(|pid| read_cpu_seconds(pid).ok()),
            tokens,
            client_cpu_s: self.fleet.cpu_seconds(),
            mock_cpu_s: self.mock_pid.and_then(|pid| read_cpu_seconds(pid).ok()),
        }
    }
}

async fn measure(
    scenario: &Scenario,
    plan: &Plan,
    gateway: &mut Gateway,
    workers: u64,
    t0: Instant,
) -> Result<Outcome> {
    let n = plan.connections();
    let addr = gateway.info.addr;
    let ramp_s = scenario.ramp_s(n);
    // All generations hold their first token until the ramp should be over, so latency is
    // measured on live fan-out rather than on replay to late joiners.
    let stream_at = Instant::now()
        + Duration::from_secs_f64(
            plan.generations.len() as f64 / CREATE_PER_S + ramp_s + scenario.start_margin_s,
        );
    eprintln!(
        "creating {} generations, then {n} connections at {}/s over {workers} worker(s); first token in {:.1} s",
        plan.generations.len(),
        scenario.ramp_rate,
        stream_at.saturating_duration_since(Instant::now()).as_secs_f64()
    );
    let ids = create_generations(addr, scenario, plan, stream_at).await?;
    let specs = worker_specs(scenario, plan, &ids, addr, workers);
    let before = gateway
        .info
        .pid
        .map(|pid| Snapshot::take(pid, t0.elapsed().as_secs_f64(), 0))
        .transpose()?;
    let mut monitor = Monitor {
        fleet: Fleet::spawn(&specs).await?,
        pid: gateway.info.pid,
        mock_pid: gateway.info.mock_pid,
        t0,
        deadline: t0 + Duration::from_secs(scenario.time_limit_s),
        planned: n,
        points: Vec::new(),
        peak_connected: 0,
        last_print: Instant::now(),
        last_tokens: 0,
        timed_out: false,
        exit: None,
        sigterm_at: None,
    };
    let mut warnings = Vec::new();

    let ramp_start = Instant::now();
    let ramp_until = ramp_start + Duration::from_secs_f64(ramp_s * 3.0 + 15.0);
    monitor
        .wait("ramp", ramp_until, |t, _| all_connected(t, n), gateway)
        .await;
    let ramp_totals = monitor.fleet.totals();
    if !all_connected(&ramp_totals, n) {
        warnings.push(format!(
            "ramp incomplete: {} of {n} connected when the ramp's time ran out",
            ramp_totals.connected
        ));
    }
    let ramp_duration = ramp_start.elapsed().as_secs_f64();
    let ramp = Some(Ramp {
        duration_s: ramp_duration,
        rate_per_s: ramp_totals.connected.max(0) as f64 / ramp_duration,
    });
    let window_start = monitor.window_mark(ramp_totals.tokens);
    // Memory with everyone connected; `idle` takes it again after its hold.
    let mut steady = monitor.snapshot();
    let mut drain = None;
    let window_end;
    match scenario.ending {
        Ending::Leave => {
            let hold_until = ramp_start + Duration::from_secs_f64(ramp_duration + scenario.hold_s);
            monitor
                .wait("hold", hold_until, |_, _| false, gateway)
                .await;
            steady = monitor.snapshot();
            window_end = monitor.window_mark(monitor.fleet.totals().tokens);
            monitor.fleet.leave().await;
            monitor
                .wait(
                    "leaving",
                    monitor.deadline,
                    |_, m| m.fleet.all_final(),
                    gateway,
                )
                .await;
        }
        Ending::AllDone => {
            monitor
                .wait(
                    "streaming",
                    monitor.deadline,
                    |_, m| m.fleet.all_final(),
                    gateway,
                )
                .await;
            window_end = monitor.window_mark(monitor.fleet.totals().tokens);
        }
        Ending::Drain => {
            let sigterm_at = stream_at + Duration::from_secs_f64(scenario.drain_after_s);
            monitor
                .wait("streaming", sigterm_at, |_, m| m.fleet.all_final(), gateway)
                .await;
            window_end = monitor.window_mark(monitor.fleet.totals().tokens);
            let sigterm_unix_us = unix_micros();
            let sigterm_run_s = monitor.at_s();
            gateway.sigterm()?;
            monitor.sigterm_at = Some(Instant::now());
            monitor
                .wait(
                    "draining",
                    monitor.deadline,
                    |_, m| m.fleet.all_final() && m.exit.is_some(),
                    gateway,
                )
                .await;
            drain = Some(drain_result(&monitor, sigterm_unix_us, sigterm_run_s, n));
        }
    }
    if monitor.timed_out {
        warnings.push(format!(
            "hit the {} s time limit: clients were told to leave",
            scenario.time_limit_s
        ));
        monitor.fleet.leave().await;
        let grace = Instant::now() + Duration::from_secs(15);
        monitor.deadline = grace;
        monitor
            .wait("stopping", grace, |_, m| m.fleet.all_final(), gateway)
            .await;
    }
    let settle_until = Instant::now() + SETTLE;
    let gateway_alive = scenario.ending != Ending::Drain;
    if gateway_alive {
        monitor
            .wait("after", settle_until, |_, _| false, gateway)
            .await;
    }
    let after = if gateway_alive {
        monitor.snapshot()
    } else {
        None
    };
    monitor.fleet.poll();

    let mut totals = Counters::default();
    let mut hist = new_histogram()?;
    for (counters, buckets) in monitor.fleet.finals() {
        totals.add(counters);
        buckets.add_to(&mut hist)?;
    }
    if !monitor.fleet.lost_workers.is_empty() {
        warnings.push(format!(
            "workers {:?} ended without a final report; their last progress is counted",
            monitor.fleet.lost_workers
        ));
    }
    let cpu = match (window_start.gateway_cpu_s, window_end.gateway_cpu_s) {
        (Some(start), Some(end)) => Some(Cpu {
            client_cpu_s: window_end.client_cpu_s - window_start.client_cpu_s,
            mock_cpu_s: window_end
                .mock_cpu_s
                .zip(window_start.mock_cpu_s)
                .map(|(e, s)| e - s),
            ..Cpu::new(
                window_end.at.duration_since(window_start.at).as_secs_f64(),
                end - start,
                window_end.tokens.saturating_sub(window_start.tokens),
            )
        }),
        _ => None,
    };
    let Monitor {
        fleet,
        points,
        peak_connected,
        timed_out,
        ..
    } = monitor;
    fleet.reap(Duration::from_secs(5)).await;
    Ok(Outcome {
        ending: scenario.ending,
        planned: n,
        latency: LatencySummary::of(&hist),
        latency_curve: quantile_curve(&hist),
        totals,
        before,
        steady,
        after,
        ramp,
        cpu,
        drain,
        points,
        peak_connected,
        timed_out,
        warnings,
    })
}

/// Every client is connected, or has already finished for good.
fn all_connected(t: &Counters, n: u64) -> bool {
    t.started >= n && t.connected.max(0) as u64 + t.ended >= n
}

fn drain_result(monitor: &Monitor, sigterm_unix_us: u64, sigterm_run_s: f64, n: u64) -> Drain {
    let t = monitor.fleet.totals();
    let notified = t.done + t.generation_errors + t.shutdown_reconnects;
    Drain {
        sigterm_at_s: sigterm_run_s,
        all_clients_notified_after_s: (notified >= n && t.last_terminal_us >= sigterm_unix_us)
            .then(|| (t.last_terminal_us - sigterm_unix_us) as f64 / 1e6),
        exit: monitor.exit.clone(),
        clients_done: t.done,
        clients_told_to_reconnect: t.shutdown_reconnects,
        lost_tokens_in_finished: t.lost_tokens,
    }
}

async fn create_generations(
    addr: SocketAddr,
    scenario: &Scenario,
    plan: &Plan,
    stream_at: Instant,
) -> Result<Vec<String>> {
    let mut ids = vec![String::new(); plan.generations.len()];
    let mut inflight = JoinSet::new();
    for (index, generation) in plan.generations.iter().enumerate() {
        if inflight.len() >= CREATE_CONCURRENCY {
            store_created(&mut ids, inflight.join_next().await)?;
        }
        let first_token_ms = stream_at
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
        let mut mock = json!({
            "tokens": generation.tokens,
            "interval_ms": scenario.interval_ms.to_json(),
            "first_token_ms": first_token_ms,
            "stamp": true,
            "seed": index,
        });
        if let Some(bytes) = scenario.token_bytes {
            mock["token_bytes"] = bytes.into();
        }
        let body = json!({
            "model": "tokenfan-loadtest",
            "messages": [{"role": "user", "content": format!("load test generation {index}")}],
            "mock": mock,
        })
        .to_string();
        inflight.spawn(async move { (index, create_one(addr, body).await) });
    }
    while let Some(joined) = inflight.join_next().await {
        store_created(&mut ids, Some(joined))?;
    }
    Ok(ids)
}

fn store_created(
    ids: &mut [String],
    joined: Option<Result<(usize, Result<String>), tokio::task::JoinError>>,
) -> Result<()> {
    if let Some(joined) = joined {
        let (index, id) = joined.context("generation creation task")?;
        ids[index] = id?;
    }
    Ok(())
}

async fn create_one(addr: SocketAddr, body: String) -> Result<String> {
    let mut attempt = 0;
    let resp = loop {
        let resp = request(
            addr,
            "POST",
            "/v1/generations",
            Some(body.as_bytes()),
            Duration::from_secs(10),
        )
        .await?;
        // Admission control (rate limit, too many running) is not what we measure: back off.
        if (resp.status == 429 || resp.status == 503) && attempt < 20 {
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            continue;
        }
        break resp;
    };
    if resp.status != 201 && resp.status != 200 {
        bail!(
            "POST /v1/generations answered {}: {}",
            resp.status,
            String::from_utf8_lossy(&resp.body)
        );
    }
    let value: serde_json::Value =
        serde_json::from_slice(&resp.body).context("generation response is not JSON")?;
    value["id"]
        .as_str()
        .map(str::to_string)
        .context("generation response has no id")
}

fn worker_specs(
    scenario: &Scenario,
    plan: &Plan,
    ids: &[String],
    gateway: SocketAddr,
    workers: u64,
) -> Vec<WorkerSpec> {
    let per_worker = plan.assignments.len().div_ceil(workers as usize).max(1);
    plan.assignments
        .chunks(per_worker)
        .enumerate()
        .map(|(k, slice)| WorkerSpec {
            gateway,
            generations: ids.to_vec(),
            assignments: slice.to_vec(),
            first_client: (k * per_worker) as u64,
            ramp_rate: scenario.ramp_rate as f64 / workers as f64,
            stall: scenario.stall.as_ref().map(|s| StallSpec {
                fraction: s.fraction,
                after_tokens: s.after_tokens,
                pause_ms: (s.pause_s * 1000.0) as u64,
                recv_buffer: s.recv_buffer,
            }),
            resume_after_shutdown: scenario.ending != Ending::Drain,
            max_reconnects: 20,
            // Room for a couple of padded events per read, without growing idle clients.
            read_buffer: scenario.token_bytes.map_or(MIN_READ_BUFFER, |b| {
                (2 * b as usize + 512).clamp(MIN_READ_BUFFER, 64 * 1024)
            }),
        })
        .collect()
}

impl Outcome {
    /// Every client got every token once, in order, and finished the way the scenario ends.
    fn zero_loss(&self) -> bool {
        let t = &self.totals;
        let finished = t.done + t.generation_errors;
        let everyone_finished = match self.ending {
            Ending::AllDone => finished >= self.planned,
            Ending::Leave => t.left >= self.planned,
            Ending::Drain => finished + t.shutdown_reconnects >= self.planned,
        };
        t.delivery_errors() == 0 && t.gave_up == 0 && everyone_finished && !self.timed_out
    }
}

/// `results/NAME` from `--out results/NAME.json`, or `results/<scenario>` by default.
fn output_stem(args: &RunArgs) -> Result<PathBuf> {
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("results").join(format!("{:?}.json", args.scenario).to_lowercase())
    });
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    Ok(out.with_extension(""))
}

fn write_outputs(args: &RunArgs, result: &RunResult, stem: &Path) -> Result<()> {
    let json_path = args
        .out
        .clone()
        .unwrap_or_else(|| stem.with_extension("json"));
    let json = serde_json::to_string_pretty(result).context("encode result")?;
    std::fs::write(&json_path, json).with_context(|| format!("write {}", json_path.display()))?;
    let with_suffix = |suffix: &str| {
        let mut name = stem.as_os_str().to_os_string();
        name.push(suffix);
        PathBuf::from(name)
    };
    if !result.ramp_points.is_empty() {
        chart::rss_against_connections(&result.ramp_points, &with_suffix(".rss.svg"))?;
    }
    let curve = &result.latency_curve;
    if !curve.is_empty() {
        let title = format!(
            "Delivery latency, {:?}, {} connections",
            result.scenario.name, result.connections.planned
        );
        chart::latency_distribution(curve, &title, &with_suffix(".latency.svg"))?;
    }
    eprintln!("wrote {} (+ charts beside it)", json_path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_args_keep_admission_out_of_the_way_unless_overridden() {
        let drain = Scenario::resolve(ScenarioName::Drain, &Overrides::default()).unwrap();
        let args = spawn_args(&drain, &["--create-rate=5".to_string()], 20_000);
        assert!(args.contains(&"--drain-deadline=5s".to_string()));
        assert!(args.contains(&"--max-connections=18936".to_string()));
        assert!(args.contains(&"--create-rate=5".to_string()));
        assert!(!args.contains(&"--create-rate=1000000".to_string()));
        assert!(args.contains(&"--create-burst=1000000".to_string()));
    }
}
