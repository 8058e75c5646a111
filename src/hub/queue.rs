//! The bounded channel between a generation and one subscriber.
//!
//! One exists per connected subscriber, so its size is multiplied by every connection: a
//! `tokio::sync::mpsc` channel allocates a 32-slot block up front (≈1.3 KB with our items)
//! even for a subscriber that never holds more than one event. This queue starts empty and
//! grows only as far as its subscriber actually lags, up to the capacity. It has exactly one
//! sender (the generation) and one receiver (the subscriber's stream), so a mutex around a
//! `VecDeque` and the receiver's waker is all it needs; the lock is held for a push or a pop.
//!
//! The sender can also end the channel with one last item past the capacity
//! ([`Sender::close_with`]): the receiver then gets everything queued, that item, and the end.
//! That is how a full subscriber learns it must go on from the log, and how a terminal event
//! reaches a subscriber whose channel is full.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

/// Why [`Sender::try_send`] refused an item.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError {
    /// The subscriber is `capacity` items behind.
    Full,
    /// The subscriber went away.
    Closed,
}

pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        capacity,
        inner: Mutex::new(Inner {
            items: VecDeque::new(),
            sender_gone: false,
            receiver_gone: false,
            waker: None,
        }),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

struct Shared<T> {
    capacity: usize,
    inner: Mutex<Inner<T>>,
}

struct Inner<T> {
    items: VecDeque<T>,
    sender_gone: bool,
    receiver_gone: bool,
    waker: Option<Waker>,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // Every critical section is a single push, pop or flag change: never inconsistent.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Sender<T> {
    /// Queues `item` unless the subscriber is full or gone; never waits.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError> {
        let mut inner = self.shared.lock();
        if inner.receiver_gone || inner.sender_gone {
            return Err(TrySendError::Closed);
        }
        if inner.items.len() >= self.shared.capacity {
            return Err(TrySendError::Full);
        }
        inner.items.push_back(item);
        let waker = inner.waker.take();
        drop(inner);
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Queues `last` whatever the capacity (one item more, once) and closes the channel: the
    /// receiver gets what is queued, then `last`, then the end. Nothing is sent after it.
    pub fn close_with(&self, last: T) {
        let mut inner = self.shared.lock();
        if inner.receiver_gone || inner.sender_gone {
            return;
        }
        inner.items.push_back(last);
        inner.sender_gone = true;
        let waker = inner.waker.take();
        drop(inner);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Whether the subscriber went away.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().receiver_gone
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.sender_gone = true;
        let waker = inner.waker.take();
        drop(inner);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// Items waiting to be received (for the queue-depth metric).
    pub fn queued(&self) -> usize {
        self.shared.lock().items.len()
    }

    /// The next item; `None` once the sender is gone and everything it sent was received.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut inner = self.shared.lock();
        if let Some(item) = inner.items.pop_front() {
            return Poll::Ready(Some(item));
        }
        if inner.sender_gone {
            return Poll::Ready(None);
        }
        match &mut inner.waker {
            Some(waker) => waker.clone_from(cx.waker()),
            None => inner.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.receiver_gone = true;
        // Free what the subscriber will never read now, not when the sender notices.
        inner.items = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    #[tokio::test]
    async fn delivers_in_order_then_ends_when_the_sender_is_gone() {
        let (tx, mut rx) = channel(4);
        for i in 0..3 {
            tx.try_send(i).unwrap();
        }
        drop(tx);
        let mut received = Vec::new();
        while let Some(item) = poll_fn(|cx| rx.poll_recv(cx)).await {
            received.push(item);
        }
        assert_eq!(received, [0, 1, 2]);
    }

    #[test]
    fn refuses_when_full_and_when_the_receiver_is_gone() {
        let (tx, rx) = channel(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(tx.try_send(3), Err(TrySendError::Full));
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.try_send(4), Err(TrySendError::Closed));
    }

    #[tokio::test]
    async fn a_full_channel_closes_with_one_last_item_past_its_capacity() {
        let (tx, mut rx) = channel(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        tx.close_with(99);
        assert_eq!(tx.try_send(3), Err(TrySendError::Closed));
        tx.close_with(100);
        let mut received = Vec::new();
        while let Some(item) = poll_fn(|cx| rx.poll_recv(cx)).await {
            received.push(item);
        }
        assert_eq!(received, [1, 2, 99]);
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_send() {
        let (tx, mut rx) = channel(1);
        let receiver = tokio::spawn(async move { poll_fn(|cx| rx.poll_recv(cx)).await });
        tokio::task::yield_now().await;
        tx.try_send(7).unwrap();
        assert_eq!(receiver.await.unwrap(), Some(7));
    }
}
