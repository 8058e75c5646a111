//! The shared generation store: what lets any instance serve any generation.
//!
//! The hub keeps every generation it serves in memory (its log and its subscribers) and fans
//! out locally. With a store, that local copy is one of several: the instance that runs a
//! generation's upstream call (its **owner**) appends every log entry to the store, and any
//! other instance with viewers keeps a **replica**, fed from the store's log and live feed
//! (`hub/replica.rs`). Without a store (`--store-url` unset) the local registry is the whole
//! truth and nothing here runs.
//!
//! - [`Store`]: the seam. The owner's writes of many generations at once (appends fenced by
//!   the owner's lease, ends), read from an index, the
//!   metadata and terminal state, the live feed, the owner's control channel, idempotency keys.
//! - [`memory::MemoryStore`]: in-process, several hubs in one process (the hub's cross-instance
//!   invariants are unit-tested on it, without Redis or HTTP).
//! - [`redis::RedisStore`]: Redis, a single server or a Cluster (Lua scripts, one pipeline
//!   per batch of writes, a Stream per generation, pub/sub).
//!
//! Nothing here knows about HTTP or about viewers: the store is touched per instance per
//! generation, never per viewer.

mod listeners;
pub mod memory;
pub mod redis;
pub mod wire;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

/// The state of a generation as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub owner: String,
    /// `running`, or the terminal status (`completed`, `failed`, …).
    pub status: String,
    /// How many entries the log holds: the next index to append.
    pub next: u64,
    /// Whether the owner's lease is held now.
    pub leased: bool,
    pub end: Option<End>,
}

/// How a generation ended, as written by its owner (or by the instance that found it orphaned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    pub status: String,
    pub token_count: u64,
    pub finish_reason: Option<String>,
    /// The provider's usage object, as JSON text.
    pub usage: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
}

/// What an append or an end did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Done,
    /// The store's log holds `next` entries, not what the writer assumed: it lost entries (a
    /// restart without persistence) or an earlier write landed twice. Write again from `next`.
    Expected {
        next: u64,
    },
    /// The store has no such generation (expired, or lost with a restart): create it again.
    Missing,
    /// Another instance holds the lease, or the generation already ended: stop writing.
    Fenced,
    /// (Ending an orphan only) the owner's lease is still held: it is alive.
    Leased,
}

/// One write of an owner to one of its generations, see [`Store::write`].
#[derive(Debug)]
pub struct Write<'a> {
    pub id: &'a str,
    pub op: WriteOp,
}

#[derive(Debug)]
pub enum WriteOp {
    /// Appends `entries` at index `first` (none: only the checks and the lease), fenced by the
    /// lease, and publishes them. The lease is renewed when `renew` is set, and taken whenever
    /// nobody holds it: renewing it with every token would cost a command per token for
    /// nothing.
    Append {
        first: u64,
        entries: Vec<Bytes>,
        renew: bool,
    },
    /// Ends the generation at `End::token_count`, which must be the log's length.
    Finish(End),
}

/// An idempotency key claimed by a request: `scope` is the caller's credential (a digest, never
/// the key), so one tenant's key can never return another tenant's generation.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    pub scope: String,
    pub key: String,
    /// A digest of the request body: the same key with another body is refused.
    pub body_hash: u64,
}

/// The generation an idempotency key already names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub body_hash: u64,
    pub id: String,
}

/// What the live feed of one generation delivers to its replica.
#[derive(Debug, Clone)]
pub enum LiveEvent {
    /// Entries `first..first + entries.len()` were appended.
    Entries { first: u64, entries: Vec<Bytes> },
    /// The generation ended: read its metadata.
    Ended,
    /// The feed may have missed messages (its connection dropped): read the log again.
    Resync,
}

/// How long things live in the store.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    /// The owner's lease: an owner not heard from for this long is presumed dead.
    pub lease: Duration,
    /// Keys of a finished generation expire this long after its end.
    pub retention: Duration,
    /// Keys of a generation still running expire this long after its start.
    pub max_age: Duration,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the store is unreachable: {0}")]
    Unavailable(String),
    #[error("the store answered something unexpected: {0}")]
    Protocol(String),
    #[error("invalid store URL: {0}")]
    Config(String),
}

/// The sending side of a live feed: bounded, filled with `try_send`, because a replica that
/// falls behind reads the log again and must never make the store's reader wait.
pub type LiveSender = mpsc::Sender<LiveEvent>;

/// Registration of a live feed; dropping it unsubscribes (when no other replica of the same
/// generation in this process still listens).
pub trait Watch: Send + Sync {}

/// The shared store behind the hub. Every method is one round trip (or none), whatever the
/// number of viewers.
pub trait Store: Send + Sync + 'static {
    /// Registers a new running generation owned by `owner`, with its lease.
    fn create<'a>(&'a self, id: &'a str, owner: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Removes a generation that was created but never started (it lost an idempotency race).
    fn discard<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Claims `claim` for generation `id`: `None` when it was free (now it is `id`'s), else
    /// what it already names.
    fn claim_idempotency<'a>(
        &'a self,
        claim: &'a IdempotencyClaim,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Claimed>, StoreError>>;

    /// Keeps an idempotency key claimed only for the retention from now on, once its
    /// generation has ended (it was claimed for a running generation's longest life).
    fn release_idempotency<'a>(
        &'a self,
        claim: &'a IdempotencyClaim,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The owner's writes to several of its generations, in one round trip where the store
    /// allows it (a Redis Cluster takes one call per generation, sent together). Each write
    /// has its own answer, in order: one generation refused or failing never holds up the
    /// others. An `Err` for one write means it may or may not have happened.
    fn write<'a>(
        &'a self,
        owner: &'a str,
        writes: &'a [Write<'a>],
    ) -> BoxFuture<'a, Vec<Result<Written, StoreError>>>;

    /// Ends a generation: by its owner (`Some(owner)`; `end.token_count` must be the log's
    /// length), or, with `None`, by any instance once the owner's lease is gone. Starts the
    /// retention clock and publishes the end.
    fn finish<'a>(
        &'a self,
        id: &'a str,
        owner: Option<&'a str>,
        end: &'a End,
    ) -> BoxFuture<'a, Result<Written, StoreError>>;

    fn meta<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Meta>, StoreError>>;

    /// Up to `max` entries from index `from` on, contiguous (fewer, or none, at the log's end).
    fn read<'a>(
        &'a self,
        id: &'a str,
        from: u64,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Bytes>, StoreError>>;

    /// Subscribes `sender` to the live feed of `id`, until the returned registration is dropped.
    fn watch<'a>(
        &'a self,
        id: &'a str,
        sender: LiveSender,
    ) -> BoxFuture<'a, Result<Box<dyn Watch>, StoreError>>;

    /// Asks the owner of `id` to cancel it; false when no instance of that name listens.
    fn request_cancel<'a>(
        &'a self,
        owner: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Delivers the ids of generations that other instances asked this owner to cancel.
    fn listen_for_cancels<'a>(
        &'a self,
        owner: &'a str,
        sender: mpsc::Sender<String>,
    ) -> BoxFuture<'a, Result<Box<dyn Watch>, StoreError>>;

    /// Whether the store answers now (for readiness).
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// Opens the store a `--store-url` names.
pub async fn open(url: &str, lifetimes: Lifetimes) -> Result<Arc<dyn Store>, StoreError> {
    Ok(Arc::new(redis::RedisStore::open(url, lifetimes).await?))
}
