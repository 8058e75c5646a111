//! Readiness on a shared store: an instance whose store has been unreachable for a while
//! cannot serve other instances' generations, so it leaves the load balancer — but only after
//! `--store-unready-after`, so that a blip of the store does not take every instance out of
//! service at once.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::store::Store;

/// How often the store is pinged.
const PING_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct StoreHealth {
    started: Instant,
    /// Milliseconds since `started` of the last answered ping.
    last_answer_ms: Arc<AtomicU64>,
    unready_after: Duration,
}

impl StoreHealth {
    /// Starts pinging `store` in the background.
    pub fn watch(store: Arc<dyn Store>, unready_after: Duration) -> Self {
        let health = Self {
            started: Instant::now(),
            last_answer_ms: Arc::default(),
            unready_after,
        };
        let pinger = health.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PING_EVERY);
            loop {
                tick.tick().await;
                let answered = tokio::time::timeout(PING_EVERY, store.ping()).await;
                if matches!(answered, Ok(Ok(()))) {
                    let now =
                        u64::try_from(pinger.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                    pinger.last_answer_ms.store(now, Ordering::Relaxed);
                }
                if Arc::strong_count(&pinger.last_answer_ms) == 1 {
                    return;
                }
            }
        });
        health
    }

    /// False once the store has not answered for `--store-unready-after`.
    pub fn ready(&self) -> bool {
        let last = Duration::from_millis(self.last_answer_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last) < self.unready_after
    }
}
