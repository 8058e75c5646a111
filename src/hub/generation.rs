//! One generation: its token log, its subscribers, and the fan-out between them.
//!
//! All state sits behind one short-lived `std::sync::Mutex` that is never held across an
//! `.await`. Appending a token and registering a subscriber take the same lock, which is what
//! makes "every subscriber sees every token exactly once, in order" hold: a subscriber reads the
//! log up to its end and is registered for live delivery in one critical section, so no token can
//! fall between replay and live.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use super::queue::{self, TrySendError};
use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::frame;

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
    pub text: String,
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

/// One step of a subscriber catching up.
#[derive(Debug)]
pub enum Attach {
    /// Logged frames from the cursor on, concatenated; the cursor moves to `next`.
    Replay { frames: Bytes, next: u64 },
    /// Caught up with a running generation: live frames arrive on this channel.
    Live(queue::Receiver<Outbound>),
    /// Caught up with a finished generation: this terminal frame is the last.
    Ended(Bytes),
}

/// Bookkeeping per logged token beyond its text and frame bytes (the `Bytes` handle and the
/// token's end offset).
const LOG_OVERHEAD_PER_TOKEN: usize = std::mem::size_of::<Bytes>() + std::mem::size_of::<usize>();

/// How big one generation's log may grow.
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    pub max_tokens: usize,
    pub max_bytes: usize,
}

/// What became of a token offered to [`Generation::push_token`].
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
    pub evicted: u64,
}

pub struct Generation {
    id: String,
    idempotency_key: Option<String>,
    cancel: CancellationToken,
    /// Subscriber streams open on this generation, replaying or live.
    viewers: AtomicUsize,
    /// When the token sampled for the fan-out lag metric arrived.
    lag: crate::metrics::LagSample,
    state: Mutex<State>,
}

struct State {
    status: Status,
    text: String,
    /// Where each token's text ends in `text`; the index is the token id.
    token_ends: Vec<usize>,
    /// Encoded token frames; the index is the token id.
    frames: Vec<Bytes>,
    terminal: Option<Bytes>,
    finish_reason: Option<String>,
    usage: Option<serde_json::Value>,
    error: Option<ErrorInfo>,
    subscribers: Vec<queue::Sender<Outbound>>,
    /// Memory held by `text` and `frames`, for the hub's log budget.
    log_bytes: usize,
    /// Since when no subscriber is attached (None while someone is).
    unwatched_since: Option<Instant>,
}

impl Generation {
    pub fn new(id: String, idempotency_key: Option<String>) -> Self {
        Self {
            id,
            idempotency_key,
            cancel: CancellationToken::new(),
            viewers: AtomicUsize::new(0),
            lag: crate::metrics::LagSample::default(),
            state: Mutex::new(State {
                status: Status::Running,
                text: String::new(),
                token_ends: Vec::new(),
                frames: Vec::new(),
                terminal: None,
                finish_reason: None,
                usage: None,
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

    /// Appends a token to the log and offers its frame to every live subscriber. A subscriber
    /// whose channel is full is dropped from the set: its stream ends with `event: reconnect`
    /// and it resumes from the log.
    pub fn push_token(&self, text: &str, limits: LogLimits) -> Pushed {
        let mut state = self.lock();
        if state.status != Status::Running {
            return Pushed::Ended;
        }
        if state.frames.len() >= limits.max_tokens
            || state.text.len() + text.len() > limits.max_bytes
        {
            return Pushed::TooLarge;
        }
        let index = state.frames.len() as u64;
        self.lag.received(index);
        let frame = frame::token(index, text);
        let log_bytes = text.len() + frame.len() + LOG_OVERHEAD_PER_TOKEN;
        state.log_bytes += log_bytes;
        state.text.push_str(text);
        let end = state.text.len();
        state.token_ends.push(end);
        state.frames.push(frame.clone());
        let fan_out = state.offer(|| Outbound::Token(frame.clone()));
        Pushed::Logged { fan_out, log_bytes }
    }

    pub fn lag(&self) -> &crate::metrics::LagSample {
        &self.lag
    }

    /// Memory held by this generation's log.
    pub fn log_bytes(&self) -> usize {
        self.lock().log_bytes
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

    pub fn set_finish_reason(&self, reason: String) {
        self.lock().finish_reason = Some(reason);
    }

    pub fn set_usage(&self, usage: serde_json::Value) {
        self.lock().usage = Some(usage);
    }

    /// Ends the generation: logs the terminal event, hands it to every subscriber and closes
    /// their channels, and stops the upstream task. Returns false if it had already ended.
    pub fn finish(&self, outcome: Outcome) -> bool {
        let mut state = self.lock();
        if state.status != Status::Running {
            return false;
        }
        let token_count = state.frames.len() as u64;
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
        state.offer(|| Outbound::Terminal(terminal.clone()));
        state.subscribers.clear();
        drop(state);
        self.cancel.cancel();
        true
    }

    /// Decides what a subscriber resuming at `cursor` (the first token id it lacks) gets.
    pub fn resume(&self, cursor: u64) -> Resume {
        let state = self.lock();
        let logged = state.frames.len() as u64;
        match (cursor, &state.terminal) {
            (c, _) if c <= logged => Resume::Stream,
            (c, Some(_)) if c == logged + 1 => Resume::NothingLeft,
            _ => Resume::BeyondEnd,
        }
    }

    /// One step of catching up from `cursor`; see [`Attach`].
    pub fn attach(&self, cursor: u64, channel_capacity: usize) -> Attach {
        let mut state = self.lock();
        let logged = state.frames.len();
        let start = usize::try_from(cursor).unwrap_or(usize::MAX).min(logged);
        if start < logged {
            return state.replay_from(start);
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

    /// The texts of tokens `from..to` (clamped to the log), one string per token: for readers
    /// that re-encode tokens in another format instead of forwarding the frames.
    pub fn token_texts(&self, from: u64, to: u64) -> Vec<String> {
        let state = self.lock();
        let end = usize::try_from(to)
            .unwrap_or(usize::MAX)
            .min(state.token_ends.len());
        let start = usize::try_from(from).unwrap_or(usize::MAX).min(end);
        let mut begin = start.checked_sub(1).map_or(0, |i| state.token_ends[i]);
        state.token_ends[start..end]
            .iter()
            .map(|&token_end| {
                let text = state.text[begin..token_end].to_owned();
                begin = token_end;
                text
            })
            .collect()
    }

    pub fn status(&self) -> Status {
        self.lock().status
    }

    pub fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        Snapshot {
            id: self.id.clone(),
            status: state.status,
            text: state.text.clone(),
            token_count: state.frames.len() as u64,
            finish_reason: state.finish_reason.clone(),
            usage: state.usage.clone(),
            error: state.error.clone(),
        }
    }
}

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
    /// Offers one event to every live subscriber; full channels are evicted, closed ones forgotten.
    fn offer(&mut self, mut message: impl FnMut() -> Outbound) -> FanOut {
        let mut counts = FanOut::default();
        self.subscribers.retain(|tx| match tx.try_send(message()) {
            Ok(()) => {
                counts.delivered += 1;
                true
            }
            Err(TrySendError::Full) => {
                counts.evicted += 1;
                false
            }
            Err(TrySendError::Closed) => false,
        });
        self.note_if_unwatched();
        counts
    }

    fn fail(&mut self, status: Status, code: &'static str, message: String) -> Bytes {
        self.status = status;
        let token_count = self.frames.len() as u64;
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

    fn replay_from(&self, start: usize) -> Attach {
        let mut end = start;
        let mut len = 0;
        while end < self.frames.len()
            && (end == start || len + self.frames[end].len() <= REPLAY_BATCH_BYTES)
        {
            len += self.frames[end].len();
            end += 1;
        }
        let frames = if end == start + 1 {
            self.frames[start].clone()
        } else {
            let mut buf = BytesMut::with_capacity(len);
            for frame in &self.frames[start..end] {
                buf.extend_from_slice(frame);
            }
            buf.freeze()
        };
        Attach::Replay {
            frames,
            next: end as u64,
        }
    }

    fn note_if_unwatched(&mut self) {
        if self.subscribers.is_empty() {
            self.unwatched_since.get_or_insert_with(Instant::now);
        }
    }
}
