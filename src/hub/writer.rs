//! The owner's side of shared generations: one writer per instance copies the log of every
//! generation this instance runs to the store, renews their leases and writes their ends.
//!
//! Viewers on the owner's instance never wait for the store: tokens are fanned out locally
//! first, and the generation only marks itself dirty (one atomic swap; the first mark since the
//! writer last looked also queues it and wakes the writer). The writer then takes every
//! dirty generation's pending entries and sends them all in one [`Store::write`] — one round
//! trip for a burst of a thousand generations' tokens, where a task per generation made a
//! thousand — so a busy moment costs fewer calls, never more than one per token. One
//! generation's refusal or error is its own: the others' writes in the same call go on.
//!
//! The local log is the owner's copy: when the store lost entries (a restart without
//! persistence) or never saw a write, the writer writes again from what the store says it
//! holds. When the store is unreachable it retries that generation with a backoff; viewers on
//! other instances wait, and lose nothing. A write refused by the lease (another instance ended
//! the generation) ends it here `owner_lost`, which stops its upstream call.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, Once,
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    generation::{Generation, Outcome, OWNER_LOST},
    Status,
};
use crate::store::{IdempotencyClaim, Store, StoreError, Write, WriteOp, Written};

/// Most entries of one generation in one write: one script call stays short for Redis.
const MAX_BATCH: usize = 512;
/// Waits between attempts while the store is unreachable.
const RETRY: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(50)..=Duration::from_secs(1);

/// The instance's writer: [`Writer::track`] a generation to have it written through.
pub struct Writer {
    inner: Arc<Inner>,
    started: Once,
    /// Fires when the process shuts down: the writer task stops.
    closed: CancellationToken,
}

struct Inner {
    store: Arc<dyn Store>,
    owner: String,
    lease: Duration,
    queue: Mutex<Queue>,
    wake: Notify,
}

/// What other tasks hand the writer task; it takes it all in one lock per round.
#[derive(Default)]
struct Queue {
    /// Generations whose log grew or that ended since the writer last looked at them.
    dirty: Vec<u64>,
    added: Vec<Tracked>,
    removed: Vec<u64>,
    next_key: u64,
}

/// A generation's dirty mark, held by the generation (see [`Generation::write_through`]).
pub struct Dirty {
    key: u64,
    /// Set from the first change after the writer looked until it looks again, so a token
    /// costs one swap, and only the first of a round also takes the queue's lock.
    marked: AtomicBool,
    inner: Arc<Inner>,
}

impl Dirty {
    /// Called after the log grew or the generation ended (never under its lock).
    pub fn mark(&self) {
        if !self.marked.swap(true, Ordering::AcqRel) {
            lock(&self.inner.queue).dirty.push(self.key);
            self.inner.wake.notify_one();
        }
    }
}

/// A generation being written through; dropping it stops the writing (a store unreachable
/// for a whole retention time, or a shutdown, must not keep a generation forever).
pub struct Tracking {
    key: u64,
    stored: CancellationToken,
    inner: Arc<Inner>,
}

impl Tracking {
    /// Resolves once the store holds the whole generation and its end, or another instance
    /// ended it.
    pub async fn stored(&self) {
        self.stored.cancelled().await;
    }
}

impl Drop for Tracking {
    fn drop(&mut self) {
        lock(&self.inner.queue).removed.push(self.key);
        self.inner.wake.notify_one();
    }
}

/// The writer task's state of one generation.
struct Tracked {
    key: u64,
    generation: Arc<Generation>,
    dirty: Arc<Dirty>,
    stored_signal: CancellationToken,
    /// How many entries the store holds.
    stored: u64,
    /// When the store last renewed the lease for us.
    renewed: Instant,
    /// While writes fail: when to try again, and the wait after that.
    retry: Option<(Instant, Duration)>,
    /// The idempotency key that names it: claimed only for the retention once it has ended.
    idempotency: Option<IdempotencyClaim>,
}

impl Writer {
    pub fn new(
        store: Arc<dyn Store>,
        owner: String,
        lease: Duration,
        closed: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                owner,
                lease,
                queue: Mutex::default(),
                wake: Notify::new(),
            }),
            started: Once::new(),
            closed,
        }
    }

    /// Starts writing `generation` through to the store (it must already be created there,
    /// and named by `idempotency` if that is set).
    pub fn track(
        &self,
        generation: Arc<Generation>,
        idempotency: Option<IdempotencyClaim>,
    ) -> Tracking {
        // Started by the first generation, on the runtime that runs it.
        self.started.call_once(|| {
            tokio::spawn(run(self.inner.clone(), self.closed.clone()));
        });
        let mut queue = lock(&self.inner.queue);
        queue.next_key += 1;
        let key = queue.next_key;
        let dirty = Arc::new(Dirty {
            key,
            // Looked at as soon as it is added: no need to queue it as dirty as well.
            marked: AtomicBool::new(true),
            inner: self.inner.clone(),
        });
        generation.write_through(dirty.clone());
        let stored = CancellationToken::new();
        queue.added.push(Tracked {
            key,
            generation,
            dirty,
            stored_signal: stored.clone(),
            stored: 0,
            renewed: Instant::now(),
            retry: None,
            idempotency,
        });
        drop(queue);
        self.inner.wake.notify_one();
        Tracking {
            key,
            stored,
            inner: self.inner.clone(),
        }
    }
}

/// What was sent for one generation in a round.
#[derive(Clone, Copy)]
enum Sent {
    Appended { count: u64, renew: bool },
    Finished,
}

/// The writer task: rounds of one [`Store::write`] each, until the process shuts down.
async fn run(inner: Arc<Inner>, closed: CancellationToken) {
    let renew_every = inner.lease / 3;
    let mut tracked: HashMap<u64, Tracked> = HashMap::new();
    let mut due: Vec<u64> = Vec::new();
    // The earliest renewal or retry; a generation's timers are only scanned once it is reached.
    let mut timer: Option<Instant> = None;
    loop {
        {
            let mut queue = lock(&inner.queue);
            for added in queue.added.drain(..) {
                due.push(added.key);
                let renew_at = added.renewed + renew_every;
                timer = Some(timer.map_or(renew_at, |t| t.min(renew_at)));
                tracked.insert(added.key, added);
            }
            for key in queue.removed.drain(..) {
                tracked.remove(&key);
            }
            due.append(&mut queue.dirty);
        }
        let now = Instant::now();
        if timer.is_some_and(|t| t <= now) {
            timer = None;
            for (key, state) in &tracked {
                let mut at = match state.retry {
                    Some((at, _)) => at,
                    None => state.renewed + renew_every,
                };
                if at <= now {
                    due.push(*key);
                    // Renewed (or failed, which sets its own timer) by this round.
                    at = now + renew_every;
                }
                timer = Some(timer.map_or(at, |t| t.min(at)));
            }
        }
        if due.is_empty() {
            let sleep = async {
                match timer {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = inner.wake.notified() => {}
                () = sleep => {}
                () = closed.cancelled() => return,
            }
            continue;
        }
        due.sort_unstable();
        due.dedup();
        let round = std::mem::take(&mut due);
        write_round(&inner, &mut tracked, &round, now, &mut due, &mut timer).await;
    }
}

/// One round: a write for each generation of `round` that has something to write, in one
/// call; the answers update each generation alone. Generations to look at again at once go to
/// `again`.
async fn write_round(
    inner: &Inner,
    tracked: &mut HashMap<u64, Tracked>,
    round: &[u64],
    now: Instant,
    again: &mut Vec<u64>,
    timer: &mut Option<Instant>,
) {
    let renew_every = inner.lease / 3;
    let mut sent: Vec<(u64, Arc<Generation>, Sent)> = Vec::with_capacity(round.len());
    let mut ops = Vec::with_capacity(round.len());
    for key in round {
        let Some(state) = tracked.get(key) else {
            continue;
        };
        if state.retry.is_some_and(|(at, _)| at > now) {
            // Its mark stays set: the retry timer brings it back.
            continue;
        }
        // Cleared before the log is read: a token logged after the read marks it again.
        state.dirty.marked.store(false, Ordering::Release);
        let renew = now >= state.renewed + renew_every;
        let pending = state.generation.entries_from(state.stored, MAX_BATCH);
        let (op, what) = if !pending.is_empty() {
            let count = pending.len() as u64;
            let op = WriteOp::Append {
                first: state.stored,
                entries: pending,
                renew,
            };
            (op, Sent::Appended { count, renew })
        } else if let Some(end) = state.generation.end_state(state.stored) {
            (WriteOp::Finish(end), Sent::Finished)
        } else if renew {
            let op = WriteOp::Append {
                first: state.stored,
                entries: Vec::new(),
                renew,
            };
            (op, Sent::Appended { count: 0, renew })
        } else {
            continue;
        };
        sent.push((*key, state.generation.clone(), what));
        ops.push(op);
    }
    if sent.is_empty() {
        return;
    }
    let writes: Vec<Write<'_>> = sent
        .iter()
        .zip(ops)
        .map(|((_, generation, _), op)| Write {
            id: generation.id(),
            op,
        })
        .collect();
    let answers = inner.store.write(&inner.owner, &writes).await;
    drop(writes);
    let mut missing = Vec::new();
    let mut released = Vec::new();
    for ((key, generation, what), answer) in sent.iter().zip(answers) {
        let Some(state) = tracked.get_mut(key) else {
            continue;
        };
        match answer {
            Ok(Written::Done) => {
                if state.retry.take().is_some() {
                    info!(generation_id = %generation.id(), stored = state.stored, "the store is reachable again");
                }
                match *what {
                    Sent::Appended { count, renew } => {
                        state.stored += count;
                        if renew {
                            state.renewed = Instant::now();
                        }
                        // More than one batch may be pending, or the end behind them.
                        if count > 0 {
                            again.push(*key);
                        }
                    }
                    Sent::Finished => {
                        state.stored_signal.cancel();
                        released.extend(state.idempotency.take());
                        tracked.remove(key);
                    }
                }
            }
            Ok(Written::Expected { next }) if next <= generation.token_count() => {
                info!(generation_id = %generation.id(), stored = state.stored, next, "the store holds another length: writing from there");
                state.stored = next;
                again.push(*key);
            }
            Ok(Written::Missing) => {
                warn!(generation_id = %generation.id(), "the store lost this generation: writing it again");
                missing.push(*key);
            }
            Ok(Written::Fenced | Written::Leased | Written::Expected { .. }) => {
                warn!(generation_id = %generation.id(), "another instance ended this generation: stopping");
                if generation.status() == Status::Running {
                    generation.finish(Outcome::Failed {
                        code: OWNER_LOST,
                        message: "this instance lost its lease on the generation".into(),
                    });
                }
                state.stored_signal.cancel();
                tracked.remove(key);
            }
            Err(error) => failed(state, &error, timer),
        }
    }
    // Once per generation with a key, together; a failure only leaves the key claimed longer.
    let releases = released
        .iter()
        .map(|claim| inner.store.release_idempotency(claim));
    for result in futures_util::future::join_all(releases).await {
        if let Err(error) = result {
            warn!(%error, "could not shorten the claim of an idempotency key");
        }
    }
    // Rare (a store restarted empty): created again together, then written from the start.
    let created = futures_util::future::join_all(missing.iter().filter_map(|key| {
        let id = tracked.get(key)?.generation.id().to_owned();
        Some(async move { (*key, inner.store.create(&id, &inner.owner).await) })
    }))
    .await;
    for (key, result) in created {
        let Some(state) = tracked.get_mut(&key) else {
            continue;
        };
        match result {
            Ok(()) => {
                state.stored = 0;
                state.renewed = Instant::now();
                again.push(key);
            }
            Err(error) => failed(state, &error, timer),
        }
    }
}

/// A write that failed: that generation waits, longer each time, then tries again.
fn failed(state: &mut Tracked, error: &StoreError, timer: &mut Option<Instant>) {
    let wait = match state.retry {
        Some((_, wait)) => wait,
        None => {
            warn!(generation_id = %state.generation.id(), %error, "cannot write to the store; retrying");
            *RETRY.start()
        }
    };
    let at = Instant::now() + wait;
    state.retry = Some((at, (wait * 2).min(*RETRY.end())));
    *timer = Some(timer.map_or(at, |t| t.min(at)));
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        hub::{generation::Pushed, Delta, LogLimits},
        store::{
            memory::{MemoryStore, WriteKind},
            Lifetimes,
        },
    };

    const LEASE: Duration = Duration::from_millis(300);
    const LIMITS: LogLimits = LogLimits {
        max_tokens: 100_000,
        max_bytes: 10_000_000,
    };
    const WAIT: Duration = Duration::from_secs(10);

    fn setup() -> (Arc<MemoryStore>, Writer) {
        let store = Arc::new(MemoryStore::new(Lifetimes {
            lease: LEASE,
            retention: Duration::from_secs(60),
            max_age: Duration::from_secs(600),
        }));
        let writer = Writer::new(store.clone(), "a".into(), LEASE, CancellationToken::new());
        (store, writer)
    }

    async fn generation(store: &MemoryStore, n: usize) -> Arc<Generation> {
        let id = format!("gen_{n:032x}");
        store.create(&id, "a").await.unwrap();
        Arc::new(Generation::new(id, None))
    }

    fn push(generation: &Generation, count: usize) {
        for _ in 0..count {
            let index = generation.token_count();
            let pushed = generation.push(Delta::Text(format!("t{index} ")), LIMITS);
            assert!(matches!(pushed, Pushed::Logged { .. }), "{pushed:?}");
        }
    }

    async fn stored_len(store: &MemoryStore, generation: &Generation) -> usize {
        store.read(generation.id(), 0, 100_000).await.unwrap().len()
    }

    /// Waits until the store holds exactly the generation's local log.
    async fn wait_stored(store: &MemoryStore, generation: &Generation) {
        tokio::time::timeout(WAIT, async {
            loop {
                let local = generation.entries_from(0, 100_000);
                if store.read(generation.id(), 0, 100_000).await.unwrap() == local {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the store never held the whole log");
    }

    /// The writes to `id` so far, in order.
    fn writes_to(store: &MemoryStore, id: &str) -> Vec<WriteKind> {
        store
            .calls()
            .into_iter()
            .flatten()
            .filter(|(written, _)| written == id)
            .map(|(_, kind)| kind)
            .collect()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_tokens_of_many_generations_go_to_the_store_in_one_call() {
        let (store, writer) = setup();
        let mut generations = Vec::new();
        for n in 0..50 {
            generations.push(generation(&store, n).await);
        }
        let _writing: Vec<_> = generations
            .iter()
            .map(|g| writer.track(g.clone(), None))
            .collect();
        // Every generation logs a token before the writer runs (one thread): one burst.
        for generation in &generations {
            push(generation, 1);
        }
        for generation in &generations {
            wait_stored(&store, generation).await;
        }
        let appending: Vec<_> = store
            .calls()
            .into_iter()
            .filter(|call| {
                call.iter()
                    .any(|(_, kind)| matches!(kind, WriteKind::Append { count, .. } if *count > 0))
            })
            .collect();
        assert_eq!(appending.len(), 1, "one call for the burst: {appending:?}");
        assert_eq!(appending[0].len(), 50);
    }

    #[tokio::test]
    async fn one_generations_failures_neither_stall_nor_corrupt_the_others() {
        let (store, writer) = setup();
        let failing = generation(&store, 1).await;
        let healthy = generation(&store, 2).await;
        let truncated = generation(&store, 3).await;
        store.set_unreachable_for(failing.id(), true);
        let writing: Vec<_> = [&failing, &healthy, &truncated]
            .into_iter()
            .map(|g| writer.track(g.clone(), None))
            .collect();
        for _ in 0..10 {
            for generation in [&failing, &healthy, &truncated] {
                push(generation, 1);
            }
            tokio::task::yield_now().await;
        }
        wait_stored(&store, &healthy).await;
        wait_stored(&store, &truncated).await;
        assert_eq!(stored_len(&store, &failing).await, 0);

        // The store loses the tail of one log: its writer writes it again from there, and the
        // others are untouched.
        store.truncate_log(truncated.id(), 3);
        for generation in [&failing, &healthy, &truncated] {
            push(generation, 5);
        }
        wait_stored(&store, &healthy).await;
        wait_stored(&store, &truncated).await;
        assert_eq!(stored_len(&store, &failing).await, 0);

        // Reachable again: the failing one catches up on its own.
        store.set_unreachable_for(failing.id(), false);
        wait_stored(&store, &failing).await;
        for (generation, writing) in [&failing, &healthy, &truncated].into_iter().zip(&writing) {
            generation.finish(Outcome::Completed);
            tokio::time::timeout(WAIT, writing.stored())
                .await
                .expect("the end was not stored");
            let end = store.meta(generation.id()).await.unwrap().unwrap().end;
            assert_eq!(end.map(|end| end.token_count), Some(15));
        }
    }

    #[tokio::test]
    async fn a_quiet_generation_keeps_its_lease() {
        let (store, writer) = setup();
        let quiet = generation(&store, 1).await;
        let _writing = writer.track(quiet.clone(), None);
        tokio::time::sleep(LEASE * 3).await;
        let meta = store.meta(quiet.id()).await.unwrap().unwrap();
        assert!(meta.leased, "the lease lapsed");
        let renewals = writes_to(&store, quiet.id())
            .into_iter()
            .filter(|kind| {
                *kind
                    == WriteKind::Append {
                        count: 0,
                        renew: true,
                    }
            })
            .count();
        assert!(renewals >= 3, "{renewals} renewals in three leases");
    }

    #[tokio::test]
    async fn the_end_is_written_only_after_every_token() {
        let (store, writer) = setup();
        let generation = generation(&store, 1).await;
        let writing = writer.track(generation.clone(), None);
        // More than one write's worth, and the end right behind them.
        push(&generation, 3 * MAX_BATCH / 2 + 7);
        generation.finish(Outcome::Completed);
        tokio::time::timeout(WAIT, writing.stored())
            .await
            .expect("the end was not stored");
        let writes = writes_to(&store, generation.id());
        let total = generation.token_count();
        let (last, appends) = writes.split_last().unwrap();
        assert_eq!(*last, WriteKind::Finish { token_count: total });
        let appended: usize = appends
            .iter()
            .map(|kind| match kind {
                WriteKind::Append { count, .. } => *count,
                WriteKind::Finish { .. } => panic!("two ends: {writes:?}"),
            })
            .sum();
        assert_eq!(appended as u64, total);
        wait_stored(&store, &generation).await;
    }
}
