//! The coordinator: checks limits, starts (or attaches to) the gateway, then hands over to
//! `phases` (set up, ramp, ending) while `monitor` samples, and assembles and writes the
//! result.

mod monitor;
mod phases;
mod setup;
mod soak;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::client::subscriber::unix_micros;
use crate::floor::{relay_floor as relay_floor_of, FloorArgs, RelayFloor};
use crate::gateway::Gateway;
use crate::metrics::limits::{
    gateway_capacity, over_the_wall, preflight, raise_nofile, workers_needed, GATEWAY_FD_MARGIN,
};
use crate::report::chatpath::ChatPath;
use crate::report::{chart, Connections, Machine, Memory, RunResult};
use crate::scenario::{Ending, Overrides, Plan, Scenario, ScenarioName};

#[derive(Debug, Args)]
pub struct RunArgs {
    #[arg(value_enum)]
    pub scenario: ScenarioName,
    #[command(flatten)]
    pub overrides: Overrides,
    /// Client worker processes; raised automatically so each stays under its open-file limit.
    #[arg(long)]
    pub workers: Option<u64>,
    /// Cap N at what the gateway processes can hold here instead of failing.
    #[arg(long)]
    pub cap: bool,
    /// tokenfan binary to spawn (as `serve` and, separately, `mock-upstream`).
    #[arg(long, default_value = "target/release/tokenfan")]
    pub gateway_bin: PathBuf,
    /// Extra flag for the spawned `tokenfan serve`, repeatable: `--gateway-arg=--channel-capacity=32`.
    #[arg(long = "gateway-arg", allow_hyphen_values = true)]
    pub gateway_args: Vec<String>,
    /// Environment of the spawned gateway, repeatable: `--gateway-env=NAME=value`; replaces the
    /// scenario's value of NAME (`--gateway-env=_RJEM_MALLOC_CONF=`: jemalloc's defaults).
    #[arg(long = "gateway-env")]
    pub gateway_env: Vec<String>,
    /// Target a running gateway (`http://127.0.0.1:8080`) instead of spawning one.
    #[arg(long)]
    pub url: Option<String>,
    /// PID of the `--url` gateway, for memory and CPU figures (and SIGTERM in `drain`).
    #[arg(long, requires = "url")]
    pub pid: Option<u32>,
    /// JSON result path; charts are written beside it (`NAME.rss.svg`, `NAME.latency.svg`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed for drawn knobs (tokens, subscribers and faults per generation, client behaviours).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Runs one scenario to completion (or its time limit) and returns the result.
pub async fn run(args: &RunArgs, command: String) -> Result<RunResult> {
    let t0 = Instant::now();
    let started_utc = crate::report::utc_timestamp(unix_micros() / 1_000_000);
    let scenario = Scenario::resolve(args.scenario, &args.overrides)?;
    if args.url.is_some() && scenario.cluster.is_some() {
        bail!("cluster starts its own instances and Redis: leave out --url");
    }
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
            let env = spawn_env(&scenario, &args.gateway_env);
            let cluster = scenario.cluster.as_ref();
            Gateway::spawn(&args.gateway_bin, &extra, &env, &log_prefix, cluster).await?
        }
    };
    // Each instance against its own open-files wall, with the clients that connect to it.
    let pids = gateway.info.pids();
    let mut capacity = Vec::new();
    for &pid in &pids {
        capacity.push(gateway_capacity(pid, scenario.upstream_fds_per_instance())?);
    }
    let loads = plan.clients_per_instance(scenario.instances());
    if let Some((worst, max)) = over_the_wall(&capacity, &loads, requested) {
        let message = capacity[worst].wall_message(pids[worst], loads[worst], max);
        if !args.cap {
            gateway.stop().await;
            bail!(message);
        }
        eprintln!("warning: {message}\nwarning: capping at {max} connections (--cap)");
        warnings.push(format!("capped at {max}: {message}"));
        plan.cap(max);
    }
    if pids.is_empty() {
        warnings.push("no gateway pid: memory and CPU were not measured".into());
    }
    let n = plan.connections();
    let workers = args
        .workers
        .unwrap_or(1)
        .max(workers_needed(n, own_nofile))
        .min(n.max(1));

    let result = match scenario.ending {
        Ending::Churn => soak::measure(&scenario, &mut gateway, workers, args.seed, t0).await,
        _ => phases::measure(&scenario, &plan, &mut gateway, workers, args.seed, t0).await,
    };
    let gateway_info = gateway.info.clone();
    gateway.stop().await;
    let outcome = result?;
    warnings.extend(outcome.warnings.iter().cloned());
    let chatpath = match &outcome.direct_latency {
        Some(direct) => {
            // The gateway's runtime has one worker per core (tokio's default).
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let mut measured = |floor: Result<RelayFloor>| {
                floor
                    .map_err(|e| warnings.push(format!("relay floor: {e:#}")))
                    .ok()
            };
            let on_one_thread = measured(relay_floor(&scenario, None).await);
            let on_workers = measured(relay_floor(&scenario, Some(u32::try_from(cores)?)).await);
            let us_per_token = outcome.cpu.as_ref().and_then(|c| c.us_per_event);
            let gateway = &outcome.latency;
            Some(ChatPath::new(
                direct.clone(),
                gateway,
                us_per_token,
                on_one_thread,
                on_workers,
            ))
        }
        None => None,
    };
    let result = RunResult {
        zero_loss: outcome.zero_loss(),
        latency_by_side: outcome.latency_by_side.clone(),
        chatpath,
        store: outcome.store.clone(),
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
        soak: outcome.soak,
        ramp_points: outcome.points,
        timed_out: outcome.timed_out,
        duration_s: t0.elapsed().as_secs_f64(),
    };
    write_outputs(args, &result, &log_prefix)?;
    Ok(result)
}

/// `floor --relay` at the scenario's load — a pair per generation at its token rate, 10 s — on
/// a quiet machine: after the run, with the gateway and mock stopped; on one thread, or on a
/// runtime of `workers`.
async fn relay_floor(scenario: &Scenario, workers: Option<u32>) -> Result<RelayFloor> {
    let args = FloorArgs {
        connections: usize::try_from(scenario.generations)?,
        rate: u32::try_from(1000 / scenario.interval_ms.min.max(1))?.max(1),
        seconds: 10,
        frame_bytes: 60,
        relay: true,
        threads: 1,
        relay_workers: workers,
    };
    eprintln!(
        "relay floor: {} pairs at {} tokens/s each, 10 s, {}",
        args.connections,
        args.rate,
        workers.map_or("one thread".into(), |w| format!("{w} workers"))
    );
    tokio::task::spawn_blocking(move || relay_floor_of(&args)).await?
}

/// Flags for a spawned gateway: the scenario's, then the user's, after defaults that keep
/// admission control out of the measurement — creation is not rate limited, and the connection
/// limit is the open-files wall rather than the gateway's conservative default reserve. A
/// default is left out when the scenario or user sets the same flag.
fn spawn_args(scenario: &Scenario, user: &[String], nofile: u64) -> Vec<String> {
    // Never below the cap `gateway_capacity` computes (which also subtracts the fds in use).
    let max_connections =
        nofile.saturating_sub(scenario.upstream_fds_per_instance() + GATEWAY_FD_MARGIN);
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

/// The scenario's gateway environment with the user's entries in place of the same names.
fn spawn_env(scenario: &Scenario, user: &[String]) -> Vec<String> {
    let name = |pair: &String| pair.split('=').next().unwrap_or_default().to_string();
    let mut env: Vec<String> = scenario
        .gateway_env
        .iter()
        .filter(|pair| !user.iter().any(|u| name(u) == name(pair)))
        .cloned()
        .collect();
    env.extend(user.iter().cloned());
    env
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
    let rss_chart = with_suffix(".rss.svg");
    match &result.soak {
        _ if result.ramp_points.is_empty() => {}
        Some(soak) => chart::rss_over_time(&result.ramp_points, soak, &rss_chart)?,
        None => chart::rss_against_connections(&result.ramp_points, &rss_chart)?,
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

    #[test]
    fn the_users_gateway_env_replaces_the_scenarios() {
        let soak = Scenario::resolve(ScenarioName::Soak, &Overrides::default()).unwrap();
        assert!(spawn_env(&soak, &[])[0].starts_with("_RJEM_MALLOC_CONF=background_thread:true"));
        let env = spawn_env(
            &soak,
            &[
                "_RJEM_MALLOC_CONF=".to_string(),
                "TOKENFAN_LOG=debug".to_string(),
            ],
        );
        assert_eq!(env, ["_RJEM_MALLOC_CONF=", "TOKENFAN_LOG=debug"]);
    }
}
