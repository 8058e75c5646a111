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
//!
//! A receiver whose bytes go straight to a socket can lend the sender its writer
//! ([`Receiver::lend_writer`]): while nothing is queued and the receiver's task is idle, the
//! sender writes a frame itself ([`Sender::try_send_or_write`]) instead of queueing it and
//! waking that task, which is the cost of a second task per token that a lone viewer's
//! connection otherwise pays (`loadtest/RESULTS.md`, "The chat path's added latency").

use bytes::{Buf, Bytes};
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

/// What [`Sender::try_send_or_write`] did with a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// The whole frame is in the receiver's socket; nothing was queued.
    Written,
    Queued,
}

/// A receiver's socket writer, which the sender may use while the receiver's own task has
/// nothing to write (between its writes, it refuses).
pub trait IdleWriter: Send + Sync {
    /// Writes what the socket takes of `bytes` now, without waiting: the count written, or
    /// `None` when the receiver's task is writing itself or the socket failed (the receiver's
    /// own write then meets the failure).
    fn write_now(&self, bytes: &[u8]) -> Option<usize>;
}

pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        capacity,
        inner: Mutex::new(Inner {
            items: VecDeque::new(),
            sender_gone: false,
            receiver_gone: false,
            waker: None,
            writer: None,
            written: 0,
        }),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared, written: 0 },
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
    /// The receiver's lent writer.
    writer: Option<Arc<dyn IdleWriter>>,
    /// Frames the sender wrote itself since the receiver last looked.
    written: u64,
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

    /// Like [`Sender::try_send`] with `wrap(frame)`, but when nothing is queued and the receiver
    /// lent an idle writer, writes the frame to it instead; the part the socket did not take
    /// is queued (`wrap` of the rest), as the receiver's task would have had it left to write.
    pub fn try_send_or_write(
        &self,
        frame: &Bytes,
        wrap: impl FnOnce(Bytes) -> T,
    ) -> Result<Sent, TrySendError> {
        let mut inner = self.shared.lock();
        if inner.receiver_gone || inner.sender_gone {
            return Err(TrySendError::Closed);
        }
        let mut rest = frame.clone();
        if let (true, Some(writer)) = (inner.items.is_empty(), &inner.writer) {
            match writer.write_now(frame) {
                Some(written) if written == frame.len() => {
                    inner.written += 1;
                    return Ok(Sent::Written);
                }
                Some(written) => rest.advance(written),
                None => {}
            }
        }
        if inner.items.len() >= self.shared.capacity {
            return Err(TrySendError::Full);
        }
        inner.items.push_back(wrap(rest));
        let waker = inner.waker.take();
        drop(inner);
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(Sent::Queued)
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
    /// Frames the sender wrote itself, counted by [`Receiver::poll_recv`] until taken.
    written: u64,
}

impl<T> Receiver<T> {
    /// Lets the sender write frames to `writer` while nothing is queued.
    pub fn lend_writer(&mut self, writer: Arc<dyn IdleWriter>) {
        self.shared.lock().writer = Some(writer);
    }

    /// How many frames the sender wrote itself, in order before anything received since the
    /// last call.
    pub fn take_written(&mut self) -> u64 {
        std::mem::take(&mut self.written)
    }

    /// Items waiting to be received (for the queue-depth metric).
    pub fn queued(&self) -> usize {
        self.shared.lock().items.len()
    }

    /// The next item; `None` once the sender is gone and everything it sent was received.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut inner = self.shared.lock();
        // Written frames came before anything queued: they were written only when it was empty.
        self.written += std::mem::take(&mut inner.written);
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
        // Free what the subscriber will never read now, not when the sender notices; the
        // writer holds the socket, which must close with the connection.
        inner.items = VecDeque::new();
        inner.writer = None;
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

    /// A socket that takes at most `room` more bytes, and only while `idle`.
    struct FakeSocket {
        state: Mutex<(bool, usize, Vec<u8>)>,
    }

    impl FakeSocket {
        fn new(idle: bool, room: usize) -> Arc<Self> {
            Arc::new(Self {
                state: Mutex::new((idle, room, Vec::new())),
            })
        }

        fn written(&self) -> Vec<u8> {
            self.state.lock().unwrap().2.clone()
        }
    }

    impl IdleWriter for FakeSocket {
        fn write_now(&self, bytes: &[u8]) -> Option<usize> {
            let (idle, room, written) = &mut *self.state.lock().unwrap();
            if !*idle {
                return None;
            }
            let take = bytes.len().min(*room);
            *room -= take;
            written.extend_from_slice(&bytes[..take]);
            Some(take)
        }
    }

    async fn recv(rx: &mut Receiver<Bytes>) -> Option<Bytes> {
        poll_fn(|cx| rx.poll_recv(cx)).await
    }

    #[tokio::test]
    async fn an_idle_writer_takes_frames_while_nothing_is_queued_and_the_receiver_counts_them() {
        let (tx, mut rx) = channel::<Bytes>(4);
        let socket = FakeSocket::new(true, 1000);
        rx.lend_writer(socket.clone());
        for frame in ["a", "b"] {
            let sent = tx.try_send_or_write(&Bytes::from(frame), |rest| rest);
            assert_eq!(sent, Ok(Sent::Written));
        }
        assert_eq!(socket.written(), b"ab");
        assert_eq!(rx.queued(), 0);
        drop(tx);
        assert_eq!(recv(&mut rx).await, None);
        assert_eq!(rx.take_written(), 2);
        assert_eq!(rx.take_written(), 0);
    }

    #[tokio::test]
    async fn what_the_socket_does_not_take_is_queued_and_nothing_overtakes_it() {
        let (tx, mut rx) = channel::<Bytes>(4);
        let socket = FakeSocket::new(true, 3);
        rx.lend_writer(socket.clone());
        // Half of "t0t0" fits: the rest is queued, so "t1" must queue behind it though the
        // socket has room again.
        assert_eq!(
            tx.try_send_or_write(&Bytes::from("t0t0"), |rest| rest),
            Ok(Sent::Queued)
        );
        socket.state.lock().unwrap().1 = 100;
        assert_eq!(
            tx.try_send_or_write(&Bytes::from("t1"), |rest| rest),
            Ok(Sent::Queued)
        );
        assert_eq!(socket.written(), b"t0t");
        assert_eq!(recv(&mut rx).await.as_deref(), Some(&b"0"[..]));
        assert_eq!(recv(&mut rx).await.as_deref(), Some(&b"t1"[..]));
        assert_eq!(
            rx.take_written(),
            0,
            "a partly written frame is received, not counted"
        );
        // Drained: the writer is used again.
        assert_eq!(
            tx.try_send_or_write(&Bytes::from("t2"), |rest| rest),
            Ok(Sent::Written)
        );
    }

    #[test]
    fn a_busy_writer_or_a_full_channel_is_the_plain_queue() {
        let (tx, mut rx) = channel::<Bytes>(1);
        let socket = FakeSocket::new(false, 100);
        rx.lend_writer(socket.clone());
        let frame = Bytes::from("t0");
        assert_eq!(tx.try_send_or_write(&frame, |rest| rest), Ok(Sent::Queued));
        assert_eq!(
            tx.try_send_or_write(&frame, |rest| rest),
            Err(TrySendError::Full)
        );
        assert!(socket.written().is_empty());
        drop(rx);
        assert_eq!(
            tx.try_send_or_write(&frame, |rest| rest),
            Err(TrySendError::Closed)
        );
        assert_eq!(
            Arc::strong_count(&socket),
            1,
            "the socket went with the receiver"
        );
    }
}
