//! The registry: generation id → [`Generation`], idempotency keys, and one task per generation.
//!
//! The registry owns the lifecycle: it starts the upstream task of a new generation, keeps the
//! finished generation readable for the retention time, then forgets it so its memory is freed.

use std::{
    collections::{HashMap, VecDeque},
    hash::{Hash, Hasher},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures_util::StreamExt;
use rand::RngCore;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use super::generation::{Generation, LogLimits, Outcome, Pushed, Status};
use crate::{
    metrics,
    upstream::{Upstream, UpstreamEvent},
};

/// Settings of the hub, taken from [`crate::config::StreamConfig`].
#[derive(Debug, Clone)]
pub struct HubSettings {
    pub channel_capacity: usize,
    pub keepalive_interval: Duration,
    pub retention: Duration,
    pub cancel_unwatched_after: Option<Duration>,
    pub max_generations: usize,
    pub log_limits: LogLimits,
    pub log_memory_budget: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("this Idempotency-Key was already used with a different request body")]
    IdempotencyKeyReused,
    #[error("too many generations are running; retry later")]
    TooManyGenerations,
    #[error("the generation logs have used their memory budget; retry later")]
    MemoryBudgetExceeded,
}

/// A new or existing generation, as returned by [`Hub::create`].
pub struct Created {
    pub generation: Arc<Generation>,
    /// False when an `Idempotency-Key` matched an earlier request.
    pub is_new: bool,
}

pub struct Hub {
    settings: HubSettings,
    upstream: Upstream,
    generations: Mutex<HashMap<String, Arc<Generation>>>,
    /// Idempotency key → (hash of the request body, generation id).
    idempotency: Mutex<HashMap<String, (u64, String)>>,
    running: AtomicUsize,
    subscribers_open: AtomicUsize,
    /// Memory held by every generation log, against `log_memory_budget`.
    log_bytes: AtomicUsize,
    /// Ids of finished generations, oldest first: the first to go when memory runs short.
    finished: Mutex<VecDeque<String>>,
    /// Fires when the process shuts down: retention timers stop waiting.
    closed: CancellationToken,
}

impl Hub {
    pub fn new(settings: HubSettings, upstream: Upstream) -> Arc<Self> {
        Arc::new(Self {
            settings,
            upstream,
            generations: Mutex::default(),
            idempotency: Mutex::default(),
            running: AtomicUsize::new(0),
            subscribers_open: AtomicUsize::new(0),
            log_bytes: AtomicUsize::new(0),
            finished: Mutex::default(),
            closed: CancellationToken::new(),
        })
    }

    pub fn settings(&self) -> &HubSettings {
        &self.settings
    }

    /// Starts a generation (one upstream task), or returns the one an earlier request with the
    /// same idempotency key started.
    pub fn create(
        self: &Arc<Self>,
        request: serde_json::Map<String, serde_json::Value>,
        idempotency_key: Option<String>,
    ) -> Result<Created, HubError> {
        if self.running() >= self.settings.max_generations {
            return Err(HubError::TooManyGenerations);
        }
        if !self.fit_log_budget() {
            return Err(HubError::MemoryBudgetExceeded);
        }
        let body_hash = hash_request(&request);
        // Held across the insert into `generations`, so two racing requests with one key cannot
        // both start an upstream call.
        let mut keys = lock(&self.idempotency);
        if let Some(key) = &idempotency_key {
            if let Some((hash, id)) = keys.get(key) {
                if *hash != body_hash {
                    return Err(HubError::IdempotencyKeyReused);
                }
                if let Some(generation) = self.get(id) {
                    return Ok(Created {
                        generation,
                        is_new: false,
                    });
                }
            }
        }
        let id = new_generation_id();
        let generation = Arc::new(Generation::new(id.clone(), idempotency_key.clone()));
        if let Some(key) = idempotency_key {
            keys.insert(key, (body_hash, id.clone()));
        }
        lock(&self.generations).insert(id.clone(), generation.clone());
        drop(keys);

        self.running.fetch_add(1, Ordering::Relaxed);
        ::metrics::gauge!(metrics::GENERATIONS_RUNNING).increment(1);
        ::metrics::counter!(metrics::GENERATIONS_STARTED).increment(1);
        let span = info_span!("generation", generation_id = %id);
        tokio::spawn(
            self.clone()
                .run(generation.clone(), request)
                .instrument(span),
        );
        Ok(Created {
            generation,
            is_new: true,
        })
    }

    pub fn get(&self, id: &str) -> Option<Arc<Generation>> {
        lock(&self.generations).get(id).cloned()
    }

    /// Generations whose upstream call is still going.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Subscriber streams open now, replaying or live.
    pub fn subscribers_open(&self) -> usize {
        self.subscribers_open.load(Ordering::Relaxed)
    }

    pub fn subscriber_opened(&self) {
        self.subscribers_open.fetch_add(1, Ordering::Relaxed);
        ::metrics::gauge!(metrics::SUBSCRIBERS_OPEN).increment(1);
    }

    pub fn subscriber_closed(&self) {
        self.subscribers_open.fetch_sub(1, Ordering::Relaxed);
        ::metrics::gauge!(metrics::SUBSCRIBERS_OPEN).decrement(1);
    }

    fn all(&self) -> Vec<Arc<Generation>> {
        lock(&self.generations).values().cloned().collect()
    }

    /// Sends a keep-alive to every idle subscriber; called by one central ticker.
    pub fn keepalive(&self) {
        for generation in self.all() {
            generation.keepalive();
        }
    }

    /// Ends every subscriber's stream (they are told to reconnect). Returns how many.
    pub fn disconnect_all(&self) -> usize {
        self.all().iter().map(|g| g.disconnect_all()).sum()
    }

    /// Ends every running generation as `interrupted`. Returns how many.
    pub fn interrupt_all(&self) -> usize {
        self.all()
            .iter()
            .filter(|g| g.finish(Outcome::Interrupted))
            .count()
    }

    /// Stops retention timers; called once the server is gone.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// The one task of a generation: stream from the upstream into the log, then keep the
    /// result for the retention time and forget it.
    async fn run(
        self: Arc<Self>,
        generation: Arc<Generation>,
        request: serde_json::Map<String, serde_json::Value>,
    ) {
        info!("generation started");
        let mut recorded = metrics::GenerationMetrics::start(metrics::model_label(&request));
        let outcome = tokio::select! {
            outcome = self.stream_upstream(&generation, request, &mut recorded) => Some(outcome),
            () = generation.ended() => None,
            () = self.watch_unwatched(&generation) => Some(Outcome::Failed {
                code: "unwatched",
                message: "cancelled: nobody watched the generation".into(),
            }),
        };
        if let Some(outcome) = outcome {
            if let Outcome::Failed { code, message } = &outcome {
                warn!(code, message, "generation failed");
            }
            generation.finish(outcome);
        }
        let status = generation.status();
        info!(?status, "generation ended");
        recorded.finish(status_label(status));
        lock(&self.finished).push_back(generation.id().to_owned());
        self.running.fetch_sub(1, Ordering::Relaxed);
        ::metrics::gauge!(metrics::GENERATIONS_RUNNING).decrement(1);
        ::metrics::counter!(metrics::GENERATIONS_FINISHED, "status" => status_label(status))
            .increment(1);

        tokio::select! {
            () = tokio::time::sleep(self.settings.retention) => {}
            () = self.closed.cancelled() => {}
        }
        self.forget(&generation);
    }

    async fn stream_upstream(
        &self,
        generation: &Generation,
        request: serde_json::Map<String, serde_json::Value>,
        recorded: &mut metrics::GenerationMetrics,
    ) -> Outcome {
        let stream = self.upstream.stream(request);
        futures_util::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(UpstreamEvent::Token(text)) => {
                    match generation.push_token(&text, self.settings.log_limits) {
                        Pushed::Logged { fan_out, log_bytes } => {
                            metrics::record_fan_out(fan_out);
                            recorded.token();
                            self.log_bytes.fetch_add(log_bytes, Ordering::Relaxed);
                            self.fit_log_budget();
                        }
                        Pushed::Ended => break,
                        Pushed::TooLarge => {
                            return Outcome::Failed {
                                code: "too_large",
                                message: "the generation exceeded its token or byte limit".into(),
                            }
                        }
                    }
                }
                Ok(UpstreamEvent::Finish(reason)) => generation.set_finish_reason(reason),
                Ok(UpstreamEvent::Usage(usage)) => generation.set_usage(usage),
                Err(error) => {
                    recorded.upstream_error(error.code());
                    return Outcome::Failed {
                        code: error.code(),
                        message: error.to_string(),
                    };
                }
            }
        }
        Outcome::Completed
    }

    /// Resolves when `--cancel-unwatched-after` is set and nobody has watched for that long.
    async fn watch_unwatched(&self, generation: &Generation) {
        let Some(limit) = self.settings.cancel_unwatched_after else {
            return std::future::pending().await;
        };
        let mut tick = tokio::time::interval((limit / 4).max(Duration::from_millis(10)));
        loop {
            tick.tick().await;
            if generation.unwatched_for().is_some_and(|idle| idle >= limit) {
                return;
            }
        }
    }

    /// Forgets finished generations, oldest first, until the logs fit the memory budget.
    /// Returns whether they fit.
    fn fit_log_budget(&self) -> bool {
        while self.log_bytes.load(Ordering::Relaxed) > self.settings.log_memory_budget {
            let Some(id) = lock(&self.finished).pop_front() else {
                return false;
            };
            if let Some(generation) = self.get(&id) {
                info!(generation_id = %id, "log memory budget reached: forgetting a finished generation early");
                ::metrics::counter!(metrics::GENERATIONS_EVICTED).increment(1);
                self.forget(&generation);
            }
        }
        true
    }

    /// Memory held by every generation log.
    pub fn log_bytes(&self) -> usize {
        self.log_bytes.load(Ordering::Relaxed)
    }

    fn forget(&self, generation: &Generation) {
        if lock(&self.generations).remove(generation.id()).is_some() {
            self.log_bytes
                .fetch_sub(generation.log_bytes(), Ordering::Relaxed);
        }
        if let Some(key) = generation.idempotency_key() {
            let mut keys = lock(&self.idempotency);
            if keys.get(key).is_some_and(|(_, id)| id == generation.id()) {
                keys.remove(key);
            }
        }
    }
}

fn status_label(status: Status) -> &'static str {
    match status {
        Status::Running => "running",
        Status::Completed => "completed",
        Status::Failed => "failed",
        Status::Cancelled => "cancelled",
        Status::Interrupted => "interrupted",
    }
}

/// `gen_` and 128 random bits in hex: unguessable, so knowing an id is the capability to read it.
fn new_generation_id() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let mut id = String::with_capacity(4 + 32);
    id.push_str("gen_");
    for byte in bytes {
        id.push_str(&format!("{byte:02x}"));
    }
    id
}

/// Whether a string has the shape of a generation id; anything else is answered 404 untouched.
pub fn is_generation_id(id: &str) -> bool {
    id.strip_prefix("gen_")
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn hash_request(request: &serde_json::Map<String, serde_json::Value>) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    // Serializing a JSON map cannot fail; an empty fallback would only weaken the key check.
    serde_json::to_vec(request)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
