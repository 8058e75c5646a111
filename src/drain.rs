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
//! With a store shared by several instances, step 2 becomes "reconnect everyone at once, the
//! generation continues elsewhere": [`run`] is the one place to change.

use std::time::{Duration, Instant};

use rand::Rng;
use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFuture},
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

/// The drain state, shared (cheap clones) by the server, handlers and subscriber streams.
#[derive(Clone)]
pub struct Drain {
    draining: CancellationToken,
    closing: CancellationToken,
    killed: CancellationToken,
    reconnect_spread: Duration,
}

impl Drain {
    pub fn new(reconnect_spread: Duration) -> Self {
        Self {
            draining: CancellationToken::new(),
            closing: CancellationToken::new(),
            killed: CancellationToken::new(),
            reconnect_spread,
        }
    }

    /// Whether the gateway has stopped taking new work.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    pub fn draining(&self) -> WaitForCancellationFuture<'_> {
        self.draining.cancelled()
    }

    /// Fires when the listener must stop accepting.
    pub fn closing(&self) -> WaitForCancellationFuture<'_> {
        self.closing.cancelled()
    }

    /// Fires when every connection must be dropped at once.
    pub fn killed(&self) -> WaitForCancellationFuture<'_> {
        self.killed.cancelled()
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
    drain.draining.cancel();

    let finished_in_time = tokio::time::timeout(deadline, everything_ended(hub))
        .await
        .is_ok();
    if finished_in_time {
        info!(elapsed = ?started.elapsed(), "drain: every generation and subscriber finished");
    } else {
        let told = hub.disconnect_all();
        let interrupted = hub.interrupt_all();
        ::metrics::counter!(metrics::DRAIN_RECONNECTS).increment(told as u64);
        ::metrics::counter!(metrics::DRAIN_INTERRUPTED).increment(interrupted as u64);
        info!(
            told,
            interrupted, "drain deadline: subscribers told to reconnect, generations interrupted"
        );
    }

    drain.closing.cancel();
    connections.close();
    if tokio::time::timeout(FLUSH_GRACE, connections.wait())
        .await
        .is_err()
    {
        info!(
            open = connections.len(),
            "drain: force-closing connections that did not flush"
        );
        drain.killed.cancel();
        // Connection tasks end at their next poll; this wait is bounded for a stuck runtime.
        let _ = tokio::time::timeout(CLOSE_GRACE, connections.wait()).await;
    }
    drain.killed.cancel();
    hub.close();
    let elapsed = started.elapsed();
    ::metrics::histogram!(metrics::DRAIN_DURATION).record(elapsed.as_secs_f64());
    info!(elapsed = ?elapsed, "drain finished");
}

/// Resolves once no generation is running and no subscriber stream is open.
async fn everything_ended(hub: &Hub) {
    while hub.running() > 0 || hub.subscribers_open() > 0 {
        tokio::time::sleep(IDLE_POLL).await;
    }
}
