//! A subscriber's read position in one generation: first the log (replay), then its own
//! bounded queue (live). The SSE stream and the OpenAI-compatible stream both read through
//! it, so "every token exactly once, in order" is implemented in one place.
//!
//! A live subscriber whose channel filled up (a burst, a long round trip) is not dropped: it
//! reads what its channel holds, then catches up from the log in batches (cheaper per token
//! than live delivery, so the burst costs less) and goes live again. Only a subscriber that
//! stays behind — the token it lacks logged longer than `--max-viewer-lag` ago, or more than
//! `--max-viewer-lag-bytes` of frames behind the log's end — is dropped as slow. One whose
//! socket accepts nothing is closed by the write timeout, wherever it is.

use std::{
    sync::Arc,
    task::{ready, Context, Poll},
    time::Instant,
};

use bytes::Bytes;

use super::{generation::Head, queue, Attach, Generation, Hub, Outbound};

/// What a subscription yields next.
#[derive(Debug)]
pub enum Delivery {
    /// Logged token frames `from..to`, concatenated: catching up.
    Replayed {
        frames: Bytes,
        from: u64,
        to: u64,
    },
    /// One live token frame and its id.
    Token {
        frame: Bytes,
        index: u64,
    },
    KeepAlive,
    /// The terminal `done`/`error` frame; nothing follows.
    Ended(Bytes),
    /// The hub dropped this subscriber (it stayed behind past a lag budget, or the gateway is
    /// shutting down). [`Subscription::resume`] catches up again from the log.
    Dropped,
}

pub struct Subscription {
    hub: Arc<Hub>,
    generation: Arc<Generation>,
    /// The first token id not yet delivered.
    cursor: u64,
    phase: Phase,
}

enum Phase {
    /// Reading the log: a new or resuming subscriber (`None`: no budget, however long the log
    /// it replays), or one whose live channel filled up. Boxed: rare, and this enum is part of
    /// every open connection.
    CatchUp(Option<Box<Behind>>),
    Live(queue::Receiver<Outbound>),
    Finished,
}

/// How far a subscriber that fell out of the live fan-out is behind the log's end.
struct Behind {
    /// Byte offset of the subscriber's cursor among the log's frames.
    offset: u64,
    /// Every token before this index had been logged at `since`, so a cursor below it is at
    /// least `since.elapsed()` late. Moved to the log's end each time the cursor passes it.
    checkpoint: u64,
    since: Instant,
}

impl Behind {
    /// Whether a subscriber at `cursor`, with the log at `head`, is past a budget.
    fn over_budget(&mut self, cursor: u64, head: Head, settings: &super::HubSettings) -> bool {
        if head.frame_bytes.saturating_sub(self.offset) > settings.max_viewer_lag_bytes {
            return true;
        }
        if cursor < self.checkpoint {
            return self.since.elapsed() > settings.max_viewer_lag;
        }
        self.checkpoint = head.tokens;
        self.since = Instant::now();
        false
    }
}

impl Subscription {
    /// Opens a subscription at token id `cursor`, counted as one of the generation's viewers;
    /// `None` when it already has `max_viewers`.
    pub fn open(
        hub: Arc<Hub>,
        generation: Arc<Generation>,
        cursor: u64,
        max_viewers: usize,
    ) -> Option<Self> {
        if !generation.join_viewer(max_viewers) {
            return None;
        }
        hub.subscriber_opened();
        Some(Self {
            hub,
            generation,
            cursor,
            phase: Phase::CatchUp(None),
        })
    }

    pub fn generation(&self) -> &Arc<Generation> {
        &self.generation
    }

    /// Events waiting in the live queue (0 while catching up).
    pub fn queued(&self) -> usize {
        match &self.phase {
            Phase::Live(rx) => rx.queued(),
            Phase::CatchUp(_) | Phase::Finished => 0,
        }
    }

    /// After [`Delivery::Dropped`]: catch up again from the first token not delivered.
    pub fn resume(&mut self) {
        self.phase = Phase::CatchUp(None);
    }

    pub fn poll_delivery(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        loop {
            let delivery = match &mut self.phase {
                // Told nothing by the drain's `disconnect_all` (it was not in a live set): told
                // now, instead of going live again on an instance that is going away. Only a
                // subscriber that fell behind: a resumed one (`None`) is what a stream that
                // cannot reconnect (`api/chat.rs`) asks for after `Dropped`, and must go on.
                Phase::CatchUp(Some(_)) if self.hub.disconnected() => {
                    self.phase = Phase::Finished;
                    Delivery::Dropped
                }
                Phase::CatchUp(behind) => {
                    let settings = self.hub.settings();
                    match self
                        .generation
                        .attach(self.cursor, settings.channel_capacity)
                    {
                        Attach::Replay { frames, next, head } => {
                            if let Some(behind) = behind {
                                if behind.over_budget(self.cursor, head, settings) {
                                    ::metrics::counter!(
                                        crate::metrics::EVICTIONS,
                                        "reason" => "slow_consumer"
                                    )
                                    .increment(1);
                                    self.phase = Phase::Finished;
                                    return Poll::Ready(Some(Delivery::Dropped));
                                }
                                behind.offset += frames.len() as u64;
                            }
                            let from = std::mem::replace(&mut self.cursor, next);
                            Delivery::Replayed {
                                frames,
                                from,
                                to: next,
                            }
                        }
                        Attach::Live(rx) => {
                            self.phase = Phase::Live(rx);
                            continue;
                        }
                        Attach::Ended(terminal) => {
                            self.phase = Phase::Finished;
                            Delivery::Ended(terminal)
                        }
                    }
                }
                Phase::Live(rx) => match ready!(rx.poll_recv(cx)) {
                    Some(Outbound::Token(frame)) => {
                        let index = self.cursor;
                        self.cursor += 1;
                        Delivery::Token { frame, index }
                    }
                    Some(Outbound::KeepAlive) => Delivery::KeepAlive,
                    Some(Outbound::Terminal(terminal)) => {
                        self.phase = Phase::Finished;
                        Delivery::Ended(terminal)
                    }
                    Some(Outbound::Behind { offset, since }) => {
                        // The token at the cursor is the one that did not fit, logged `since`.
                        self.phase = Phase::CatchUp(Some(Box::new(Behind {
                            offset,
                            checkpoint: self.cursor + 1,
                            since,
                        })));
                        continue;
                    }
                    None => {
                        self.phase = Phase::Finished;
                        Delivery::Dropped
                    }
                },
                Phase::Finished => return Poll::Ready(None),
            };
            return Poll::Ready(Some(delivery));
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.generation.leave_viewer();
        self.hub.subscriber_closed();
    }
}
