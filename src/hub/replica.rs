//! A replica: this instance's copy of a generation that another instance runs, kept in step
//! with the store by one relay task, whatever the number of viewers here.
//!
//! The relay subscribes to the live feed first, then reads the log, and merges the two by index:
//! an entry it already has is dropped, an entry past a gap sends it to the log first, so the
//! local log grows in order with no hole and no duplicate. Viewers attach to the local copy
//! exactly as to a generation of ours (same bounded channels, same replay).
//!
//! The store's live feed is best effort (pub/sub); the log is the truth. So the relay reads the
//! log whenever the feed skipped, dropped or went quiet for a while, and it is also the one that
//! notices a dead owner: a running generation without a lease for a whole lease time is ended
//! `failed` with `owner_lost`.

use std::{sync::Arc, time::Instant};

use tokio::sync::mpsc;
use tracing::{info, warn, Instrument};

use super::{
    generation::{Generation, Outcome, Pushed, LOG_LOST, OWNER_LOST},
    registry::Shared,
    Delta, Hub, HubError, Status,
};
use crate::{
    metrics,
    store::{End, LiveEvent, Meta, StoreError, Watch},
};

/// Live messages a replica may have queued before it misses some (and reads the log).
const FEED_CAPACITY: usize = 256;
/// Entries read from the log in one call.
const READ_BATCH: usize = 512;
/// A running replica nobody watched for this long is dropped (a later viewer opens another).
const IDLE_REPLICA: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens a replica of `id`, caught up with the store's log; `None` if the store knows no such
/// generation.
pub(super) async fn open(
    hub: &Arc<Hub>,
    shared: &Shared,
    id: &str,
) -> Result<Option<Arc<Generation>>, HubError> {
    // An unknown id (a typo, a guess, an expired generation) costs one read, not a
    // subscription made and undone.
    if shared.store.meta(id).await?.is_none() {
        return Ok(None);
    }
    let (tx, rx) = mpsc::channel(FEED_CAPACITY);
    // Subscribed before the reads that count, so nothing appended after them can be missed.
    let watch = shared.store.watch(id, tx).await?;
    let Some(meta) = shared.store.meta(id).await? else {
        return Ok(None);
    };
    let replica = Arc::new(Generation::replica(id.to_owned(), meta.owner.clone()));
    let mut relay = Relay {
        hub: hub.clone(),
        generation: replica.clone(),
        no_lease_since: None,
    };
    relay.catch_up(shared).await?;
    let ended = relay.settle(shared, meta).await?;
    let (generation, adopted) = hub.adopt(replica);
    if adopted {
        let span = tracing::info_span!("replica", generation_id = %id);
        tokio::spawn(relay.run(watch, rx, ended).instrument(span));
    }
    Ok(Some(generation))
}

struct Relay {
    hub: Arc<Hub>,
    generation: Arc<Generation>,
    /// Since when the store shows the generation running with no owner's lease.
    no_lease_since: Option<Instant>,
}

impl Relay {
    async fn run(
        mut self,
        watch: Box<dyn Watch>,
        mut feed: mpsc::Receiver<LiveEvent>,
        ended: bool,
    ) {
        if !ended {
            self.follow(&mut feed).await;
        }
        drop(watch);
        if self.generation.status() != Status::Running {
            self.hub.mark_finished(&self.generation);
            self.hub.retain_then_forget(&self.generation).await;
        } else {
            self.hub.forget(&self.generation);
        }
    }

    /// Follows the store until the generation ends here, or nobody watches it here any more.
    async fn follow(&mut self, feed: &mut mpsc::Receiver<LiveEvent>) {
        let Some(lease) = self.hub.shared().map(|shared| shared.lease) else {
            return;
        };
        let quiet = (lease / 2).max(std::time::Duration::from_millis(250));
        loop {
            let event = tokio::select! {
                event = feed.recv() => event,
                () = tokio::time::sleep(quiet) => None,
                () = self.generation.ended() => return,
                () = self.hub.closed() => return,
            };
            if let Some(LiveEvent::Entries { first, entries }) = &event {
                let next = self.generation.token_count();
                if *first <= next {
                    let skip = usize::try_from(next - first).unwrap_or(usize::MAX);
                    for entry in entries.iter().skip(skip) {
                        self.push(entry);
                    }
                    continue;
                }
            }
            if self
                .generation
                .unwatched_for()
                .is_some_and(|idle| idle >= IDLE_REPLICA)
            {
                info!("nobody watches this replica any more: dropping it");
                return;
            }
            // A gap, a dropped feed, the end, or a quiet spell: the metadata tells, and the log
            // is read only when it holds more than the replica (a quiet, healthy generation
            // costs one round trip per half lease, not two).
            let hub = self.hub.clone();
            let Some(shared) = hub.shared() else { return };
            let result = async {
                let meta = shared.store.meta(self.generation.id()).await?;
                match meta {
                    Some(meta) => {
                        if meta.next > self.generation.token_count() {
                            self.catch_up(shared).await?;
                        }
                        self.settle(shared, meta).await
                    }
                    None => Ok(self.settle_missing(lease)),
                }
            }
            .await;
            match result {
                Ok(true) => return,
                Ok(false) => {}
                Err(error) => warn!(%error, "cannot read the store; retrying"),
            }
        }
    }

    /// Appends one entry of the owner's log. An entry that does not decode (a newer version's
    /// kind, or corruption) is logged as an empty text, so that indices stay aligned.
    fn push(&self, entry: &bytes::Bytes) {
        let delta = Delta::decode(entry).unwrap_or_else(|error| {
            warn!(%error, "an undecodable log entry was replaced by an empty text");
            Delta::Text(String::new())
        });
        let limits = self.hub.settings().log_limits;
        match self.generation.push(delta, limits) {
            Pushed::Logged { fan_out, log_bytes } => {
                metrics::record_fan_out(fan_out, metrics::TokenSource::Store);
                self.hub.logged(log_bytes);
            }
            // Limits smaller here than the owner's: end the copy rather than skip an entry,
            // which would shift every index after it.
            Pushed::TooLarge => {
                self.generation.finish(Outcome::Failed {
                    code: "too_large",
                    message: "the generation exceeded this instance's token or byte limit".into(),
                });
            }
            Pushed::Ended => {}
        }
    }

    /// Appends what the store's log holds past the local copy.
    async fn catch_up(&self, shared: &Shared) -> Result<(), StoreError> {
        loop {
            let from = self.generation.token_count();
            let entries = shared
                .store
                .read(self.generation.id(), from, READ_BATCH)
                .await?;
            for entry in &entries {
                self.push(entry);
            }
            if entries.len() < READ_BATCH {
                return Ok(());
            }
        }
    }

    /// Acts on the metadata after a catch-up; true once the generation has ended here.
    async fn settle(&mut self, shared: &Shared, meta: Meta) -> Result<bool, StoreError> {
        if let Some(end) = &meta.end {
            if self.generation.token_count() < end.token_count {
                // Ended, and the log is shorter than the end says: never present it as whole.
                self.generation.finish(Outcome::Failed {
                    code: LOG_LOST,
                    message: "the store lost part of this generation's log".into(),
                });
            } else {
                self.generation.finish_as(end);
            }
            return Ok(true);
        }
        if meta.leased {
            self.no_lease_since = None;
            return Ok(false);
        }
        let since = *self.no_lease_since.get_or_insert_with(Instant::now);
        if since.elapsed() < shared.lease {
            return Ok(false);
        }
        let end = End {
            status: "failed".into(),
            token_count: meta.next,
            finish_reason: None,
            usage: None,
            error_code: Some(OWNER_LOST.into()),
            error_message: Some("the instance running this generation stopped".into()),
        };
        let written = shared
            .store
            .finish(self.generation.id(), None, &end)
            .await?;
        info!(owner = %meta.owner, ?written, "the owner's lease is gone: ended the generation");
        // The end arrives through the metadata on the next look.
        Ok(false)
    }

    /// The store has no metadata (it lost it, or it expired): give the owner a lease time to
    /// write it again, then end the replica.
    fn settle_missing(&mut self, lease: std::time::Duration) -> bool {
        let since = *self.no_lease_since.get_or_insert_with(Instant::now);
        if since.elapsed() < lease * 2 {
            return false;
        }
        self.generation.finish(Outcome::Failed {
            code: LOG_LOST,
            message: "the store lost this generation".into(),
        })
    }
}
