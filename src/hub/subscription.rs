//! A subscriber's read position in one generation: first the log (replay), then its own
//! bounded queue (live). The SSE stream and the OpenAI-compatible stream both read through
//! it, so "every token exactly once, in order" is implemented in one place.

use std::{
    sync::Arc,
    task::{ready, Context, Poll},
};

use bytes::Bytes;

use super::{queue, Attach, Generation, Hub, Outbound};

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
    /// The hub dropped this subscriber (it fell a queue's length behind, or the gateway is
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
    CatchUp,
    Live(queue::Receiver<Outbound>),
    Finished,
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
            phase: Phase::CatchUp,
        })
    }

    pub fn generation(&self) -> &Arc<Generation> {
        &self.generation
    }

    /// Events waiting in the live queue (0 while catching up).
    pub fn queued(&self) -> usize {
        match &self.phase {
            Phase::Live(rx) => rx.queued(),
            Phase::CatchUp | Phase::Finished => 0,
        }
    }

    /// After [`Delivery::Dropped`]: catch up again from the first token not delivered.
    pub fn resume(&mut self) {
        self.phase = Phase::CatchUp;
    }

    pub fn poll_delivery(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        loop {
            let delivery = match &mut self.phase {
                Phase::CatchUp => {
                    let capacity = self.hub.settings().channel_capacity;
                    match self.generation.attach(self.cursor, capacity) {
                        Attach::Replay { frames, next } => {
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
