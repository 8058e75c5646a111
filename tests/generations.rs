//! The backend API: create, snapshot, cancel, idempotency, retention, and clear errors.

mod common;

use std::time::Duration;

use common::{chat_request, Gateway};
use serde_json::{json, Value};

#[tokio::test]
async fn create_answers_201_at_once_with_an_unguessable_id() {
    let gateway = Gateway::start().await;
    // The first token is far away: the answer must not wait for it.
    let response = gateway
        .http
        .post(gateway.url("/v1/generations"))
        .json(&chat_request(json!({"first_token_ms": 60_000})))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    let id = body["id"].as_str().unwrap();
    assert!(id.starts_with("gen_") && id.len() == 4 + 32, "{id}");
    assert_eq!(body["status"], "running");
    assert_eq!(body["events_url"], format!("/v1/generations/{id}/events"));
    assert_eq!(location, format!("/v1/generations/{id}"));

    let (status, snapshot) = gateway.snapshot(id).await;
    assert_eq!(status, 200);
    assert_eq!(snapshot["status"], "running");
    assert_eq!(snapshot["token_count"], 0);
    gateway.shutdown().await;
}

#[tokio::test]
async fn idempotency_key_returns_the_same_generation_without_a_second_upstream_call() {
    let gateway = Gateway::start().await;
    let body = chat_request(json!({"tokens": 3, "key": "once"}));
    let key = [("idempotency-key", "order-42")];
    let (first_status, first) = gateway.post_generation(body.clone(), &key).await;
    let (second_status, second) = gateway.post_generation(body.clone(), &key).await;
    assert_eq!((first_status, second_status), (201, 201));
    assert_eq!(first["id"], second["id"]);
    gateway.wait_finished(first["id"].as_str().unwrap()).await;
    assert_eq!(gateway.mock_stats().await["keys"]["once"], 1);

    // The same key with another body is a client bug, not a replay.
    let other = chat_request(json!({"tokens": 4, "key": "once"}));
    let (status, error) = gateway.post_generation(other, &key).await;
    assert_eq!(status, 422);
    assert_eq!(error["error"]["code"], "idempotency_key_reused");
    gateway.shutdown().await;
}

#[tokio::test]
async fn cancel_stops_the_generation_and_ends_every_stream() {
    let gateway = Gateway::start().await;
    let id = gateway
        .create(json!({"tokens": 1000, "interval_ms": 20}))
        .await;
    let stream = gateway.subscribe(&id, None).await;
    let cancel = gateway
        .http
        .delete(gateway.url(&format!("/v1/generations/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 200);
    let snapshot: Value = cancel.json().await.unwrap();
    assert_eq!(snapshot["status"], "cancelled");

    let events = common::read_events(stream).await;
    let last = events.last().unwrap();
    assert_eq!(last.event, "error");
    assert_eq!(last.json()["status"], "cancelled");
    assert_eq!(last.json()["code"], "cancelled");
    assert_eq!(last.id, Some(snapshot["token_count"].to_string()));
    gateway.shutdown().await;
}

#[tokio::test]
async fn finished_generation_is_forgotten_after_retention() {
    let gateway = Gateway::start_with(|c| c.stream.retention = Duration::from_millis(200)).await;
    let id = gateway.create(json!({"tokens": 2, "interval_ms": 0})).await;
    gateway.wait_finished(&id).await;
    tokio::time::timeout(common::WAIT, async {
        while gateway.snapshot(&id).await.0 != 404 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("generation still readable long after its retention");
    assert_eq!(gateway.subscribe(&id, None).await.status(), 404);
    gateway.shutdown().await;
}

#[tokio::test]
async fn unwatched_generation_is_cancelled_when_asked_to() {
    let gateway =
        Gateway::start_with(|c| c.stream.cancel_unwatched_after = Some(Duration::from_millis(200)))
            .await;
    let id = gateway
        .create(json!({"tokens": 1000, "interval_ms": 10}))
        .await;
    let snapshot = gateway.wait_finished(&id).await;
    assert_eq!(snapshot["status"], "failed");
    assert_eq!(snapshot["error"]["code"], "unwatched");
    gateway.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_a_clear_error_code() {
    let gateway = Gateway::start().await;
    let url = gateway.url("/v1/generations");
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            gateway
                .http
                .post(&url)
                .header("content-type", "application/json")
                .body("{oops"),
            400,
            "invalid_json",
        ),
        (
            gateway.http.post(&url).json(&json!([1, 2])),
            400,
            "invalid_request",
        ),
        (
            gateway.http.post(&url).json(&json!({"model": "m"})),
            400,
            "invalid_request",
        ),
        (
            gateway
                .http
                .post(&url)
                .json(&json!({"model": "m", "messages": "hi"})),
            400,
            "invalid_request",
        ),
        (
            gateway
                .http
                .post(&url)
                .json(&json!({"model": 3, "messages": [{}]})),
            400,
            "invalid_request",
        ),
        (
            gateway
                .http
                .post(&url)
                .json(&json!({"model": "m", "messages": [{}], "n": 2})),
            400,
            "invalid_request",
        ),
        (
            gateway
                .http
                .post(&url)
                .header("content-type", "text/plain")
                .body("{}"),
            415,
            "unsupported_media_type",
        ),
        (
            gateway
                .http
                .post(&url)
                .header("content-type", "application/json")
                .body(vec![b' '; 5 << 20]),
            413,
            "body_too_large",
        ),
        (
            gateway
                .http
                .post(&url)
                .header("idempotency-key", "")
                .json(&chat_request(json!({}))),
            400,
            "invalid_idempotency_key",
        ),
        (
            gateway.http.get(gateway.url("/v1/nothing")),
            404,
            "not_found",
        ),
        (gateway.http.put(&url), 405, "method_not_allowed"),
    ];
    for (request, status, code) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "expected {code}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code);
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    gateway.shutdown().await;
}

#[tokio::test]
async fn keepalive_comments_flow_on_an_idle_stream() {
    let gateway =
        Gateway::start_with(|c| c.stream.keepalive_interval = Duration::from_millis(50)).await;
    let id = gateway
        .create(json!({"tokens": 1, "first_token_ms": 60_000}))
        .await;
    let mut stream = gateway.subscribe(&id, None).await;
    let chunk = tokio::time::timeout(common::WAIT, stream.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&chunk[..], b":\n\n");
    gateway.shutdown().await;
}
