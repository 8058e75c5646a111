//! Setting a run up on the gateway: creating the generations (each holding its first token
//! until the ramp should be over) and cutting the clients into worker specs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio::task::JoinSet;

use crate::client::http::request;
use crate::client::subscriber::MIN_READ_BUFFER;
use crate::scenario::{Ending, Plan, Scenario};
use crate::worker::{StallSpec, WorkerSpec};

/// Concurrent `POST /v1/generations` while setting up.
const CREATE_CONCURRENCY: usize = 64;

pub async fn create_generations(
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

pub fn worker_specs(
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
