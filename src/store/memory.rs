//! The store in one process's memory: the same contract as Redis (fencing by lease, expected
//! index, idempotency, live feed, control channel), so that several hubs in one process behave
//! like several instances on one Redis. The hub's cross-instance invariants are tested on it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use bytes::Bytes;
use futures_util::future::{self, BoxFuture};
use tokio::sync::mpsc;

use super::{
    listeners::{self, Listener, Listeners},
    Claimed, End, IdempotencyClaim, Lifetimes, LiveEvent, LiveSender, Meta, Store, StoreError,
    Watch, Written,
};

#[derive(Default)]
struct Entry {
    owner: String,
    lease_until: Option<Instant>,
    log: Vec<Bytes>,
    end: Option<End>,
}

#[derive(Default)]
struct State {
    generations: HashMap<String, Entry>,
    idempotency: HashMap<(String, String), Claimed>,
}

pub struct MemoryStore {
    lifetimes: Lifetimes,
    state: Mutex<State>,
    /// Live feeds by generation id, control channels by owner name.
    listeners: Arc<Mutex<Listeners>>,
}

impl MemoryStore {
    pub fn new(lifetimes: Lifetimes) -> Self {
        Self {
            lifetimes,
            state: Mutex::default(),
            listeners: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self, id: &str, event: &LiveEvent) {
        listeners::lock(&self.listeners).publish(id, event);
    }

    /// Forgets a generation, as a restart without persistence would.
    #[cfg(test)]
    pub fn lose(&self, id: &str) {
        self.lock().generations.remove(id);
    }

    /// Keeps only the first `len` entries of a log, as a store that lost its tail would.
    #[cfg(test)]
    pub fn truncate_log(&self, id: &str, len: usize) {
        if let Some(entry) = self.lock().generations.get_mut(id) {
            entry.log.truncate(len);
        }
    }
}

impl Entry {
    fn leased_by_other(&self, owner: &str) -> bool {
        self.lease_until.is_some_and(|until| until > Instant::now()) && self.owner != owner
    }

    fn leased(&self) -> bool {
        self.lease_until.is_some_and(|until| until > Instant::now())
    }
}

impl Store for MemoryStore {
    fn create<'a>(&'a self, id: &'a str, owner: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        let lease_until = Some(Instant::now() + self.lifetimes.lease);
        self.lock().generations.insert(
            id.to_owned(),
            Entry {
                owner: owner.to_owned(),
                lease_until,
                ..Entry::default()
            },
        );
        Box::pin(future::ready(Ok(())))
    }

    fn discard<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        self.lock().generations.remove(id);
        Box::pin(future::ready(Ok(())))
    }

    fn claim_idempotency<'a>(
        &'a self,
        claim: &'a IdempotencyClaim,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Claimed>, StoreError>> {
        let mut state = self.lock();
        let key = (claim.scope.clone(), claim.key.clone());
        let existing = state.idempotency.get(&key).cloned();
        if existing.is_none() {
            state.idempotency.insert(
                key,
                Claimed {
                    body_hash: claim.body_hash,
                    id: id.to_owned(),
                },
            );
        }
        Box::pin(future::ready(Ok(existing)))
    }

    fn append<'a>(
        &'a self,
        id: &'a str,
        owner: &'a str,
        first: u64,
        entries: &'a [Bytes],
    ) -> BoxFuture<'a, Result<Written, StoreError>> {
        let lease = self.lifetimes.lease;
        let mut state = self.lock();
        let written = match state.generations.get_mut(id) {
            None => Written::Missing,
            Some(entry) if entry.end.is_some() || entry.leased_by_other(owner) => Written::Fenced,
            Some(entry) if entry.log.len() as u64 != first => Written::Expected {
                next: entry.log.len() as u64,
            },
            Some(entry) => {
                entry.owner = owner.to_owned();
                entry.lease_until = Some(Instant::now() + lease);
                entry.log.extend_from_slice(entries);
                Written::Done
            }
        };
        drop(state);
        if written == Written::Done {
            self.publish(
                id,
                &LiveEvent::Entries {
                    first,
                    entries: entries.to_vec(),
                },
            );
        }
        Box::pin(future::ready(Ok(written)))
    }

    fn renew<'a>(
        &'a self,
        id: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<Written, StoreError>> {
        let lease = self.lifetimes.lease;
        let written = match self.lock().generations.get_mut(id) {
            None => Written::Missing,
            Some(entry) if entry.end.is_some() || entry.leased_by_other(owner) => Written::Fenced,
            Some(entry) => {
                entry.lease_until = Some(Instant::now() + lease);
                Written::Done
            }
        };
        Box::pin(future::ready(Ok(written)))
    }

    fn finish<'a>(
        &'a self,
        id: &'a str,
        owner: Option<&'a str>,
        end: &'a End,
    ) -> BoxFuture<'a, Result<Written, StoreError>> {
        let mut state = self.lock();
        let written = match (state.generations.get_mut(id), owner) {
            (None, _) => Written::Missing,
            (Some(entry), _) if entry.end.is_some() => Written::Fenced,
            (Some(entry), None) if entry.leased() => Written::Leased,
            (Some(entry), Some(owner)) if entry.leased_by_other(owner) => Written::Fenced,
            (Some(entry), Some(_)) if entry.log.len() as u64 != end.token_count => {
                Written::Expected {
                    next: entry.log.len() as u64,
                }
            }
            (Some(entry), _) => {
                let mut end = end.clone();
                end.token_count = entry.log.len() as u64;
                entry.end = Some(end);
                entry.lease_until = None;
                Written::Done
            }
        };
        drop(state);
        if written == Written::Done {
            self.publish(id, &LiveEvent::Ended);
        }
        Box::pin(future::ready(Ok(written)))
    }

    fn meta<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Meta>, StoreError>> {
        let meta = self.lock().generations.get(id).map(|entry| Meta {
            owner: entry.owner.clone(),
            status: entry
                .end
                .as_ref()
                .map_or_else(|| "running".to_owned(), |end| end.status.clone()),
            next: entry.log.len() as u64,
            leased: entry.leased(),
            end: entry.end.clone(),
        });
        Box::pin(future::ready(Ok(meta)))
    }

    fn read<'a>(
        &'a self,
        id: &'a str,
        from: u64,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Bytes>, StoreError>> {
        let entries = self
            .lock()
            .generations
            .get(id)
            .map(|entry| {
                let start = usize::try_from(from)
                    .unwrap_or(usize::MAX)
                    .min(entry.log.len());
                let end = start.saturating_add(max).min(entry.log.len());
                entry.log[start..end].to_vec()
            })
            .unwrap_or_default();
        Box::pin(future::ready(Ok(entries)))
    }

    fn watch<'a>(
        &'a self,
        id: &'a str,
        sender: LiveSender,
    ) -> BoxFuture<'a, Result<Box<dyn Watch>, StoreError>> {
        let (registration, _) = Listeners::add(&self.listeners, id, Listener::Live(sender), None);
        Box::pin(future::ready(Ok(registration)))
    }

    fn request_cancel<'a>(
        &'a self,
        owner: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let heard = listeners::lock(&self.listeners).request(owner, id) > 0;
        Box::pin(future::ready(Ok(heard)))
    }

    fn listen_for_cancels<'a>(
        &'a self,
        owner: &'a str,
        sender: mpsc::Sender<String>,
    ) -> BoxFuture<'a, Result<Box<dyn Watch>, StoreError>> {
        let listener = Listener::Control(sender);
        let (registration, _) = Listeners::add(&self.listeners, owner, listener, None);
        Box::pin(future::ready(Ok(registration)))
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(future::ready(Ok(())))
    }
}
