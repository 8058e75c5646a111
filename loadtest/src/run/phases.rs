//! The phases of a run once the gateway is up: set up, ramp, the scenario's ending (hold and
//! leave, stream to the end, or SIGTERM and drain), a stop at the time limit, the after
//! snapshot, and the sums of what the workers saw.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::monitor::{all_connected, Monitor, WindowMark};
use super::setup::{create_generations, direct_call, target, worker_specs};
use crate::client::stats::Counters;
use crate::client::subscriber::unix_micros;
use crate::fleet::Fleet;
use crate::gateway::Gateway;
use crate::metrics::latency::{new_histogram, quantile_curve, BySide, LatencySummary};
use crate::metrics::redis::{generation_statuses, stored_tokens, RedisStats, StoreUse};
use crate::metrics::snapshot::{RampPoint, Snapshot};
use crate::report::soak::Soak;
use crate::report::{Cpu, Drain, Ramp};
use crate::scenario::{Ending, Plan, Scenario};

const SETTLE: Duration = Duration::from_secs(2);
/// Assumed creation rate, used only to plan when the first token should be emitted.
const CREATE_PER_S: f64 = 1000.0;

/// Everything measured while the clients ran.
pub struct Outcome {
    pub ending: Ending,
    pub planned: u64,
    pub totals: Counters,
    pub latency: LatencySummary,
    /// Streams read straight from the mock beside the gateway's (`chatpath`).
    pub direct_latency: Option<LatencySummary>,
    /// With several instances: viewers on the generation's owner and on other instances.
    pub latency_by_side: Option<BySide<LatencySummary>>,
    pub latency_curve: Vec<(f64, u64)>,
    pub store: Option<StoreUse>,
    pub before: Option<Snapshot>,
    pub steady: Option<Snapshot>,
    pub after: Option<Snapshot>,
    pub ramp: Ramp,
    pub cpu: Option<Cpu>,
    pub drain: Option<Drain>,
    pub points: Vec<RampPoint>,
    pub peak_connected: i64,
    pub timed_out: bool,
    pub warnings: Vec<String>,
    pub soak: Option<Soak>,
}

impl Outcome {
    /// Every client got every token once, in order, and finished the way the scenario ends.
    pub fn zero_loss(&self) -> bool {
        let t = &self.totals;
        let finished = t.done + t.generation_errors;
        let everyone_finished = match self.ending {
            Ending::AllDone => finished >= self.planned,
            Ending::Leave => t.left >= self.planned,
            // Handed-over viewers read on elsewhere until their generation ends.
            Ending::Drain if self.drain.as_ref().is_some_and(|d| d.hands_over) => {
                finished >= self.planned
            }
            Ending::Drain => finished + t.shutdown_reconnects >= self.planned,
            // Clients that left mid-stream on purpose are the only ones without an ending.
            Ending::Churn => finished + t.left_midstream >= self.planned,
        };
        t.delivery_errors() == 0 && t.gave_up == 0 && everyone_finished && !self.timed_out
    }
}

/// What the scenario's ending measured.
struct Ended {
    /// A later steady snapshot (`idle` takes it at the end of its hold).
    steady: Option<Snapshot>,
    window_end: WindowMark,
    drain: Option<Drain>,
}

pub async fn measure(
    scenario: &Scenario,
    plan: &Plan,
    gateway: &mut Gateway,
    workers: u64,
    seed: u64,
    t0: Instant,
) -> Result<Outcome> {
    let n = plan.connections();
    let addrs = gateway.info.addrs();
    let store_addr = gateway.info.store.as_ref().map(|s| s.addr);
    let store_before = match store_addr {
        Some(addr) => Some(RedisStats::read(addr).await?),
        None => None,
    };
    // All generations hold their first token until the ramp should be over, so latency is
    // measured on live fan-out rather than on replay to late joiners.
    let stream_at = Instant::now()
        + Duration::from_secs_f64(
            plan.generations.len() as f64 / CREATE_PER_S
                + scenario.ramp_s(n)
                + scenario.start_margin_s,
        );
    eprintln!(
        "creating {} generations, then {n} connections at {}/s over {workers} worker(s); first token in {:.1} s",
        plan.generations.len() as u64 - scenario.direct_streams(),
        scenario.ramp_rate,
        stream_at.saturating_duration_since(Instant::now()).as_secs_f64()
    );
    let mut ids = vec![None; plan.generations.len()];
    let now = Instant::now();
    let phase = first_token_phase(scenario, plan.generations.len());
    let first_token_at = |index: usize| stream_at + phase * index as u32;
    create_generations(
        &addrs,
        scenario,
        plan,
        |index| (now, first_token_at(index)),
        |index, id| {
            ids[index] = Some(id?);
            Ok(())
        },
    )
    .await?;
    let mock = gateway.info.mock_addr;
    let mut targets = Vec::with_capacity(ids.len());
    for (index, id) in ids.into_iter().enumerate() {
        let direct = match (plan.generations[index].direct, mock) {
            (false, _) => None,
            (true, Some(mock)) => Some(direct_call(
                scenario,
                plan,
                index,
                mock,
                first_token_at(index),
            )),
            (true, None) => bail!("direct streams need the mock the tool spawns: leave out --url"),
        };
        targets.push(target(scenario, plan, index, id, direct));
    }
    let specs = worker_specs(scenario, plan, &targets, &addrs, workers, seed);
    let pids = gateway.info.pids();
    let before = (!pids.is_empty())
        .then(|| Snapshot::take(&pids, t0.elapsed().as_secs_f64(), 0))
        .transpose()?;
    let deadline = t0 + Duration::from_secs(scenario.time_limit_s);
    let fleet = Fleet::spawn(&specs).await?;
    let mut monitor = Monitor::new(fleet, gateway, t0, deadline, n);
    let mut warnings = Vec::new();

    let ramp = ramp(&mut monitor, gateway, scenario, n, &mut warnings).await;
    let window_start = monitor.window_mark(monitor.fleet.totals().tokens);
    // Memory with everyone connected.
    let steady = monitor.snapshot();
    let mut ended = match scenario.ending {
        Ending::Leave => hold_and_leave(&mut monitor, gateway, scenario).await,
        // A churn run has its own phases (`soak`); were one to come here, it streams to the end.
        Ending::AllDone | Ending::Churn => stream_to_the_end(&mut monitor, gateway).await,
        Ending::Drain => sigterm_and_drain(&mut monitor, gateway, scenario, stream_at, n).await?,
    };
    // At the end of streaming, before the retention expires anything.
    let store = match (store_addr, store_before) {
        (Some(addr), Some(before)) => {
            let after = RedisStats::read(addr).await?;
            Some(StoreUse::between(
                &before,
                &after,
                stored_tokens(addr).await?,
            ))
        }
        _ => None,
    };
    if monitor.timed_out {
        warnings.push(format!(
            "hit the {} s time limit: clients were told to leave",
            scenario.time_limit_s
        ));
        stop(&mut monitor, gateway).await;
    }
    let after = if scenario.ending == Ending::Drain {
        None
    } else {
        let settle_until = Instant::now() + SETTLE;
        monitor
            .wait("after", settle_until, |_, _| false, gateway)
            .await;
        monitor.snapshot()
    };
    if let (Some(drain), Some(addr)) = (ended.drain.as_mut(), store_addr) {
        drain.generations = generation_statuses(addr).await?;
    }
    let cpu = window_start.cpu_until(&ended.window_end);
    let finished = finish(monitor, &mut warnings).await?;
    if let Some(drain) = ended.drain.as_mut().filter(|d| d.hands_over) {
        drain.handover_gap = Some(LatencySummary::of(&finished.handover_gap));
    }
    let all = finished.hist.merged()?;
    Ok(Outcome {
        ending: scenario.ending,
        planned: n,
        latency: LatencySummary::of(&all),
        direct_latency: (scenario.direct_streams() > 0)
            .then(|| LatencySummary::of(&finished.direct_latency)),
        latency_by_side: (scenario.instances() > 1).then(|| finished.hist.map(LatencySummary::of)),
        latency_curve: quantile_curve(&all),
        store,
        totals: finished.totals,
        before,
        steady: ended.steady.or(steady),
        after,
        ramp,
        cpu,
        drain: ended.drain,
        points: finished.points,
        peak_connected: finished.peak_connected,
        timed_out: finished.timed_out,
        warnings,
        soak: None,
    })
}

/// Waits until every client is connected (or its time is up: three times the planned ramp).
async fn ramp(
    monitor: &mut Monitor,
    gateway: &mut Gateway,
    scenario: &Scenario,
    n: u64,
    warnings: &mut Vec<String>,
) -> Ramp {
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(scenario.ramp_s(n) * 3.0 + 15.0);
    monitor
        .wait("ramp", until, |t, _| all_connected(t, n), gateway)
        .await;
    let totals = monitor.fleet.totals();
    if !all_connected(&totals, n) {
        warnings.push(format!(
            "ramp incomplete: {} of {n} connected when the ramp's time ran out",
            totals.connected
        ));
    }
    let duration_s = start.elapsed().as_secs_f64();
    Ramp {
        duration_s,
        rate_per_s: totals.connected.max(0) as f64 / duration_s,
    }
}

/// `idle`: everyone holds their stream, then all leave at once.
async fn hold_and_leave(
    monitor: &mut Monitor,
    gateway: &mut Gateway,
    scenario: &Scenario,
) -> Ended {
    let hold_until = Instant::now() + Duration::from_secs_f64(scenario.hold_s.max(0.0));
    monitor
        .wait("hold", hold_until, |_, _| false, gateway)
        .await;
    let steady = monitor.snapshot();
    let window_end = monitor.window_mark(monitor.fleet.totals().tokens);
    monitor.fleet.leave();
    let deadline = monitor.deadline;
    monitor
        .wait("leaving", deadline, |_, m| m.fleet.all_final(), gateway)
        .await;
    Ended {
        steady,
        window_end,
        drain: None,
    }
}

/// Every client reads until its generation's `done`.
async fn stream_to_the_end(monitor: &mut Monitor, gateway: &mut Gateway) -> Ended {
    let deadline = monitor.deadline;
    monitor
        .wait("streaming", deadline, |_, m| m.fleet.all_final(), gateway)
        .await;
    Ended {
        steady: None,
        window_end: monitor.window_mark(monitor.fleet.totals().tokens),
        drain: None,
    }
}

/// `drain` and `cluster-drain`: SIGTERM (to instance 0) a fixed time into streaming, then wait
/// for every client and the exit.
async fn sigterm_and_drain(
    monitor: &mut Monitor,
    gateway: &mut Gateway,
    scenario: &Scenario,
    stream_at: Instant,
    n: u64,
) -> Result<Ended> {
    let sigterm_at = stream_at + Duration::from_secs_f64(scenario.drain_after_s);
    monitor
        .wait("streaming", sigterm_at, |_, m| m.fleet.all_final(), gateway)
        .await;
    let window_end = monitor.window_mark(monitor.fleet.totals().tokens);
    let sigterm_unix_us = unix_micros();
    let sigterm_run_s = monitor.at_s();
    gateway.sigterm()?;
    monitor.sigterm_at = Some(Instant::now());
    let deadline = monitor.deadline;
    monitor
        .wait(
            "draining",
            deadline,
            |_, m| m.fleet.all_final() && m.exit.is_some(),
            gateway,
        )
        .await;
    let t = monitor.fleet.totals();
    let notified = t.done + t.generation_errors + t.shutdown_reconnects;
    let drain = Drain {
        sigterm_at_s: sigterm_run_s,
        all_clients_notified_after_s: (notified >= n && t.last_terminal_us >= sigterm_unix_us)
            .then(|| (t.last_terminal_us - sigterm_unix_us) as f64 / 1e6),
        exit: monitor.exit.clone(),
        clients_done: t.done,
        clients_told_to_reconnect: t.shutdown_reconnects,
        lost_tokens_in_finished: t.lost_tokens,
        hands_over: scenario.hands_over(),
        // Filled in from the workers' final reports and the store once the run is over.
        handover_gap: None,
        generations: Default::default(),
    };
    Ok(Ended {
        steady: None,
        window_end,
        drain: Some(drain),
    })
}

/// The time limit passed: tell every client to leave and give the workers 15 s to report.
pub(super) async fn stop(monitor: &mut Monitor, gateway: &mut Gateway) {
    monitor.fleet.leave();
    let grace = Instant::now() + Duration::from_secs(15);
    monitor.deadline = grace;
    monitor
        .wait("stopping", grace, |_, m| m.fleet.all_final(), gateway)
        .await;
}

/// What a fleet leaves when its clients are done: their summed counters and merged latency
/// histogram, and what the monitor sampled.
pub(super) struct Finished {
    pub totals: Counters,
    pub hist: BySide<hdrhistogram::Histogram<u64>>,
    pub direct_latency: hdrhistogram::Histogram<u64>,
    /// Hand-over gaps of clients a draining instance told to reconnect.
    pub handover_gap: hdrhistogram::Histogram<u64>,
    pub points: Vec<RampPoint>,
    pub peak_connected: i64,
    pub timed_out: bool,
}

/// Collects the workers' final reports, then reaps them.
pub(super) async fn finish(mut monitor: Monitor, warnings: &mut Vec<String>) -> Result<Finished> {
    let (totals, hist, direct_latency, handover_gap) = collect(&mut monitor, warnings)?;
    let Monitor {
        fleet,
        points,
        peak_connected,
        timed_out,
        ..
    } = monitor;
    fleet.reap(Duration::from_secs(5)).await;
    Ok(Finished {
        totals,
        hist,
        direct_latency,
        handover_gap,
        points,
        peak_connected,
        timed_out,
    })
}

type Collected = (
    Counters,
    BySide<hdrhistogram::Histogram<u64>>,
    hdrhistogram::Histogram<u64>,
    hdrhistogram::Histogram<u64>,
);

/// Sums the workers' final counters and merges their latency (gateway, direct) and hand-over
/// histograms.
fn collect(monitor: &mut Monitor, warnings: &mut Vec<String>) -> Result<Collected> {
    monitor.fleet.poll();
    let mut totals = Counters::default();
    let mut hist = BySide::new()?;
    let mut direct_latency = new_histogram()?;
    let mut handover_gap = new_histogram()?;
    for done in monitor.fleet.finals() {
        totals.add(&done.counters);
        done.latency.add_to(&mut hist)?;
        done.direct_latency.add_to(&mut direct_latency)?;
        done.handover_gap.add_to(&mut handover_gap)?;
    }
    if !monitor.fleet.lost_workers.is_empty() {
        warnings.push(format!(
            "workers {:?} ended without a final report; their last progress is counted",
            monitor.fleet.lost_workers
        ));
    }
    Ok((totals, hist, direct_latency, handover_gap))
}

/// How far apart consecutive generations' first tokens are: together they spread over one token
/// interval (at most a second), as independent providers' streams do. The mock keeps each stream
/// on its own fixed schedule, so first tokens released in the same millisecond would stay in
/// phase for the whole run, and every token would reach the gateway as a burst of all
/// generations at once — a worst case (the `burst` scenario's business), not a steady load.
fn first_token_phase(scenario: &Scenario, generations: usize) -> Duration {
    let spread = Duration::from_millis(scenario.interval_ms.min.min(1000));
    spread / u32::try_from(generations.max(1)).unwrap_or(u32::MAX)
}
