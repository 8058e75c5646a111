//! Many subscribers of one generation see the same tokens, in order, exactly once.

mod common;

use common::{token_texts, Gateway};
use serde_json::json;

#[tokio::test]
async fn many_subscribers_get_identical_ordered_streams() {
    let gateway = Gateway::start().await;
    // The first token waits long enough for every subscriber to be attached before it.
    let id = gateway
        .create(json!({"tokens": 200, "interval_ms": [0, 2], "first_token_ms": 300}))
        .await;

    let subscribers: Vec<_> = (0..20)
        .map(|_| {
            let gateway_url = gateway.url("");
            let id = id.clone();
            let http = gateway.http.clone();
            tokio::spawn(async move {
                let response = http
                    .get(format!("{gateway_url}/v1/generations/{id}/events"))
                    .send()
                    .await
                    .unwrap();
                common::read_events(response).await
            })
        })
        .collect();

    let snapshot = gateway.wait_finished(&id).await;
    assert_eq!(snapshot["status"], "completed");
    assert_eq!(snapshot["token_count"], 200);
    for subscriber in subscribers {
        let events = subscriber.await.unwrap();
        let texts = token_texts(&events, 0);
        assert_eq!(texts.len(), 200);
        assert_eq!(texts.concat(), snapshot["text"]);
        let done = events.last().unwrap();
        assert_eq!(done.event, "done");
        assert_eq!(done.id.as_deref(), Some("200"));
        let data = done.json();
        assert_eq!(data["status"], "completed");
        assert_eq!(data["token_count"], 200);
        assert_eq!(data["finish_reason"], "stop");
        assert!(data["usage"]["completion_tokens"].is_number(), "{data}");
    }
    gateway.shutdown().await;
}
