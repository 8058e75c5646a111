//! The registry: generation id → [`Generation`], idempotency keys, and one task per generation.
//!
//! The registry owns the lifecycle: it starts the upstream task of a new generation, keeps the
//! finished generation readable for the retention time, then forgets it so its memory is freed.

use std::{
    collections::{HashMap, VecDeque},
    hash::{Hash, Hasher},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures_util::StreamExt;
use rand::RngCore;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use super::{
    generation::{status_label, Generation, LogLimits, Outcome, Pushed, Resume, Status},
    replica,
    writer::{Tracking, Writer},
};
use crate::{
    metrics,
    store::{IdempotencyClaim, Store, StoreError},
    upstream::{LogSafe, Route, UnknownModel, UpstreamEvent, Upstreams},
};

/// Settings of the hub, taken from [`crate::config::StreamConfig`].
#[derive(Debug, Clone)]
pub struct HubSettings {
    pub channel_capacity: usize,
    /// A subscriber that fell behind is disconnected past either (see [`super::Subscription`]).
    pub max_viewer_lag: Duration,
    pub max_viewer_lag_bytes: u64,
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
    #[error(transparent)]
    UnknownModel(#[from] UnknownModel),
    #[error("too many generations are running; retry later")]
    TooManyGenerations,
    #[error("the generation logs have used their memory budget; retry later")]
    MemoryBudgetExceeded,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The store shared with other instances, and this instance's name in it.
pub struct Shared {
    pub store: Arc<dyn Store>,
    pub instance: String,
    /// The owner's lease: replicas wait this long without one before ending a generation.
    pub lease: Duration,
}

/// An `Idempotency-Key`, scoped to the credential that sent it.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    /// A digest of the caller's API key (or `-` without keys): one tenant's key never names
    /// another tenant's generation.
    pub scope: String,
    pub key: String,
}

/// The labels of a generation's metrics: its model (bounded, see [`metrics::model_label`]) and
/// the caller's API key name (for usage).
struct UsageLabels {
    model: ::metrics::SharedString,
    key_label: String,
}

/// A new or existing generation, as returned by [`Hub::create`].
pub struct Created {
    pub generation: Arc<Generation>,
    /// False when an `Idempotency-Key` matched an earlier request.
    pub is_new: bool,
}

pub struct Hub {
    settings: HubSettings,
    upstreams: Upstreams,
    shared: Option<Shared>,
    /// With a store: writes our generations through to it.
    writer: Option<Writer>,
    /// Generations served here: our own, and replicas of other instances' (with a store).
    generations: Mutex<HashMap<String, Arc<Generation>>>,
    /// (scope, idempotency key) → (hash of the request body, generation id), without a store.
    idempotency: Mutex<HashMap<(String, String), (u64, String)>>,
    running: AtomicUsize,
    subscribers_open: AtomicUsize,
    /// Memory held by every generation log, against `log_memory_budget`.
    log_bytes: AtomicUsize,
    /// Ids of finished generations, oldest first: the first to go when memory runs short.
    finished: Mutex<VecDeque<String>>,
    /// Fires when the process shuts down: retention timers stop waiting.
    closed: CancellationToken,
    /// Set by [`Hub::disconnect_all`].
    disconnected: AtomicBool,
}

impl Hub {
    pub fn new(
        settings: HubSettings,
        upstreams: impl Into<Upstreams>,
        shared: Option<Shared>,
    ) -> Arc<Self> {
        let closed = CancellationToken::new();
        let writer = shared.as_ref().map(|shared| {
            Writer::new(
                shared.store.clone(),
                shared.instance.clone(),
                shared.lease,
                closed.clone(),
            )
        });
        Arc::new(Self {
            settings,
            upstreams: upstreams.into(),
            shared,
            writer,
            generations: Mutex::default(),
            idempotency: Mutex::default(),
            running: AtomicUsize::new(0),
            subscribers_open: AtomicUsize::new(0),
            log_bytes: AtomicUsize::new(0),
            finished: Mutex::default(),
            closed,
            disconnected: AtomicBool::new(false),
        })
    }

    /// With a store: starts listening for the cancel requests of other instances. Called once,
    /// before the first request is served, so that none is missed.
    pub async fn listen_to_instances(self: &Arc<Self>) -> Result<(), HubError> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let registration = shared
            .store
            .listen_for_cancels(&shared.instance, tx)
            .await?;
        tokio::spawn(self.clone().serve_cancel_requests(registration, rx));
        Ok(())
    }

    pub fn settings(&self) -> &HubSettings {
        &self.settings
    }

    pub fn shared(&self) -> Option<&Shared> {
        self.shared.as_ref()
    }

    /// This instance's name (with a store), for the viewers and the logs.
    pub fn instance(&self) -> Option<&str> {
        self.shared.as_ref().map(|shared| shared.instance.as_str())
    }

    /// Fires when the process shuts down.
    pub fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.closed.cancelled()
    }

    /// The providers generations stream from (for calls that are not generations: their
    /// models).
    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// Starts a generation (one upstream task), or returns the one an earlier request with the
    /// same idempotency key (from the same credential) started, on any instance. `key_label`
    /// names the caller's API key in the usage metrics. A model no upstream serves is refused
    /// first, before the hub's limits are looked at or anything is stored.
    pub async fn create(
        self: &Arc<Self>,
        request: serde_json::Map<String, serde_json::Value>,
        idempotency_key: Option<IdempotencyKey>,
        key_label: &str,
    ) -> Result<Created, HubError> {
        let model = request.get("model").and_then(serde_json::Value::as_str);
        let route = self.upstreams.route(model.unwrap_or_default())?;
        if self.running() >= self.settings.max_generations {
            return Err(HubError::TooManyGenerations);
        }
        if !self.fit_log_budget() {
            return Err(HubError::MemoryBudgetExceeded);
        }
        let body_hash = hash_request(&request);
        let id = new_generation_id();
        let (generation, claim) = match &self.shared {
            None => match self.register_local(id, idempotency_key, body_hash)? {
                Ok(generation) => (generation, None),
                Err(existing) => return Ok(existing),
            },
            Some(shared) => {
                shared.store.create(&id, &shared.instance).await?;
                let claim = idempotency_key.as_ref().map(|key| IdempotencyClaim {
                    scope: key.scope.clone(),
                    key: key.key.clone(),
                    body_hash,
                });
                if let Some(claim) = &claim {
                    if let Some(claimed) = shared.store.claim_idempotency(claim, &id).await? {
                        if let Err(error) = shared.store.discard(&id).await {
                            warn!(%error, "could not remove a generation that lost an idempotency race");
                        }
                        if claimed.body_hash != body_hash {
                            return Err(HubError::IdempotencyKeyReused);
                        }
                        let generation = self.find(&claimed.id).await?.ok_or_else(|| {
                            StoreError::Protocol(
                                "the generation of this Idempotency-Key is gone".into(),
                            )
                        })?;
                        return Ok(Created {
                            generation,
                            is_new: false,
                        });
                    }
                }
                let key = idempotency_key.map(|key| key.key);
                let generation = Arc::new(Generation::new(id.clone(), key));
                lock(&self.generations).insert(id.clone(), generation.clone());
                (generation, claim)
            }
        };
        let writing = self
            .writer
            .as_ref()
            .map(|writer| writer.track(generation.clone(), claim));

        self.running.fetch_add(1, Ordering::Relaxed);
        ::metrics::gauge!(metrics::GENERATIONS_RUNNING).increment(1);
        ::metrics::counter!(metrics::GENERATIONS_STARTED).increment(1);
        let span = info_span!("generation", generation_id = %generation.id());
        let labels = UsageLabels {
            model: metrics::model_label(&request),
            key_label: key_label.to_owned(),
        };
        let hub = self.clone();
        let task_generation = generation.clone();
        tokio::spawn(async move {
            hub.clone()
                .run(task_generation.clone(), writing, request, route, labels)
                .instrument(span)
                .await;
            // Outside the span: a generation's trace ends when the generation does, not when
            // its retention does (or at shutdown, racing the exporter's last flush).
            hub.retain_then_forget(&task_generation).await;
        });
        Ok(Created {
            generation,
            is_new: true,
        })
    }

    /// Registers a new generation in this process alone; `Err` with the existing one when the
    /// idempotency key was used before.
    #[allow(clippy::type_complexity)]
    fn register_local(
        &self,
        id: String,
        idempotency_key: Option<IdempotencyKey>,
        body_hash: u64,
    ) -> Result<Result<Arc<Generation>, Created>, HubError> {
        // Held across the insert into `generations`, so two racing requests with one key cannot
        // both start an upstream call.
        let mut keys = lock(&self.idempotency);
        let scoped = idempotency_key.map(|key| (key.scope, key.key));
        if let Some(scoped) = &scoped {
            if let Some((hash, existing)) = keys.get(scoped) {
                if *hash != body_hash {
                    return Err(HubError::IdempotencyKeyReused);
                }
                if let Some(generation) = self.get(existing) {
                    return Ok(Err(Created {
                        generation,
                        is_new: false,
                    }));
                }
            }
        }
        let generation = Arc::new(Generation::new(
            id.clone(),
            scoped.as_ref().map(|(_, key)| key.clone()),
        ));
        if let Some(scoped) = scoped {
            keys.insert(scoped, (body_hash, id.clone()));
        }
        lock(&self.generations).insert(id, generation.clone());
        Ok(Ok(generation))
    }

    /// Finds a generation: one served here, or, with a store, one that another instance runs
    /// (this instance then keeps a replica of it).
    pub async fn find(self: &Arc<Self>, id: &str) -> Result<Option<Arc<Generation>>, HubError> {
        if let Some(generation) = self.get(id) {
            return Ok(Some(generation));
        }
        match &self.shared {
            None => Ok(None),
            Some(shared) => Ok(replica::open(self, shared, id).await?),
        }
    }

    /// Where a subscriber resuming at `cursor` stands. A replica may trail the instance the
    /// client comes from by a few messages: it gets a moment to catch up before the cursor is
    /// refused as beyond the end.
    pub async fn resume(&self, generation: &Generation, cursor: u64) -> Resume {
        let deadline = tokio::time::Instant::now() + REPLICA_CATCH_UP;
        loop {
            let resume = generation.resume(cursor);
            let may_catch_up = generation.owner().is_some()
                && generation.status() == Status::Running
                && tokio::time::Instant::now() < deadline;
            if resume != Resume::BeyondEnd || !may_catch_up {
                return resume;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Registers a replica, unless another request made one first: the one to use is returned.
    pub(super) fn adopt(&self, replica: Arc<Generation>) -> (Arc<Generation>, bool) {
        let mut generations = lock(&self.generations);
        if let Some(existing) = generations.get(replica.id()) {
            // The loser never enters the registry, so `forget` will never give back what its
            // catch-up counted: give it back here.
            self.log_bytes
                .fetch_sub(replica.log_bytes(), Ordering::Relaxed);
            return (existing.clone(), false);
        }
        generations.insert(replica.id().to_owned(), replica.clone());
        (replica, true)
    }

    /// Cancels a generation: ours at once; another instance's by asking its owner (or, when
    /// the owner is gone, in the store), then waiting briefly for the end to arrive here.
    pub async fn cancel(&self, generation: &Generation) -> Result<(), HubError> {
        let (Some(owner), Some(shared)) = (generation.owner(), &self.shared) else {
            generation.finish(Outcome::Cancelled);
            return Ok(());
        };
        if generation.status() != Status::Running {
            return Ok(());
        }
        if !shared.store.request_cancel(owner, generation.id()).await? {
            let end = crate::store::End {
                status: "cancelled".into(),
                token_count: generation.token_count(),
                finish_reason: None,
                usage: None,
                error_code: Some("cancelled".into()),
                error_message: Some("the generation was cancelled".into()),
            };
            shared.store.finish(generation.id(), None, &end).await?;
        }
        let _ = tokio::time::timeout(CANCEL_WAIT, generation.ended()).await;
        Ok(())
    }

    /// Cancels our generations when another instance asks (`DELETE` answered elsewhere).
    async fn serve_cancel_requests(
        self: Arc<Self>,
        _registration: Box<dyn crate::store::Watch>,
        mut rx: tokio::sync::mpsc::Receiver<String>,
    ) {
        loop {
            let id = tokio::select! {
                id = rx.recv() => id,
                () = self.closed.cancelled() => None,
            };
            let Some(id) = id else { return };
            if let Some(generation) = self.get(&id).filter(|g| g.owner().is_none()) {
                info!(generation_id = %id, "cancelled at another instance's request");
                generation.finish(Outcome::Cancelled);
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<Generation>> {
        lock(&self.generations).get(id).cloned()
    }

    /// Generations of ours whose upstream call is still going.
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

    /// Ends every subscriber's stream (they are told to reconnect): the live ones now (returns
    /// how many), the ones that fell behind and read the log at their next step (see
    /// [`Hub::disconnected`]).
    pub fn disconnect_all(&self) -> usize {
        self.disconnected.store(true, Ordering::Relaxed);
        self.all().iter().map(|g| g.disconnect_all()).sum()
    }

    /// Whether every subscriber was told to reconnect (the drain): one that fell behind and
    /// catches up from the log then is in no live set to be told, and must not go live again
    /// here.
    pub fn disconnected(&self) -> bool {
        self.disconnected.load(Ordering::Relaxed)
    }

    /// Ends every running generation of ours as `interrupted` (replicas end when their owner
    /// says so). Returns how many.
    pub fn interrupt_all(&self) -> usize {
        self.all()
            .iter()
            .filter(|g| g.owner().is_none() && g.finish(Outcome::Interrupted))
            .count()
    }

    /// Stops retention timers; called once the server is gone.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// A generation's life, in its task and its span: stream from the upstream into the log
    /// (and, with a store, wait for the `writing` to hold it all) and count its end. The same
    /// task then keeps the result for the retention time ([`Self::retain_then_forget`]).
    async fn run(
        self: Arc<Self>,
        generation: Arc<Generation>,
        writing: Option<Tracking>,
        request: serde_json::Map<String, serde_json::Value>,
        route: Route,
        labels: UsageLabels,
    ) {
        info!(upstream = %route.name, "generation started");
        let mut recorded = metrics::GenerationMetrics::start(labels.model.clone());
        let outcome = tokio::select! {
            outcome = self.stream_upstream(&generation, request, &route, &labels, &mut recorded) => Some(outcome),
            () = generation.ended() => None,
            () = self.watch_unwatched(&generation) => Some(Outcome::Failed {
                code: "unwatched",
                message: "cancelled: nobody watched the generation".into(),
            }),
        };
        if let Some(outcome) = outcome {
            if let Outcome::Failed { code, message } = &outcome {
                // Provider text: escaped, so that a newline in it cannot forge a log line.
                warn!(code, message = %LogSafe(message), "generation failed");
            }
            generation.finish(outcome);
        }
        let status = generation.status();
        info!(?status, "generation ended");
        recorded.finish(status_label(status));
        self.mark_finished(&generation);
        if let Some(writing) = writing {
            // A generation counts as running until the store holds its end too (a drain waits
            // for that), but a store that stays unreachable for a whole retention time does
            // not keep it here forever (dropping `writing` stops its writes).
            tokio::select! {
                () = writing.stored() => {}
                () = tokio::time::sleep(self.settings.retention) => {}
                () = self.closed.cancelled() => {}
            }
        }
        self.running.fetch_sub(1, Ordering::Relaxed);
        ::metrics::gauge!(metrics::GENERATIONS_RUNNING).decrement(1);
        ::metrics::counter!(metrics::GENERATIONS_FINISHED, "status" => status_label(status))
            .increment(1);
        metrics::record_usage(
            &labels.model,
            &labels.key_label,
            generation.usage().as_ref(),
        );
    }

    /// Keeps a finished generation readable for the retention time, then forgets it.
    pub(super) async fn retain_then_forget(&self, generation: &Generation) {
        tokio::select! {
            () = tokio::time::sleep(self.settings.retention) => {}
            () = self.closed.cancelled() => {}
            // Evicted early to fit the log memory budget: stop holding it now, not at the end
            // of its retention, or the budget would not bound memory.
            () = generation.forgotten() => {}
        }
        self.forget(generation);
    }

    async fn stream_upstream(
        &self,
        generation: &Generation,
        request: serde_json::Map<String, serde_json::Value>,
        route: &Route,
        labels: &UsageLabels,
        recorded: &mut metrics::GenerationMetrics,
    ) -> Outcome {
        let stream = route
            .upstream
            .stream(route.request(request), labels.model.clone());
        futures_util::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(UpstreamEvent::Delta(delta)) => {
                    match generation.push(delta, self.settings.log_limits) {
                        Pushed::Logged { fan_out, log_bytes } => {
                            metrics::record_fan_out(fan_out, metrics::TokenSource::Upstream);
                            recorded.token();
                            self.grow_log(log_bytes);
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
                Ok(UpstreamEvent::Finish(reason)) => {
                    self.grow_log(generation.set_finish_reason(reason));
                }
                Ok(UpstreamEvent::Usage { usage, bytes }) => {
                    self.grow_log(generation.set_usage(usage, bytes));
                }
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

    fn grow_log(&self, bytes: usize) {
        self.log_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.fit_log_budget();
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

    /// Counts log memory that a replica took on.
    pub(super) fn logged(&self, bytes: usize) {
        self.log_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.fit_log_budget();
    }

    /// Puts a finished generation in line for early eviction under memory pressure, after its
    /// log gave back the room it kept for tokens that will not come.
    pub(super) fn mark_finished(&self, generation: &Generation) {
        self.log_bytes
            .fetch_sub(generation.shrink_log(), Ordering::Relaxed);
        lock(&self.finished).push_back(generation.id().to_owned());
    }

    pub(super) fn forget(&self, generation: &Generation) {
        let mut generations = lock(&self.generations);
        // A replica forgotten after another took its place leaves the newer one alone.
        let same = generations
            .get(generation.id())
            .is_some_and(|known| std::ptr::eq(Arc::as_ptr(known), generation));
        let removed = same && generations.remove(generation.id()).is_some();
        drop(generations);
        generation.mark_forgotten();
        if removed {
            self.log_bytes
                .fetch_sub(generation.log_bytes(), Ordering::Relaxed);
        }
        if generation.idempotency_key().is_some() {
            lock(&self.idempotency).retain(|_, (_, id)| id != generation.id());
        }
    }
}

/// How long a replica may take to reach a resuming client's cursor.
const REPLICA_CATCH_UP: Duration = Duration::from_secs(3);
/// How long a `DELETE` answered by a replica waits for the owner's end to arrive.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

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
