//! `SseDecoder` on arbitrary bytes, split into arbitrary chunks.
//!
//! Input layout: byte 0 picks the chunking (a seed and a largest chunk size), byte 1 how many
//! times the rest is repeated (once, unless it is 0xFE or 0xFF: then 2^14 or 2^15 times, up to
//! just over 1 MiB, to reach the size limits; rare, as such runs are slow), the rest is the
//! body. Checked on every input:
//! - nothing panics;
//! - the chunked decode dispatches exactly the data of the whole-input decode, and ends with the
//!   same error (or none): framing never depends on where the network split the body;
//! - memory held while decoding in chunks is bounded by the longest line, the longest event and
//!   the chunk size, never by the body's length (a counting allocator measures it);
//! - a body too small to reach a limit (decoded, as replacement characters grow invalid
//!   UTF-8) decodes exactly as a naive reading of the WHATWG event-stream rules says.
#![no_main]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
};

use libfuzzer_sys::fuzz_target;
use tokenfan::upstream::sse::{SseDecoder, SseError, MAX_EVENT_BYTES};
use tokenfan_fuzz::Rng;

/// The largest body built by repetition: just past the limits, as such runs are the slow ones.
const MAX_BODY: usize = MAX_EVENT_BYTES + (64 << 10);

/// Bytes the decoder may hold while decoding in chunks of at most `chunk` bytes: the unparsed
/// buffer (the line being read plus a chunk) and the event data (the lines since the last blank
/// one, decoded), each at most doubled by `Vec` growth. Lengths are capped by the limits.
fn memory_bound(shape: &Shape, chunk: usize) -> usize {
    let line = shape.longest_line.min(MAX_EVENT_BYTES + 1);
    let block = shape.longest_block.min(MAX_EVENT_BYTES);
    2 * (line + chunk) + 2 * block + 1024
}

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[derive(Debug, PartialEq)]
struct Outcome {
    events: Vec<String>,
    error: Option<SseError>,
}

fn decode_whole(body: &[u8]) -> Outcome {
    let mut decoder = SseDecoder::default();
    decoder.push(body);
    let mut events = Vec::new();
    loop {
        match decoder.next_data() {
            Ok(Some(data)) => events.push(data.to_owned()),
            Ok(None) => {
                return Outcome {
                    events,
                    error: None,
                }
            }
            Err(error) => {
                return Outcome {
                    events,
                    error: Some(error),
                }
            }
        }
    }
}

/// Decodes `body` in chunks and checks each event against `expected` as it comes, storing
/// nothing, so that the allocator's peak measures the decoder alone.
fn check_chunked(body: &[u8], expected: &Outcome, shape: &Shape, rng: &mut Rng, max_chunk: usize) {
    let mut decoder = SseDecoder::default();
    let mut seen = 0;
    let mut rest = body;
    let baseline = LIVE.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);
    let error = 'feed: loop {
        if rest.is_empty() {
            break None;
        }
        let (chunk, tail) = rest.split_at((1 + rng.below(max_chunk)).min(rest.len()));
        rest = tail;
        decoder.push(chunk);
        loop {
            match decoder.next_data() {
                Ok(Some(data)) => {
                    assert_eq!(
                        Some(data),
                        expected.events.get(seen).map(String::as_str),
                        "event {seen} differs from the whole-input decode"
                    );
                    seen += 1;
                }
                Ok(None) => break,
                Err(error) => break 'feed Some(error),
            }
        }
    };
    let held = PEAK.load(Ordering::Relaxed).saturating_sub(baseline);
    assert!(
        held <= memory_bound(shape, max_chunk),
        "decoding {} bytes ({shape:?}) in chunks of at most {max_chunk} held {held} bytes",
        body.len()
    );
    assert_eq!(seen, expected.events.len(), "chunked decode lost events");
    assert_eq!(error, expected.error, "chunked decode ended differently");
}

/// Sizes in a body (decoded, so at least the raw sizes) that bound what a decoder must hold.
#[derive(Debug, Default)]
struct Shape {
    longest_line: usize,
    /// Lines and their endings since the last blank line: a superset of an event's data.
    longest_block: usize,
}

/// The WHATWG event-stream rules read literally, data only, no limits; and the body's shape.
fn reference(text: &str) -> (Vec<String>, Shape) {
    let mut rest = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut events = Vec::new();
    let mut data = String::new();
    let mut shape = Shape::default();
    let mut block = 0;
    // A last line without its end is not a line: it is discarded with its event.
    while let Some(end) = rest.find(['\r', '\n']) {
        let line = &rest[..end];
        let ending = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + ending..];
        shape.longest_line = shape.longest_line.max(line.len());
        block = if line.is_empty() {
            0
        } else {
            block + line.len() + 1
        };
        shape.longest_block = shape.longest_block.max(block);
        if line.is_empty() {
            if let Some(event) = data.strip_suffix('\n') {
                events.push(event.to_owned());
            }
            data.clear();
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        if field == "data" {
            data.push_str(value);
            data.push('\n');
        }
    }
    shape.longest_line = shape.longest_line.max(rest.len());
    shape.longest_block = shape.longest_block.max(block + rest.len());
    (events, shape)
}

fuzz_target!(|input: &[u8]| {
    let [chunking, repeat, payload @ ..] = input else {
        return;
    };
    let times = if *repeat < 0xFE {
        1
    } else {
        (1usize << (repeat - 0xF0)).min(MAX_BODY / payload.len().max(1))
    };
    let body = payload.repeat(times.max(1));

    let whole = decode_whole(&body);
    let text = String::from_utf8_lossy(&body);
    let (events, shape) = reference(&text);
    if text.len() <= MAX_EVENT_BYTES {
        assert_eq!(whole.error, None, "a limit was hit below the limit");
        assert_eq!(whole.events, events, "differs from the reference");
    }
    for event in &whole.events {
        assert!(event.len() < MAX_EVENT_BYTES, "an event above the limit");
    }

    let mut max_chunk = [1, 3, 17, 256, 4096][usize::from(chunking % 5)];
    if body.len() > 1 << 16 {
        // Byte by byte through megabytes would cost seconds per input.
        max_chunk = max_chunk.max(1024);
    }
    let mut rng = Rng(u64::from(*chunking));
    check_chunked(&body, &whole, &shape, &mut rng, max_chunk);
});
