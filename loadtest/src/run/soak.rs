//! The soak: rounds of churn against one gateway — a warm-up, then the measured rounds. In a
//! round, generations are created on a schedule through the API (a drawn share told to fail)
//! while clients arrive, read, stall, drop and leave; then the round settles: the gateway's
//! gauges must come back to 0, the retention must free every finished generation, and RSS is
//! read once it stops falling. The warm-up's settled RSS is the baseline: memory the process
//! legitimately keeps after serving this load (allocator extents, hyper and tokio pools) is in
//! it, so a later round that ends above baseline + margin holds memory it should not.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::monitor::Monitor;
use super::phases::{finish, stop, Outcome};
use super::setup::{create_generations, target, worker_specs};
use crate::client::stats::Counters;
use crate::fleet::Fleet;
use crate::gateway::Gateway;
use crate::metrics::gauges::{scrape, Gauges};
use crate::metrics::latency::{new_histogram, quantile_curve, LatencySummary};
use crate::metrics::snapshot::RampPoint;
use crate::report::soak::{Soak, SoakRound};
use crate::report::{Cpu, Ramp};
use crate::scenario::{mix, Ending, Plan, Scenario, SoakKnobs};

/// How long the gauges may take to come back to 0 once every generation should have ended.
const GAUGE_SETTLE: Duration = Duration::from_secs(5);
/// Past the retention, so the last finished generation is surely freed.
const RETENTION_SLACK: Duration = Duration::from_millis(500);
/// RSS has stopped falling when it has not dropped by more than `RSS_STEP` for `RSS_QUIET`;
/// it is read then, or after `RSS_SETTLE_MAX` at the latest.
const RSS_STEP: u64 = 256 << 10;
const RSS_QUIET: Duration = Duration::from_secs(3);
const RSS_SETTLE_MAX: Duration = Duration::from_secs(15);
/// Delay before the first generation of a round, so the workers are up to follow it.
const ROUND_START: Duration = Duration::from_millis(200);
const TICK: Duration = Duration::from_millis(250);

pub async fn measure(
    scenario: &Scenario,
    gateway: &mut Gateway,
    workers: u64,
    seed: u64,
    t0: Instant,
) -> Result<Outcome> {
    let soak = scenario.soak.as_ref().context("the soak needs its knobs")?;
    let deadline = t0 + Duration::from_secs(scenario.time_limit_s);
    let mut warnings = Vec::new();
    let before_traffic = gateway
        .info
        .pid()
        .and_then(|pid| crate::metrics::proc::read_rss(pid).ok());
    let mut run = Run::default();
    let mut hist = new_histogram()?;
    // Over the soak rounds' churn (not the warm-up, nor the settles between rounds).
    let mut cpu: Option<Cpu> = None;
    for (name, churn_s, round_seed) in rounds(soak, seed) {
        let warm_up = name == WARM_UP;
        let plan = Plan::churn(scenario, round_seed, churn_s)?;
        let round_workers = workers.min(plan.connections().max(1));
        let specs = worker_specs(
            scenario,
            &plan,
            &[],
            &gateway.info.addrs(),
            round_workers,
            round_seed,
        );
        let fleet = Fleet::spawn(&specs).await?;
        let mut monitor = Monitor::new(fleet, gateway, t0, deadline, plan.connections());
        let started = Instant::now();
        let peak_from = run.points.len();
        let window_start = monitor.window_mark(0);
        let creation_errors = churn(&mut monitor, gateway, scenario, &plan, &name, churn_s).await;
        let window_end = monitor.window_mark(monitor.fleet.totals().tokens);
        if let Some(round_cpu) = window_start.cpu_until(&window_end).filter(|_| !warm_up) {
            cpu = Some(match cpu.take() {
                Some(sum) => sum.plus(round_cpu),
                None => round_cpu,
            });
        }
        if creation_errors.count > 0 {
            warnings.push(format!(
                "{name}: {} generations could not be created, first: {}",
                creation_errors.count,
                creation_errors.first.as_deref().unwrap_or("?")
            ));
        }
        if monitor.timed_out {
            warnings.push(format!(
                "hit the {} s time limit in {name}: clients were told to leave",
                scenario.time_limit_s
            ));
            stop(&mut monitor, gateway).await;
        }
        let settled = settle(&mut monitor, gateway, scenario, soak, churn_s, started).await;
        let finished = finish(monitor, &mut warnings).await?;
        hist.add(&finished.hist.merged()?)
            .context("merge latency histograms")?;
        let delivery = finished.totals;
        run.points.extend(finished.points);
        run.peak_connected = run.peak_connected.max(finished.peak_connected);
        run.timed_out |= finished.timed_out;
        run.planned += plan.connections();
        run.totals.add(&delivery);
        if !warm_up {
            run.churn_s += churn_s;
            run.soak_clients += plan.connections();
        }
        run.rounds.push(SoakRound {
            name,
            warm_up,
            churn_s,
            clients: plan.connections(),
            generations: plan.generations.len() as u64,
            generations_planned_to_fail: plan
                .generations
                .iter()
                .filter(|g| g.fault.is_some())
                .count() as u64,
            creation_errors: creation_errors.count,
            delivery,
            gauges: settled.gauges,
            gauges_idle_after_s: settled.gauges_idle_after_s,
            peak_rss_bytes: run.points[peak_from..].iter().map(|p| p.rss_bytes).max(),
            settled: settled.snapshot,
            rss_settle_s: settled.rss_settle_s,
            duration_s: started.elapsed().as_secs_f64(),
        });
        if run.timed_out {
            break;
        }
    }

    let baseline = match run.rounds.iter().find(|r| r.warm_up) {
        Some(warm_up) => warm_up.settled.as_ref().map(|s| s.rss_bytes),
        None => {
            warnings.push(
                "no warm-up: the RSS baseline was taken before any traffic, which allocator \
                 retention alone will exceed"
                    .into(),
            );
            before_traffic
        }
    };
    let outcome = Outcome {
        ending: Ending::Churn,
        planned: run.planned,
        totals: run.totals,
        latency: LatencySummary::of(&hist),
        direct_latency: None,
        latency_by_side: None,
        store: None,
        latency_curve: quantile_curve(&hist),
        before: None,
        steady: None,
        after: None,
        ramp: Ramp {
            duration_s: run.churn_s,
            rate_per_s: run.soak_clients as f64 / run.churn_s.max(f64::EPSILON),
        },
        cpu,
        drain: None,
        points: run.points,
        peak_connected: run.peak_connected,
        timed_out: run.timed_out,
        warnings,
        soak: None,
    };
    let delivery = outcome.zero_loss();
    Ok(Outcome {
        soak: Some(Soak::new(run.rounds, before_traffic, baseline, delivery)),
        ..outcome
    })
}

const WARM_UP: &str = "warm-up";

/// (name, churn seconds, seed) of each round. The first soak round uses the run's seed, so
/// its plan is the one `Plan::build` makes for the scenario.
fn rounds(soak: &SoakKnobs, seed: u64) -> Vec<(String, f64, u64)> {
    let warm_up =
        (soak.warmup_s > 0.0).then(|| (WARM_UP.to_string(), soak.warmup_s, mix(seed ^ 0x3a7d)));
    let soaks = (1..=soak.rounds).map(|i| {
        let name = if soak.rounds == 1 {
            "soak".to_string()
        } else {
            format!("soak {i}")
        };
        let round_seed = if i == 1 {
            seed
        } else {
            mix(seed ^ u64::from(i))
        };
        (name, soak.churn_s, round_seed)
    });
    warm_up.into_iter().chain(soaks).collect()
}

/// What a run of rounds adds up to.
#[derive(Default)]
struct Run {
    rounds: Vec<SoakRound>,
    totals: Counters,
    points: Vec<RampPoint>,
    peak_connected: i64,
    timed_out: bool,
    planned: u64,
    churn_s: f64,
    soak_clients: u64,
}

#[derive(Default)]
struct CreationErrors {
    count: u64,
    first: Option<String>,
}

/// Creates the round's generations evenly over `churn_s`, telling the workers each one as it
/// is created, while watching the clients until all are done.
async fn churn(
    monitor: &mut Monitor,
    gateway: &mut Gateway,
    scenario: &Scenario,
    plan: &Plan,
    name: &str,
    churn_s: f64,
) -> CreationErrors {
    let addrs = gateway.info.addrs();
    let commands = monitor.fleet.commands();
    let start = Instant::now() + ROUND_START;
    let period = Duration::from_secs_f64(churn_s / plan.generations.len().max(1) as f64);
    let margin = Duration::from_secs_f64(scenario.start_margin_s);
    let mut errors = CreationErrors::default();
    let creating = create_generations(
        &addrs,
        scenario,
        plan,
        |index| {
            let due = start + period * index as u32;
            (due, due + margin)
        },
        |index, id| {
            let id = id
                .map_err(|error| {
                    errors.count += 1;
                    errors.first.get_or_insert_with(|| format!("{error:#}"));
                })
                .ok();
            commands.announce(&target(scenario, plan, index, id, None));
            Ok(())
        },
    );
    let deadline = monitor.deadline;
    let watching = monitor.wait(name, deadline, |_, m| m.fleet.all_final(), gateway);
    let (created, _) = tokio::join!(creating, watching);
    if let Err(error) = created {
        errors.count += 1;
        errors.first.get_or_insert_with(|| format!("{error:#}"));
    }
    errors
}

/// What the settle after a round found.
struct Settled {
    gauges: Option<Gauges>,
    gauges_idle_after_s: Option<f64>,
    snapshot: Option<crate::metrics::snapshot::Snapshot>,
    rss_settle_s: f64,
}

/// Polls the gauges until idle (allowing the last generations their stream), waits out the
/// retention from the moment nothing ran, then reads RSS once it stops falling.
async fn settle(
    monitor: &mut Monitor,
    gateway: &mut Gateway,
    scenario: &Scenario,
    soak: &SoakKnobs,
    churn_s: f64,
    round_started: Instant,
) -> Settled {
    // The soak runs one instance.
    let addr = gateway.info.addrs()[0];
    let clients_done = Instant::now();
    // The last generation is due at the end of the churn and may stream its longest.
    let last_may_end = round_started
        + ROUND_START
        + Duration::from_secs_f64(churn_s + scenario.start_margin_s + scenario.stream_s());
    let give_up = last_may_end.max(clients_done) + GAUGE_SETTLE;
    let mut gauges = None;
    let mut nothing_running_at = None;
    loop {
        if let Ok(scraped) = scrape(addr).await {
            if scraped.nothing_running() {
                nothing_running_at.get_or_insert_with(Instant::now);
            }
            gauges = Some(scraped);
        }
        if gauges.is_some_and(|g| g.idle()) || Instant::now() >= give_up.min(monitor.deadline) {
            break;
        }
        monitor
            .wait("settle", Instant::now() + TICK, |_, _| false, gateway)
            .await;
    }
    let gauges_idle_after_s = gauges
        .filter(Gauges::idle)
        .map(|_| clients_done.elapsed().as_secs_f64());
    // Every generation ended by `nothing_running_at`; the retention frees it that much later.
    let freed_at = nothing_running_at.unwrap_or_else(Instant::now)
        + Duration::from_secs_f64(soak.retention_s)
        + RETENTION_SLACK;
    monitor
        .wait("retention", freed_at, |_, _| false, gateway)
        .await;
    let rss_from = Instant::now();
    if gateway.info.pid().is_some() {
        let mut lowest = u64::MAX;
        let mut last_drop = rss_from;
        loop {
            monitor
                .wait("settle RSS", Instant::now() + TICK, |_, _| false, gateway)
                .await;
            let Some(rss) = monitor.points.last().map(|p| p.rss_bytes) else {
                break;
            };
            if rss + RSS_STEP < lowest {
                last_drop = Instant::now();
            }
            lowest = lowest.min(rss);
            let now = Instant::now();
            if now - last_drop >= RSS_QUIET
                || now - rss_from >= RSS_SETTLE_MAX
                || now >= monitor.deadline
            {
                break;
            }
        }
    }
    Settled {
        gauges,
        gauges_idle_after_s,
        snapshot: monitor.snapshot(),
        rss_settle_s: rss_from.elapsed().as_secs_f64(),
    }
}
