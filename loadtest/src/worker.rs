//! A worker process: runs a slice of the clients on one thread and talks to the coordinator
//! over stdio — the spec as the first stdin line, `leave` commands after it; JSON progress
//! lines and one final report on stdout. Several workers spread clients over processes (and
//! cores, and per-process open-file limits), so the same tool reaches 100K–1M connections on a
//! machine big enough for it.

use std::cell::RefCell;
use std::io::Write;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;
use tokio::task::LocalSet;

use crate::client::connect::source_address;
use crate::client::stats::Counters;
use crate::client::subscriber::{self, Plan, Policy, Shared, Stall};
use crate::metrics::latency::{new_histogram, Buckets};
use crate::scenario::stalls;

const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Clients are started in small batches on this tick rather than one timer per client.
const RAMP_TICK: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StallSpec {
    pub fraction: f64,
    pub after_tokens: u64,
    pub pause_ms: u64,
    pub recv_buffer: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub gateway: SocketAddr,
    pub generations: Vec<String>,
    /// Generation index of each of this worker's clients.
    pub assignments: Vec<u32>,
    /// Global index of `assignments[0]`: picks source addresses and the stalling subset.
    pub first_client: u64,
    /// This worker's share of the ramp, in clients per second.
    pub ramp_rate: f64,
    pub stall: Option<StallSpec>,
    pub resume_after_shutdown: bool,
    pub max_reconnects: u32,
    pub read_buffer: usize,
}

/// One stdout line of a worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerReport {
    Progress(Counters),
    Final {
        counters: Counters,
        latency: Buckets,
    },
}

/// Entry point of `tokenfan-loadtest worker`.
pub fn main() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("worker runtime")?;
    LocalSet::new().block_on(&runtime, run())
}

async fn run() -> Result<()> {
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let line = stdin
        .next_line()
        .await
        .context("read worker spec")?
        .context("no worker spec on stdin")?;
    let spec: WorkerSpec = serde_json::from_str(&line).context("parse worker spec")?;
    let (leave_tx, leave_rx) = watch::channel(false);
    tokio::task::spawn_local(async move {
        // `leave`, or the coordinator going away (EOF), ends every client.
        while let Ok(Some(cmd)) = stdin.next_line().await {
            if cmd.trim() == "leave" {
                break;
            }
        }
        let _ = leave_tx.send(true);
    });
    let shared = Rc::new(Shared {
        gateway: spec.gateway,
        counters: RefCell::new(Counters::default()),
        latency: RefCell::new(new_histogram()?),
        leave: leave_rx.clone(),
        policy: Policy {
            resume_after_shutdown: spec.resume_after_shutdown,
            max_reconnects: spec.max_reconnects,
            read_buffer: spec.read_buffer,
            backoff: Duration::from_secs(1),
        },
    });
    let ramp = tokio::task::spawn_local(ramp(spec, shared.clone(), leave_rx));
    let mut ticker = tokio::time::interval(PROGRESS_EVERY);
    loop {
        ticker.tick().await;
        let counters = shared.counters.borrow().clone();
        emit(&WorkerReport::Progress(counters.clone()))?;
        if ramp.is_finished() && counters.ended == counters.started {
            break;
        }
    }
    let counters = shared.counters.borrow().clone();
    let latency = Buckets::from_histogram(&shared.latency.borrow());
    emit(&WorkerReport::Final { counters, latency })
}

/// Starts this worker's clients at its share of the ramp rate, until all started or `leave`.
async fn ramp(spec: WorkerSpec, shared: Rc<Shared>, leave: watch::Receiver<bool>) {
    let generations: Vec<Rc<str>> = spec
        .generations
        .iter()
        .map(|g| Rc::from(g.as_str()))
        .collect();
    let stall = spec.stall.as_ref().map(|s| Stall {
        after_tokens: s.after_tokens,
        pause: Duration::from_millis(s.pause_ms),
        recv_buffer: s.recv_buffer,
    });
    let start = Instant::now();
    let mut ticker = tokio::time::interval(RAMP_TICK);
    let mut started = 0usize;
    while started < spec.assignments.len() && !*leave.borrow() {
        ticker.tick().await;
        let due = ((start.elapsed().as_secs_f64() * spec.ramp_rate) as usize + 1)
            .min(spec.assignments.len());
        for local in started..due {
            let index = spec.first_client + local as u64;
            let Some(generation) = generations.get(spec.assignments[local] as usize) else {
                // Cannot happen with a coordinator-built spec; never leave the count hanging.
                shared.counters.borrow_mut().ended += 1;
                continue;
            };
            let stalls_here = spec
                .stall
                .as_ref()
                .is_some_and(|s| stalls(index, s.fraction));
            let plan = Plan {
                generation: generation.clone(),
                source: source_address(index),
                stall: stall.filter(|_| stalls_here),
            };
            tokio::task::spawn_local(subscriber::run(plan, shared.clone()));
        }
        shared.counters.borrow_mut().started += (due - started) as u64;
        started = due;
    }
}

fn emit(report: &WorkerReport) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, report).context("encode worker report")?;
    out.write_all(b"\n")
        .and_then(|()| out.flush())
        .context("write worker report")
}
