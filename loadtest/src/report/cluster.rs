//! The `cluster` rows of the summary: the instances and their store, latency for viewers on
//! the generation's owner beside viewers on another instance, each instance's CPU, and what
//! Redis did per stored token.

use super::{kb, mib, ms, RunResult};
use crate::metrics::latency::LatencySummary;
use crate::metrics::redis::REPORTED;

/// (metric, value) rows; none outside `cluster`.
pub fn rows(result: &RunResult) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    if result.scenario.cluster.is_none() {
        return rows;
    }
    let instances = result.gateway.instances.len();
    let store = result.gateway.store.as_ref();
    rows.push((
        "instances".into(),
        match store {
            Some(s) => format!("{instances}, sharing redis-server on {}", s.addr),
            None => format!("{instances}, in-memory store"),
        },
    ));
    if let Some(sides) = &result.latency_by_side {
        let summary = |l: &LatencySummary| {
            format!(
                "{} / {} / {} (n = {})",
                ms(l.p50_us),
                ms(l.p99_us),
                ms(l.max_us),
                l.count
            )
        };
        rows.push((
            "latency p50 / p99 / max, viewers on the owner".into(),
            summary(&sides.owner),
        ));
        rows.push((
            "latency p50 / p99 / max, viewers on another instance".into(),
            summary(&sides.non_owner),
        ));
    }
    if let Some(steady) = result.memory.as_ref().and_then(|m| m.steady.as_ref()) {
        let each: Vec<String> = steady.instance_rss_bytes.iter().map(|&b| mib(b)).collect();
        rows.push(("gateway RSS per instance, steady".into(), each.join(" / ")));
    }
    if let Some(cpu) = &result.cpu {
        let each: Vec<String> = (cpu.instance_cpu_s.iter())
            .map(|s| format!("{s:.2} s"))
            .collect();
        rows.push((
            "gateway CPU per instance over window (summed above)".into(),
            each.join(" / "),
        ));
        if let Some(store_s) = cpu.store_cpu_s {
            rows.push((
                "redis-server CPU over window".into(),
                format!(
                    "{store_s:.2} s ({:.2} cores)",
                    store_s / cpu.window_s.max(1e-9)
                ),
            ));
        }
    }
    if let Some(used) = &result.store {
        let per_token = |name: &str| used.calls_per_token.get(name).copied().unwrap_or(0.0);
        let scripts = per_token("evalsha") + per_token("eval");
        let listed: Vec<String> = REPORTED[2..]
            .iter()
            .map(|&name| format!("{:.3}", per_token(name)))
            .collect();
        rows.push((
            "Redis calls per stored token: evalsha+eval / xrange / publish / hgetall / all".into(),
            format!(
                "{scripts:.3} / {} / {} ({} tokens stored, {} calls)",
                listed.join(" / "),
                used.total_calls_per_token
                    .map_or("–".into(), |t| format!("{t:.3}")),
                used.tokens_stored,
                used.total_calls
            ),
        ));
        rows.push((
            "Redis memory per stored token (used_memory delta)".into(),
            format!(
                "{} ({} in all)",
                kb(used.memory_per_token_bytes),
                mib(used.used_memory_delta_bytes.max(0) as u64)
            ),
        ));
    }
    rows
}
