//! Late joiners replay the log then go live; `Last-Event-ID` resumes exactly where a client
//! stopped; a client that has everything gets 204.

mod common;

use common::{token_texts, Gateway};
use futures_util::StreamExt;
use serde_json::json;

#[tokio::test]
async fn late_joiner_replays_history_then_goes_live() {
    let gateway = Gateway::start().await;
    let id = gateway
        .create(json!({"tokens": 60, "interval_ms": 20}))
        .await;
    // Join once part of the generation is logged.
    tokio::time::timeout(common::WAIT, async {
        while gateway.snapshot(&id).await.1["token_count"]
            .as_u64()
            .unwrap()
            < 20
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    let events = gateway.events(&id, None).await;
    let (_, snapshot) = gateway.snapshot(&id).await;
    assert_eq!(
        snapshot["status"], "completed",
        "the stream ended before the generation"
    );
    assert_eq!(token_texts(&events, 0).concat(), snapshot["text"]);
    assert_eq!(events.last().unwrap().event, "done");
    gateway.shutdown().await;
}

#[tokio::test]
async fn last_event_id_resumes_mid_stream() {
    let gateway = Gateway::start().await;
    let id = gateway
        .create(json!({"tokens": 40, "interval_ms": [1, 5]}))
        .await;

    // A viewer reads the first ten tokens and drops its connection.
    let response = gateway.subscribe(&id, None).await;
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    while common::parse_events(&seen)
        .iter()
        .filter(|e| e.event == "token")
        .count()
        < 10
    {
        seen.push_str(std::str::from_utf8(&body.next().await.unwrap().unwrap()).unwrap());
    }
    drop(body);
    let first_part: Vec<_> = common::parse_events(&seen).into_iter().take(10).collect();
    let last_id: u64 = first_part
        .last()
        .unwrap()
        .id
        .as_ref()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(last_id, 9);

    // It comes back with Last-Event-ID and gets exactly the rest.
    let rest = gateway.events(&id, Some(last_id)).await;
    let texts = [token_texts(&first_part, 0), token_texts(&rest, 10)].concat();
    let snapshot = gateway.wait_finished(&id).await;
    assert_eq!(texts.concat(), snapshot["text"]);
    assert_eq!(texts.len(), 40);

    // The query parameter works the same for clients that cannot set headers.
    let response = gateway
        .http
        .get(gateway.url(&format!("/v1/generations/{id}/events?last_event_id=29")))
        .send()
        .await
        .unwrap();
    let tail = common::read_events(response).await;
    assert_eq!(token_texts(&tail, 30).len(), 10);
    gateway.shutdown().await;
}

#[tokio::test]
async fn resume_after_the_terminal_event_is_204_and_beyond_is_400() {
    let gateway = Gateway::start().await;
    let id = gateway.create(json!({"tokens": 5, "interval_ms": 0})).await;
    gateway.wait_finished(&id).await;

    // Last id 4 (the last token): only the terminal event is left.
    let events = gateway.events(&id, Some(4)).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event, "done");
    assert_eq!(events[0].id.as_deref(), Some("5"));

    // Last id 5 (the terminal event): nothing left, and an EventSource stops on 204.
    assert_eq!(gateway.subscribe(&id, Some(5)).await.status(), 204);

    let response = gateway.subscribe(&id, Some(6)).await;
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_last_event_id");
    gateway.shutdown().await;
}

#[tokio::test]
async fn unknown_generation_is_404() {
    let gateway = Gateway::start().await;
    for id in [
        "gen_00000000000000000000000000000000",
        "nope",
        "..%2F..%2Fetc",
    ] {
        let response = gateway.subscribe(id, None).await;
        assert_eq!(response.status(), 404, "{id}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "generation_not_found");
    }
    gateway.shutdown().await;
}
