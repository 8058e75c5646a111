//! Reading one open event stream into [`UpstreamEvent`]s, within the call's idle, first-token
//! and total deadlines: the SSE parser yields `data:` payloads, the dialect's decoder turns
//! them into events. Never retries: a token may already have gone out.

use std::{collections::VecDeque, fmt, pin::Pin, time::Duration};

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::time::{Instant, Sleep};

use super::{
    client::{deadline_after, Deadlines},
    dialect::StreamDecoder,
    http1::{self, HttpError, Response},
    sse::SseDecoder,
    UpstreamError, UpstreamEvent,
};

/// Reads one open event stream into events; never retries.
pub(super) struct Reader {
    body: http1::Body,
    decoder: SseDecoder,
    /// The dialect's reading of each event.
    events: Box<dyn StreamDecoder>,
    /// Decoded events not yielded yet (a chunk may carry several); allocated once per call.
    pending: VecDeque<UpstreamEvent>,
    deadlines: Deadlines,
    idle_timeout: Duration,
    /// One timer for the whole call, moved forward before each read: pushing a deadline later
    /// is an atomic update, where a fresh timeout per chunk registers in and leaves the timer
    /// wheel under its lock every time (visible in profiles of the token path).
    deadline: Pin<Box<Sleep>>,
    token_seen: bool,
    finish_seen: bool,
    done: bool,
}

impl Reader {
    pub(super) fn new(
        response: Response,
        events: Box<dyn StreamDecoder>,
        deadlines: Deadlines,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            body: response.body,
            decoder: SseDecoder::default(),
            events,
            pending: VecDeque::new(),
            deadlines,
            idle_timeout,
            deadline: Box::pin(tokio::time::sleep_until(deadlines.first_token)),
            token_seen: false,
            finish_seen: false,
            done: false,
        }
    }

    pub(super) async fn next(&mut self) -> Option<Result<UpstreamEvent, UpstreamError>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                match event {
                    UpstreamEvent::Delta(_) => self.token_seen = true,
                    UpstreamEvent::Finish(_) => self.finish_seen = true,
                    UpstreamEvent::Usage { .. } => {}
                }
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            if let Err(error) = self.fill().await {
                return Some(Err(error));
            }
        }
    }

    /// Decodes buffered events until one yields something, else reads one more chunk.
    async fn fill(&mut self) -> Result<(), UpstreamError> {
        while let Some(data) = self.decoder.next_data().map_err(protocol)? {
            if self.events.decode(data, &mut self.pending)? {
                self.done = true;
                self.release_connection();
                return Ok(());
            }
            if !self.pending.is_empty() {
                return Ok(());
            }
        }
        match self.read_chunk().await? {
            Some(chunk) => self.decoder.push(&chunk),
            // Some providers end the body after the finish_reason without `[DONE]`.
            None if self.finish_seen => self.done = true,
            None => {
                return Err(UpstreamError::Interrupted(
                    "the stream ended before a finish reason or its end event".to_owned(),
                ))
            }
        }
        Ok(())
    }

    /// The next body chunk (`None` at the end), within the idle, first-token and total deadlines.
    async fn read_chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        let (mut deadline, mut which) = self.deadlines.earliest(self.token_seen);
        let idle = deadline_after(Instant::now(), self.idle_timeout);
        if idle < deadline {
            (deadline, which) = (idle, "idle");
        }
        self.deadline.as_mut().reset(deadline);
        tokio::select! {
            biased;
            chunk = self.body.chunk() => chunk.map_err(body_error),
            () = self.deadline.as_mut() => Err(UpstreamError::Timeout(which)),
        }
    }

    /// After `[DONE]` the body's end is usually already buffered: reading it now returns the
    /// connection to the pool instead of closing it, which at thousands of generations a second
    /// spares the client's ephemeral ports. Never waits.
    fn release_connection(&mut self) {
        let _ = self.body.chunk().now_or_never();
    }
}

pub(super) fn protocol(error: impl fmt::Display) -> UpstreamError {
    UpstreamError::Protocol(error.to_string())
}

/// A failure while reading the body: the stream was cut, or it broke HTTP framing.
pub(super) fn body_error(error: HttpError) -> UpstreamError {
    match error {
        HttpError::Protocol(message) => UpstreamError::Protocol(message),
        other => UpstreamError::Interrupted(other.to_string()),
    }
}
