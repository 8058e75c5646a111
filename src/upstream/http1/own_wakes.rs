//! Wakes that the response body's reader sends itself.
//!
//! hyper's connection and its body channel are both polled on the generation's task
//! (`Body::poll_chunk`). Taking a chunk from the body tells the connection it may read again,
//! and that wakes the connection's waker — the same task — so every token cost a second poll
//! of the whole task (the `select!`, the span, the stream adapters, a trip through the
//! scheduler) that found nothing to do. Measured with a probe on the task's poll: 200,797
//! polls for 100,240 tokens (`loadtest/RESULTS.md`, "The chat path: a second task, a second
//! poll, and the floor's runtime").
//!
//! So the connection and the body are polled with this waker instead of the task's: a wake
//! that arrives while the reader is polling them (from hyper, or from another thread at that
//! moment) is only noted, and a wake at any other time goes to the task as before. When the
//! reader ends its poll with a chunk, a noted wake is dropped: nothing is owed to a future that
//! returned `Ready`, and the next read polls the connection and the body first (what the socket
//! received meanwhile is in the runtime's readiness, not in the wake). When it ends waiting, a
//! noted wake goes to the task, as it would have: polling again at once instead could spin
//! forever on a wake that asks the task to yield first (tokio's cooperative budget).

use std::{
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    task::{Wake, Waker},
};

use futures_util::task::AtomicWaker;

const IDLE: u8 = 0;
const POLLING: u8 = 1;
/// Polling, and a wake came meanwhile.
const WOKEN: u8 = 2;

#[derive(Default)]
pub struct OwnWakes {
    state: AtomicU8,
    /// The reader's task, as of its last poll.
    task: AtomicWaker,
}

impl OwnWakes {
    /// A waker for what the reader polls, and the shared state it reports to.
    pub fn new() -> (Arc<Self>, Waker) {
        let wakes = Arc::new(Self::default());
        let waker = Waker::from(wakes.clone());
        (wakes, waker)
    }

    /// The reader starts polling on behalf of `task`.
    pub fn start(&self, task: &Waker) {
        self.task.register(task);
        self.state.store(POLLING, Ordering::Release);
    }

    /// The reader stops polling; `true` if a wake came since [`OwnWakes::start`]. Any wake
    /// after this goes to the task.
    pub fn stop(&self) -> bool {
        self.state.swap(IDLE, Ordering::AcqRel) == WOKEN
    }
}

impl Wake for OwnWakes {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            match state {
                // Waking the task when the reader has just started polling only costs a poll.
                IDLE => return self.task.wake(),
                POLLING => {
                    match self.state.compare_exchange(
                        POLLING,
                        WOKEN,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => return,
                        Err(now) => state = now,
                    }
                }
                _ => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A task waker that counts its wakes.
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_wake_while_polling_is_noted_for_the_reader_and_any_other_reaches_the_task() {
        let task = Arc::new(Counter(AtomicUsize::new(0)));
        let task_waker = Waker::from(task.clone());
        let (wakes, waker) = OwnWakes::new();

        wakes.start(&task_waker);
        waker.wake_by_ref();
        waker.wake_by_ref();
        assert_eq!(task.0.load(Ordering::SeqCst), 0, "the task was not woken");
        assert!(wakes.stop(), "the reader is told");
        assert!(!wakes.stop(), "once");

        waker.wake_by_ref();
        assert_eq!(
            task.0.load(Ordering::SeqCst),
            1,
            "after the poll, the task is woken"
        );
    }

    #[test]
    fn no_wake_from_another_thread_is_lost() {
        // Whatever the interleaving, each wake is either seen by the reader's `stop` or
        // delivered to the task.
        for _ in 0..2_000 {
            let task = Arc::new(Counter(AtomicUsize::new(0)));
            let task_waker = Waker::from(task.clone());
            let (wakes, waker) = OwnWakes::new();
            wakes.start(&task_waker);
            let other = std::thread::spawn(move || waker.wake());
            let noted = wakes.stop();
            other.join().unwrap();
            let delivered = task.0.load(Ordering::SeqCst);
            assert_eq!(usize::from(noted) + delivered, 1, "told exactly once");
        }
    }
}
