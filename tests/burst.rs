//! A provider that sends thousands of tokens at once does not make viewers that keep up look
//! slow: a full channel sends its viewer to the log to catch up, not away with `reconnect`.

mod common;

use common::{get_text, token_texts, Gateway};
use serde_json::json;

#[tokio::test]
async fn a_burst_of_3000_tokens_evicts_none_of_10_fast_viewers() {
    let gateway = Gateway::start().await;
    // Every viewer is attached before the first token; then 3,000 come as fast as the gateway
    // reads them, far more than a viewer's 64 slots.
    let id = gateway
        .create(json!({"tokens": 3000, "interval_ms": 0, "first_token_ms": 500}))
        .await;
    let url = gateway.url(&format!("/v1/generations/{id}/events"));
    let viewers: Vec<_> = (0..10)
        .map(|_| {
            let response = gateway.http.get(&url).send();
            tokio::spawn(async move { common::read_events(response.await.unwrap()).await })
        })
        .collect();

    let snapshot = gateway.wait_finished(&id).await;
    assert_eq!(snapshot["token_count"], 3000);
    for viewer in viewers {
        let events = viewer.await.unwrap();
        assert!(
            events.iter().all(|event| event.event != "reconnect"),
            "a viewer that keeps up was told to reconnect"
        );
        let texts = token_texts(&events, 0);
        assert_eq!(texts.len(), 3000);
        assert_eq!(texts.concat(), snapshot["text"]);
        assert_eq!(events.last().unwrap().event, "done");
    }
    let metrics = get_text(&gateway.http, &gateway.url("/metrics")).await;
    assert!(
        !metrics.contains(r#"tokenfan_evictions_total{reason="slow_consumer"}"#),
        "{metrics}"
    );
    gateway.shutdown().await;
}
