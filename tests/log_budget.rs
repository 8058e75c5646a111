//! The log memory budget bounds the process's memory, with a real process: a generation
//! forgotten to fit the budget is freed at once, not when its retention would have ended.

mod common;

use std::time::Duration;

use common::{chat_request, process::GatewayProcess, WAIT};
use serde_json::json;

const BUDGET: u64 = 20_000_000;

fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

#[tokio::test]
async fn rss_stays_within_the_log_budget_under_a_flood_of_large_generations() {
    let budget = BUDGET.to_string();
    let gateway = GatewayProcess::start_with_env(
        &["--log-memory-budget", &budget, "--retention", "10m"],
        // Freed pages go back to the kernel within ~0.2 s, so RSS shows what is allocated.
        &[(
            "_RJEM_MALLOC_CONF",
            "background_thread:true,dirty_decay_ms:200,muzzy_decay_ms:0",
        )],
    )
    .await;
    let base = gateway.url("");
    let baseline = resident_bytes(gateway.pid());
    // 40 generations of one 1 MB token: each logs ~1 MB (its frame), 40 MB in all, twice the
    // budget; all retained for 10 minutes unless the budget makes room.
    for _ in 0..40 {
        let knobs = json!({"tokens": 1, "interval_ms": 0, "token_bytes": 1_000_000});
        let response = gateway
            .http
            .post(format!("{base}/v1/generations"))
            .json(&chat_request(knobs))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        gateway
            .wait_metric("tokenfan_generations_running", |running| running == 0.0)
            .await;
    }
    assert!(gateway.metric("tokenfan_generations_evicted_total").await >= 15.0);
    let allowed = BUDGET + BUDGET / 5 + 16 * 1024 * 1024;
    let settled = tokio::time::timeout(WAIT, async {
        loop {
            let grown = resident_bytes(gateway.pid()).saturating_sub(baseline);
            if grown <= allowed {
                return grown;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if let Ok(grown) = settled {
        eprintln!(
            "RSS grew {} KiB for a {} KiB budget",
            grown >> 10,
            BUDGET >> 10
        );
    }
    assert!(
        settled.is_ok(),
        "RSS grew {} MiB over {} MiB of budget (allowed: {} MiB)",
        resident_bytes(gateway.pid()).saturating_sub(baseline) >> 20,
        BUDGET >> 20,
        allowed >> 20
    );
}
