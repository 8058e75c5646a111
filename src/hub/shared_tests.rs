//! The hub's cross-instance invariants, at the store seam: several hubs in one process on one
//! [`MemoryStore`], no HTTP between them (the upstream is the embedded mock, as in production).

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::{
    generation::{Generation, LOG_LOST, OWNER_LOST},
    Delivery, Delta, Hub, HubError, HubSettings, IdempotencyKey, LogLimits, Shared, Status,
    Subscription,
};
use crate::{
    config::Config,
    store::{memory::MemoryStore, Lifetimes, Store, Write, WriteOp, Written},
    upstream::{mock, Upstream},
};

const WAIT: Duration = Duration::from_secs(20);
const LEASE: Duration = Duration::from_millis(200);

struct Cluster {
    store: Arc<MemoryStore>,
    mock_url: String,
}

impl Cluster {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(mock::serve(
            listener,
            mock::MockConfig::default(),
            std::future::pending(),
        ));
        let store = Arc::new(MemoryStore::new(Lifetimes {
            lease: LEASE,
            retention: Duration::from_secs(60),
            max_age: Duration::from_secs(600),
        }));
        Self {
            store,
            mock_url: format!("http://{addr}/v1"),
        }
    }

    async fn hub(&self, instance: &str) -> Arc<Hub> {
        let config = Config::defaults();
        let settings = HubSettings {
            channel_capacity: 64,
            max_viewer_lag: config.stream.max_viewer_lag,
            max_viewer_lag_bytes: config.stream.max_viewer_lag_bytes,
            keepalive_interval: Duration::from_secs(15),
            retention: Duration::from_secs(60),
            cancel_unwatched_after: None,
            max_generations: 1000,
            log_limits: LogLimits {
                max_tokens: 100_000,
                max_bytes: 10_000_000,
            },
            log_memory_budget: usize::MAX,
        };
        let store: Arc<dyn Store> = self.store.clone();
        let hub = Hub::new(
            settings,
            Upstream::new(&config.upstream, &self.mock_url).unwrap(),
            Some(Shared {
                store,
                instance: instance.to_owned(),
                lease: LEASE,
            }),
        );
        hub.listen_to_instances().await.unwrap();
        hub
    }
}

fn request(knobs: Value) -> Map<String, Value> {
    let Value::Object(request) = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "mock": knobs,
    }) else {
        unreachable!()
    };
    request
}

/// Reads a subscription to its end: the token ids seen, in order, and the terminal frame.
async fn read_all(hub: &Arc<Hub>, generation: Arc<Generation>, cursor: u64) -> (Vec<u64>, String) {
    let mut subscription = Subscription::open(hub.clone(), generation, cursor, 100).unwrap();
    let mut ids = Vec::new();
    let read = async {
        loop {
            match std::future::poll_fn(|cx| subscription.poll_delivery(cx)).await {
                Some(Delivery::Replayed { from, to, .. }) => ids.extend(from..to),
                Some(Delivery::Token { index, .. }) => ids.push(index),
                Some(Delivery::KeepAlive) => {}
                Some(Delivery::Ended(frame)) => {
                    return String::from_utf8_lossy(&frame).into_owned();
                }
                Some(Delivery::Dropped) => subscription.resume(),
                None => panic!("stream ended without a terminal event"),
            }
        }
    };
    let terminal = tokio::time::timeout(WAIT, read)
        .await
        .expect("no end in time");
    (ids, terminal)
}

/// Appends as the owner "ghost" would (a writer of an instance that is not in the test).
async fn append(store: &MemoryStore, id: &str, first: u64, entries: &[Bytes]) -> Written {
    let writes = [Write {
        id,
        op: WriteOp::Append {
            first,
            entries: entries.to_vec(),
            renew: true,
        },
    }];
    store.write("ghost", &writes).await.remove(0).unwrap()
}

async fn ended(generation: &Generation) {
    tokio::time::timeout(WAIT, generation.ended())
        .await
        .expect("generation did not end in time");
}

#[tokio::test]
async fn a_generation_created_on_one_instance_streams_whole_from_another() {
    let cluster = Cluster::start().await;
    let (a, b) = (cluster.hub("a").await, cluster.hub("b").await);
    let created = a
        .create(
            request(json!({"tokens": 200, "interval_ms": [0, 2]})),
            None,
            "-",
        )
        .await
        .unwrap();
    let id = created.generation.id().to_owned();
    let replica = b.find(&id).await.unwrap().expect("b finds a's generation");
    assert_eq!(replica.owner(), Some("a"));

    let (ids, terminal) = read_all(&b, replica.clone(), 0).await;
    assert_eq!(
        ids,
        (0..200).collect::<Vec<_>>(),
        "every token once, in order"
    );
    assert!(terminal.contains("event: done"), "{terminal}");
    assert_eq!(
        replica.snapshot().content.text,
        created.generation.snapshot().content.text
    );
    assert_eq!(
        replica.snapshot().usage,
        created.generation.snapshot().usage
    );

    // A late viewer on a third instance resumes mid-log from the store alone.
    let c = cluster.hub("c").await;
    let late = c.find(&id).await.unwrap().unwrap();
    let (ids, _) = read_all(&c, late, 150).await;
    assert_eq!(ids, (150..200).collect::<Vec<_>>());
}

#[tokio::test(flavor = "current_thread")]
async fn a_replica_that_missed_live_messages_fills_the_gap_from_the_log_without_duplicates() {
    let cluster = Cluster::start().await;
    let b = cluster.hub("b").await;
    let store = &cluster.store;
    store
        .create("gen_00000000000000000000000000000001", "ghost")
        .await
        .unwrap();
    let id = "gen_00000000000000000000000000000001";
    let entry = |i: u64| vec![Delta::Text(format!("t{i} ")).encode()];
    append(store, id, 0, &entry(0)).await;
    let replica = b.find(id).await.unwrap().unwrap();
    assert_eq!(replica.token_count(), 1);
    // Far more single appends than the replica's feed holds, without letting it run: its feed
    // overflows and drops the later ones.
    for i in 1..900 {
        append(store, id, i, &entry(i)).await;
    }
    // It catches up with what it got; the next messages then start past what it has.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(replica.token_count() < 900, "the feed did not overflow");
    for i in 900..1000 {
        append(store, id, i, &entry(i)).await;
        tokio::task::yield_now().await;
    }
    let end = crate::store::End {
        status: "completed".into(),
        token_count: 1000,
        finish_reason: Some("stop".into()),
        usage: None,
        error_code: None,
        error_message: None,
    };
    store.finish(id, Some("ghost"), &end).await.unwrap();
    ended(&replica).await;
    let expected: String = (0..1000).map(|i| format!("t{i} ")).collect();
    assert_eq!(replica.snapshot().content.text, expected);
    assert_eq!(replica.status(), Status::Completed);
}

#[tokio::test]
async fn a_generation_whose_owner_died_ends_failed_owner_lost() {
    let cluster = Cluster::start().await;
    let b = cluster.hub("b").await;
    let id = "gen_00000000000000000000000000000002";
    cluster.store.create(id, "ghost").await.unwrap();
    append(
        &cluster.store,
        id,
        0,
        &[Delta::Text("hello".into()).encode()],
    )
    .await;
    let replica = b.find(id).await.unwrap().unwrap();
    // The owner renews nothing: its lease runs out.
    ended(&replica).await;
    let snapshot = replica.snapshot();
    assert_eq!(snapshot.status, Status::Failed);
    assert_eq!(snapshot.error.unwrap().code, OWNER_LOST);
    assert_eq!(
        snapshot.content.text, "hello",
        "what was logged stays readable"
    );
    // The store says so too, for every other instance.
    let meta = cluster.store.meta(id).await.unwrap().unwrap();
    assert_eq!(meta.end.unwrap().error_code.as_deref(), Some(OWNER_LOST));
}

#[tokio::test]
async fn a_live_owner_keeps_its_generation_however_long_it_runs() {
    let cluster = Cluster::start().await;
    let (a, b) = (cluster.hub("a").await, cluster.hub("b").await);
    // Slower than several leases: only renewals keep it alive.
    let created = a
        .create(request(json!({"tokens": 3, "interval_ms": 400})), None, "-")
        .await
        .unwrap();
    let replica = b.find(created.generation.id()).await.unwrap().unwrap();
    let (ids, terminal) = read_all(&b, replica, 0).await;
    assert_eq!(ids, vec![0, 1, 2]);
    assert!(terminal.contains("event: done"), "{terminal}");
}

#[tokio::test]
async fn cancelling_on_another_instance_stops_the_owners_upstream_call() {
    let cluster = Cluster::start().await;
    let (a, b) = (cluster.hub("a").await, cluster.hub("b").await);
    let created = a
        .create(
            request(json!({"tokens": 10_000, "interval_ms": 10})),
            None,
            "-",
        )
        .await
        .unwrap();
    let replica = b.find(created.generation.id()).await.unwrap().unwrap();
    b.cancel(&replica).await.unwrap();
    ended(&created.generation).await;
    assert_eq!(created.generation.status(), Status::Cancelled);
    ended(&replica).await;
    assert_eq!(replica.status(), Status::Cancelled);
    assert_eq!(
        replica.token_count(),
        created.generation.token_count(),
        "the replica ends at the owner's last token"
    );
}

#[tokio::test]
async fn an_owner_writes_again_what_the_store_lost_while_running() {
    let cluster = Cluster::start().await;
    let (a, b) = (cluster.hub("a").await, cluster.hub("b").await);
    let created = a
        .create(
            request(json!({"tokens": 300, "interval_ms": [0, 3]})),
            None,
            "-",
        )
        .await
        .unwrap();
    let id = created.generation.id().to_owned();
    let replica = b.find(&id).await.unwrap().unwrap();
    tokio::time::timeout(WAIT, async {
        while replica.token_count() < 50 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    cluster.store.lose(&id);
    let (ids, terminal) = read_all(&b, replica.clone(), 0).await;
    assert_eq!(ids, (0..300).collect::<Vec<_>>());
    assert!(terminal.contains("event: done"), "{terminal}");
    assert_eq!(
        replica.snapshot().content.text,
        created.generation.snapshot().content.text
    );
}

#[tokio::test]
async fn idempotency_keys_are_shared_by_instances_and_scoped_by_credential() {
    let cluster = Cluster::start().await;
    let (a, b) = (cluster.hub("a").await, cluster.hub("b").await);
    let key = |scope: &str| {
        Some(IdempotencyKey {
            scope: scope.into(),
            key: "k1".into(),
        })
    };
    let knobs = json!({"tokens": 5, "interval_ms": 0});
    let first = a
        .create(request(knobs.clone()), key("tenant-1"), "-")
        .await
        .unwrap();
    assert!(first.is_new);
    let again = b
        .create(request(knobs.clone()), key("tenant-1"), "-")
        .await
        .unwrap();
    assert!(!again.is_new);
    assert_eq!(again.generation.id(), first.generation.id());
    let other_tenant = b
        .create(request(knobs.clone()), key("tenant-2"), "-")
        .await
        .unwrap();
    assert!(other_tenant.is_new);
    assert_ne!(other_tenant.generation.id(), first.generation.id());
    let other_body = b
        .create(request(json!({"tokens": 6})), key("tenant-1"), "-")
        .await;
    assert!(matches!(other_body, Err(HubError::IdempotencyKeyReused)));
}

#[tokio::test]
async fn an_ended_generation_whose_log_the_store_lost_is_never_served_as_whole() {
    let cluster = Cluster::start().await;
    let b = cluster.hub("b").await;
    let id = "gen_00000000000000000000000000000003";
    let store = &cluster.store;
    store.create(id, "ghost").await.unwrap();
    let entries = [
        Delta::Text("a".into()).encode(),
        Delta::Text("b".into()).encode(),
    ];
    append(store, id, 0, &entries).await;
    let end = crate::store::End {
        status: "completed".into(),
        token_count: 2,
        finish_reason: None,
        usage: None,
        error_code: None,
        error_message: None,
    };
    store.finish(id, Some("ghost"), &end).await.unwrap();
    store.truncate_log(id, 1);
    let replica = b.find(id).await.unwrap().unwrap();
    let snapshot = replica.snapshot();
    assert_eq!(snapshot.status, Status::Failed);
    assert_eq!(snapshot.error.unwrap().code, LOG_LOST);
}

#[tokio::test]
async fn unknown_ids_are_not_found_on_any_instance() {
    let cluster = Cluster::start().await;
    let b = cluster.hub("b").await;
    assert!(b
        .find("gen_ffffffffffffffffffffffffffffffff")
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn what_a_replica_takes_from_the_store_is_bounded() {
    let cluster = Cluster::start().await;
    let b = cluster.hub("b").await;
    let id = "gen_00000000000000000000000000000004";
    let store = &cluster.store;
    store.create(id, "ghost").await.unwrap();
    let end = crate::store::End {
        status: "failed".into(),
        token_count: 0,
        finish_reason: Some("x".repeat(10_000)),
        usage: Some(format!("{{\"pad\":\"{}\"}}", "u".repeat(100_000))),
        error_code: Some("upstream_error".into()),
        error_message: Some("é".repeat(10_000)),
    };
    store.finish(id, Some("ghost"), &end).await.unwrap();
    let snapshot = b.find(id).await.unwrap().unwrap().snapshot();
    assert_eq!(snapshot.status, Status::Failed);
    assert!(snapshot.finish_reason.is_none());
    assert!(snapshot.usage.is_none());
    let error = snapshot.error.unwrap();
    assert_eq!(error.code, "upstream_error");
    assert!(error.message.len() <= 1024 && error.message.starts_with('é'));
}

#[tokio::test]
async fn a_replica_that_lost_the_race_gives_back_the_log_bytes_it_counted() {
    let cluster = Cluster::start().await;
    let b = cluster.hub("b").await;
    let limits = LogLimits {
        max_tokens: 100,
        max_bytes: 100_000,
    };
    // Two requests opened a replica of the same generation at once; each counted its catch-up.
    let caught_up = || {
        let replica = Arc::new(Generation::replica(
            "gen_00000000000000000000000000000005".into(),
            "a".into(),
        ));
        for token in ["Hello", " world"] {
            if let super::generation::Pushed::Logged { log_bytes, .. } =
                replica.push(Delta::Text(token.into()), limits)
            {
                b.logged(log_bytes);
            }
        }
        replica
    };
    let (first, second) = (caught_up(), caught_up());
    assert!(b.adopt(first.clone()).1);
    assert!(!b.adopt(second).1);
    assert_eq!(b.log_bytes(), first.log_bytes());
}
