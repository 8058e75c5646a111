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
    Watch, Write, WriteOp, Written,
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
    /// Every `write` call, for the writer's tests: each write's id and kind.
    #[cfg(test)]
    calls: Mutex<Vec<Vec<(String, WriteKind)>>>,
    /// Generations whose writes fail as if the store were unreachable.
    #[cfg(test)]
    unreachable_for: Mutex<std::collections::HashSet<String>>,
    /// Live feeds by generation id, control channels by owner name.
    listeners: Arc<Mutex<Listeners>>,
}

impl MemoryStore {
    pub fn new(lifetimes: Lifetimes) -> Self {
        Self {
            lifetimes,
            state: Mutex::default(),
            #[cfg(test)]
            calls: Mutex::default(),
            #[cfg(test)]
            unreachable_for: Mutex::default(),
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

    /// The `write` calls so far: each write's id and kind.
    #[cfg(test)]
    pub fn calls(&self) -> Vec<Vec<(String, WriteKind)>> {
        self.calls
            .lock()
            .map(|calls| calls.clone())
            .unwrap_or_default()
    }

    /// Makes every write to `id` fail as an unreachable store's would, or (false) succeed again.
    #[cfg(test)]
    pub fn set_unreachable_for(&self, id: &str, unreachable: bool) {
        if let Ok(mut ids) = self.unreachable_for.lock() {
            if unreachable {
                ids.insert(id.to_owned());
            } else {
                ids.remove(id);
            }
        }
    }

    /// Keeps only the first `len` entries of a log, as a store that lost its tail would.
    #[cfg(test)]
    pub fn truncate_log(&self, id: &str, len: usize) {
        if let Some(entry) = self.lock().generations.get_mut(id) {
            entry.log.truncate(len);
        }
    }
}

impl MemoryStore {
    /// Every append takes or renews the lease here: keeping time costs nothing in memory.
    fn append(&self, id: &str, owner: &str, first: u64, entries: &[Bytes]) -> Written {
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
        if written == Written::Done && !entries.is_empty() {
            self.publish(
                id,
                &LiveEvent::Entries {
                    first,
                    entries: entries.to_vec(),
                },
            );
        }
        written
    }

    fn end(&self, id: &str, owner: Option<&str>, end: &End) -> Written {
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
        written
    }
}

/// What one write was, as the writer's tests see it.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// Entries appended (possibly 0), and whether the lease was to be renewed.
    Append { count: usize, renew: bool },
    /// The end, at this many tokens.
    Finish { token_count: u64 },
}

#[cfg(test)]
impl WriteKind {
    fn of(write: &Write<'_>) -> (String, Self) {
        let kind = match &write.op {
            WriteOp::Append { entries, renew, .. } => Self::Append {
                count: entries.len(),
                renew: *renew,
            },
            WriteOp::Finish(end) => Self::Finish {
                token_count: end.token_count,
            },
        };
        (write.id.to_owned(), kind)
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

    /// Keys here live as long as the process: there is no retention to shorten.
    fn release_idempotency<'a>(
        &'a self,
        _claim: &'a IdempotencyClaim,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(future::ready(Ok(())))
    }

    fn write<'a>(
        &'a self,
        owner: &'a str,
        writes: &'a [Write<'a>],
    ) -> BoxFuture<'a, Vec<Result<Written, StoreError>>> {
        #[cfg(test)]
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(writes.iter().map(WriteKind::of).collect());
        }
        let written = writes
            .iter()
            .map(|write| {
                #[cfg(test)]
                if self
                    .unreachable_for
                    .lock()
                    .is_ok_and(|ids| ids.contains(write.id))
                {
                    return Err(StoreError::Unavailable("unreachable (test)".into()));
                }
                Ok(match &write.op {
                    WriteOp::Append { first, entries, .. } => {
                        self.append(write.id, owner, *first, entries)
                    }
                    WriteOp::Finish(end) => self.end(write.id, Some(owner), end),
                })
            })
            .collect();
        Box::pin(future::ready(written))
    }

    fn finish<'a>(
        &'a self,
        id: &'a str,
        owner: Option<&'a str>,
        end: &'a End,
    ) -> BoxFuture<'a, Result<Written, StoreError>> {
        Box::pin(future::ready(Ok(self.end(id, owner, end))))
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
