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
use crate::client::direct;
use crate::client::link::{self, LinkKnobs};
use crate::client::stats::Counters;
use crate::client::subscriber::{self, Expected, Plan, Policy, Shared};
use crate::metrics::latency::{new_histogram, Buckets, BySide};
use crate::scenario::ClientMix;

const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Clients are started in small batches on this tick rather than one timer per client.
const RAMP_TICK: Duration = Duration::from_millis(10);

/// A generation clients may follow: its id (`None`: it could not be created) and, when the
/// coordinator knows it, how it will end.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub index: u32,
    pub id: Option<String>,
    /// Not on the gateway: a stream its clients ask the mock for themselves (`chatpath`).
    pub direct: Option<DirectCall>,
    pub expect: Option<Expected>,
    /// The instance it was created on, which owns it.
    pub owner: u32,
}

/// A chat completion the client sends the mock itself: where, the streamed request, and when
/// its first token is due (Unix ms), from which the client sets `first_token_ms` as it sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DirectCall {
    pub mock: SocketAddr,
    pub body: serde_json::Value,
    pub first_token_unix_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// The gateway instances; `instances` index them.
    pub gateways: Vec<SocketAddr>,
    /// Generations created before the worker starts; a churn run announces the others on
    /// stdin as it creates them, and a client waits (in arrival order) for its generation.
    pub generations: Vec<Target>,
    /// Generation index of each of this worker's clients.
    pub assignments: Vec<u32>,
    /// The instance each of this worker's clients connects to first.
    pub instances: Vec<u32>,
    /// Global index of `assignments[0]`: picks source addresses and behaviours.
    pub first_client: u64,
    /// This worker's share of the ramp, in clients per second.
    pub ramp_rate: f64,
    /// Seconds before the first client is due (churn: clients arrive in global index order).
    pub ramp_delay_s: f64,
    pub clients: ClientMix,
    pub seed: u64,
    pub resume_after_shutdown: bool,
    pub max_reconnects: u32,
    pub read_buffer: usize,
    /// A delaying relay between this worker's clients and the gateways (`None`: direct).
    pub link: Option<LinkKnobs>,
}

/// One stdin line of a worker after its spec.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerCommand {
    /// A generation was created (or failed to be) during the run.
    Generation(Target),
    /// Close every stream and finish.
    Leave,
}

/// One stdout line of a worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerReport {
    Progress(Counters),
    Final {
        counters: Counters,
        latency: BySide<Buckets>,
        /// Streams read straight from the mock (`chatpath`).
        direct_latency: Buckets,
        /// Hand-over gaps (µs) of clients a draining instance told to reconnect.
        handover_gap: Buckets,
    },
}

/// A generation as this worker knows it.
enum Known {
    Created {
        id: Rc<str>,
        expect: Option<Expected>,
        owner: u32,
    },
    Direct {
        call: Rc<DirectCall>,
        expect: Option<Expected>,
    },
    Missing,
}

/// Generations by index, filled from the spec and from announcements.
#[derive(Default)]
struct Generations(Vec<Option<Known>>);

impl Generations {
    fn learn(&mut self, target: Target) {
        let index = target.index as usize;
        if self.0.len() <= index {
            self.0.resize_with(index + 1, || None);
        }
        self.0[index] = Some(match (target.id, target.direct) {
            (_, Some(call)) => Known::Direct {
                call: Rc::new(call),
                expect: target.expect,
            },
            (Some(id), None) => Known::Created {
                id: Rc::from(id),
                expect: target.expect,
                owner: target.owner,
            },
            (None, None) => Known::Missing,
        });
    }
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
    let mut spec: WorkerSpec = serde_json::from_str(&line).context("parse worker spec")?;
    let generations = Rc::new(RefCell::new(Generations::default()));
    for target in std::mem::take(&mut spec.generations) {
        generations.borrow_mut().learn(target);
    }
    let (leave_tx, leave_rx) = watch::channel(false);
    let announced = generations.clone();
    tokio::task::spawn_local(async move {
        // `leave`, or the coordinator going away (EOF), ends every client.
        while let Ok(Some(line)) = stdin.next_line().await {
            match serde_json::from_str(&line) {
                Ok(WorkerCommand::Generation(target)) => announced.borrow_mut().learn(target),
                Ok(WorkerCommand::Leave) => break,
                Err(error) => eprintln!("worker: ignoring command {line:?}: {error}"),
            }
        }
        let _ = leave_tx.send(true);
    });
    let mut gateways = std::mem::take(&mut spec.gateways);
    if let Some(knobs) = spec.link {
        for gateway in &mut gateways {
            *gateway = link::start(*gateway, knobs)
                .await
                .context("start the delaying relay")?;
        }
    }
    let shared = Rc::new(Shared {
        gateways,
        counters: RefCell::new(Counters::default()),
        latency: RefCell::new(BySide::new()?),
        direct_latency: RefCell::new(new_histogram()?),
        handover_gap: RefCell::new(new_histogram()?),
        leave: leave_rx.clone(),
        policy: Policy {
            resume_after_shutdown: spec.resume_after_shutdown,
            max_reconnects: spec.max_reconnects,
            read_buffer: spec.read_buffer,
            backoff: Duration::from_secs(1),
        },
    });
    let ramp = tokio::task::spawn_local(ramp(spec, shared.clone(), generations, leave_rx));
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
    let latency = shared.latency.borrow().map(Buckets::from_histogram);
    let direct_latency = Buckets::from_histogram(&shared.direct_latency.borrow());
    let handover_gap = Buckets::from_histogram(&shared.handover_gap.borrow());
    emit(&WorkerReport::Final {
        counters,
        latency,
        direct_latency,
        handover_gap,
    })
}

/// Starts this worker's clients at its share of the ramp rate, until all started or `leave`.
/// A client whose generation is not announced yet holds back the ones after it.
async fn ramp(
    spec: WorkerSpec,
    shared: Rc<Shared>,
    generations: Rc<RefCell<Generations>>,
    leave: watch::Receiver<bool>,
) {
    tokio::time::sleep(Duration::from_secs_f64(spec.ramp_delay_s.max(0.0))).await;
    let start = Instant::now();
    let mut ticker = tokio::time::interval(RAMP_TICK);
    let mut started = 0usize;
    while started < spec.assignments.len() && !*leave.borrow() {
        ticker.tick().await;
        let due = ((start.elapsed().as_secs_f64() * spec.ramp_rate) as usize + 1)
            .min(spec.assignments.len());
        while started < due {
            let index = spec.first_client + started as u64;
            let (source, behaviour) = (
                source_address(index),
                spec.clients.behaviour(index, spec.seed),
            );
            match generations
                .borrow()
                .0
                .get(spec.assignments[started] as usize)
            {
                Some(Some(Known::Created { id, expect, owner })) => {
                    let plan = Plan {
                        generation: id.clone(),
                        expect: *expect,
                        source,
                        behaviour,
                        owner: *owner,
                        first_instance: spec.instances[started],
                    };
                    tokio::task::spawn_local(subscriber::run(plan, shared.clone()));
                }
                Some(Some(Known::Direct { call, expect })) => {
                    let (call, expect) = (call.clone(), *expect);
                    tokio::task::spawn_local(direct::run(call, expect, source, shared.clone()));
                }
                Some(Some(Known::Missing)) => {
                    let mut counters = shared.counters.borrow_mut();
                    counters.no_generation += 1;
                    counters.ended += 1;
                }
                Some(None) | None => break,
            }
            shared.counters.borrow_mut().started += 1;
            started += 1;
        }
    }
}

fn emit(report: &WorkerReport) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, report).context("encode worker report")?;
    out.write_all(b"\n")
        .and_then(|()| out.flush())
        .context("write worker report")
}
