//! Admission control: every limit answers with a clear error, none crashes or degrades
//! silently.

mod common;

use std::time::Duration;

use common::{chat_request, Gateway};
use serde_json::{json, Value};
use tokenfan::config::Secret;

async fn error_of(response: reqwest::Response) -> (u16, Option<String>, String) {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = response.json().await.unwrap();
    (
        status,
        retry_after,
        body["error"]["code"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn connections_beyond_the_limit_are_turned_away_politely() {
    let gateway = Gateway::start_with(|c| c.limits.max_connections = Some(2)).await;
    // Two idle connections take both places.
    let _held = [
        tokio::net::TcpStream::connect(gateway.addr).await.unwrap(),
        tokio::net::TcpStream::connect(gateway.addr).await.unwrap(),
    ];
    // A subscriber gets 200 and a reconnect event with a long retry (an EventSource would
    // give up for good on an error status).
    let http = reqwest::Client::new();
    let events = http
        .get(gateway.url("/v1/generations/gen_x/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let events = common::read_events(events).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event, "reconnect");
    assert_eq!(events[0].json()["reason"], "over_capacity");
    assert!(events[0].retry.unwrap() >= 10_000);
    // A backend call gets 503 with Retry-After; liveness still answers.
    let create = http
        .post(gateway.url("/v1/generations"))
        .json(&chat_request(json!({})))
        .send()
        .await
        .unwrap();
    let (status, retry_after, code) = error_of(create).await;
    assert_eq!((status, code.as_str()), (503, "over_capacity"));
    assert!(retry_after.is_some());
    assert_eq!(
        http.get(gateway.url("/livez"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    drop(_held);
    gateway.shutdown().await;
}

#[tokio::test]
async fn running_generations_are_capped() {
    let gateway = Gateway::start_with(|c| c.limits.max_generations = 1).await;
    gateway
        .create(json!({"tokens": 1000, "interval_ms": 20}))
        .await;
    let (status, body) = gateway.post_generation(chat_request(json!({})), &[]).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "too_many_generations");
    gateway.shutdown().await;
}

#[tokio::test]
async fn subscribers_per_generation_are_capped() {
    let gateway = Gateway::start_with(|c| c.limits.max_subscribers_per_generation = 2).await;
    let id = gateway
        .create(json!({"tokens": 1000, "interval_ms": 20}))
        .await;
    let first = gateway.subscribe(&id, None).await;
    let second = gateway.subscribe(&id, None).await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let (status, _, code) = error_of(gateway.subscribe(&id, None).await).await;
    assert_eq!((status, code.as_str()), (429, "too_many_subscribers"));
    // A place frees up when a viewer leaves.
    drop(first);
    tokio::time::timeout(common::WAIT, async {
        while gateway.subscribe(&id, None).await.status() != 200 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the place of a departed viewer was never freed");
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_generation_past_its_log_limits_fails_as_too_large() {
    let gateway = Gateway::start_with(|c| {
        c.limits.max_generation_tokens = 5;
        c.limits.max_generation_bytes = 1000;
    })
    .await;
    for (knobs, expected_tokens) in [
        (json!({"tokens": 20, "interval_ms": 0}), 5),
        (
            json!({"tokens": 20, "interval_ms": 0, "token_bytes": 300}),
            3,
        ),
    ] {
        let id = gateway.create(knobs).await;
        let events = gateway.events(&id, None).await;
        assert_eq!(common::token_texts(&events, 0).len(), expected_tokens);
        let last = events.last().unwrap();
        assert_eq!(
            (last.event.as_str(), last.json()["code"].as_str()),
            ("error", Some("too_large"))
        );
        let (_, snapshot) = gateway.snapshot(&id).await;
        assert_eq!(snapshot["status"], "failed");
    }
    gateway.shutdown().await;
}

#[tokio::test]
async fn log_memory_budget_forgets_the_oldest_finished_generation_first() {
    // Each generation below logs about 8.5 KB once finished (50 frames of ~150 bytes, an
    // offset each, and its usage object), and is counted as ~17 KB while it runs (its chunks'
    // whole capacity): one finished and one running fit the budget, two finished and one
    // running do not, so the third makes the oldest go.
    let gateway = Gateway::start_with(|c| c.limits.log_memory_budget = 30_000).await;
    let knobs = json!({"tokens": 50, "interval_ms": 0, "token_bytes": 100});
    let oldest = gateway.create(knobs.clone()).await;
    gateway.wait_finished(&oldest).await;
    let middle = gateway.create(knobs.clone()).await;
    gateway.wait_finished(&middle).await;
    let newest = gateway.create(knobs.clone()).await;
    gateway.wait_finished(&newest).await;
    assert_eq!(
        gateway.snapshot(&oldest).await.0,
        404,
        "the oldest should have made room"
    );
    assert_eq!(gateway.snapshot(&middle).await.0, 200);
    assert_eq!(gateway.snapshot(&newest).await.0, 200);

    // Running generations are never forgotten: once they alone fill the budget, creation stops.
    let gateway2 = Gateway::start_with(|c| c.limits.log_memory_budget = 5_000).await;
    let running = gateway2
        .create(json!({"tokens": 100_000, "interval_ms": 1, "token_bytes": 100}))
        .await;
    let refused = tokio::time::timeout(common::WAIT, async {
        loop {
            let (status, body) = gateway2
                .post_generation(chat_request(json!({"tokens": 1})), &[])
                .await;
            if status == 503 {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("creation never refused");
    assert_eq!(refused["error"]["code"], "memory_budget_exceeded");
    assert_eq!(gateway2.snapshot(&running).await.1["status"], "running");
    gateway.shutdown().await;
    gateway2.shutdown().await;
}

#[tokio::test]
async fn creation_is_rate_limited_per_key() {
    let gateway = Gateway::start_with(|c| {
        c.access.api_keys = vec![Secret::new("a"), Secret::new("b")];
        c.limits.create_rate = 0.5;
        c.limits.create_burst = 2;
    })
    .await;
    let body = chat_request(json!({"tokens": 1}));
    for _ in 0..2 {
        assert_eq!(
            gateway
                .post_generation(body.clone(), &[("authorization", "Bearer a")])
                .await
                .0,
            201
        );
    }
    let response = gateway
        .http
        .post(gateway.url("/v1/generations"))
        .bearer_auth("a")
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, retry_after, code) = error_of(response).await;
    assert_eq!((status, code.as_str()), (429, "rate_limited"));
    assert_eq!(retry_after.as_deref(), Some("2"));
    assert_eq!(
        gateway
            .post_generation(body, &[("authorization", "Bearer b")])
            .await
            .0,
        201
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn oversized_request_heads_are_refused() {
    let gateway = Gateway::start_with(|c| c.limits.max_header_bytes = 10_000).await;
    let id = gateway.create(json!({"tokens": 1})).await;
    let events = format!("/v1/generations/{id}/events");
    // hyper serves `/livez` and a subscription after another request on the same connection;
    // a subscription opening a connection is read by `server/subscriber.rs`.
    for (path, size, status) in [
        ("/livez", 32 * 1024, 431),
        ("/livez", 15_000, 431),
        ("/livez", 9_000, 200),
        (events.as_str(), 15_000, 431),
        (events.as_str(), 9_000, 200),
    ] {
        let response = gateway
            .http
            .get(gateway.url(path))
            .header("x-padding", "a".repeat(size))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{path} with {size} bytes");
    }
    let head = format!(
        "GET {events} HTTP/1.1\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(15_000)
    );
    let response = common::raw_exchange(gateway.addr, head.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 431 "), "{response:.80}");
    gateway.shutdown().await;
}
