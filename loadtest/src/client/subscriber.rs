//! One SSE subscriber: connects from its source address, reads the stream through the chunked
//! decoder and SSE parser, checks every token id arrives exactly once and in order and that the
//! generation ends as planned, records receipt − emit latency, and reconnects with
//! `Last-Event-ID` after `event: reconnect` the way a browser's EventSource does — on the next
//! gateway instance when there are several, as a load balancer would send it elsewhere. Its
//! [`Behaviour`] may also make it stall, close its connection and come back, or leave.
//!
//! All subscribers of a worker run on one thread (a `LocalSet`), so they share plain
//! `RefCell` counters instead of atomics; no borrow is held across an `.await`.

use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::connect::connect_from;
use super::http::{events_request, parse_head, MAX_HEAD_BYTES};
use super::payload::{contains, emit_stamp_us, u64_member};
use super::sse::{EventKind, SseBody, SseEvent};
use super::stats::Counters;
use crate::metrics::latency::BySide;

/// Smallest read buffer per subscriber. Token events are ~100 bytes; a small buffer keeps 20K
/// clients in ~40 MB and a burst is simply read in several calls.
pub const MIN_READ_BUFFER: usize = 2048;

/// What every subscriber of a worker shares.
pub struct Shared {
    /// The gateway instances (several only in a cluster); a client resumes on the next one.
    pub gateways: Vec<SocketAddr>,
    pub counters: RefCell<Counters>,
    /// Receipt − emit in microseconds, for clients that keep reading, kept apart by whether
    /// the client was connected to its generation's owner.
    pub latency: RefCell<BySide<Histogram<u64>>>,
    /// Receipt − emit in microseconds of streams read straight from the mock (`chatpath`).
    pub direct_latency: RefCell<Histogram<u64>>,
    /// Per client told to reconnect by a draining instance: microseconds from its last token
    /// there to its next token from the instance it resumed on (the hand-over a viewer sees).
    pub handover_gap: RefCell<Histogram<u64>>,
    /// Flips to true when clients must close their streams and stop.
    pub leave: watch::Receiver<bool>,
    pub policy: Policy,
}

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Resume after `reason: shutdown`? Not in `drain`, where the only gateway goes away; yes
    /// in `cluster-drain`, where the other instances serve on from the store.
    pub resume_after_shutdown: bool,
    /// Reconnections one client may make before it gives up.
    pub max_reconnects: u32,
    /// Read buffer per subscriber: `MIN_READ_BUFFER`, larger when tokens are padded.
    pub read_buffer: usize,
    /// Wait before reconnecting after a dropped stream or failed connect (no `retry:` given).
    pub backoff: Duration,
}

/// What a client does besides reading, once it has read `after_tokens` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    /// Reads to the end.
    Read,
    /// Stops reading for a while, to be evicted as a slow consumer, then reads on (and resumes
    /// after the `event: reconnect` behind its backlog).
    Stall {
        after_tokens: u64,
        pause_ms: u64,
        /// SO_RCVBUF, so back-pressure reaches the gateway after kilobytes.
        recv_buffer: u32,
    },
    /// Closes its connection, then comes back after `away_ms` with `Last-Event-ID`.
    Reconnect { after_tokens: u64, away_ms: u64 },
    /// Closes its connection and does not come back.
    Leave { after_tokens: u64 },
}

impl Behaviour {
    fn after_tokens(&self) -> Option<u64> {
        match *self {
            Self::Read => None,
            Self::Stall { after_tokens, .. }
            | Self::Reconnect { after_tokens, .. }
            | Self::Leave { after_tokens } => Some(after_tokens),
        }
    }
}

/// How a generation will end, when the coordinator knows it (it told the mock): checked
/// against the terminal event each client receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expected {
    pub tokens: u64,
    /// `done` after all its tokens; false: `error` after `tokens`.
    pub completes: bool,
}

pub struct Plan {
    pub generation: Rc<str>,
    pub expect: Option<Expected>,
    pub source: Ipv4Addr,
    pub behaviour: Behaviour,
    /// The instance that owns the generation, and the one this client connects to first.
    pub owner: u32,
    pub first_instance: u32,
}

/// How one connection ended.
enum SessionEnd {
    Terminal,
    Reconnect {
        retry: Duration,
        shutdown: bool,
    },
    /// Connect failure, HTTP error, or the stream ended without an event saying why.
    Failed,
    /// The client closed the connection on purpose; it comes back after this long, or never.
    Closed {
        back_after: Option<Duration>,
    },
}

/// Per-client state that survives reconnections.
struct Progress {
    next_id: u64,
    /// The client's behaviour has happened (once per client).
    acted: bool,
    /// Unix µs of the last token received, on any instance.
    last_token_us: u64,
    /// Set when a draining instance told the client to reconnect: the time of its last token
    /// there, until the next token arrives and the gap is recorded.
    handed_over_at: Option<u64>,
}

/// Runs one subscriber until its generation ends, it gives up, or the worker says leave.
pub async fn run(plan: Plan, shared: Rc<Shared>) {
    let mut leave = shared.leave.clone();
    let mut progress = Progress {
        next_id: 0,
        acted: false,
        last_token_us: 0,
        handed_over_at: None,
    };
    let mut buf = vec![0u8; shared.policy.read_buffer.max(MIN_READ_BUFFER)];
    let mut attempts = 0u32;
    let left = loop {
        let instance = (plan.first_instance as usize + attempts as usize) % shared.gateways.len();
        let end = tokio::select! {
            end = session(&plan, &shared, instance, &mut progress, &mut buf) => end,
            _ = leave.wait_for(|go| *go) => break true,
        };
        let wait = match end {
            SessionEnd::Terminal | SessionEnd::Closed { back_after: None } => break false,
            SessionEnd::Reconnect { shutdown: true, .. }
                if !shared.policy.resume_after_shutdown =>
            {
                break false
            }
            SessionEnd::Reconnect { retry, shutdown } => {
                // A client that had no token yet has no gap to measure.
                if shutdown && progress.last_token_us > 0 {
                    progress.handed_over_at = Some(progress.last_token_us);
                }
                retry
            }
            SessionEnd::Failed => shared.policy.backoff,
            SessionEnd::Closed {
                back_after: Some(away),
            } => away,
        };
        attempts += 1;
        if attempts > shared.policy.max_reconnects {
            shared.counters.borrow_mut().gave_up += 1;
            break false;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = leave.wait_for(|go| *go) => break true,
        }
        shared.counters.borrow_mut().reconnects += 1;
    };
    let mut counters = shared.counters.borrow_mut();
    counters.ended += 1;
    if left {
        counters.left += 1;
    }
}

/// Keeps the `connected` gauge right even when the session future is dropped by `leave`.
pub(super) struct ConnectedGuard<'a>(pub(super) &'a RefCell<Counters>);

impl Drop for ConnectedGuard<'_> {
    fn drop(&mut self) {
        self.0.borrow_mut().connected -= 1;
    }
}

async fn session(
    plan: &Plan,
    shared: &Shared,
    instance: usize,
    progress: &mut Progress,
    buf: &mut [u8],
) -> SessionEnd {
    let recv_buffer = match plan.behaviour {
        Behaviour::Stall { recv_buffer, .. } => Some(recv_buffer),
        _ => None,
    };
    let gateway = shared.gateways[instance];
    let mut stream = match connect_from(plan.source, gateway, recv_buffer).await {
        Ok(stream) => stream,
        Err(_) => {
            shared.counters.borrow_mut().connect_errors += 1;
            return SessionEnd::Failed;
        }
    };
    let last_id = progress.next_id.checked_sub(1);
    let subscribed_at = unix_micros();
    let request = events_request(gateway, &plan.generation, last_id);
    if stream.write_all(&request).await.is_err() {
        shared.counters.borrow_mut().connect_errors += 1;
        return SessionEnd::Failed;
    }
    let Some((chunked, body_start, filled)) = read_head(&mut stream, buf, shared).await else {
        return SessionEnd::Failed;
    };
    if body_start == usize::MAX {
        // 204: the generation ended before our Last-Event-ID; nothing left to deliver.
        return SessionEnd::Terminal;
    }
    shared.counters.borrow_mut().connects += 1;
    shared.counters.borrow_mut().connected += 1;
    let _guard = ConnectedGuard(&shared.counters);
    let mut reader = StreamReader {
        body: SseBody::new(chunked),
        subscribed_at,
        record_latency: !matches!(plan.behaviour, Behaviour::Stall { .. }),
        on_owner: instance == plan.owner as usize,
        expect: plan.expect,
        end: None,
    };
    let mut range = body_start..filled;
    loop {
        let now = unix_micros();
        if reader.consume(&buf[range.clone()], now, progress, shared) {
            let mut counters = shared.counters.borrow_mut();
            counters.keepalives += reader.body.parser.comments();
            if reader.end.is_none() {
                counters.dropped_streams += 1;
            }
            return reader.finish(shared.policy.backoff);
        }
        if let Some(end) = act(plan.behaviour, progress, shared).await {
            shared.counters.borrow_mut().keepalives += reader.body.parser.comments();
            return end;
        }
        match stream.read(buf).await {
            Ok(0) | Err(_) => {
                let mut counters = shared.counters.borrow_mut();
                counters.keepalives += reader.body.parser.comments();
                counters.dropped_streams += 1;
                return SessionEnd::Failed;
            }
            Ok(n) => range = 0..n,
        }
    }
}

/// Carries out the client's behaviour once it has read enough tokens: a stall sleeps here
/// (the socket stays open, unread); closing ends the session.
async fn act(behaviour: Behaviour, progress: &mut Progress, shared: &Shared) -> Option<SessionEnd> {
    let after = behaviour.after_tokens()?;
    if progress.acted || progress.next_id < after {
        return None;
    }
    progress.acted = true;
    match behaviour {
        Behaviour::Read => None,
        Behaviour::Stall { pause_ms, .. } => {
            shared.counters.borrow_mut().stalls += 1;
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
            None
        }
        Behaviour::Reconnect { away_ms, .. } => {
            shared.counters.borrow_mut().disconnects += 1;
            Some(SessionEnd::Closed {
                back_after: Some(Duration::from_millis(away_ms)),
            })
        }
        Behaviour::Leave { .. } => {
            shared.counters.borrow_mut().left_midstream += 1;
            Some(SessionEnd::Closed { back_after: None })
        }
    }
}

/// Reads until the response head is complete. Returns (chunked, body start, bytes filled), with
/// body start `usize::MAX` for a 204; `None` after counting an error.
pub(super) async fn read_head(
    stream: &mut TcpStream,
    buf: &mut [u8],
    shared: &Shared,
) -> Option<(bool, usize, usize)> {
    let mut filled = 0;
    loop {
        let limit = buf.len().min(MAX_HEAD_BYTES);
        let n: usize = stream
            .read(&mut buf[filled..limit])
            .await
            .unwrap_or_default();
        if n == 0 {
            shared.counters.borrow_mut().connect_errors += 1;
            return None;
        }
        filled += n;
        match parse_head(&buf[..filled]) {
            Ok(None) if filled < limit => continue,
            Ok(Some(head)) if head.status == 200 => return Some((head.chunked, head.len, filled)),
            Ok(Some(head)) if head.status == 204 => return Some((false, usize::MAX, filled)),
            Ok(Some(_)) => shared.counters.borrow_mut().http_errors += 1,
            Ok(None) | Err(_) => shared.counters.borrow_mut().protocol_errors += 1,
        }
        return None;
    }
}

/// Decoding and verification state of one open stream.
struct StreamReader {
    body: SseBody,
    subscribed_at: u64,
    record_latency: bool,
    on_owner: bool,
    expect: Option<Expected>,
    end: Option<SessionEnd>,
}

impl StreamReader {
    /// Feeds received bytes; true when the stream is over: a terminal or reconnect event, bad
    /// framing, or the body's last chunk (the connection itself may stay open: keep-alive).
    fn consume(
        &mut self,
        bytes: &[u8],
        now: u64,
        progress: &mut Progress,
        shared: &Shared,
    ) -> bool {
        let Self {
            body,
            subscribed_at,
            record_latency,
            on_owner,
            expect,
            end,
        } = self;
        let handle = |ev: SseEvent<'_>| {
            if end.is_none() {
                let timing = Timing {
                    now,
                    subscribed_at: *subscribed_at,
                    record: *record_latency,
                    on_owner: *on_owner,
                };
                *end = on_event(ev, timing, *expect, progress, shared);
            }
        };
        if body.feed(bytes, handle).is_err() {
            shared.counters.borrow_mut().protocol_errors += 1;
            return true;
        }
        self.end.is_some() || self.body.ended()
    }

    /// How the stream ended, with the server's `retry:` (or `default_retry`) for a reconnect.
    fn finish(self, default_retry: Duration) -> SessionEnd {
        match self.end {
            Some(SessionEnd::Reconnect { shutdown, .. }) => SessionEnd::Reconnect {
                retry: self
                    .body
                    .parser
                    .retry_ms()
                    .map_or(default_retry, Duration::from_millis),
                shutdown,
            },
            Some(end) => end,
            None => SessionEnd::Failed,
        }
    }
}

/// When an event arrived, and whether its latency is recorded.
#[derive(Clone, Copy)]
struct Timing {
    now: u64,
    subscribed_at: u64,
    record: bool,
    on_owner: bool,
}

fn on_event(
    ev: SseEvent<'_>,
    timing: Timing,
    expect: Option<Expected>,
    progress: &mut Progress,
    shared: &Shared,
) -> Option<SessionEnd> {
    let Timing {
        now,
        subscribed_at,
        record: record_latency,
        on_owner,
    } = timing;
    let mut counters = shared.counters.borrow_mut();
    match ev.kind {
        EventKind::Token => {
            let Some(id) = ev.id else {
                counters.protocol_errors += 1;
                return None;
            };
            if id < progress.next_id {
                counters.duplicate_tokens += 1;
                return None;
            }
            counters.missing_tokens += id - progress.next_id;
            progress.next_id = id + 1;
            counters.tokens += 1;
            counters.last_token_us = counters.last_token_us.max(now);
            progress.last_token_us = now;
            if let Some(since) = progress.handed_over_at.take() {
                let _ = shared
                    .handover_gap
                    .borrow_mut()
                    .record(now.saturating_sub(since).max(1));
            }
            match emit_stamp_us(ev.data) {
                Some(emitted) if emitted >= subscribed_at => {
                    counters.live_tokens += 1;
                    if record_latency {
                        let _ = shared
                            .latency
                            .borrow_mut()
                            .side(on_owner)
                            .record(now.saturating_sub(emitted).max(1));
                    }
                }
                Some(_) => counters.replayed_tokens += 1,
                None => counters.unstamped_tokens += 1,
            }
            None
        }
        EventKind::Done | EventKind::Error => {
            counters.last_terminal_us = counters.last_terminal_us.max(now);
            let completed = ev.kind == EventKind::Done;
            if expect.is_some_and(|e| e.completes != completed || e.tokens != progress.next_id) {
                counters.unexpected_endings += 1;
            }
            if !completed {
                counters.generation_errors += 1;
                // Its id is the token count, like `done`'s: the tokens before it all arrived.
                if ev.id != Some(progress.next_id) {
                    counters.error_mismatches += 1;
                }
                return Some(SessionEnd::Terminal);
            }
            counters.done += 1;
            let announced = u64_member(ev.data, "token_count");
            if announced != Some(progress.next_id) || ev.id != Some(progress.next_id) {
                counters.done_mismatches += 1;
            }
            counters.lost_tokens += announced.unwrap_or(0).saturating_sub(progress.next_id);
            Some(SessionEnd::Terminal)
        }
        EventKind::Reconnect => {
            counters.last_terminal_us = counters.last_terminal_us.max(now);
            let shutdown = contains(ev.data, b"\"shutdown\"");
            if shutdown {
                counters.shutdown_reconnects += 1;
            } else if contains(ev.data, b"\"slow_consumer\"") {
                counters.evictions += 1;
            } else {
                counters.other_reconnects += 1;
            }
            // `retry:` is parser state; `StreamReader::finish` fills it in.
            Some(SessionEnd::Reconnect {
                retry: Duration::ZERO,
                shutdown,
            })
        }
        EventKind::Message | EventKind::Other => {
            counters.unknown_events += 1;
            None
        }
    }
}

pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::latency::new_histogram;
    use tokio::net::TcpListener;
    use tokio::task::LocalSet;

    fn chunk(payload: &str) -> String {
        format!("{:x}\r\n{payload}\r\n", payload.len())
    }

    fn token(id: u64, stamp: u64) -> String {
        chunk(&format!(
            "id: {id}\nevent: token\ndata: {{\"index\":{id},\"text\":\"{stamp} w\"}}\n\n"
        ))
    }

    const HEAD: &str =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

    /// Serves one canned response per connection and returns each request's head.
    async fn serve(responses: Vec<String>) -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = tokio::spawn(async move {
            let mut requests = Vec::new();
            for response in responses {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let n = socket.read(&mut buf).await.unwrap();
                requests.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                socket.write_all(response.as_bytes()).await.unwrap();
                // Keep-alive: the body ends with its last chunk, not with a close.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            requests
        });
        (addr, handle)
    }

    /// Runs one client of a generation owned by the first of `gateways`, connecting there
    /// first; returns its counters, how many tokens were timed on each side, and its
    /// hand-over gaps.
    async fn run_on(gateways: Vec<SocketAddr>) -> (Counters, BySide<u64>, Histogram<u64>) {
        let (_leave_tx, leave) = watch::channel(false);
        let shared = Rc::new(Shared {
            gateways,
            counters: RefCell::new(Counters::default()),
            latency: RefCell::new(BySide::new().unwrap()),
            direct_latency: RefCell::new(new_histogram().unwrap()),
            handover_gap: RefCell::new(new_histogram().unwrap()),
            leave,
            policy: Policy {
                resume_after_shutdown: true,
                max_reconnects: 3,
                backoff: Duration::from_millis(10),
                read_buffer: MIN_READ_BUFFER,
            },
        });
        let plan = Plan {
            generation: Rc::from("gen_1"),
            expect: None,
            source: Ipv4Addr::new(127, 0, 0, 1),
            behaviour: Behaviour::Read,
            owner: 0,
            first_instance: 0,
        };
        LocalSet::new().run_until(run(plan, shared.clone())).await;
        let counters = shared.counters.borrow().clone();
        let timed = shared.latency.borrow().map(Histogram::len);
        assert_eq!(timed.owner + timed.non_owner, counters.live_tokens);
        let gaps = shared.handover_gap.borrow().clone();
        (counters, timed, gaps)
    }

    async fn run_one(addr: SocketAddr) -> Counters {
        let (counters, timed, _) = run_on(vec![addr]).await;
        assert_eq!(timed.non_owner, 0);
        counters
    }

    #[tokio::test]
    async fn a_resume_goes_to_the_next_instance_and_is_timed_as_a_non_owner_viewer() {
        let now = unix_micros() + 1_000_000;
        let owner = format!(
            "{HEAD}{}{}0\r\n\r\n",
            token(0, now),
            chunk("retry: 10\nevent: reconnect\ndata: {\"reason\":\"slow_consumer\"}\n\n"),
        );
        let other = format!(
            "{HEAD}{}{}{}0\r\n\r\n",
            token(1, now),
            token(2, now),
            chunk("id: 3\nevent: done\ndata: {\"status\":\"completed\",\"token_count\":3}\n\n"),
        );
        let (first, first_server) = serve(vec![owner]).await;
        let (second, second_server) = serve(vec![other]).await;
        let (c, timed, gaps) = run_on(vec![first, second]).await;
        assert_eq!((c.tokens, c.reconnects, c.done), (3, 1, 1));
        assert_eq!(c.delivery_errors(), 0);
        assert_eq!((timed.owner, timed.non_owner), (1, 2));
        // An eviction is not a hand-over.
        assert!(gaps.is_empty());
        assert!(!first_server.await.unwrap()[0].contains("Last-Event-ID"));
        assert!(second_server.await.unwrap()[0].contains("\r\nLast-Event-ID: 0\r\n"));
    }

    #[tokio::test]
    async fn a_shutdown_hand_over_waits_the_servers_retry_and_records_the_gap() {
        let now = unix_micros() + 1_000_000;
        let draining = format!(
            "{HEAD}{}{}0\r\n\r\n",
            token(0, now),
            chunk("retry: 300\nevent: reconnect\ndata: {\"reason\":\"shutdown\"}\n\n"),
        );
        let other = format!(
            "{HEAD}{}{}0\r\n\r\n",
            token(1, now),
            chunk("id: 2\nevent: done\ndata: {\"status\":\"completed\",\"token_count\":2}\n\n"),
        );
        let (first, _first_server) = serve(vec![draining]).await;
        let (second, second_server) = serve(vec![other]).await;
        let (c, _, gaps) = run_on(vec![first, second]).await;
        assert_eq!((c.tokens, c.shutdown_reconnects, c.done), (2, 1, 1));
        assert_eq!(c.delivery_errors(), 0);
        // One gap, at least the 300 ms `retry:` the draining instance asked for.
        assert_eq!(gaps.len(), 1);
        assert!(gaps.min() >= 300_000, "gap {} µs", gaps.min());
        assert!(second_server.await.unwrap()[0].contains("\r\nLast-Event-ID: 0\r\n"));
    }

    #[tokio::test]
    async fn a_complete_stream_is_verified_and_timed() {
        let now = unix_micros() + 1_000_000;
        let body = format!(
            "{HEAD}{}{}{}{}{}0\r\n\r\n",
            chunk(": keep-alive\n\n"),
            token(0, now),
            token(1, now),
            token(2, now),
            chunk("id: 3\nevent: done\ndata: {\"status\":\"completed\",\"token_count\":3}\n\n"),
        );
        let (addr, server) = serve(vec![body]).await;
        let c = run_one(addr).await;
        assert_eq!((c.tokens, c.live_tokens, c.done, c.ended), (3, 3, 1, 1));
        assert_eq!((c.delivery_errors(), c.keepalives, c.connected), (0, 1, 0));
        let requests = server.await.unwrap();
        assert!(!requests[0].contains("Last-Event-ID"));
    }

    #[tokio::test]
    async fn an_evicted_client_resumes_after_its_last_id_and_gaps_are_counted() {
        let old = unix_micros() - 5_000_000;
        let first = format!(
            "{HEAD}{}{}{}0\r\n\r\n",
            token(0, old),
            token(1, old),
            chunk("retry: 20\nevent: reconnect\ndata: {\"reason\":\"slow_consumer\"}\n\n"),
        );
        let second = format!(
            "{HEAD}{}{}0\r\n\r\n",
            token(3, old),
            chunk("id: 4\nevent: done\ndata: {\"status\":\"completed\",\"token_count\":4}\n\n"),
        );
        let (addr, server) = serve(vec![first, second]).await;
        let c = run_one(addr).await;
        assert_eq!((c.evictions, c.reconnects, c.connects), (1, 1, 2));
        assert_eq!((c.tokens, c.replayed_tokens, c.live_tokens), (3, 3, 0));
        assert_eq!((c.missing_tokens, c.done, c.done_mismatches), (1, 1, 0));
        let requests = server.await.unwrap();
        assert!(
            requests[1].contains("\r\nLast-Event-ID: 1\r\n"),
            "{}",
            requests[1]
        );
    }

    #[tokio::test]
    async fn a_body_that_ends_without_a_terminal_event_is_a_dropped_stream() {
        let now = unix_micros();
        let cut = format!("{HEAD}{}0\r\n\r\n", token(0, now));
        let gone = "HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n".to_string();
        let (addr, server) = serve(vec![cut, gone]).await;
        let c = run_one(addr).await;
        assert_eq!(
            (c.dropped_streams, c.reconnects, c.tokens, c.ended),
            (1, 1, 1, 1)
        );
        let requests = server.await.unwrap();
        assert!(requests[1].contains("Last-Event-ID: 0"));
    }
}
