//! Upstream failures: retried before the first token, reported as an `error` event after it.

mod common;

use common::{token_texts, Gateway};
use serde_json::json;

#[tokio::test]
async fn upstream_500_before_the_first_token_is_retried() {
    let gateway = Gateway::start().await;
    let id = gateway
        .create(json!({"tokens": 5, "interval_ms": 0, "status": 500, "status_times": 2, "key": "flaky"}))
        .await;
    let events = gateway.events(&id, None).await;
    assert_eq!(token_texts(&events, 0).len(), 5);
    assert_eq!(events.last().unwrap().event, "done");
    assert_eq!(gateway.mock_stats().await["keys"]["flaky"], 3);
    gateway.shutdown().await;
}

#[tokio::test]
async fn upstream_drop_mid_stream_ends_with_an_error_event() {
    let gateway = Gateway::start().await;
    let id = gateway
        .create(json!({"tokens": 20, "interval_ms": 0, "fail_after": 7, "key": "drop"}))
        .await;
    let events = gateway.events(&id, None).await;
    assert_eq!(token_texts(&events, 0).len(), 7);
    let error = events.last().unwrap();
    assert_eq!(error.event, "error");
    assert_eq!(error.id.as_deref(), Some("7"));
    assert_eq!(error.json()["status"], "failed");
    assert_eq!(error.json()["code"], "upstream_interrupted");
    // Never retried after tokens were sent: that would duplicate them.
    assert_eq!(gateway.mock_stats().await["keys"]["drop"], 1);
    let (_, snapshot) = gateway.snapshot(&id).await;
    assert_eq!(snapshot["status"], "failed");
    assert_eq!(snapshot["error"]["code"], "upstream_interrupted");
    gateway.shutdown().await;
}

#[tokio::test]
async fn upstream_client_error_fails_the_generation_without_retry() {
    let gateway = Gateway::start().await;
    let id = gateway.create(json!({"status": 400, "key": "bad"})).await;
    let events = gateway.events(&id, None).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event, "error");
    assert_eq!(events[0].json()["code"], "upstream_http_error");
    assert_eq!(gateway.mock_stats().await["keys"]["bad"], 1);
    gateway.shutdown().await;
}
