//! A generation's log as stored: every entry's SSE frame, back to back in large chunks.
//!
//! The frame is the only form an entry is kept in. Replay hands out the frames themselves (a
//! slice of a chunk, no copy), and the few readers that want the entry itself (the snapshot, the
//! store writer, the OpenAI-compatible stream) decode it back from its frame
//! ([`frame::decode`]). A logged token costs its frame's bytes and a 4-byte end offset, instead
//! of a `Delta`, its `String` and a `Bytes` handle to a frame of its own.
//!
//! Chunks grow from [`MIN_CHUNK`] to [`MAX_CHUNK`] bytes, so a short generation does not hold a
//! large buffer, and a long one allocates once per [`MAX_CHUNK`]. A frame larger than a chunk
//! gets one of its own, exactly its size.
//!
//! The generation's lock guards a `Log`; nothing here is shared or locked.

use std::sync::Arc;

use bytes::Bytes;
use tracing::error;

use super::{frame, Delta};

/// The first chunk's capacity: a generation of a few tokens holds no more than this.
const MIN_CHUNK: usize = 1024;
/// The largest chunk frames are gathered into (a jemalloc size class, like every size on the
/// way from [`MIN_CHUNK`]); larger ones save nothing more per token.
const MAX_CHUNK: usize = 64 * 1024;
/// A chunk sealed with more than this fraction of it unused (a large frame came next) is
/// shrunk to fit.
const SEALED_WASTE_DIVISOR: usize = 8;

/// A frame too large for the log's offsets (over 4 GiB); the log limits stop far sooner.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("a frame of {0} bytes is too large for the log")]
pub struct FrameTooLarge(pub usize);

/// Cloning is cheap but for the open chunk (at most [`MAX_CHUNK`] bytes, copied): the sealed
/// chunks are shared, which lets a reader decode a long log outside the generation's lock.
#[derive(Default, Clone)]
pub struct Log {
    /// Full chunks, oldest first.
    sealed: Vec<Sealed>,
    /// Memory held by the sealed chunks' frames and offsets.
    sealed_bytes: usize,
    /// The chunk frames are appended to.
    open: Open,
    /// The memory this log is counted as, for the hub's log budget: every chunk's capacity, not
    /// just the bytes used, and the offsets, at the most they have been since the last
    /// [`Log::shrink`] (see [`Log::recount`]).
    counted: usize,
}

/// A full chunk: shared, so a replay step is a slice of it.
#[derive(Clone)]
struct Sealed {
    /// The index of its first entry.
    first: usize,
    /// Where each entry's frame ends in `frames`.
    ends: Arc<[u32]>,
    frames: Bytes,
}

/// A chunk as read, sealed or open.
struct ChunkRef<'a> {
    first: usize,
    ends: &'a [u32],
    frames: &'a [u8],
    /// The sealed chunk's shared bytes, which a replay step slices.
    shared: Option<&'a Bytes>,
}

impl ChunkRef<'_> {
    /// Where the frame of the chunk's `at`-th entry begins.
    fn begin(&self, at: usize) -> usize {
        at.checked_sub(1)
            .map_or(0, |before| self.ends[before] as usize)
    }
}

#[derive(Default, Clone)]
struct Open {
    first: usize,
    ends: Vec<u32>,
    /// Never grown past its capacity: a frame that does not fit goes to the next chunk.
    frames: Vec<u8>,
}

impl Log {
    /// How many entries the log holds; the next one's index.
    pub fn len(&self) -> usize {
        self.open.first + self.open.ends.len()
    }

    /// Appends one entry's frame; returns how much the counted memory grew.
    pub fn append(&mut self, frame: &[u8]) -> Result<usize, FrameTooLarge> {
        let too_large = || FrameTooLarge(frame.len());
        u32::try_from(frame.len()).map_err(|_| too_large())?;
        if self.open.frames.capacity() - self.open.frames.len() < frame.len() {
            self.seal(frame.len());
        }
        self.open.frames.extend_from_slice(frame);
        let end = u32::try_from(self.open.frames.len()).map_err(|_| too_large())?;
        self.open.ends.push(end);
        Ok(self.recount())
    }

    /// Up to `max_bytes` of frames from entry `start` on (always at least one entry, and never
    /// past the end of a chunk), and the index after the last one; `None` past the end.
    pub fn read(&self, start: usize, max_bytes: usize) -> Option<(Bytes, usize)> {
        let chunk = self.chunk(start)?;
        let from = start - chunk.first;
        let begin = chunk.begin(from);
        let limit = begin.saturating_add(max_bytes);
        let taken = chunk.ends[from..]
            .partition_point(|&end| end as usize <= limit)
            .max(1);
        let range = begin..chunk.ends[from + taken - 1] as usize;
        let frames = match chunk.shared {
            Some(frames) => frames.slice(range),
            // The open chunk is still being written to: its bytes are copied out.
            None => Bytes::copy_from_slice(&chunk.frames[range]),
        };
        Some((frames, start + taken))
    }

    /// The frame of entry `index`.
    fn frame(&self, index: usize) -> Option<&[u8]> {
        let chunk = self.chunk(index)?;
        let at = index - chunk.first;
        chunk
            .frames
            .get(chunk.begin(at)..*chunk.ends.get(at)? as usize)
    }

    /// The chunk that holds entry `index`.
    fn chunk(&self, index: usize) -> Option<ChunkRef<'_>> {
        if index >= self.len() {
            return None;
        }
        // Sealed chunks are contiguous and the open one follows them: entry `index` is in the
        // last sealed chunk that starts at or before it, unless it is past that one's end.
        let at = self.sealed.partition_point(|chunk| chunk.first <= index);
        Some(match at.checked_sub(1).map(|at| &self.sealed[at]) {
            Some(chunk) if index < chunk.first + chunk.ends.len() => ChunkRef {
                first: chunk.first,
                ends: &chunk.ends,
                frames: &chunk.frames,
                shared: Some(&chunk.frames),
            },
            _ => ChunkRef {
                first: self.open.first,
                ends: &self.open.ends,
                frames: &self.open.frames,
                shared: None,
            },
        })
    }

    /// Entries `from..to` (clamped to the log), decoded from their frames.
    pub fn deltas(&self, from: usize, to: usize) -> impl Iterator<Item = Delta> + '_ {
        let to = to.min(self.len());
        (from.min(to)..to).map(|index| {
            let decoded = self
                .frame(index)
                .ok_or(frame::DecodeError::Shape)
                .and_then(frame::decode);
            decoded.unwrap_or_else(|err| {
                // Only a bug can get here: every frame was encoded by `frame::delta`. An empty
                // text keeps every later entry at its index.
                error!(%err, index, "a logged frame does not decode; read as an empty text");
                Delta::Text(String::new())
            })
        })
    }

    /// Gives back unused capacity, once nothing more will be appended (a finished
    /// generation, kept for its retention); returns how much the counted memory fell.
    pub fn shrink(&mut self) -> usize {
        self.open.frames.shrink_to_fit();
        self.open.ends.shrink_to_fit();
        self.sealed.shrink_to_fit();
        let now = self.memory();
        let freed = self.counted.saturating_sub(now);
        self.counted = now;
        freed
    }

    /// Closes the open chunk and opens one with room for at least `room` bytes.
    fn seal(&mut self, room: usize) {
        let capacity = (self.open.frames.capacity() * 2)
            .clamp(MIN_CHUNK, MAX_CHUNK)
            .max(room);
        let next = Open {
            first: self.len(),
            // About one offset per 64-byte frame, a short token's size.
            ends: Vec::with_capacity(capacity / 64),
            frames: Vec::with_capacity(capacity),
        };
        let Open {
            first,
            ends,
            mut frames,
        } = std::mem::replace(&mut self.open, next);
        if ends.is_empty() {
            return;
        }
        if frames.capacity() - frames.len() > frames.capacity() / SEALED_WASTE_DIVISOR {
            frames.shrink_to_fit();
        }
        let ends: Arc<[u32]> = Arc::from(ends);
        self.sealed_bytes += frames.capacity() + std::mem::size_of_val(&*ends);
        self.sealed.push(Sealed {
            first,
            ends,
            // A full `Vec` becomes `Bytes` without copying or allocating.
            frames: Bytes::from(frames),
        });
    }

    /// The memory the log holds now.
    fn memory(&self) -> usize {
        self.sealed_bytes
            + self.sealed.capacity() * std::mem::size_of::<Sealed>()
            + self.open.frames.capacity()
            + self.open.ends.capacity() * std::mem::size_of::<u32>()
    }

    /// Raises the counted memory to what the log holds now, if that is more; returns the
    /// rise. A shrink while sealing is not handed back before [`Log::shrink`]: the hub adds
    /// only growth, and this count is what it subtracts when it forgets the generation.
    fn recount(&mut self) -> usize {
        let now = self.memory();
        let grown = now.saturating_sub(self.counted);
        self.counted += grown;
        grown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(count: usize, width: usize) -> Vec<Vec<u8>> {
        (0..count)
            .map(|i| format!("{i:0width$}\n").into_bytes())
            .collect()
    }

    fn logged(frames: &[Vec<u8>]) -> Log {
        let mut log = Log::default();
        for frame in frames {
            log.append(frame).unwrap();
        }
        log
    }

    /// Reads the whole log in steps of at most `max` bytes, as a late joiner does.
    fn read_all(log: &Log, from: usize, max: usize) -> (Vec<u8>, Vec<usize>) {
        let (mut bytes, mut steps, mut cursor) = (Vec::new(), Vec::new(), from);
        while let Some((frames, next)) = log.read(cursor, max) {
            assert!(next > cursor);
            bytes.extend_from_slice(&frames);
            steps.push(next);
            cursor = next;
        }
        (bytes, steps)
    }

    #[test]
    fn replay_from_any_entry_returns_the_frames_in_order_across_chunks() {
        let frames = frames(3000, 40);
        let log = logged(&frames);
        assert_eq!(log.len(), 3000);
        assert!(
            log.sealed.len() >= 3,
            "several chunks: {}",
            log.sealed.len()
        );
        for from in [0, 1, 24, 25, 26, 1500, 2999] {
            let (bytes, _) = read_all(&log, from, 1000);
            assert_eq!(bytes, frames[from..].concat(), "from {from}");
        }
        assert!(log.read(3000, 1000).is_none());
    }

    #[test]
    fn a_step_stops_at_the_byte_limit_and_at_a_chunk_end_but_takes_at_least_one_entry() {
        let frames = frames(100, 99); // 100-byte frames
        let log = logged(&frames);
        assert_eq!(
            log.read(0, 350).map(|(b, next)| (b.len(), next)),
            Some((300, 3))
        );
        assert_eq!(
            log.read(5, 10).map(|(b, next)| (b.len(), next)),
            Some((100, 6))
        );
        // The first chunk (1 KiB) holds 10 frames: a step never crosses into the next.
        assert_eq!(log.sealed[0].ends.len(), 10);
        assert_eq!(
            log.read(8, 16384).map(|(b, next)| (b.len(), next)),
            Some((200, 10))
        );
    }

    #[test]
    fn a_sealed_chunk_is_sliced_not_copied() {
        let log = logged(&frames(100, 99));
        let (a, _) = log.read(0, 300).unwrap();
        let (b, _) = log.read(0, 300).unwrap();
        assert_eq!(a.as_ptr(), b.as_ptr());
        assert_eq!(a.as_ptr(), log.sealed[0].frames.as_ptr());
    }

    #[test]
    fn a_frame_larger_than_a_chunk_gets_a_chunk_of_its_size() {
        let big = vec![b'x'; 3 * MAX_CHUNK];
        let mut log = Log::default();
        log.append(b"small\n").unwrap();
        log.append(&big).unwrap();
        log.append(b"after\n").unwrap();
        assert_eq!(log.read(1, 100).unwrap(), (Bytes::from(big.clone()), 2));
        assert_eq!(&log.read(0, usize::MAX).unwrap().0[..], b"small\n");
        assert_eq!(&log.read(2, usize::MAX).unwrap().0[..], b"after\n");
        // The chunk the small frame sat in was shrunk when sealed, the big one fits exactly.
        assert_eq!(log.sealed_bytes, 6 + 4 + big.len() + 4);
    }

    #[test]
    fn counted_memory_covers_capacity_grows_only_by_what_append_reports_and_shrinks_to_use() {
        let mut log = Log::default();
        let mut reported = 0;
        for frame in frames(5000, 60) {
            reported += log.append(&frame).unwrap();
            assert_eq!(log.counted, reported);
            assert!(reported >= log.memory());
        }
        // Unused room in the open chunk is counted while it can still be written to.
        assert!(reported >= 5000 * 61);
        let freed = log.shrink();
        assert_eq!(log.counted, reported - freed);
        // Once shrunk: the frames and a 4-byte offset each, and a little per chunk.
        let per_entry = log.counted as f64 / 5000.0;
        assert!((65.0..66.0).contains(&per_entry), "{per_entry}");
        let (bytes, _) = read_all(&log, 0, 16384);
        assert_eq!(bytes.len(), 5000 * 61);
    }

    #[test]
    fn a_clone_keeps_what_was_logged_and_shares_the_sealed_chunks() {
        let all = frames(3000, 60);
        let mut log = logged(&all[..2000]);
        let copy = log.clone();
        for frame in &all[2000..] {
            log.append(frame).unwrap();
        }
        assert_eq!(copy.len(), 2000);
        assert_eq!(
            read_all(&copy, 0, 16384).0,
            read_all(&log, 0, 16384).0[..2000 * 61]
        );
        let (original, cloned) = (log.read(0, 64).unwrap().0, copy.read(0, 64).unwrap().0);
        assert_eq!(
            original.as_ptr(),
            cloned.as_ptr(),
            "a sealed chunk is shared, not copied"
        );
    }

    #[test]
    fn an_empty_log_holds_nothing() {
        let mut log = Log::default();
        assert_eq!(log.len(), 0);
        assert!(log.read(0, 100).is_none());
        assert_eq!(log.deltas(0, 10).count(), 0);
        assert_eq!(log.shrink(), 0);
        assert_eq!(log.counted, 0);
    }

    /// Through a whole generation: what a late joiner replays is byte for byte what live
    /// viewers were sent, and the entries read back (snapshot, store writer, OpenAI stream)
    /// are the ones pushed.
    #[tokio::test]
    async fn a_generation_replays_the_frames_it_fanned_out_and_reads_its_entries_back() {
        use crate::hub::{
            delta::{Assembled, ToolCallDelta},
            Attach, Generation, LogLimits, Outbound, Outcome, Pushed,
        };
        let entry = |i: usize| match i % 4 {
            0 => Delta::Text(format!(" tok{i} \"q\"\n")),
            1 => Delta::Reasoning(format!("hm {i}")),
            2 => Delta::Text("é🦀".repeat(i % 50)),
            _ => Delta::ToolCall(Box::new(ToolCallDelta {
                index: (i % 2) as u32,
                id: (i % 8 == 3).then(|| format!("call_{i}")),
                name: None,
                arguments: format!("{{\"n\":{i}}}"),
            })),
        };
        let entries: Vec<Delta> = (0..3000).map(entry).collect();
        let generation = Generation::new("gen_test".into(), None);
        let Attach::Live(mut live) = generation.attach(0, 4000) else {
            panic!("an empty running generation takes a live viewer");
        };
        let limits = LogLimits {
            max_tokens: usize::MAX,
            max_bytes: usize::MAX,
        };
        for entry in &entries {
            let pushed = generation.push(entry.clone(), limits);
            assert!(matches!(pushed, Pushed::Logged { .. }), "{pushed:?}");
        }
        let mut sent = Vec::new();
        for _ in 0..entries.len() {
            match std::future::poll_fn(|cx| live.poll_recv(cx)).await {
                Some(Outbound::Token(frame)) => sent.extend_from_slice(&frame),
                other => panic!("{other:?}"),
            }
        }
        // Read while running (the open chunk is copied) and once ended and shrunk.
        for ended in [false, true] {
            if ended {
                generation.finish(Outcome::Completed);
                assert!(generation.shrink_log() > 0);
            }
            let (mut replayed, mut cursor) = (Vec::new(), 0);
            while let Attach::Replay { frames, next, .. } = generation.attach(cursor, 64) {
                assert!(frames.len() <= 16 * 1024 || next == cursor + 1);
                replayed.extend_from_slice(&frames);
                cursor = next;
            }
            assert_eq!(cursor, 3000);
            assert_eq!(replayed, sent);
            assert_eq!(generation.deltas(0, 3000), entries);
            assert_eq!(generation.deltas(2999, 5000), entries[2999..]);
            assert_eq!(generation.snapshot().content, Assembled::of(&entries));
            let stored: Vec<_> = entries[1000..1512].iter().map(Delta::encode).collect();
            assert_eq!(generation.entries_from(1000, 512), stored);
        }
    }

    #[test]
    fn entries_decode_back_from_their_frames() {
        let deltas = [
            Delta::Text("Hello".into()),
            Delta::Reasoning("hm".into()),
            Delta::Text(" world".into()),
        ];
        let mut log = Log::default();
        for (index, delta) in deltas.iter().enumerate() {
            log.append(&frame::delta(index as u64, delta)).unwrap();
        }
        assert_eq!(log.deltas(0, 10).collect::<Vec<_>>(), deltas);
        assert_eq!(log.deltas(1, 2).collect::<Vec<_>>(), deltas[1..2]);
        assert_eq!(log.deltas(3, 2).count(), 0);
    }
}
