//! A lone subscriber's tokens written to its socket by the fan-out, at the hub seam (no HTTP):
//! whatever mix of direct writes, partial writes, queued frames and catching up from the log,
//! the socket receives every token once and in order, then the terminal event.

use std::{
    future::poll_fn,
    sync::{Arc, Mutex},
    task::Poll,
    thread,
    time::Duration,
};

use rand::{rngs::StdRng, Rng, SeedableRng};

use super::{
    generation::Pushed, queue::IdleWriter, Delivery, Delta, Generation, Hub, HubSettings,
    LogLimits, Outcome, Subscription,
};
use crate::{config::Config, upstream::Upstream};

const LIMITS: LogLimits = LogLimits {
    max_tokens: 1_000_000,
    max_bytes: 100_000_000,
};

fn hub(channel_capacity: usize) -> Arc<Hub> {
    let settings = HubSettings {
        channel_capacity,
        max_viewer_lag: Duration::from_secs(60),
        max_viewer_lag_bytes: u64::MAX,
        keepalive_interval: Duration::from_secs(15),
        retention: Duration::from_secs(60),
        cancel_unwatched_after: None,
        max_generations: 10,
        log_limits: LIMITS,
        log_memory_budget: usize::MAX,
    };
    // Never called: the generation is fed by hand.
    let upstream = Upstream::new(&Config::defaults().upstream, "http://127.0.0.1:9/v1").unwrap();
    Hub::new(settings, upstream, None)
}

/// The connection's socket as `server/subscriber.rs` lends it: usable only while its reader is
/// idle, and then taking a random part of what it is offered (a socket buffer filling up).
struct Socket {
    state: Mutex<SocketState>,
}

struct SocketState {
    idle: bool,
    bytes: Vec<u8>,
    direct_writes: usize,
    rng: StdRng,
}

impl Socket {
    fn set_idle(&self, idle: bool) {
        self.state.lock().unwrap().idle = idle;
    }

    /// The subscriber's own write (it is busy then, so never at the same time as the fan-out's).
    fn write(&self, bytes: &[u8]) {
        self.state.lock().unwrap().bytes.extend_from_slice(bytes);
    }
}

impl IdleWriter for Socket {
    fn write_now(&self, bytes: &[u8]) -> Option<usize> {
        let state = &mut *self.state.lock().unwrap();
        if !state.idle {
            return None;
        }
        let taken = if state.rng.random_ratio(1, 4) {
            state.rng.random_range(0..bytes.len())
        } else {
            bytes.len()
        };
        state.bytes.extend_from_slice(&bytes[..taken]);
        state.direct_writes += 1;
        Some(taken)
    }
}

/// The ids of the SSE frames in `bytes`, which must be whole frames back to back.
fn frame_ids(bytes: &[u8]) -> Vec<u64> {
    let text = std::str::from_utf8(bytes).unwrap();
    assert!(text.ends_with("\n\n"), "a frame was cut");
    text.split_terminator("\n\n")
        .map(|frame| {
            let id = frame.lines().next().unwrap().strip_prefix("id: ").unwrap();
            id.parse().unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_subscriber_written_to_by_the_fan_out_gets_every_token_once_in_order() {
    const TOKENS: u64 = 5_000;
    let generation = Arc::new(Generation::new("gen_direct".into(), None));
    let socket = Arc::new(Socket {
        state: Mutex::new(SocketState {
            idle: false,
            bytes: Vec::new(),
            direct_writes: 0,
            rng: StdRng::seed_from_u64(7),
        }),
    });
    // A channel of 4: bursts send the subscriber to the log now and then.
    let mut subscription = Subscription::open(
        hub(4),
        generation.clone(),
        0,
        10,
        Some(socket.clone() as Arc<dyn IdleWriter>),
    )
    .unwrap();

    let producer = {
        let generation = generation.clone();
        thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(11);
            for i in 0..TOKENS {
                let pushed = generation.push(Delta::Text(format!("t{i} ")), LIMITS);
                assert!(matches!(pushed, Pushed::Logged { .. }), "{pushed:?}");
                if rng.random_ratio(1, 8) {
                    thread::sleep(Duration::from_micros(rng.random_range(0..300)));
                }
            }
            generation.finish(Outcome::Completed);
        })
    };
    // The subscriber's task as `BodyWriter` runs it: busy from its wake to its next wait.
    let mut rng = StdRng::seed_from_u64(13);
    loop {
        let delivery = poll_fn(|cx| {
            socket.set_idle(false);
            let polled = subscription.poll_delivery(cx);
            if polled.is_pending() {
                socket.set_idle(true);
            }
            polled
        })
        .await;
        match delivery {
            Some(Delivery::Replayed { frames, .. }) => socket.write(&frames),
            Some(Delivery::Token { frame, .. }) => socket.write(&frame),
            Some(Delivery::Ended(terminal)) => socket.write(&terminal),
            Some(Delivery::KeepAlive) => {}
            Some(Delivery::Dropped) => panic!("dropped"),
            None => break,
        }
        if rng.random_ratio(1, 16) {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    producer.join().unwrap();
    drop(subscription);

    let state = socket.state.lock().unwrap();
    assert_eq!(
        frame_ids(&state.bytes),
        (0..=TOKENS).collect::<Vec<_>>(),
        "every token once and in order, then the terminal event (id = token count)"
    );
    assert!(
        state.direct_writes > 100,
        "the fan-out wrote only {} times itself",
        state.direct_writes
    );
    assert_eq!(
        Arc::strong_count(&socket),
        1,
        "the socket is not held past the subscription"
    );
}

#[tokio::test]
async fn a_second_subscriber_turns_direct_writes_off() {
    let generation = Arc::new(Generation::new("gen_two".into(), None));
    let hub = hub(64);
    let socket = |seed| {
        Arc::new(Socket {
            state: Mutex::new(SocketState {
                idle: true,
                bytes: Vec::new(),
                direct_writes: 0,
                rng: StdRng::seed_from_u64(seed),
            }),
        })
    };
    let (first, second) = (socket(1), socket(2));
    let mut subscriptions = [&first, &second].map(|socket| {
        Subscription::open(
            hub.clone(),
            generation.clone(),
            0,
            10,
            Some(socket.clone() as Arc<dyn IdleWriter>),
        )
        .unwrap()
    });
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    for subscription in &mut subscriptions {
        assert!(subscription.poll_delivery(&mut cx).is_pending(), "live");
    }
    generation.push(Delta::Text("shared".into()), LIMITS);
    for (subscription, socket) in subscriptions.iter_mut().zip([&first, &second]) {
        assert_eq!(socket.state.lock().unwrap().direct_writes, 0);
        let delivered = subscription.poll_delivery(&mut cx);
        assert!(
            matches!(
                delivered,
                Poll::Ready(Some(Delivery::Token { index: 0, .. }))
            ),
            "{delivered:?}"
        );
    }
}
