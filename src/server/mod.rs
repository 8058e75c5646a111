//! The accept loop and the per-connection tasks.
//!
//! We accept and spawn connections ourselves instead of `axum::serve`, for three reasons: each
//! connection can be killed (a drain must close connections whose endless SSE body would
//! otherwise never end — axum #2673), each socket gets a write timeout, and what a connection
//! costs is ours to choose. A connection's first task only looks at its request line and
//! spawns the task that serves it: `subscriber.rs` for a connection that opens with a
//! subscription (≈1.2 KB per idle subscriber, measured), hyper's `http1` connection builder for
//! every other (≈10.5 KB per idle SSE connection; `axum::serve` ≈23 KB).

pub mod subscriber;
mod write_timeout;

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::Router;
use futures_util::FutureExt;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use pin_project_lite::pin_project;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    time::Instant,
};
use tokio_util::{sync::WaitForCancellationFutureOwned, task::TaskTracker};
use tracing::{debug, warn};

use crate::{
    config::ConnectionConfig,
    drain::{Drain, Phase},
    metrics,
};
use write_timeout::WriteTimeout;

/// Longest pause after a failed accept (e.g. out of file descriptors).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// File descriptors kept for everything but client connections (upstream calls, the mock,
/// logs) when the connection limit is derived from the open-files limit.
const RESERVED_DESCRIPTORS: u64 = 1024;

/// The connection limit when none is configured: what the open-files limit leaves after a
/// reserve, so that accept never fails for lack of descriptors while upstream calls need some.
pub fn default_max_connections() -> usize {
    let (soft, _hard) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
    let usable = soft.saturating_sub(RESERVED_DESCRIPTORS).max(soft / 2);
    usize::try_from(usable).unwrap_or(usize::MAX)
}

/// Binds a listener with a large backlog: tokio's `TcpListener::bind` uses 128, and the burst
/// of reconnects after another instance drains needs far more.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

pub struct Server {
    pub listener: TcpListener,
    pub router: Router,
    /// Serves connections beyond `max_connections`.
    pub over_capacity_router: Router,
    pub config: ConnectionConfig,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub drain: Drain,
    pub connections: TaskTracker,
}

impl Server {
    /// Accepts connections until the drain closes the listener.
    pub async fn run(self) {
        let open = Arc::new(AtomicUsize::new(0));
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = self.drain.closing() => return,
            };
            match accepted {
                Ok((stream, _peer)) => {
                    backoff = Duration::from_millis(5);
                    self.spawn_connection(stream, &open);
                }
                Err(error) => {
                    // Typically EMFILE: the process is at its open-files limit. Back off so
                    // that existing connections keep being served, and try again.
                    warn!(%error, ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                }
            }
        }
    }

    fn spawn_connection(&self, stream: TcpStream, open: &Arc<AtomicUsize>) {
        // SSE events are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        if let Some(size) = self.config.socket_send_buffer {
            if let Err(error) = socket2::SockRef::from(&stream).set_send_buffer_size(size) {
                debug!(%error, "could not set the socket send buffer");
            }
        }
        let guard = OpenConnection::count(open.clone());
        let over_capacity = guard.open_before >= self.max_connections;
        let router = if over_capacity {
            ::metrics::counter!(metrics::CONNECTIONS_SHED).increment(1);
            &self.over_capacity_router
        } else {
            &self.router
        };
        let connection = Connection {
            io: WriteTimeout::new(stream, self.config.write_timeout),
            router: router.clone(),
            header_read_timeout: self.config.header_read_timeout,
            max_header_bytes: self.max_header_bytes,
            one_request_only: over_capacity || self.drain.is_draining(),
            drain: self.drain.clone(),
            connections: self.connections.clone(),
            _open: guard,
        };
        self.connections.spawn(connection.start());
    }
}

struct Connection {
    io: WriteTimeout,
    router: Router,
    header_read_timeout: Duration,
    max_header_bytes: usize,
    /// Connections accepted during a drain or over capacity answer one request (a probe, a
    /// reconnect event) and close.
    one_request_only: bool,
    drain: Drain,
    connections: TaskTracker,
    _open: OpenConnection,
}

impl Connection {
    /// Looks at the connection's first request line, then hands the connection to a task of
    /// its own that serves it. Two tasks because a task's future is allocated at the size of
    /// its largest state for the task's whole life: hyper's connection state is ~2 KB, which a
    /// subscriber's task (~0.5 KB) would otherwise carry too.
    async fn start(self) {
        let head_deadline = Instant::now() + self.header_read_timeout;
        let first = subscriber::first_request_is_subscription(self.io.stream());
        let first = tokio::time::timeout_at(head_deadline, first);
        match UntilKilled::kill_only(self.drain.clone(), first).await {
            // Killed, or nothing useful came within the header timeout: close, as hyper would.
            None | Some(Err(_) | Ok(Err(_))) => {}
            Some(Ok(Ok(true))) => self.serve_subscriber(head_deadline),
            Some(Ok(Ok(false))) => self.serve_with_hyper(head_deadline),
        }
    }

    fn serve_subscriber(self, head_deadline: Instant) {
        let limits = subscriber::Limits {
            head_deadline,
            max_head_bytes: self.max_header_bytes,
        };
        let serve = subscriber::serve(self.io, self.router, limits);
        // A stream outlives the start of a drain by design (it ends with the generation or
        // with the drain's reconnect event); only the kill cuts it.
        let serve = UntilKilled::kill_only(self.drain, serve);
        spawn_serving(&self.connections, self._open, serve);
    }

    fn serve_with_hyper(self, head_deadline: Instant) {
        let accepted_while_draining = self.drain.is_draining();
        // hyper starts its header timer when it first reads, after our look at the request
        // line: given the full timeout, a head trickled past the look would get a second one.
        // The rest of it instead, so the head is due at the accept + the timeout. (hyper uses
        // one value for the connection: later requests of a connection whose first head
        // trickled get the shorter timeout too, which only a trickling client notices.)
        let header_read_timeout = head_deadline.saturating_duration_since(Instant::now());
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .max_buf_size(self.max_header_bytes)
            // hyper then copies each small SSE chunk (with its chunked-encoding framing) into
            // its write buffer and sends it with one send(2), which costs the kernel less than a
            // writev(2) of three slices (~7 % of the CPU per delivered event in a profile).
            .writev(false)
            .keep_alive(!self.one_request_only);
        let connection =
            builder.serve_connection(TokioIo::new(self.io), TowerToHyperService::new(self.router));
        // Let the response in flight (often an SSE stream) finish, then close.
        let graceful = (!accepted_while_draining).then_some(
            |connection: Pin<&mut http1::Connection<_, _>>| connection.graceful_shutdown(),
        );
        let serve = UntilKilled::new(self.drain, connection, graceful);
        spawn_serving(&self.connections, self._open, serve);
    }
}

/// Runs a connection's serving future as a task of its own; the connection stops counting as
/// open when it ends, however it ends (`None`: killed by the drain).
fn spawn_serving<E: std::fmt::Display>(
    connections: &TaskTracker,
    open: OpenConnection,
    serve: impl Future<Output = Option<Result<(), E>>> + Send + 'static,
) {
    connections.spawn(serve.map(move |served| {
        drop(open);
        if let Some(Err(error)) = served {
            debug!(%error, "connection ended with an error");
        }
    }));
}

pin_project! {
    /// Polls `work` until it ends (`Some` of its output) or the drain kills every connection
    /// (`None`); `on_draining` runs once when the drain begins. A struct rather than an
    /// `async fn`, which would hold `work` twice (as its argument and as its pinned local):
    /// this future lives as long as the connection.
    struct UntilKilled<F, D> {
        #[pin]
        work: F,
        #[pin]
        draining: WaitForCancellationFutureOwned,
        #[pin]
        killed: WaitForCancellationFutureOwned,
        drain: Drain,
        on_draining: Option<D>,
        // The drain phase when the drain's signals were last polled (`None`: never).
        seen: Option<Phase>,
    }
}

impl<F: Future, D: FnOnce(Pin<&mut F>)> UntilKilled<F, D> {
    fn new(drain: Drain, work: F, on_draining: Option<D>) -> Self {
        Self {
            work,
            draining: drain.draining(),
            killed: drain.killed(),
            drain,
            on_draining,
            seen: None,
        }
    }
}

impl<F: Future> UntilKilled<F, fn(Pin<&mut F>)> {
    /// For work that has nothing to do when the drain begins.
    fn kill_only(drain: Drain, work: F) -> Self {
        Self::new(drain, work, None)
    }
}

impl<F: Future, D: FnOnce(Pin<&mut F>)> Future for UntilKilled<F, D> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(output) = this.work.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        // The task is woken for every event it writes. Polling the drain's signals each
        // time took two shared mutexes per event (~3 % of the CPU per delivered event,
        // measured); once polled, a signal wakes the task by itself (a spawned task keeps
        // one waker for life), so they need another look only when the phase has moved.
        let phase = this.drain.phase();
        if *this.seen == Some(phase) {
            return Poll::Pending;
        }
        *this.seen = Some(phase);
        if this.killed.poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        if this.on_draining.is_some() && this.draining.poll(cx).is_ready() {
            if let Some(on_draining) = this.on_draining.take() {
                on_draining(this.work.as_mut());
            }
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

/// Keeps the open-connections count (for the limit) and gauge right however a connection
/// task ends.
struct OpenConnection {
    open: Arc<AtomicUsize>,
    /// Connections open when this one was accepted.
    open_before: usize,
}

impl OpenConnection {
    fn count(open: Arc<AtomicUsize>) -> Self {
        let open_before = open.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(metrics::CONNECTIONS_ACCEPTED).increment(1);
        ::metrics::gauge!(metrics::CONNECTIONS_OPEN).increment(1);
        Self { open, open_before }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        ::metrics::gauge!(metrics::CONNECTIONS_OPEN).decrement(1);
    }
}
