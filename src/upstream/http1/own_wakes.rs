//! Wakes that the response body's reader sends itself.
//!
//! hyper's connection and its body channel are both polled on the generation's task
//! (`Body::poll_chunk`). Taking a chunk from the body tells the connection it may read again,
//! and that wakes the connection's waker — the same task — so every token cost a second poll
//! of the whole task (the `select!`, the span, the stream adapters, a trip through the
//! scheduler) that found nothing to do. Measured with a probe on the task's poll: 200,797
//! polls for 100,240 tokens (`loadtest/RESULTS.md`, "Two polls per token").
//!
//! So the connection and the body are polled with this waker instead of the task's: a wake
//! that arrives while the reader is polling them (from hyper, or from another thread at that
//! moment) is only noted, and the reader polls them again itself before it waits; a wake at
//! any other time goes to the task as before. A wake noted while the reader ends its poll
//! with a chunk is dropped: the caller owes nothing to a future that returned `Ready`, and its
//! next read polls the connection and the body first.

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

    /// The reader stops polling; `true` if a wake came since [`OwnWakes::start`] (or since the
    /// last `true`), in which case it is still polling and must poll again before it waits.
    /// Any wake after a `false` goes to the task.
    pub fn stop(&self) -> bool {
        if self.state.swap(IDLE, Ordering::AcqRel) == WOKEN {
            self.state.store(POLLING, Ordering::Release);
            return true;
        }
        false
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
        assert!(wakes.stop(), "the reader must poll again");
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
            let mut noted = false;
            while wakes.stop() {
                noted = true;
            }
            other.join().unwrap();
            assert!(noted || task.0.load(Ordering::SeqCst) == 1);
        }
    }
}
