//! The hot path's invariant, counted: a token costs the gateway the same number of heap
//! allocations whether 10 or 100 subscribers receive it (its frame is encoded once and shared;
//! queues, wake-ups and socket writes allocate nothing per subscriber).
//!
//! The gateway runs on a runtime of its own whose thread is the only one whose allocations are
//! counted; the mock LLM and the clients run on the test's runtime. Counts, not times: this is
//! not a timed test.

mod common;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use serde_json::json;
use tokenfan::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Set on the gateway's runtime thread only. `const` and `Cell<bool>`: no lazy
    /// initialisation and no destructor, so reading it inside the allocator cannot allocate or
    /// touch a destroyed value.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds
// `GlobalAlloc`'s contract; counting touches only an atomic and a thread-local `Cell<bool>`
// (which `try_with` reads without ever allocating or panicking).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn count() {
    if COUNTED.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

/// Token ids between which allocations are counted: after every subscriber is live, before
/// the end. A long window, because a subscriber may still allocate once or twice after going
/// live (measured: ~2 each over the window, whatever its length), which must not read as a
/// per-token cost.
const FROM: u64 = 20;
const TO: u64 = 320;

#[tokio::test]
async fn a_token_costs_the_same_allocations_for_10_or_100_subscribers() {
    let mock_addr = common::start_mock().await;
    let gateway = start_counted_gateway(format!("http://{mock_addr}/v1")).await;
    let http = reqwest::Client::new();

    let per_token_10 = allocations_per_token(&http, gateway, 10).await;
    let per_token_100 = allocations_per_token(&http, gateway, 100).await;

    eprintln!(
        "gateway allocations per token (mock upstream read, log, fan-out): \
         {per_token_10:.1} with 10 subscribers, {per_token_100:.1} with 100"
    );
    let per_extra_delivery = (per_token_100 - per_token_10) / 90.0;
    assert!(
        per_extra_delivery < 0.05,
        "{per_extra_delivery:.2} allocations per extra subscriber per token \
         ({per_token_10:.1} per token with 10 subscribers, {per_token_100:.1} with 100)"
    );
}

/// A gateway on a one-thread runtime of its own, the only thread whose allocations count.
async fn start_counted_gateway(upstream: String) -> std::net::SocketAddr {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(|| COUNTED.with(|counted| counted.set(true)))
        .enable_all()
        .build()
        .unwrap();
    let (bound, addr) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let mut config = Config::defaults();
            config.upstream.url = Some(upstream);
            let listener = tokenfan::bind("127.0.0.1:0".parse().unwrap(), 1024).unwrap();
            bound.send(listener.local_addr().unwrap()).unwrap();
            tokenfan::serve(listener, config, std::future::pending())
                .await
                .unwrap();
        });
    });
    addr.await.unwrap()
}

/// Starts a generation, subscribes `subscribers` raw clients, and counts the gateway's
/// allocations from the moment all of them have token `FROM` to the moment all have `TO`.
async fn allocations_per_token(
    http: &reqwest::Client,
    gateway: std::net::SocketAddr,
    subscribers: usize,
) -> f64 {
    // Tokens 20 ms apart: every subscriber is idle again long before the next one, so no
    // queue grows and no write is batched; the first token waits for everyone to subscribe.
    let knobs = json!({"tokens": TO + 20, "interval_ms": 20, "first_token_ms": 1000});
    let id = common::create_generation(http, &format!("http://{gateway}"), knobs).await;
    let reached_from = Arc::new(AtomicUsize::new(0));
    let reached_to = Arc::new(AtomicUsize::new(0));
    for _ in 0..subscribers {
        let mut socket = tokio::net::TcpStream::connect(gateway).await.unwrap();
        let request = format!("GET /v1/generations/{id}/events HTTP/1.1\r\nHost: t\r\n\r\n");
        socket.write_all(request.as_bytes()).await.unwrap();
        let (reached_from, reached_to) = (reached_from.clone(), reached_to.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buf = [0; 8192];
            let (from, to) = (format!("\nid: {FROM}\n"), format!("\nid: {TO}\n"));
            let mut counted_from = false;
            while let Ok(read @ 1..) = socket.read(&mut buf).await {
                seen.extend_from_slice(&buf[..read]);
                let text = String::from_utf8_lossy(&seen);
                if !counted_from && text.contains(&from) {
                    counted_from = true;
                    reached_from.fetch_add(1, Ordering::SeqCst);
                }
                if text.contains(&to) {
                    reached_to.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                // Keep only a tail long enough to hold a split `id:` line.
                let keep = seen.len().saturating_sub(64);
                seen.drain(..keep);
            }
        });
    }
    let before = wait_for(&reached_from, subscribers).await;
    let after = wait_for(&reached_to, subscribers).await;
    (after - before) as f64 / (TO - FROM) as f64
}

/// Waits until `count` subscribers reached a mark; returns the allocation count then.
async fn wait_for(reached: &AtomicUsize, count: usize) -> u64 {
    tokio::time::timeout(common::WAIT, async {
        while reached.load(Ordering::SeqCst) < count {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the subscribers did not all get there");
    ALLOCATIONS.load(Ordering::Relaxed)
}
