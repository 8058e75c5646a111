//! Token usage is counted per model and per API key (by a short hash, never the key) when a
//! generation ends, in any status.

mod common;

use std::time::Duration;

use common::{chat_request, Gateway, WAIT};
use serde_json::{json, Value};
use tokenfan::config::Secret;

const KEY: &str = "sk-usage-metrics-secret-key";

/// Waits until a line of `/metrics` for `metric` has all of `labels`, and returns its value.
async fn metric(gateway: &Gateway, metric: &str, labels: &[&str]) -> (String, f64) {
    tokio::time::timeout(WAIT, async {
        loop {
            let text = common::get_text(&gateway.http, &gateway.url("/metrics")).await;
            assert!(!text.contains(KEY), "the key is in the metrics");
            let found = text.lines().find(|line| {
                line.starts_with(&format!("{metric}{{"))
                    && labels.iter().all(|label| line.contains(label))
            });
            if let Some(line) = found {
                let value = line.rsplit(' ').next().unwrap().parse().unwrap();
                return (line.to_owned(), value);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {metric} with {labels:?}"))
}

async fn create(gateway: &Gateway, model: &str, mock: Value) -> String {
    let mut body = chat_request(mock);
    body["model"] = json!(model);
    let bearer = format!("Bearer {KEY}");
    let (status, created) = gateway
        .post_generation(body, &[("authorization", &bearer)])
        .await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn usage_is_counted_per_model_and_key_hash_whatever_the_end() {
    let gateway = Gateway::start_with(|c| c.access.api_keys = vec![Secret::new(KEY)]).await;

    create(
        &gateway,
        "usage-model-a",
        json!({"tokens": 7, "interval_ms": 0}),
    )
    .await;
    let model = r#"model="usage-model-a""#;
    let (line, completion) = metric(
        &gateway,
        "tokenfan_usage_completion_tokens_total",
        &[model, r#"key="key-"#],
    )
    .await;
    assert_eq!(completion, 7.0, "{line}");
    let (_, prompt) = metric(&gateway, "tokenfan_usage_prompt_tokens_total", &[model]).await;
    assert!(prompt > 0.0);

    // Cancelled before any usage came: counted as unreported.
    let id = create(
        &gateway,
        "usage-model-b",
        json!({"tokens": 5, "first_token_ms": 10_000}),
    )
    .await;
    let cancelled = gateway
        .http
        .delete(gateway.url(&format!("/v1/generations/{id}")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 200);
    let (_, unreported) = metric(
        &gateway,
        "tokenfan_usage_unreported_total",
        &[r#"model="usage-model-b""#],
    )
    .await;
    assert_eq!(unreported, 1.0);
    gateway.shutdown().await;
}
