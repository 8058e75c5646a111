//! Drain with a shared store: SIGTERM hands every viewer over to another instance at once,
//! while the draining instance finishes its upstream calls into the store. Real processes, a
//! real redis-server, real signals.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{Cluster, Roam};
use nix::sys::signal::Signal;
use serde_json::json;

#[tokio::test]
async fn sigterm_hands_viewers_over_and_the_generation_completes_from_the_store() {
    let mut cluster = Cluster::start(2, &["--drain-deadline", "20s"], &[]).await;
    let knobs = json!({"tokens": 300, "interval_ms": 10});
    let roams = vec![
        Roam::Stay(1),
        Roam::Failover(0),
        Roam::Failover(0),
        Roam::Failover(0),
    ];
    let (_, viewers) = cluster.watch(0, knobs, roams).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let signalled = Instant::now();
    cluster.instances[0].signal(Signal::SIGTERM);

    let mut viewed = viewers.await.unwrap();
    let elsewhere = viewed.remove(0);
    let handed_over = viewed;
    for viewed in handed_over.iter().chain([&elsewhere]) {
        assert_eq!(viewed.terminal.event, "done", "{:?}", viewed.terminal);
        assert_eq!(viewed.texts.len(), 300);
        assert_eq!(viewed.texts, elsewhere.texts);
    }
    for viewed in &handed_over {
        assert_eq!(viewed.instances.first().map(String::as_str), Some("i0"));
        assert_eq!(
            viewed.instances.last().map(String::as_str),
            Some("i1"),
            "the viewer was not handed over: {:?}",
            viewed.instances
        );
    }
    // The draining instance exits once its call and its store writes are done, long before the
    // 20 s deadline.
    let (status, waited) = cluster.instances[0]
        .exit(signalled, Duration::from_secs(15))
        .await;
    assert!(status.success(), "{status:?}");
    assert!(waited < Duration::from_secs(10), "exited after {waited:?}");
}

#[tokio::test]
async fn a_call_still_running_at_the_drain_deadline_ends_interrupted_for_viewers_elsewhere() {
    let mut cluster = Cluster::start(2, &["--drain-deadline", "1s"], &[]).await;
    let knobs = json!({"tokens": 100_000, "interval_ms": 10});
    let (_, viewer) = cluster.watch(0, knobs, vec![Roam::Failover(0)]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let signalled = Instant::now();
    cluster.instances[0].signal(Signal::SIGTERM);
    let viewed = viewer.await.unwrap().remove(0);
    assert_eq!(viewed.terminal.event, "error");
    assert_eq!(viewed.terminal.json()["code"], "interrupted");
    assert_eq!(
        viewed.terminal.id.as_deref(),
        Some(viewed.texts.len().to_string().as_str()),
        "the end follows the last token"
    );
    let (status, _) = cluster.instances[0]
        .exit(signalled, Duration::from_secs(10))
        .await;
    assert!(status.success(), "{status:?}");
}
