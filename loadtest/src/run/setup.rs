//! Setting a run up on the gateway: creating the generations (all before the clients come,
//! each holding its first token until the ramp should be over; or on a schedule while they
//! come) and cutting the clients into worker specs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio::task::{JoinError, JoinSet};

use crate::client::http::request;
use crate::client::subscriber::{unix_micros, MIN_READ_BUFFER};
use crate::scenario::{Ending, GenerationPlan, Plan, Scenario};
use crate::worker::{DirectCall, Target, WorkerSpec};

/// Concurrent `POST /v1/generations` while setting up.
const CREATE_CONCURRENCY: usize = 64;

type Creation = Result<(usize, Result<String>), JoinError>;

/// Creates the plan's generations, each on its owner among `instances`: not before the first
/// instant `timing(index)` gives, its first token held until the second. Every id (or creation error) goes to `created` as
/// soon as it is known; an error `created` returns ends the creation.
pub async fn create_generations(
    instances: &[SocketAddr],
    scenario: &Scenario,
    plan: &Plan,
    timing: impl Fn(usize) -> (Instant, Instant),
    mut created: impl FnMut(usize, Result<String>) -> Result<()>,
) -> Result<()> {
    let mut take = |joined: Creation| -> Result<()> {
        let (index, id) = joined.context("generation creation task")?;
        created(index, id)
    };
    let mut inflight = JoinSet::new();
    // A direct stream is asked for by its client, from the mock (`direct_call`).
    let on_gateway = (plan.generations.iter().enumerate()).filter(|(_, g)| !g.direct);
    for (index, generation) in on_gateway {
        let (due, first_token_at) = timing(index);
        loop {
            if inflight.len() >= CREATE_CONCURRENCY {
                if let Some(joined) = inflight.join_next().await {
                    take(joined)?;
                }
                continue;
            }
            if Instant::now() >= due {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep_until(due.into()) => {}
                Some(joined) = inflight.join_next() => take(joined)?,
            }
        }
        let first_token_ms = first_token_at
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
        let body = generation_request(scenario, index, generation, first_token_ms).to_string();
        let addr = instances[scenario.owner(index as u32) as usize];
        inflight.spawn(async move { (index, create_one(addr, body).await) });
    }
    while let Some(joined) = inflight.join_next().await {
        take(joined)?;
    }
    Ok(())
}

/// The create request: the plan's length and fault, the scenario's pace, stamped tokens.
fn generation_request(
    scenario: &Scenario,
    index: usize,
    generation: &GenerationPlan,
    first_token_ms: u64,
) -> serde_json::Value {
    let mut mock = generation.mock_knobs();
    mock["interval_ms"] = scenario.interval_ms.to_json();
    mock["first_token_ms"] = first_token_ms.into();
    mock["stamp"] = true.into();
    mock["seed"] = index.into();
    if let Some(bytes) = scenario.token_bytes {
        mock["token_bytes"] = bytes.into();
    }
    json!({
        "model": "tokenfan-loadtest",
        "messages": [{"role": "user", "content": format!("load test generation {index}")}],
        "mock": mock,
    })
}

/// The same request as a chat completion its client sends the mock itself, streamed; the client
/// sets `first_token_ms` from `first_token_at` when it sends it (clients connect over the ramp).
pub fn direct_call(
    scenario: &Scenario,
    plan: &Plan,
    index: usize,
    mock: SocketAddr,
    first_token_at: Instant,
) -> DirectCall {
    let mut body = generation_request(scenario, index, &plan.generations[index], 0);
    body["stream"] = true.into();
    let until = first_token_at.saturating_duration_since(Instant::now());
    DirectCall {
        mock,
        body,
        first_token_unix_ms: unix_micros() / 1000 + until.as_millis() as u64,
    }
}

/// What the workers are told about a created generation. The ending is known (and checked)
/// when clients read to the end; not in a drain, which interrupts generations.
/// `direct` is the call of a direct stream (`direct_call`), `None` for a generation.
pub fn target(
    scenario: &Scenario,
    plan: &Plan,
    index: usize,
    id: Option<String>,
    direct: Option<DirectCall>,
) -> Target {
    let knows_ending = matches!(scenario.ending, Ending::AllDone | Ending::Churn);
    Target {
        index: index as u32,
        id,
        direct,
        expect: knows_ending.then(|| plan.generations[index].expected()),
        owner: scenario.owner(index as u32),
    }
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

/// Cuts the clients into `workers` contiguous slices. `generations` are the ones created
/// before the workers start (a churn round announces its generations as it creates them).
pub fn worker_specs(
    scenario: &Scenario,
    plan: &Plan,
    generations: &[Target],
    gateways: &[SocketAddr],
    workers: u64,
    seed: u64,
) -> Vec<WorkerSpec> {
    let per_worker = plan.assignments.len().div_ceil(workers as usize).max(1);
    let rate = scenario.ramp_rate as f64;
    (plan.assignments.chunks(per_worker))
        .zip(plan.instances.chunks(per_worker))
        .enumerate()
        .map(|(k, (slice, instances))| {
            let first_client = (k * per_worker) as u64;
            // Churn clients arrive in global order, each slice in its own stretch of the round;
            // otherwise every worker ramps its share from the start.
            let (ramp_rate, ramp_delay_s) = match scenario.ending {
                Ending::Churn => (rate, first_client as f64 / rate),
                _ => (rate / workers as f64, 0.0),
            };
            WorkerSpec {
                gateways: gateways.to_vec(),
                generations: generations.to_vec(),
                assignments: slice.to_vec(),
                instances: instances.to_vec(),
                first_client,
                ramp_rate,
                ramp_delay_s,
                clients: scenario.clients.clone(),
                seed,
                // A lone draining gateway is going away; in a cluster the others serve on.
                resume_after_shutdown: scenario.ending != Ending::Drain || scenario.hands_over(),
                max_reconnects: 20,
                // Room for a couple of padded events per read, without growing idle clients.
                read_buffer: scenario.token_bytes.map_or(MIN_READ_BUFFER, |b| {
                    (2 * b as usize + 512).clamp(MIN_READ_BUFFER, 64 * 1024)
                }),
                link: scenario.link,
            }
        })
        .collect()
}
