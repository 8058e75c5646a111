//! Redis faults and a dead owner, with real processes: viewers on the owner and on another
//! instance end with every token once, in order, and the right terminal event.

mod common;

use std::time::{Duration, Instant};

use common::{
    cluster::{Cluster, Roam, Viewed},
    create_generation,
};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

const TOKENS: usize = 400;

/// A generation on instance 0, watched from instances 0 and 1.
struct Watched {
    id: String,
    viewers: tokio::task::JoinHandle<Vec<Viewed>>,
}

/// Starts a generation and its two viewers; returns once they have seen some tokens.
async fn watch_a_generation(cluster: &Cluster) -> Watched {
    let knobs = json!({"tokens": TOKENS, "interval_ms": 10});
    let (id, viewers) = cluster
        .watch(0, knobs, vec![Roam::Stay(0), Roam::Stay(1)])
        .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    Watched { id, viewers }
}

/// Waits for both viewers to end; checks both saw the owner's whole text.
async fn assert_both_saw_everything(cluster: &Cluster, watched: Watched) {
    let viewed = watched.viewers.await.unwrap();
    let (on_owner, elsewhere) = (&viewed[0], &viewed[1]);
    let (_, snapshot) = cluster.snapshot(0, &watched.id).await;
    assert_whole(on_owner, &snapshot);
    assert_whole(elsewhere, &snapshot);
}

fn assert_whole(viewed: &Viewed, snapshot: &Value) {
    assert_eq!(viewed.terminal.event, "done", "{:?}", viewed.terminal);
    assert_eq!(viewed.texts.len(), TOKENS);
    assert_eq!(viewed.texts.concat(), snapshot["text"].as_str().unwrap());
}

#[tokio::test]
async fn redis_killed_and_restarted_empty_mid_stream_loses_no_token() {
    let mut cluster = Cluster::start(2, &[], &[]).await;
    let watched = watch_a_generation(&cluster).await;
    cluster.redis.crash_and_restart().await;
    assert_both_saw_everything(&cluster, watched).await;
}

#[tokio::test]
async fn a_dropped_pubsub_connection_loses_no_token() {
    let cluster = Cluster::start(2, &[], &[]).await;
    let watched = watch_a_generation(&cluster).await;
    let killed: i64 = cluster
        .redis
        .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
        .await;
    assert!(killed >= 1, "no pub/sub connection to kill");
    assert_both_saw_everything(&cluster, watched).await;
}

#[tokio::test]
async fn a_paused_redis_loses_no_token() {
    let cluster = Cluster::start(2, &[], &[]).await;
    let watched = watch_a_generation(&cluster).await;
    let _: String = cluster.redis.command(&["CLIENT", "PAUSE", "2000"]).await;
    assert_both_saw_everything(&cluster, watched).await;
}

#[tokio::test]
async fn viewers_of_a_killed_owner_get_owner_lost_within_20_seconds() {
    let cluster = Cluster::start(2, &[], &[]).await;
    let knobs = json!({"tokens": 100_000, "interval_ms": 20});
    let (id, viewer) = cluster.watch(0, knobs, vec![Roam::Stay(1)]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    cluster.instances[0].signal(Signal::SIGKILL);
    let viewed = viewer.await.unwrap().remove(0);
    let waited = killed.elapsed();
    assert_eq!(viewed.terminal.event, "error");
    assert_eq!(viewed.terminal.json()["code"], "owner_lost");
    assert!(waited < Duration::from_secs(20), "told after {waited:?}");
    assert!(
        !viewed.texts.is_empty(),
        "tokens before the kill were delivered"
    );
    // Every other instance agrees, and keeps what was logged.
    let (_, snapshot) = cluster.snapshot(1, &id).await;
    assert_eq!(snapshot["status"], "failed");
    assert_eq!(snapshot["error"]["code"], "owner_lost");
    assert_eq!(snapshot["text"].as_str().unwrap(), viewed.texts.concat());
}

#[tokio::test]
async fn while_redis_is_down_viewers_are_told_to_come_back_and_readiness_holds_for_a_while() {
    let mut cluster = Cluster::start(2, &["--store-unready-after", "2s"], &[]).await;
    let id = create_generation(&cluster.http, &cluster.base(0), json!({"tokens": 5})).await;
    cluster.redis.crash().await;
    let lost_at = Instant::now();

    // Instance 1 has never seen this generation: it cannot tell, and says "come back" in a way
    // a browser's EventSource follows (an error status would make it give up).
    let response = cluster
        .http
        .get(format!("{}/v1/generations/{id}/events", cluster.base(1)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    assert!(body.contains("event: reconnect"), "{body}");
    assert!(body.contains("store_unavailable"), "{body}");
    // Backends get a clear, retryable error.
    let (status, created) = {
        let response = cluster
            .http
            .post(format!("{}/v1/generations", cluster.base(1)))
            .json(&common::chat_request(json!({})))
            .send()
            .await
            .unwrap();
        let retry_after = response.headers().contains_key("retry-after");
        assert!(retry_after);
        (
            response.status().as_u16(),
            response.json::<Value>().await.unwrap(),
        )
    };
    assert_eq!(status, 503);
    assert_eq!(created["error"]["code"], "store_unavailable");

    // Ready through a blip, not ready once the outage lasts, ready again when it is over.
    cluster.instances[1].wait_readyz(503).await;
    assert!(
        lost_at.elapsed() >= Duration::from_secs(2),
        "unready too soon"
    );
    cluster.redis.restart().await;
    cluster.instances[1].wait_readyz(200).await;
}
