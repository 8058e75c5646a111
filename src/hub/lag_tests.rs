//! Subscribers that fall behind, at the hub seam (no HTTP): a full channel sends its subscriber
//! to the log instead of dropping it, and only the lag budgets drop it.

use std::{
    future::poll_fn,
    sync::Arc,
    task::{Context, Waker},
    thread,
    time::{Duration, Instant},
};

use rand::{rngs::StdRng, Rng, SeedableRng};

use super::{
    generation::Pushed, Delivery, Delta, Generation, Hub, HubSettings, LogLimits, Outcome,
    Subscription,
};
use crate::{config::Config, upstream::Upstream};

const LIMITS: LogLimits = LogLimits {
    max_tokens: 1_000_000,
    max_bytes: 100_000_000,
};
const WAIT: Duration = Duration::from_secs(20);

fn hub(channel_capacity: usize, max_viewer_lag: Duration, max_viewer_lag_bytes: u64) -> Arc<Hub> {
    let config = Config::defaults();
    let settings = HubSettings {
        channel_capacity,
        max_viewer_lag,
        max_viewer_lag_bytes,
        keepalive_interval: Duration::from_secs(15),
        retention: Duration::from_secs(60),
        cancel_unwatched_after: None,
        max_generations: 10,
        log_limits: LIMITS,
        log_memory_budget: usize::MAX,
    };
    // Never called: these generations are fed by hand.
    let upstream = Upstream::new(&config.upstream, "http://127.0.0.1:9/v1").unwrap();
    Hub::new(settings, upstream, None)
}

fn generation() -> Arc<Generation> {
    Arc::new(Generation::new("gen_lag".into(), None))
}

fn push(generation: &Generation, text: &str) -> u64 {
    match generation.push(Delta::Text(text.into()), LIMITS) {
        Pushed::Logged { fan_out, .. } => fan_out.fell_behind,
        other => panic!("not logged: {other:?}"),
    }
}

/// Attaches a subscription to a generation with nothing logged yet: it is live, waiting.
fn go_live(subscription: &mut Subscription) {
    let mut cx = Context::from_waker(Waker::noop());
    let first = subscription.poll_delivery(&mut cx);
    assert!(first.is_pending(), "{first:?}");
}

/// What a reader saw: every token id in order, how often it went live again after reading
/// from the log, and how the stream ended.
#[derive(Debug, Default)]
struct Seen {
    ids: Vec<u64>,
    back_live: usize,
    dropped: bool,
    ended: bool,
}

/// Reads `subscription` to its end; `pause` runs between deliveries (a reader's own pace).
async fn read(
    subscription: &mut Subscription,
    mut pause: impl FnMut() -> Option<Duration>,
) -> Seen {
    let mut seen = Seen::default();
    let mut from_log = false;
    let read = async {
        loop {
            match poll_fn(|cx| subscription.poll_delivery(cx)).await {
                Some(Delivery::Replayed { from, to, .. }) => {
                    seen.ids.extend(from..to);
                    from_log = true;
                }
                Some(Delivery::Token { index, .. }) => {
                    seen.ids.push(index);
                    if std::mem::take(&mut from_log) {
                        seen.back_live += 1;
                    }
                }
                Some(Delivery::KeepAlive) => {}
                Some(Delivery::Ended(_)) => seen.ended = true,
                Some(Delivery::Dropped) => seen.dropped = true,
                None => return,
            }
            match pause() {
                Some(pause) if !pause.is_zero() => tokio::time::sleep(pause).await,
                Some(_) => tokio::task::yield_now().await,
                None => {}
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("the subscription did not end");
    seen
}

#[tokio::test]
async fn a_burst_past_the_channel_is_read_from_the_log_and_nobody_is_evicted() {
    let hub = hub(64, Duration::from_secs(10), 4 * 1024 * 1024);
    let generation = generation();
    let mut subscription = Subscription::open(hub, generation.clone(), 0, 10).unwrap();
    // Live on an empty log, then 3,000 tokens at once: far more than its 64 slots.
    go_live(&mut subscription);
    let reader = tokio::spawn(async move { read(&mut subscription, || None).await });
    let fell_behind: u64 = (0..3000)
        .map(|i| push(&generation, &format!("t{i} ")))
        .sum();
    generation.finish(Outcome::Completed);
    let seen = reader.await.unwrap();

    assert_eq!(
        fell_behind, 1,
        "the reader left the live set once, at token 64"
    );
    assert!(!seen.dropped, "evicted by a burst");
    assert!(seen.ended);
    assert_eq!(seen.ids, (0..3000).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_subscriber_behind_by_more_than_the_byte_budget_is_dropped() {
    let hub = hub(4, Duration::from_secs(60), 4096);
    let generation = generation();
    let mut subscription = Subscription::open(hub, generation.clone(), 0, 10).unwrap();
    go_live(&mut subscription);
    // 200 tokens of ~100 bytes of frame while it does not read: ~20 KB behind.
    for _ in 0..200 {
        push(&generation, &"x".repeat(64));
    }
    let seen = read(&mut subscription, || None).await;
    assert!(seen.dropped, "not dropped 20 KB behind a 4 KB budget");
    assert_eq!(seen.ids, [0, 1, 2, 3], "the queued tokens come first");
    assert!(!seen.ended);
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_past_the_time_budget_is_dropped() {
    let hub = hub(2, Duration::from_millis(100), u64::MAX);
    let generation = generation();
    let mut subscription = Subscription::open(hub, generation.clone(), 0, 10).unwrap();
    go_live(&mut subscription);
    let started = Instant::now();
    for _ in 0..10 {
        push(&generation, "y");
    }
    let mut steps = 0;
    let seen = read(&mut subscription, || {
        steps += 1;
        // It reads its two queued tokens, then stops reading for a while.
        (steps == 2).then_some(Duration::from_millis(300))
    })
    .await;
    assert!(seen.dropped, "kept 300 ms behind a 100 ms budget");
    assert_eq!(seen.ids, [0, 1]);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

/// Live → log → live, many times, while a producer pushes in bursts from another thread:
/// every reader sees every token exactly once, in order, and none is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_across_live_log_live_under_concurrent_pushes() {
    const TOKENS: u64 = 20_000;
    for seed in 0..4 {
        let hub = hub(4, Duration::from_secs(60), u64::MAX);
        let generation = generation();
        let readers: Vec<_> = (0..6)
            .map(|reader| {
                let mut subscription =
                    Subscription::open(hub.clone(), generation.clone(), 0, 10).unwrap();
                let mut rng = StdRng::seed_from_u64(seed * 100 + reader);
                tokio::spawn(async move {
                    read(&mut subscription, move || match rng.random_range(0..100) {
                        0 => Some(Duration::from_micros(rng.random_range(100..2000))),
                        1..=20 => Some(Duration::ZERO),
                        _ => None,
                    })
                    .await
                })
            })
            .collect();
        let producer = {
            let generation = generation.clone();
            thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed);
                let mut fell_behind = 0;
                let mut pushed = 0;
                while pushed < TOKENS {
                    let burst = rng.random_range(1..300).min(TOKENS - pushed);
                    for _ in 0..burst {
                        fell_behind += push(&generation, &format!("{pushed} "));
                        pushed += 1;
                    }
                    thread::sleep(Duration::from_micros(rng.random_range(0..500)));
                }
                generation.finish(Outcome::Completed);
                fell_behind
            })
        };
        let mut back_live = 0;
        for reader in readers {
            let seen = reader.await.unwrap();
            assert!(!seen.dropped, "seed {seed}: dropped");
            assert!(seen.ended, "seed {seed}: no end");
            assert_eq!(seen.ids.len() as u64, TOKENS, "seed {seed}");
            assert!(
                seen.ids.iter().copied().eq(0..TOKENS),
                "seed {seed}: not every token once in order"
            );
            back_live += seen.back_live;
        }
        let fell_behind = producer.join().unwrap();
        assert!(fell_behind > 0, "seed {seed}: nobody fell behind");
        assert!(back_live > 0, "seed {seed}: nobody went live again");
    }
}

#[tokio::test]
async fn a_drain_tells_a_subscriber_that_fell_behind_and_lets_a_resumed_one_go_on() {
    let hub = hub(2, Duration::from_secs(60), u64::MAX);
    let generation = generation();
    let mut subscription = Subscription::open(hub.clone(), generation.clone(), 0, 10).unwrap();
    go_live(&mut subscription);
    for _ in 0..5 {
        push(&generation, "w");
    }
    // Out of every live set when the drain tells them all: it learns at its next step.
    hub.disconnect_all();
    let seen = read(&mut subscription, || None).await;
    assert!(
        seen.dropped,
        "went on reading an instance that is going away"
    );
    assert_eq!(seen.ids, [0, 1]);

    // A stream that cannot reconnect (chat) resumes from its cursor and goes on.
    subscription.resume();
    generation.finish(Outcome::Completed);
    let seen = read(&mut subscription, || None).await;
    assert!(seen.ended && !seen.dropped);
    assert_eq!(seen.ids, [2, 3, 4]);
}

#[test]
fn a_viewer_catching_up_from_the_log_counts_as_watching() {
    let generation = generation();
    push(&generation, "hello");
    // Nobody live for a while, then a reader catches up from the log.
    thread::sleep(Duration::from_millis(50));
    assert!(generation.unwatched_for() >= Some(Duration::from_millis(50)));
    assert!(matches!(
        generation.attach(0, 64),
        super::Attach::Replay { .. }
    ));
    assert!(generation.unwatched_for() < Some(Duration::from_millis(50)));
}
