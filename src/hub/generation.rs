//! One generation: its token log, its subscribers, and the fan-out between them.
//!
//! All state sits behind one short-lived `std::sync::Mutex` that is never held across an
//! `.await`. Appending a token and registering a subscriber take the same lock, which is what
//! makes "every subscriber sees every token exactly once, in order" hold: a subscriber reads the
//! log up to its end and is registered for live delivery in one critical section, so no token can
//! fall between replay and live.
//!
//! Fan-out never waits and never evicts: a live subscriber whose channel is full is taken out
//! of the live set and told, as its channel's last item, to go on from the log
//! ([`Outbound::Behind`]); it catches up there in batches and comes back through the same
//! critical section. Whether it is too slow to keep is the subscription's call
//! (`subscription.rs`), against the lag budgets.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use super::queue::{self, TrySendError};
use bytes::Bytes;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    store::End,
    upstream::{MAX_FINISH_REASON_BYTES, MAX_USAGE_BYTES},
};

use super::{delta::Assembled, frame, log::Log, writer::Dirty, Delta};

/// Most bytes handed to a subscriber in one replay step: large enough to amortise the lock,
/// small enough that one late joiner never holds it long or allocates much.
const REPLAY_BATCH_BYTES: usize = 16 * 1024;

/// What a subscriber's channel carries. Frames are pre-encoded and shared.
#[derive(Debug)]
pub enum Outbound {
    Token(Bytes),
    KeepAlive,
    /// The terminal `done`/`error` event; the channel closes right after it.
    Terminal(Bytes),
    /// The channel was full when a token came (at `since`): the subscriber left the live set
    /// and goes on from the log at that token, whose byte offset among the log's frames is
    /// `offset`. The channel closes right after it.
    Behind {
        offset: u64,
        since: Instant,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Running,
    Completed,
    Failed,
    Cancelled,
    Interrupted,
}

/// How a generation ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Completed,
    Failed { code: &'static str, message: String },
    Cancelled,
    Interrupted,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorInfo {
    pub code: &'static str,
    pub message: String,
}

/// The `GET /v1/generations/{id}` view.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub id: String,
    pub status: Status,
    /// `text`, `reasoning`, `refusal`, `tool_calls`.
    #[serde(flatten)]
    pub content: Assembled,
    /// Log entries (of every kind), so also the id of the terminal event.
    pub token_count: u64,
    pub finish_reason: Option<String>,
    pub usage: Option<serde_json::Value>,
    pub error: Option<ErrorInfo>,
}

/// Where a resuming subscriber stands, decided before any byte of the response is sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Resume {
    /// There is something to send from this cursor on.
    Stream,
    /// The client already has the terminal event: nothing more will ever come.
    NothingLeft,
    /// The cursor points past anything this generation has produced.
    BeyondEnd,
}

/// How far the log reached when a replay step was taken, for a subscriber's lag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Tokens logged.
    pub tokens: u64,
    /// Bytes of their frames, all together.
    pub frame_bytes: u64,
}

/// One step of a subscriber catching up.
#[derive(Debug)]
pub enum Attach {
    /// Logged frames from the cursor on, concatenated; the cursor moves to `next`.
    Replay {
        frames: Bytes,
        next: u64,
        head: Head,
    },
    /// Caught up with a running generation: live frames arrive on this channel.
    Live(queue::Receiver<Outbound>),
    /// Caught up with a finished generation: this terminal frame is the last.
    Ended(Bytes),
}

/// How big one generation's log may grow.
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    pub max_tokens: usize,
    pub max_bytes: usize,
}

/// What became of a delta offered to [`Generation::push`].
#[derive(Debug)]
pub enum Pushed {
    /// Logged and fanned out; `log_bytes` is what the log grew by.
    Logged { fan_out: FanOut, log_bytes: usize },
    /// The generation had already ended; the token was dropped.
    Ended,
    /// The token would take the log past its limits; nothing was logged.
    TooLarge,
}

/// Counts of one fan-out, reported to metrics by the caller after the lock is released.
#[derive(Debug, Default, Clone, Copy)]
pub struct FanOut {
    pub delivered: u64,
    /// Subscribers whose channel was full: they go on from the log.
    pub fell_behind: u64,
}

pub struct Generation {
    id: String,
    idempotency_key: Option<String>,
    /// With a shared store: the instance that runs this generation's upstream call, when it is
    /// not this one (this is a replica, fed from the store). `None` for our own.
    owner: Option<String>,
    /// With a shared store, marks an owned generation for the instance's store writer when
    /// the log grew or the generation ended.
    changed: OnceLock<Arc<Dirty>>,
    cancel: CancellationToken,
    /// Fires when the registry forgets the generation (retention over, or evicted to fit the
    /// log memory budget): its task stops holding it then, so its memory goes at once.
    forgotten: CancellationToken,
    /// Subscriber streams open on this generation, replaying or live.
    viewers: AtomicUsize,
    /// When the token sampled for the fan-out lag metric arrived.
    lag: crate::metrics::LagSample,
    state: Mutex<State>,
}

struct State {
    status: Status,
    /// The log: each entry's frame; the index is the entry's (event) id.
    log: Log,
    /// Bytes of content logged, against [`LogLimits::max_bytes`].
    content_bytes: usize,
    /// Bytes of the logged frames, all together: how far behind a subscriber is, in bytes.
    frame_bytes: u64,
    terminal: Option<Bytes>,
    finish_reason: Option<String>,
    usage: Option<serde_json::Value>,
    /// What `usage` is counted as in `log_bytes`.
    usage_bytes: usize,
    error: Option<ErrorInfo>,
    subscribers: Vec<queue::Sender<Outbound>>,
    /// Memory held by `log`, `finish_reason` and `usage`, for the hub's log budget.
    log_bytes: usize,
    /// Since when no subscriber is attached (None while someone is).
    unwatched_since: Option<Instant>,
}

impl Generation {
    pub fn new(id: String, idempotency_key: Option<String>) -> Self {
        Self::with_owner(id, idempotency_key, None)
    }

    /// A replica of a generation that instance `owner` runs.
    pub fn replica(id: String, owner: String) -> Self {
        Self::with_owner(id, None, Some(owner))
    }

    fn with_owner(id: String, idempotency_key: Option<String>, owner: Option<String>) -> Self {
        Self {
            id,
            idempotency_key,
            owner,
            changed: OnceLock::new(),
            cancel: CancellationToken::new(),
            forgotten: CancellationToken::new(),
            viewers: AtomicUsize::new(0),
            lag: crate::metrics::LagSample::default(),
            state: Mutex::new(State {
                status: Status::Running,
                log: Log::default(),
                content_bytes: 0,
                frame_bytes: 0,
                terminal: None,
                finish_reason: None,
                usage: None,
                usage_bytes: 0,
                error: None,
                subscribers: Vec::new(),
                log_bytes: 0,
                unwatched_since: Some(Instant::now()),
            }),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }

    /// The instance that runs this generation, if it is another one (see [`Generation::replica`]).
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// Has the store writer told of every change from now on (once, for an owned generation).
    pub(super) fn write_through(&self, dirty: Arc<Dirty>) {
        let _ = self.changed.set(dirty);
    }

    fn mark_changed(&self) {
        if let Some(dirty) = self.changed.get() {
            dirty.mark();
        }
    }

    /// How many tokens the log holds.
    pub fn token_count(&self) -> u64 {
        self.lock().log.len() as u64
    }

    /// Up to `max` log entries from `from` on, encoded for the store writer.
    pub fn entries_from(&self, from: u64, max: usize) -> Vec<Bytes> {
        let state = self.lock();
        let start = usize::try_from(from).unwrap_or(usize::MAX);
        let end = start.saturating_add(max);
        state
            .log
            .deltas(start, end)
            .map(|delta| delta.encode())
            .collect()
    }

    /// How the generation ended, once it has and the store holds all `stored` tokens.
    pub fn end_state(&self, stored: u64) -> Option<End> {
        let state = self.lock();
        if state.status == Status::Running || state.log.len() as u64 != stored {
            return None;
        }
        Some(End {
            status: status_label(state.status).to_owned(),
            token_count: stored,
            finish_reason: state.finish_reason.clone(),
            usage: state.usage.as_ref().map(|usage| usage.to_string()),
            error_code: state.error.as_ref().map(|error| error.code.to_owned()),
            error_message: state.error.as_ref().map(|error| error.message.clone()),
        })
    }

    /// Ends a replica the way its owner ended it. What the store says is bounded as what a
    /// provider says is (a store can be wrong or hostile too): an oversized finish reason or
    /// usage is dropped, an oversized error message cut.
    pub fn finish_as(&self, end: &End) -> bool {
        if let Some(reason) = end
            .finish_reason
            .as_ref()
            .filter(|reason| reason.len() <= MAX_FINISH_REASON_BYTES)
        {
            self.set_finish_reason(reason.clone());
        }
        if let Some(text) = end
            .usage
            .as_ref()
            .filter(|usage| usage.len() <= MAX_USAGE_BYTES)
        {
            if let Ok(usage) = serde_json::from_str(text) {
                self.set_usage(usage, text.len());
            }
        }
        let mut message = end.error_message.clone().unwrap_or_default();
        if message.len() > MAX_STORED_MESSAGE_BYTES {
            let mut cut = MAX_STORED_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let outcome = match end.status.as_str() {
            "completed" => Outcome::Completed,
            "cancelled" => Outcome::Cancelled,
            "interrupted" => Outcome::Interrupted,
            _ => Outcome::Failed {
                code: known_code(end.error_code.as_deref()),
                message,
            },
        };
        self.finish(outcome)
    }

    /// Fires once the registry has forgotten the generation.
    pub fn forgotten(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.forgotten.cancelled()
    }

    pub fn mark_forgotten(&self) {
        self.forgotten.cancel();
    }

    /// Fires when the generation has ended, whoever ended it; the upstream task stops then.
    pub fn ended(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module; the state it guards is
        // still consistent (every mutation is a single push or assignment), so keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends a delta to the log and offers its frame to every live subscriber. A subscriber
    /// whose channel is full leaves the live set and goes on from the log
    /// ([`Outbound::Behind`]).
    pub fn push(&self, delta: Delta, limits: LogLimits) -> Pushed {
        let mut state = self.lock();
        if state.status != Status::Running {
            return Pushed::Ended;
        }
        let content = delta.content_len();
        if state.log.len() >= limits.max_tokens || state.content_bytes + content > limits.max_bytes
        {
            return Pushed::TooLarge;
        }
        let index = state.log.len() as u64;
        self.lag.received(index);
        let frame = frame::delta(index, &delta);
        let Ok(log_bytes) = state.log.append(&frame) else {
            return Pushed::TooLarge;
        };
        state.log_bytes += log_bytes;
        state.content_bytes += content;
        let offset = state.frame_bytes;
        state.frame_bytes += frame.len() as u64;
        let fan_out = state.offer(&frame, offset);
        drop(state);
        self.mark_changed();
        Pushed::Logged { fan_out, log_bytes }
    }

    pub fn lag(&self) -> &crate::metrics::LagSample {
        &self.lag
    }

    /// Memory held by this generation's log.
    pub fn log_bytes(&self) -> usize {
        self.lock().log_bytes
    }

    /// Gives the log's unused room back once the generation has ended and is only kept to be
    /// read; returns how much its memory fell, which the hub takes off its sum.
    pub fn shrink_log(&self) -> usize {
        let mut state = self.lock();
        if state.status == Status::Running {
            return 0;
        }
        let freed = state.log.shrink();
        state.log_bytes -= freed;
        freed
    }

    /// Counts a new viewer unless there are already `max`; returns whether it was counted.
    pub fn join_viewer(&self, max: usize) -> bool {
        self.viewers
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn leave_viewer(&self) {
        self.viewers.fetch_sub(1, Ordering::Relaxed);
    }

    /// Keeps the provider's finish reason (bounded by the upstream); returns what the log
    /// memory grew by. A replacement never shrinks the count: the hub's sum and this log's own
    /// must move together, and a provider sends one finish reason anyway.
    pub fn set_finish_reason(&self, reason: String) -> usize {
        let mut state = self.lock();
        let old = state.finish_reason.as_ref().map_or(0, String::len);
        let grown = reason.len().saturating_sub(old);
        state.finish_reason = Some(reason);
        state.log_bytes += grown;
        grown
    }

    /// The provider's usage object, once it came.
    pub fn usage(&self) -> Option<serde_json::Value> {
        self.lock().usage.clone()
    }

    /// Keeps the provider's usage object, `size` bytes as received (bounded by the upstream)
    /// and counted as several times that, because a parsed JSON value is larger than its text;
    /// returns what the log memory grew by, never shrinking as [`Self::set_finish_reason`].
    pub fn set_usage(&self, usage: serde_json::Value, size: usize) -> usize {
        let mut state = self.lock();
        let counted = size.saturating_mul(USAGE_MEMORY_FACTOR);
        let grown = counted.saturating_sub(state.usage_bytes);
        state.usage = Some(usage);
        state.usage_bytes = state.usage_bytes.max(counted);
        state.log_bytes += grown;
        grown
    }

    /// Ends the generation: logs the terminal event, hands it to every subscriber and closes
    /// their channels, and stops the upstream task. Returns false if it had already ended. A
    /// full channel takes the terminal event too: it holds every token before it already.
    pub fn finish(&self, outcome: Outcome) -> bool {
        let mut state = self.lock();
        if state.status != Status::Running {
            return false;
        }
        let token_count = state.log.len() as u64;
        let terminal = match outcome {
            Outcome::Completed => {
                state.status = Status::Completed;
                frame::event(
                    Some(token_count),
                    "done",
                    &DoneData {
                        status: Status::Completed,
                        finish_reason: state.finish_reason.as_deref(),
                        token_count,
                        usage: state.usage.as_ref(),
                    },
                )
            }
            Outcome::Failed { code, message } => state.fail(Status::Failed, code, message),
            Outcome::Cancelled => state.fail(
                Status::Cancelled,
                "cancelled",
                "the generation was cancelled".into(),
            ),
            Outcome::Interrupted => state.fail(
                Status::Interrupted,
                "interrupted",
                "the gateway shut down before the generation finished".into(),
            ),
        };
        state.terminal = Some(terminal.clone());
        for tx in state.subscribers.drain(..) {
            tx.close_with(Outbound::Terminal(terminal.clone()));
        }
        drop(state);
        self.cancel.cancel();
        self.mark_changed();
        true
    }

    /// Decides what a subscriber resuming at `cursor` (the first token id it lacks) gets.
    pub fn resume(&self, cursor: u64) -> Resume {
        let state = self.lock();
        let logged = state.log.len() as u64;
        match (cursor, &state.terminal) {
            (c, _) if c <= logged => Resume::Stream,
            (c, Some(_)) if c == logged + 1 => Resume::NothingLeft,
            _ => Resume::BeyondEnd,
        }
    }

    /// One step of catching up from `cursor`; see [`Attach`].
    pub fn attach(&self, cursor: u64, channel_capacity: usize) -> Attach {
        let mut state = self.lock();
        let start = usize::try_from(cursor).unwrap_or(usize::MAX);
        if let Some((frames, next)) = state.log.read(start, REPLAY_BATCH_BYTES) {
            // A reader catching up from the log (a late joiner, a viewer that fell behind) is
            // watching, though not in the live set.
            state.unwatched_since = None;
            return Attach::Replay {
                frames,
                next: next as u64,
                head: Head {
                    tokens: state.log.len() as u64,
                    frame_bytes: state.frame_bytes,
                },
            };
        }
        if let Some(terminal) = &state.terminal {
            return Attach::Ended(terminal.clone());
        }
        let (tx, rx) = queue::channel(channel_capacity);
        state.subscribers.push(tx);
        state.unwatched_since = None;
        Attach::Live(rx)
    }

    /// Sends a keep-alive to every live subscriber that has room for one, and forgets
    /// subscribers that went away. A full channel already has bytes on their way, so a
    /// keep-alive that does not fit is simply skipped.
    pub fn keepalive(&self) {
        let mut state = self.lock();
        state
            .subscribers
            .retain(|tx| match tx.try_send(Outbound::KeepAlive) {
                Ok(()) | Err(TrySendError::Full) => true,
                Err(TrySendError::Closed) => false,
            });
        state.note_if_unwatched();
    }

    /// Closes every live subscriber's channel; their streams end with `event: reconnect`.
    /// Returns how many there were.
    pub fn disconnect_all(&self) -> usize {
        let mut state = self.lock();
        let count = state.subscribers.len();
        state.subscribers.clear();
        state.note_if_unwatched();
        count
    }

    /// How long nobody has been watching, if nobody is.
    pub fn unwatched_for(&self) -> Option<Duration> {
        let mut state = self.lock();
        state.subscribers.retain(|tx| !tx.is_closed());
        state.note_if_unwatched();
        state.unwatched_since.map(|since| since.elapsed())
    }

    /// Log entries `from..to` (clamped to the log): for readers that re-encode them in another
    /// format instead of forwarding the frames.
    pub fn deltas(&self, from: u64, to: u64) -> Vec<Delta> {
        let state = self.lock();
        let start = usize::try_from(from).unwrap_or(usize::MAX);
        let end = usize::try_from(to).unwrap_or(usize::MAX);
        state.log.deltas(start, end).collect()
    }

    pub fn status(&self) -> Status {
        self.lock().status
    }

    pub fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        // Decoding a long log takes milliseconds: it is done on a copy (shared chunks, cheap)
        // once the lock is released, so that pushes and subscribers never wait for a snapshot.
        let log = state.log.clone();
        let (status, finish_reason, usage, error) = (
            state.status,
            state.finish_reason.clone(),
            state.usage.clone(),
            state.error.clone(),
        );
        drop(state);
        Snapshot {
            id: self.id.clone(),
            status,
            content: Assembled::of(log.deltas(0, usize::MAX)),
            token_count: log.len() as u64,
            finish_reason,
            usage,
            error,
        }
    }
}

/// The lowercase name of a status, as in the API and the store.
pub fn status_label(status: Status) -> &'static str {
    match status {
        Status::Running => "running",
        Status::Completed => "completed",
        Status::Failed => "failed",
        Status::Cancelled => "cancelled",
        Status::Interrupted => "interrupted",
    }
}

/// Failure codes this gateway writes; a code read back from the store is one of them (an
/// unknown one, from a newer version, reads as `failed`).
const KNOWN_CODES: &[&str] = &[
    "upstream_connect_error",
    "upstream_timeout",
    "upstream_http_error",
    "upstream_protocol_error",
    "upstream_error",
    "upstream_interrupted",
    "too_large",
    "unwatched",
    "cancelled",
    "interrupted",
    OWNER_LOST,
    LOG_LOST,
];

/// Longest error message taken from the store for a replica's end.
const MAX_STORED_MESSAGE_BYTES: usize = 1024;

/// The instance running a generation stopped before ending it.
pub const OWNER_LOST: &str = "owner_lost";
/// The store lost part of a generation's log.
pub const LOG_LOST: &str = "log_lost";

fn known_code(code: Option<&str>) -> &'static str {
    code.and_then(|code| KNOWN_CODES.iter().find(|known| **known == code))
        .copied()
        .unwrap_or("failed")
}

/// A parsed usage object holds about this many times its JSON text (maps, boxed numbers).
const USAGE_MEMORY_FACTOR: usize = 8;

#[derive(Serialize)]
struct DoneData<'a> {
    status: Status,
    finish_reason: Option<&'a str>,
    token_count: u64,
    usage: Option<&'a serde_json::Value>,
}

#[derive(Serialize)]
struct ErrorData<'a> {
    status: Status,
    code: &'a str,
    message: &'a str,
}

impl State {
    /// Offers a token's frame to every live subscriber; a full channel is closed with
    /// [`Outbound::Behind`] (`offset`: the frame's byte offset), a closed one forgotten.
    fn offer(&mut self, frame: &Bytes, offset: u64) -> FanOut {
        let mut counts = FanOut::default();
        let mut now = None;
        self.subscribers
            .retain(|tx| match tx.try_send(Outbound::Token(frame.clone())) {
                Ok(()) => {
                    counts.delivered += 1;
                    true
                }
                Err(TrySendError::Full) => {
                    let since = *now.get_or_insert_with(Instant::now);
                    tx.close_with(Outbound::Behind { offset, since });
                    counts.fell_behind += 1;
                    false
                }
                Err(TrySendError::Closed) => false,
            });
        self.note_if_unwatched();
        counts
    }

    fn fail(&mut self, status: Status, code: &'static str, message: String) -> Bytes {
        self.status = status;
        let token_count = self.log.len() as u64;
        let frame = frame::event(
            Some(token_count),
            "error",
            &ErrorData {
                status,
                code,
                message: &message,
            },
        );
        self.error = Some(ErrorInfo { code, message });
        frame
    }

    fn note_if_unwatched(&mut self) {
        if self.subscribers.is_empty() {
            self.unwatched_since.get_or_insert_with(Instant::now);
        }
    }
}
