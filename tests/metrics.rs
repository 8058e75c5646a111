//! What an operator reads on `/metrics`: latency by model, upstream failures, fan-out lag,
//! replays, the process against its limits and the build. (A drain in progress: `drain.rs`.)

mod common;

use common::Gateway;
use serde_json::{json, Value};

fn request(model: &str, mock: Value) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "mock": mock})
}

/// The value of the one sample of `name` whose labels contain every one of `labels`.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    let line = metrics
        .lines()
        .find(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
                && labels.iter().all(|label| line.contains(label))
        })
        .unwrap_or_else(|| panic!("no {name} with {labels:?} in\n{metrics}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

async fn scrape(gateway: &Gateway) -> String {
    common::get_text(&gateway.http, &gateway.url("/metrics")).await
}

#[tokio::test]
async fn latency_failures_fan_out_and_limits_are_measured_by_model() {
    let gateway = Gateway::start().await;
    let create = |body: Value| gateway.post_generation(body, &[]);

    // A stream watched live from before its first token: 130 tokens give lag samples at 0,
    // 64 and 128.
    let (status, created) = create(request(
        "model-a",
        json!({"tokens": 130, "interval_ms": 1, "first_token_ms": 300}),
    ))
    .await;
    assert_eq!(status, 201);
    let id = created["id"].as_str().unwrap().to_owned();
    let live = gateway.events(&id, None).await;
    assert_eq!(live.last().unwrap().event, "done");
    // A late viewer is served from the log.
    assert_eq!(gateway.events(&id, None).await.len(), 131);
    // Retried once after a 503, then streams; a 400 is not retried and fails the generation.
    let (_, retried) = create(request(
        "model-b",
        json!({"tokens": 2, "status": 503, "status_times": 1, "key": "metrics-retry"}),
    ))
    .await;
    let (_, failed) = create(request("model-b", json!({"status": 400}))).await;
    for created in [retried, failed] {
        gateway.wait_finished(created["id"].as_str().unwrap()).await;
    }

    let metrics = scrape(&gateway).await;
    let a = "model=\"model-a\"";
    let b = "model=\"model-b\"";
    for name in [
        "tokenfan_time_to_first_token_seconds_count",
        "tokenfan_inter_token_gap_seconds_count",
    ] {
        assert!(sample(&metrics, name, &[a]) >= 1.0, "{name}");
    }
    let ttft_below_300ms = sample(
        &metrics,
        "tokenfan_time_to_first_token_seconds_bucket",
        &[a, "le=\"0.25\""],
    );
    assert_eq!(ttft_below_300ms, 0.0, "the first token came after 300 ms");
    assert_eq!(
        sample(&metrics, "tokenfan_inter_token_gap_seconds_count", &[a]),
        129.0
    );
    let completed = "status=\"completed\"";
    let duration = "tokenfan_generation_duration_seconds_count";
    assert_eq!(sample(&metrics, duration, &[a, completed]), 1.0);
    assert_eq!(sample(&metrics, duration, &[b, "status=\"failed\""]), 1.0);
    let attempts = "tokenfan_upstream_request_duration_seconds_count";
    assert_eq!(sample(&metrics, attempts, &[b, "class=\"5xx\""]), 1.0);
    assert_eq!(sample(&metrics, attempts, &[b, "class=\"4xx\""]), 1.0);
    assert_eq!(sample(&metrics, attempts, &[b, "class=\"2xx\""]), 1.0);
    assert_eq!(
        sample(&metrics, "tokenfan_upstream_retries_total", &[b]),
        1.0
    );
    let errors = "tokenfan_upstream_errors_total";
    assert_eq!(
        sample(&metrics, errors, &[b, "code=\"upstream_http_error\""]),
        1.0
    );
    // Three sampled tokens reached the live viewer.
    assert!(sample(&metrics, "tokenfan_fan_out_lag_seconds_count", &[]) >= 3.0);
    assert!(sample(&metrics, "tokenfan_subscriber_queue_depth_count", &[]) >= 3.0);
    assert!(sample(&metrics, "tokenfan_replayed_events_total", &[]) >= 130.0);
    assert!(sample(&metrics, "tokenfan_replays_total", &[]) >= 1.0);

    assert!(sample(&metrics, "tokenfan_log_memory_bytes", &[]) > 0.0);
    assert_eq!(
        sample(&metrics, "tokenfan_log_memory_budget_bytes", &[]),
        1024.0 * 1024.0 * 1024.0
    );
    let open = sample(&metrics, "tokenfan_open_files", &[]);
    assert!(open > 0.0 && open < sample(&metrics, "tokenfan_open_files_limit", &[]));
    assert!(sample(&metrics, "tokenfan_process_resident_memory_bytes", &[]) > 1e6);
    sample(&metrics, "tokenfan_process_cpu_milliseconds_total", &[]);
    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    assert_eq!(
        sample(&metrics, "tokenfan_build_info", &[&version, "commit=\""]),
        1.0
    );
    gateway.shutdown().await;
}
