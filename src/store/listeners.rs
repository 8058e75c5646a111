//! Who in this process listens to which store channel: replicas to a generation's live feed,
//! the hub to its owner's control channel. Shared by both stores; delivery never waits (a full
//! replica feed misses the message and finds the gap later).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
};

use tokio::sync::mpsc;

use super::{LiveEvent, LiveSender, Watch};

#[derive(Default)]
pub struct Listeners {
    feeds: HashMap<String, Vec<(u64, LiveSender)>>,
    controls: HashMap<String, Vec<(u64, mpsc::Sender<String>)>>,
    next_registration: u64,
}

/// What a listener receives.
pub enum Listener {
    Live(LiveSender),
    Control(mpsc::Sender<String>),
}

/// Called with the channel when its last listener goes (the Redis store unsubscribes then).
pub type OnLast = Box<dyn Fn(&str) + Send + Sync>;

pub fn lock(listeners: &Mutex<Listeners>) -> std::sync::MutexGuard<'_, Listeners> {
    listeners
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Listeners {
    /// Registers `listener` on `channel`; returns the registration (dropping it removes the
    /// listener) and whether it is the channel's first.
    pub fn add(
        shared: &Arc<Mutex<Self>>,
        channel: &str,
        listener: Listener,
        on_last: Option<OnLast>,
    ) -> (Box<dyn Watch>, bool) {
        let mut listeners = lock(shared);
        listeners.next_registration += 1;
        let number = listeners.next_registration;
        let first = match listener {
            Listener::Live(tx) => push(&mut listeners.feeds, channel, number, tx),
            Listener::Control(tx) => push(&mut listeners.controls, channel, number, tx),
        };
        let registration = Registration {
            listeners: Arc::downgrade(shared),
            channel: channel.to_owned(),
            number,
            on_last,
        };
        (Box::new(registration), first)
    }

    /// Whether anyone listens to `channel`.
    pub fn is_wanted(&self, channel: &str) -> bool {
        self.feeds.contains_key(channel) || self.controls.contains_key(channel)
    }

    /// Offers a live event to every replica listening to `channel`; false if none does.
    pub fn publish(&self, channel: &str, event: &LiveEvent) -> bool {
        let Some(feeds) = self.feeds.get(channel) else {
            return false;
        };
        for (_, tx) in feeds {
            let _ = tx.try_send(event.clone());
        }
        true
    }

    /// Delivers a cancel request on `channel`; returns how many listeners took it.
    pub fn request(&self, channel: &str, id: &str) -> usize {
        self.controls.get(channel).map_or(0, |controls| {
            controls
                .iter()
                .filter(|(_, tx)| tx.try_send(id.to_owned()).is_ok())
                .count()
        })
    }

    /// Tells every replica that the feed may have missed messages.
    pub fn resync_all(&self) {
        for (_, tx) in self.feeds.values().flatten() {
            let _ = tx.try_send(LiveEvent::Resync);
        }
    }

    /// Removes registration `number`; true if `channel` has no listener left.
    fn remove(&mut self, channel: &str, number: u64) -> bool {
        let mut emptied = false;
        if let Some(list) = self.feeds.get_mut(channel) {
            list.retain(|(n, _)| *n != number);
            emptied |= list.is_empty();
        }
        if let Some(list) = self.controls.get_mut(channel) {
            list.retain(|(n, _)| *n != number);
            emptied |= list.is_empty();
        }
        if emptied {
            self.feeds.remove(channel);
            self.controls.remove(channel);
        }
        emptied
    }
}

fn push<T>(map: &mut HashMap<String, Vec<(u64, T)>>, channel: &str, number: u64, tx: T) -> bool {
    let list = map.entry(channel.to_owned()).or_default();
    list.push((number, tx));
    list.len() == 1
}

/// One listener of a channel.
struct Registration {
    listeners: Weak<Mutex<Listeners>>,
    channel: String,
    number: u64,
    on_last: Option<OnLast>,
}

impl Watch for Registration {}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(listeners) = self.listeners.upgrade() else {
            return;
        };
        let last = lock(&listeners).remove(&self.channel, self.number);
        if let (true, Some(on_last)) = (last, &self.on_last) {
            on_last(&self.channel);
        }
    }
}
