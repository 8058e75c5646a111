//! What the subscribers of one worker observed, summed. Workers ship these as JSON to the
//! coordinator, which adds them up, so every field is a plain count that sums meaningfully
//! (except the two `*_us` fields, which are maxima).

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Counters {
    /// Clients the worker has started (ramp progress).
    pub started: u64,
    /// Clients whose stream is open right now (a gauge: connected minus ended).
    pub connected: i64,
    /// Successful SSE responses (200), first connections and reconnections.
    pub connects: u64,
    /// Reconnections after an eviction, a shutdown or a dropped stream (EventSource behaviour).
    pub reconnects: u64,
    pub connect_errors: u64,
    /// Non-200/204 answers to the events request.
    pub http_errors: u64,
    /// Token events delivered in order (each id exactly once).
    pub tokens: u64,
    /// Tokens emitted after the client subscribed: their latency is recorded.
    pub live_tokens: u64,
    /// Tokens emitted before the client (re)subscribed, delivered from the log.
    pub replayed_tokens: u64,
    pub unstamped_tokens: u64,
    /// Tokens of streams read straight from the mock (`chatpath`): not in `tokens`, so the
    /// gateway's CPU is divided by its own deliveries only.
    pub direct_tokens: u64,
    pub duplicate_tokens: u64,
    /// Token ids skipped over (the stream jumped ahead).
    pub missing_tokens: u64,
    /// `done` events; `done_mismatches` of them had token_count ≠ tokens received.
    pub done: u64,
    pub done_mismatches: u64,
    /// Tokens a `done` event announced that this client never received.
    pub lost_tokens: u64,
    /// `error` terminal events (the generation failed); `error_mismatches` of them had an id ≠
    /// tokens received.
    pub generation_errors: u64,
    pub error_mismatches: u64,
    /// Terminal events other than the coordinator planned: `done` for a generation told to
    /// fail or the reverse, or a token count other than the planned one (0 when unknown).
    pub unexpected_endings: u64,
    /// `event: reconnect` with reason slow_consumer.
    pub evictions: u64,
    /// `event: reconnect` with reason shutdown.
    pub shutdown_reconnects: u64,
    pub other_reconnects: u64,
    /// Streams that ended without a terminal or reconnect event (read error or EOF).
    pub dropped_streams: u64,
    pub protocol_errors: u64,
    pub unknown_events: u64,
    pub keepalives: u64,
    /// Clients that stopped reading on purpose (`slow`, `soak`).
    pub stalls: u64,
    /// Clients that closed their connection on purpose and came back (`soak`).
    pub disconnects: u64,
    /// Clients that closed their connection on purpose for good (`soak`).
    pub left_midstream: u64,
    /// Clients never started because their generation could not be created.
    pub no_generation: u64,
    /// Clients that finished: with `done`/`error`, by leaving, by giving up, on shutdown.
    pub ended: u64,
    pub left: u64,
    pub gave_up: u64,
    /// Latest wall-clock time (Unix µs) a client saw a terminal or reconnect event.
    pub last_terminal_us: u64,
    /// Latest wall-clock time (Unix µs) a client saw any token.
    pub last_token_us: u64,
}

impl Counters {
    pub fn add(&mut self, other: &Counters) {
        macro_rules! sum {
            ($($field:ident),*) => { $( self.$field += other.$field; )* };
        }
        sum!(
            started,
            connected,
            connects,
            reconnects,
            connect_errors,
            http_errors,
            tokens,
            live_tokens,
            replayed_tokens,
            unstamped_tokens,
            direct_tokens,
            duplicate_tokens,
            missing_tokens,
            done,
            done_mismatches,
            lost_tokens,
            generation_errors,
            error_mismatches,
            unexpected_endings,
            evictions,
            shutdown_reconnects,
            other_reconnects,
            dropped_streams,
            protocol_errors,
            unknown_events,
            keepalives,
            stalls,
            disconnects,
            left_midstream,
            no_generation,
            ended,
            left,
            gave_up
        );
        self.last_terminal_us = self.last_terminal_us.max(other.last_terminal_us);
        self.last_token_us = self.last_token_us.max(other.last_token_us);
    }

    /// Delivery errors of any kind: a correct run has zero.
    pub fn delivery_errors(&self) -> u64 {
        self.duplicate_tokens
            + self.missing_tokens
            + self.done_mismatches
            + self.error_mismatches
            + self.unexpected_endings
            + self.lost_tokens
            + self.protocol_errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_sums_counts_and_keeps_latest_times() {
        let mut a = Counters {
            tokens: 5,
            connected: 2,
            last_terminal_us: 10,
            ..Counters::default()
        };
        let b = Counters {
            tokens: 7,
            connected: -1,
            missing_tokens: 1,
            last_terminal_us: 3,
            ..Counters::default()
        };
        a.add(&b);
        assert_eq!((a.tokens, a.connected, a.last_terminal_us), (12, 1, 10));
        assert_eq!(a.delivery_errors(), 1);
    }
}
