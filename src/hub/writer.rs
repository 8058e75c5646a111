//! The owner's side of a shared generation: copies its log to the store, renews its lease,
//! and writes its end.
//!
//! Viewers on the owner's instance never wait for the store: tokens are fanned out locally
//! first, and this task follows, writing every token that is ready in one call (so a busy
//! moment costs fewer calls, never more than one per token). The local log is the owner's
//! copy: when the store lost entries (a restart without persistence) or never saw a write, the
//! writer writes again from what the store says it holds. When the store is unreachable it
//! retries; viewers on other instances wait, and lose nothing.

use std::{sync::Arc, time::Duration};

use tracing::{info, warn};

use super::{
    generation::{Generation, Outcome, OWNER_LOST},
    Status,
};
use crate::store::{Store, Written};

/// Most entries in one append: one script call stays short for Redis.
const MAX_BATCH: usize = 512;
/// Waits between attempts while the store is unreachable.
const RETRY: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(50)..=Duration::from_secs(1);

/// Runs until the store holds the whole generation and its end, or another instance ended it.
pub async fn run(
    store: Arc<dyn Store>,
    owner: String,
    lease: Duration,
    generation: Arc<Generation>,
) {
    let id = generation.id().to_owned();
    let renew_every = lease / 3;
    let mut stored = 0u64;
    let mut retry = *RETRY.start();
    let mut failing = false;
    let mut last_write = tokio::time::Instant::now();
    loop {
        // Registered before looking, so a token logged meanwhile still wakes us.
        let changed = generation.changed();
        let pending = generation.entries_from(stored, MAX_BATCH);
        let result = if !pending.is_empty() {
            let written = store.append(&id, &owner, stored, &pending).await;
            if matches!(written, Ok(Written::Done)) {
                stored += pending.len() as u64;
            }
            written
        } else if let Some(end) = generation.end_state(stored) {
            match store.finish(&id, Some(&owner), &end).await {
                Ok(Written::Done) => return,
                other => other,
            }
        } else if last_write.elapsed() >= renew_every {
            store.renew(&id, &owner).await
        } else {
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(last_write + renew_every) => {}
            }
            continue;
        };
        match result {
            Ok(Written::Done) => {
                last_write = tokio::time::Instant::now();
                retry = *RETRY.start();
                if std::mem::take(&mut failing) {
                    info!(generation_id = %id, stored, "the store is reachable again");
                }
            }
            Ok(Written::Expected { next }) if next <= generation.token_count() => {
                info!(generation_id = %id, stored, next, "the store holds another length: writing from there");
                stored = next;
            }
            Ok(Written::Missing) => {
                warn!(generation_id = %id, "the store lost this generation: writing it again");
                if store.create(&id, &owner).await.is_ok() {
                    stored = 0;
                }
            }
            Ok(Written::Fenced | Written::Leased | Written::Expected { .. }) => {
                warn!(generation_id = %id, "another instance ended this generation: stopping");
                if generation.status() == Status::Running {
                    generation.finish(Outcome::Failed {
                        code: OWNER_LOST,
                        message: "this instance lost its lease on the generation".into(),
                    });
                }
                return;
            }
            Err(error) => {
                if !std::mem::replace(&mut failing, true) {
                    warn!(generation_id = %id, %error, "cannot write to the store; retrying");
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(*RETRY.end());
            }
        }
    }
}
