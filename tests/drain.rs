//! SIGTERM drains a real `tokenfan` process: readiness flips, new work is refused in the way
//! each client understands, running generations finish within the deadline, the rest are told
//! to reconnect at spread-out times, and the process exits 0 in time.

mod common;

use std::time::{Duration, Instant};

use common::{chat_request, process::GatewayProcess, read_events, token_texts, Event};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use tokio::{io::AsyncWriteExt, net::TcpSocket, task::JoinHandle};

const DEADLINE: Duration = Duration::from_secs(3);
const SPREAD_MS: u64 = 2000;
/// The promise to operators: the process is gone within the deadline plus this.
const EXIT_MARGIN: Duration = Duration::from_secs(2);

async fn create(gateway: &GatewayProcess, mock: Value) -> String {
    let response = gateway
        .http
        .post(gateway.url("/v1/generations"))
        .json(&chat_request(mock))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn subscribe_many(gateway: &GatewayProcess, id: &str, count: usize) -> Vec<JoinHandle<Vec<Event>>> {
    (0..count)
        .map(|_| {
            let url = gateway.url(&format!("/v1/generations/{id}/events"));
            let http = gateway.http.clone();
            tokio::spawn(async move { read_events(http.get(url).send().await.unwrap()).await })
        })
        .collect()
}

async fn start() -> GatewayProcess {
    GatewayProcess::start(&[
        "--drain-deadline",
        &format!("{}s", DEADLINE.as_secs()),
        "--reconnect-spread",
        &format!("{SPREAD_MS}ms"),
    ])
    .await
}

#[tokio::test]
async fn sigterm_drains_under_the_deadline_and_exits_zero() {
    let mut gateway = start().await;
    // One generation that ends within the deadline, one that cannot.
    let short = create(&gateway, json!({"tokens": 60, "interval_ms": 20})).await;
    let long = create(&gateway, json!({"tokens": 100_000, "interval_ms": 20})).await;
    let short_viewers = subscribe_many(&gateway, &short, 150);
    let long_viewers = subscribe_many(&gateway, &long, 150);
    gateway
        .wait_metric("tokenfan_subscribers_open", |n| n >= 300.0)
        .await;

    let signalled = Instant::now();
    gateway.signal(Signal::SIGTERM);

    // 1. Not ready at once, still alive; new generations refused with Retry-After. The drain
    // shows on /metrics while it runs, so a scrape sees one that outlasts its deadline.
    gateway.wait_readyz(503).await;
    assert_eq!(gateway.metric("tokenfan_draining").await, 1.0);
    assert_eq!(
        gateway.metric("tokenfan_drain_deadline_seconds").await,
        DEADLINE.as_secs_f64()
    );
    assert!(
        gateway
            .metric("tokenfan_drain_started_timestamp_seconds")
            .await
            > 1.7e9
    );
    let live = gateway
        .http
        .get(gateway.url("/livez"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    let refused = gateway
        .http
        .post(gateway.url("/v1/generations"))
        .json(&chat_request(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(
        refused.json::<Value>().await.unwrap()["error"]["code"],
        "draining"
    );

    // 2. A late subscriber gets 200 and a reconnect event (an EventSource would give up on 503).
    let late = gateway
        .http
        .get(gateway.url(&format!("/v1/generations/{long}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), 200);
    let late = read_events(late).await;
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].event, "reconnect");
    assert_eq!(late[0].json()["reason"], "shutdown");

    // 3. The short generation finished for every viewer.
    for viewer in short_viewers {
        let events = viewer.await.unwrap();
        assert_eq!(token_texts(&events, 0).len(), 60);
        assert_eq!(events.last().unwrap().event, "done");
    }

    // 4. The long one's viewers were told to reconnect, at spread-out times.
    let mut retries = Vec::new();
    for viewer in long_viewers {
        let events = viewer.await.unwrap();
        let last = events.last().unwrap();
        assert_eq!(last.event, "reconnect", "{events:?}");
        assert_eq!(last.json()["reason"], "shutdown");
        retries.push(last.retry.expect("reconnect without retry"));
        assert!(token_texts(&events, 0).len() > 10);
    }
    assert!(retries.iter().all(|&ms| ms <= SPREAD_MS));
    retries.sort_unstable();
    retries.dedup();
    assert!(
        retries.len() > 50,
        "retry values are not spread: {retries:?}"
    );

    // 5. Exit 0 within deadline + 2 s.
    let (status, elapsed) = gateway
        .exit(signalled, DEADLINE + EXIT_MARGIN + EXIT_MARGIN)
        .await;
    assert!(status.success(), "{status}");
    assert!(elapsed <= DEADLINE + EXIT_MARGIN, "exit took {elapsed:?}");
    assert!(
        elapsed >= DEADLINE - Duration::from_millis(100),
        "did not wait for the deadline"
    );
}

#[tokio::test]
async fn drain_exits_early_when_everything_has_finished() {
    let mut gateway = start().await;
    let id = create(&gateway, json!({"tokens": 20, "interval_ms": 10})).await;
    let viewers = subscribe_many(&gateway, &id, 20);
    gateway
        .wait_metric("tokenfan_subscribers_open", |n| n >= 20.0)
        .await;
    let signalled = Instant::now();
    gateway.signal(Signal::SIGTERM);
    for viewer in viewers {
        assert_eq!(viewer.await.unwrap().last().unwrap().event, "done");
    }
    let (status, elapsed) = gateway.exit(signalled, DEADLINE + EXIT_MARGIN).await;
    assert!(status.success());
    assert!(
        elapsed < DEADLINE,
        "waited for the deadline with nothing left: {elapsed:?}"
    );
}

#[tokio::test]
async fn peer_that_stopped_reading_does_not_hold_the_exit() {
    // The write timeout is far away: only the drain's force-close can end these connections.
    let mut gateway =
        GatewayProcess::start(&["--drain-deadline", "1s", "--write-timeout", "10m"]).await;
    let id = create(
        &gateway,
        json!({"tokens": 100_000, "interval_ms": 1, "token_bytes": 2000}),
    )
    .await;
    let mut stalled = Vec::new();
    for _ in 0..50 {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(gateway.addr.parse().unwrap()).await.unwrap();
        let request = format!("GET /v1/generations/{id}/events HTTP/1.1\r\nHost: t\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        stalled.push(stream);
    }
    gateway
        .wait_metric("tokenfan_subscribers_open", |n| n >= 50.0)
        .await;
    let signalled = Instant::now();
    gateway.signal(Signal::SIGTERM);
    let (status, elapsed) = gateway.exit(signalled, Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    assert!(
        elapsed <= Duration::from_secs(1) + EXIT_MARGIN,
        "exit took {elapsed:?}"
    );
    drop(stalled);
}

#[tokio::test]
async fn second_signal_exits_at_once() {
    let mut gateway = GatewayProcess::start(&["--drain-deadline", "60s"]).await;
    let id = create(&gateway, json!({"tokens": 100_000, "interval_ms": 20})).await;
    let viewers = subscribe_many(&gateway, &id, 5);
    gateway
        .wait_metric("tokenfan_subscribers_open", |n| n >= 5.0)
        .await;
    gateway.signal(Signal::SIGTERM);
    gateway.wait_readyz(503).await;
    let signalled = Instant::now();
    gateway.signal(Signal::SIGINT);
    let (status, elapsed) = gateway.exit(signalled, Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(1));
    assert!(
        elapsed < Duration::from_secs(1),
        "second signal took {elapsed:?}"
    );
    for viewer in viewers {
        viewer.abort();
    }
}
