//! What a generation's log costs: memory per logged token against the bytes of its frame, and
//! how fast the log is read back (a late joiner's replay through `Generation::attach`, the
//! snapshot, the store writer's `entries_from`).
//!
//! `cargo bench --bench log` (release). Memory is counted by this binary's global allocator
//! (bytes requested and not yet freed), so it does not depend on the machine's load; it does
//! not see the allocator's own rounding (jemalloc size classes). Times do depend on the load:
//! compare runs taken side by side, alternating builds. `cargo bench --bench log -- replay`
//! runs the replay part only (e.g. under `valgrind --tool=callgrind`).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    sync::atomic::{AtomicIsize, Ordering},
    time::{Duration, Instant},
};

use tokenfan::hub::{Attach, Delta, Generation, LogLimits, Outcome, Pushed};

struct Counting;

/// Bytes allocated and not freed, by everything in this process.
static LIVE: AtomicIsize = AtomicIsize::new(0);

fn size(bytes: usize) -> isize {
    isize::try_from(bytes).unwrap_or(isize::MAX)
}

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds
// `GlobalAlloc`'s contract; counting touches one atomic.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(size(layout.size()), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(size(layout.size()), Ordering::Relaxed);
        // SAFETY: `ptr` came from `System` with this layout, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(size(new_size) - size(layout.size()), Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const TOKENS: usize = 200_000;
const LIMITS: LogLimits = LogLimits {
    max_tokens: usize::MAX,
    max_bytes: usize::MAX,
};
/// Whole-log reads timed per measurement; the fastest and the median are printed.
const ROUNDS: usize = 15;

/// A token of `chars` ASCII characters, varied so that no two neighbours are equal.
fn token(i: usize, chars: usize) -> String {
    const WORDS: &str = " the quick brown fox jumps over a lazy dog and then some";
    let start = i % (WORDS.len() - chars);
    WORDS[start..start + chars].to_owned()
}

fn logged(tokens: usize, chars: usize) -> Generation {
    let generation = Generation::new("gen_bench".into(), None);
    for i in 0..tokens {
        let pushed = generation.push(Delta::Text(token(i, chars)), LIMITS);
        assert!(matches!(pushed, Pushed::Logged { .. }), "{pushed:?}");
    }
    generation
}

/// Reads the whole log as a late joiner does; returns the bytes of frames read.
#[inline(never)]
fn replay_all(generation: &Generation) -> usize {
    let mut cursor = 0;
    let mut bytes = 0;
    loop {
        match generation.attach(cursor, 64) {
            Attach::Replay { frames, next, .. } => {
                bytes += black_box(frames).len();
                cursor = next;
            }
            Attach::Live(_) | Attach::Ended(_) => return bytes,
        }
    }
}

fn memory(chars: usize) {
    let before = live();
    let generation = logged(TOKENS, chars);
    let running = live() - before;
    let counted = generation.log_bytes();
    generation.finish(Outcome::Completed);
    // What a finished generation keeps for its retention (the hub shrinks it when it ends).
    generation.shrink_log();
    let retained = live() - before;
    let frames = replay_all(&generation);
    let per_token = |bytes: isize| bytes as f64 / TOKENS as f64;
    let frame = frames as f64 / TOKENS as f64;
    println!(
        "{chars:>2}-char tokens: {:.1} B allocated per logged token, frame {frame:.1} B, \
         ratio {:.3}; log_bytes counts {:.1} B per token; ended and shrunk: {:.1} B, ratio {:.3}",
        per_token(running),
        per_token(running) / frame,
        counted as f64 / TOKENS as f64,
        per_token(retained),
        per_token(retained) / frame,
    );
}

fn timed(name: &str, tokens: usize, bytes: usize, mut read: impl FnMut()) {
    let mut times: Vec<Duration> = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            read();
            start.elapsed()
        })
        .collect();
    times.sort();
    let rate = |time: Duration| {
        (
            tokens as f64 / time.as_secs_f64() / 1e6,
            bytes as f64 / time.as_secs_f64() / 1e6,
        )
    };
    let (best_tokens, best_mb) = rate(times[0]);
    let (median_tokens, median_mb) = rate(times[ROUNDS / 2]);
    println!(
        "{name}: best {best_tokens:.2} M tokens/s ({best_mb:.0} MB/s), \
         median {median_tokens:.2} M tokens/s ({median_mb:.0} MB/s)",
    );
}

fn reads(chars: usize) {
    let generation = logged(TOKENS, chars);
    generation.finish(Outcome::Completed);
    let frames = replay_all(&generation);
    timed(&format!("{chars:>2}-char replay"), TOKENS, frames, || {
        black_box(replay_all(&generation));
    });
    timed(&format!("{chars:>2}-char snapshot"), TOKENS, frames, || {
        black_box(generation.snapshot());
    });
    timed(
        &format!("{chars:>2}-char entries_from"),
        TOKENS,
        frames,
        || {
            let mut from = 0;
            while from < TOKENS as u64 {
                let entries = generation.entries_from(from, 512);
                from += entries.len() as u64;
                black_box(entries);
            }
        },
    );
}

fn main() {
    let only_replay = std::env::args().any(|arg| arg == "replay");
    if only_replay {
        let generation = logged(TOKENS, 4);
        generation.finish(Outcome::Completed);
        black_box(replay_all(&generation));
        return;
    }
    for chars in [4, 20] {
        memory(chars);
    }
    for chars in [4, 20] {
        reads(chars);
    }
}
