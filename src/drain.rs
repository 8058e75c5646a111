//! The shutdown policy, in one place.
//!
//! On the shutdown signal, [`run`] takes the gateway through these steps:
//! 1. **Drain begins** ([`Drain::is_draining`]): `/readyz` answers 503, new generations 503, new
//!    subscriptions get `event: reconnect`; idle keep-alive connections are closed.
//! 2. **Running generations keep streaming** to their subscribers until they all end, or until
//!    the deadline. Subscribers of finished generations get `done` and are closed normally.
//! 3. **At the deadline** every remaining subscriber is told to reconnect (with `retry:` values
//!    spread over a window) and the remaining generations are interrupted.
//! 4. **Connections are closed**: after a short flush grace, whatever is still open (a peer
//!    that stopped reading) is force-closed, so the process exits within deadline + 2 s.
//!
//! With a store shared by several instances (**hand-off**), step 2 changes: every subscriber is
//! told to reconnect at once (another instance serves it from the store), while this
//! instance's upstream calls keep running, and writing to the store, until they end or the
//! deadline; the process exits as soon as they are done and their ends are written.

use std::{
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use rand::Rng;
use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFuture, WaitForCancellationFutureOwned},
    task::TaskTracker,
};
use tracing::info;

use crate::{hub::Hub, metrics};

/// How long connections get to flush their last events before they are force-closed.
const FLUSH_GRACE: Duration = Duration::from_secs(1);
/// How long force-closed connection tasks get to finish.
const CLOSE_GRACE: Duration = Duration::from_millis(500);
/// How often the drain checks whether everything has ended.
const IDLE_POLL: Duration = Duration::from_millis(20);

/// How far the drain has gone; only ever moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    Serving = 0,
    /// Step 1 on: no new work.
    Draining = 1,
    /// Step 4: the listener stops accepting.
    Closing = 2,
    /// Step 4, after the flush grace: every connection is dropped.
    Killed = 3,
}

/// The drain state, shared (cheap clones) by the server, handlers and subscriber streams.
#[derive(Clone)]
pub struct Drain {
    /// The current [`Phase`], readable with one atomic load (checking a token takes a mutex).
    phase: Arc<AtomicU8>,
    draining: CancellationToken,
    closing: CancellationToken,
    killed: CancellationToken,
    reconnect_spread: Duration,
}

impl Drain {
    pub fn new(reconnect_spread: Duration) -> Self {
        Self {
            phase: Arc::new(AtomicU8::new(Phase::Serving as u8)),
            draining: CancellationToken::new(),
            closing: CancellationToken::new(),
            killed: CancellationToken::new(),
            reconnect_spread,
        }
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Serving,
            1 => Phase::Draining,
            2 => Phase::Closing,
            _ => Phase::Killed,
        }
    }

    /// Whether the gateway has stopped taking new work.
    pub fn is_draining(&self) -> bool {
        self.phase() >= Phase::Draining
    }

    /// Moves to `phase`, then fires its signal: whoever is woken by the signal already sees
    /// the new phase.
    fn enter(&self, phase: Phase) {
        self.phase.fetch_max(phase as u8, Ordering::SeqCst);
        match phase {
            Phase::Serving => {}
            Phase::Draining => self.draining.cancel(),
            Phase::Closing => self.closing.cancel(),
            Phase::Killed => self.killed.cancel(),
        }
    }

    pub fn draining(&self) -> WaitForCancellationFutureOwned {
        self.draining.clone().cancelled_owned()
    }

    /// Fires when the listener must stop accepting.
    pub fn closing(&self) -> WaitForCancellationFuture<'_> {
        self.closing.cancelled()
    }

    /// Fires when every connection must be dropped at once.
    pub fn killed(&self) -> WaitForCancellationFutureOwned {
        self.killed.clone().cancelled_owned()
    }

    /// A `retry:` for a client sent away by the shutdown, drawn uniformly over the spread window
    /// so that thousands of clients do not come back in the same millisecond.
    pub fn reconnect_retry_ms(&self) -> u64 {
        let spread = u64::try_from(self.reconnect_spread.as_millis()).unwrap_or(u64::MAX);
        rand::rng().random_range(0..=spread)
    }
}

/// Drains the gateway under `deadline`; returns when every connection is closed.
pub async fn run(drain: &Drain, hub: &Hub, connections: &TaskTracker, deadline: Duration) {
    let started = Instant::now();
    info!(deadline = ?deadline, "drain started: not ready, refusing new work");
    ::metrics::counter!(metrics::DRAIN_STARTED).increment(1);
    metrics::record_draining(Some(deadline));
    drain.enter(Phase::Draining);
    if hub.shared().is_some() {
        let told = hub.disconnect_all();
        ::metrics::counter!(metrics::DRAIN_RECONNECTS).increment(told as u64);
        info!(
            told,
            "drain: subscribers handed over to other instances; upstream calls go on"
        );
    }

    let finished_in_time = tokio::time::timeout(deadline, everything_ended(hub))
        .await
        .is_ok();
    if finished_in_time {
        info!(elapsed = ?started.elapsed(), "drain: every generation and subscriber finished");
    } else {
        let told = hub.disconnect_all();
        let interrupted = hub.interrupt_all();
        ::metrics::counter!(metrics::DRAIN_RECONNECTS).increment(told as u64);
        ::metrics::counter!(metrics::EVICTIONS, "reason" => "shutdown").increment(told as u64);
        ::metrics::counter!(metrics::DRAIN_INTERRUPTED).increment(interrupted as u64);
        info!(
            told,
            interrupted, "drain deadline: subscribers told to reconnect, generations interrupted"
        );
        // With a store, viewers elsewhere learn of the interruption from it: give the writers
        // a moment to write the ends.
        if hub.shared().is_some() {
            let _ = tokio::time::timeout(FLUSH_GRACE, everything_ended(hub)).await;
        }
    }

    drain.enter(Phase::Closing);
    connections.close();
    if tokio::time::timeout(FLUSH_GRACE, connections.wait())
        .await
        .is_err()
    {
        info!(
            open = connections.len(),
            "drain: force-closing connections that did not flush"
        );
        drain.enter(Phase::Killed);
        // Connection tasks end at their next poll; this wait is bounded for a stuck runtime.
        let _ = tokio::time::timeout(CLOSE_GRACE, connections.wait()).await;
    }
    drain.enter(Phase::Killed);
    hub.close();
    let elapsed = started.elapsed();
    ::metrics::histogram!(metrics::DRAIN_DURATION).record(elapsed.as_secs_f64());
    metrics::record_draining(None);
    info!(elapsed = ?elapsed, "drain finished");
}

/// Resolves once no generation is running and no subscriber stream is open.
async fn everything_ended(hub: &Hub) {
    while hub.running() > 0 || hub.subscribers_open() > 0 {
        tokio::time::sleep(IDLE_POLL).await;
    }
}
