//! Any instance serves any generation: real `tokenfan serve` processes on a real `redis-server`.

mod common;

use std::time::Duration;

use common::{
    chat_request,
    cluster::{view, Cluster, Roam},
    create_generation, parse_events,
    redis::RedisServer,
    start_mock, WAIT,
};
use futures_util::future::join_all;
use serde_json::{json, Value};

#[tokio::test]
async fn every_api_answers_on_every_instance() {
    let cluster = Cluster::start(3, &[], &[]).await;
    let bases = cluster.bases();
    let id = create_generation(
        &cluster.http,
        &bases[0],
        json!({"tokens": 40, "interval_ms": 10}),
    )
    .await;

    // Subscribe on another instance than the owner's: the whole stream, in order.
    let whole = view(&cluster.http, &bases, &id, Roam::Stay(1)).await;
    assert_eq!(whole.texts.len(), 40);
    assert_eq!(whole.terminal.event, "done");

    // Resume on a third instance with Last-Event-ID: exactly the rest.
    let response = cluster
        .http
        .get(format!("{}/v1/generations/{id}/events", bases[2]))
        .header("last-event-id", "29")
        .send()
        .await
        .unwrap();
    let events = parse_events(&response.text().await.unwrap());
    let ids: Vec<_> = events.iter().filter_map(|e| e.id.clone()).collect();
    assert_eq!(ids, (30..=40).map(|i| i.to_string()).collect::<Vec<_>>());

    // After the end: 204 for a client that has everything, on any instance.
    let response = cluster
        .http
        .get(format!("{}/v1/generations/{id}/events", bases[1]))
        .header("last-event-id", "40")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);

    // The snapshot is the same everywhere.
    let (status, owner_view) = cluster.snapshot(0, &id).await;
    assert_eq!(status, 200);
    for i in 1..3 {
        assert_eq!(cluster.snapshot(i, &id).await.1, owner_view);
    }
    assert_eq!(owner_view["text"].as_str().unwrap(), whole.texts.concat());

    // Only the owner called the upstream; the others relayed what the store had.
    assert_eq!(
        cluster.instances[0].metric("tokenfan_tokens_total").await,
        40.0
    );
    assert_eq!(
        cluster.instances[1].metric("tokenfan_tokens_total").await,
        0.0
    );
    assert_eq!(
        cluster.instances[1]
            .metric("tokenfan_relayed_tokens_total")
            .await,
        40.0
    );

    // Unknown ids are 404 everywhere.
    let (status, body) = cluster
        .snapshot(2, "gen_0123456789abcdef0123456789abcdef")
        .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "generation_not_found");
}

#[tokio::test]
async fn a_delete_on_another_instance_cancels_the_owners_upstream_call() {
    let cluster = Cluster::start(2, &[], &[]).await;
    let bases = cluster.bases();
    let id = create_generation(
        &cluster.http,
        &bases[0],
        json!({"tokens": 100_000, "interval_ms": 10}),
    )
    .await;
    let (status, answered) = cluster.cancel(1, &id).await;
    assert_eq!(status, 200);
    assert_eq!(answered["status"], "cancelled");
    let (_, owner_view) = cluster.snapshot(0, &id).await;
    assert_eq!(owner_view["status"], "cancelled");
    assert_eq!(owner_view["error"]["code"], "cancelled");
    // Viewers anywhere get the terminal event.
    let viewed = view(&cluster.http, &bases, &id, Roam::Stay(1)).await;
    assert_eq!(viewed.terminal.event, "error");
    assert_eq!(viewed.terminal.json()["code"], "cancelled");
}

#[tokio::test]
async fn one_idempotency_key_makes_one_generation_across_instances_per_api_key() {
    let env = [
        ("TOKENFAN_API_KEYS", "key-one,key-two"),
        (
            "TOKENFAN_SUBSCRIBE_TOKEN_KEY",
            "0123456789abcdef0123456789abcdef",
        ),
        ("TOKENFAN_SUBSCRIBE_TOKEN_TTL", "2s"),
    ];
    let cluster = Cluster::start(3, &[], &env).await;
    let bases = cluster.bases();
    let body = chat_request(json!({"tokens": 5, "interval_ms": 5, "key": "idem"}));
    let post = |i: usize, key: &'static str| {
        cluster
            .http
            .post(format!("{}/v1/generations", bases[i % 3]))
            .bearer_auth(key)
            .header("idempotency-key", "order-42")
            .json(&body)
            .send()
    };
    let answers = join_all((0..50).map(|i| post(i, "key-one"))).await;
    let mut ids = Vec::new();
    for answer in answers {
        let answer = answer.unwrap();
        assert!(answer.status() == 201, "{}", answer.status());
        let created: Value = answer.json().await.unwrap();
        ids.push(created["id"].as_str().unwrap().to_owned());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one generation for one key: {ids:?}");
    let other: Value = post(1, "key-two").await.unwrap().json().await.unwrap();
    assert_ne!(
        other["id"], ids[0],
        "another API key never gets the first key's generation"
    );

    // Exactly one upstream call for key-one's 50 requests, one for key-two's.
    tokio::time::timeout(WAIT, async {
        while cluster.mock_stats().await["keys"]["idem"] != 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("upstream calls");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(cluster.mock_stats().await["keys"]["idem"], 2);

    // A subscribe token made by one instance is good on every other; an expired one is not.
    let token = other["subscribe_token"].as_str().unwrap();
    let url = format!(
        "{}/v1/generations/{}/events?token={token}",
        bases[2],
        other["id"].as_str().unwrap()
    );
    let response = cluster.http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let response = cluster.http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 401);
    let refused: Value = response.json().await.unwrap();
    assert_eq!(refused["error"]["code"], "token_expired");
}

#[tokio::test]
async fn the_openai_endpoint_names_a_generation_every_instance_serves() {
    let cluster = Cluster::start(2, &[], &[]).await;
    let bases = cluster.bases();
    let response = cluster
        .http
        .post(format!("{}/v1/chat/completions", bases[0]))
        .json(&json!({
            "model": "tokenfan-mock",
            "messages": [{"role": "user", "content": "hi"}],
            "mock": {"tokens": 12, "interval_ms": 5}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-tokenfan-generation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let completion: Value = response.json().await.unwrap();
    let viewed = view(&cluster.http, &bases, &id, Roam::Stay(1)).await;
    assert_eq!(
        viewed.texts.concat(),
        completion["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
    );
}

#[tokio::test]
async fn tool_calls_and_reasoning_reach_viewers_and_snapshots_on_every_instance() {
    let cluster = Cluster::start(2, &[], &[]).await;
    let bases = cluster.bases();
    let mut request = chat_request(json!({"tokens": 5, "reasoning": 6, "tool_calls": 2}));
    request["tools"] = json!([{
        "type": "function",
        "function": {"name": "search", "parameters": {"type": "object"}}
    }]);
    let created: Value = cluster
        .http
        .post(format!("{}/v1/generations", bases[0]))
        .json(&request)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap();
    let on_owner = view(&cluster.http, &bases, id, Roam::Stay(0)).await;
    let elsewhere = view(&cluster.http, &bases, id, Roam::Stay(1)).await;
    assert_eq!(elsewhere.texts, on_owner.texts);
    assert!(elsewhere.texts.iter().any(|e| e.starts_with("tool_call: ")));
    assert!(elsewhere.texts.iter().any(|e| e.starts_with("reasoning: ")));
    let (_, owner_view) = cluster.snapshot(0, id).await;
    let (_, replica_view) = cluster.snapshot(1, id).await;
    assert_eq!(replica_view, owner_view);
    assert_eq!(owner_view["tool_calls"].as_array().unwrap().len(), 2);
    assert_eq!(owner_view["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn viewers_roaming_between_instances_see_every_token_once_in_order() {
    let cluster = Cluster::start(3, &[], &[]).await;
    let bases = cluster.bases();
    let ids = join_all((0..50).map(|i| {
        create_generation(
            &cluster.http,
            &bases[i % 3],
            json!({"tokens": 2000, "interval_ms": [0, 6]}),
        )
    }))
    .await;
    let viewers = (0..200).map(|v| view(&cluster.http, &bases, &ids[v % 50], Roam::Randomly));
    let viewed = join_all(viewers).await;
    let reconnects: usize = viewed.iter().map(|v| v.connections - 1).sum();
    for (v, seen) in viewed.iter().enumerate() {
        assert_eq!(seen.texts.len(), 2000, "viewer {v}");
        assert_eq!(seen.terminal.event, "done", "viewer {v}");
        assert_eq!(seen.terminal.json()["token_count"], 2000);
    }
    // Every viewer of a generation saw the same text.
    for v in 50..200 {
        assert_eq!(viewed[v].texts, viewed[v % 50].texts);
    }
    assert!(reconnects >= 200, "viewers moved {reconnects} times");
}

#[tokio::test]
async fn a_finished_generation_leaves_no_key_in_redis_after_its_retention() {
    let cluster = Cluster::start(2, &["--retention", "2s"], &[]).await;
    let bases = cluster.bases();
    // With an Idempotency-Key: the key too is claimed only for the retention after the end
    // (it was claimed for the longest life of a running generation, 11 minutes here).
    let created: Value = cluster
        .http
        .post(format!("{}/v1/generations", bases[0]))
        .header("idempotency-key", "order-7")
        .json(&chat_request(json!({"tokens": 10, "interval_ms": 1})))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let viewed = view(&cluster.http, &bases, &id, Roam::Stay(1)).await;
    assert_eq!(viewed.terminal.event, "done");
    let keys: Vec<String> = cluster.redis.command(&["KEYS", "*"]).await;
    assert!(keys.iter().any(|key| key.contains(&id)), "{keys:?}");
    assert!(keys.iter().any(|key| key.contains("order-7")), "{keys:?}");
    tokio::time::timeout(WAIT, async {
        loop {
            let keys: Vec<String> = cluster.redis.command(&["KEYS", "*"]).await;
            if keys.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("keys of a finished generation outlived its retention");
}

#[tokio::test]
async fn instances_on_a_redis_cluster_serve_each_others_generations() {
    let redis = RedisServer::start_cluster(3).await;
    let cluster = Cluster::start_on(redis, start_mock().await, 2, &[], &[]).await;
    let bases = cluster.bases();
    // Enough generations that their hash tags land on every shard.
    let ids = join_all((0..12).map(|i| {
        create_generation(
            &cluster.http,
            &bases[i % 2],
            json!({"tokens": 100, "interval_ms": [0, 4]}),
        )
    }))
    .await;
    let viewed = join_all(
        ids.iter()
            .enumerate()
            .map(|(i, id)| view(&cluster.http, &bases, id, Roam::Stay((i + 1) % 2))),
    )
    .await;
    for seen in &viewed {
        assert_eq!(seen.texts.len(), 100);
        assert_eq!(seen.terminal.event, "done");
    }
    // A DELETE crosses instances on a cluster too.
    let id = create_generation(
        &cluster.http,
        &bases[0],
        json!({"tokens": 100_000, "interval_ms": 10}),
    )
    .await;
    let (_, answered) = cluster.cancel(1, &id).await;
    assert_eq!(answered["status"], "cancelled");
}
