//! A TCP stream that gives up on a peer that stops reading.
//!
//! hyper, blocked on a full socket, never polls the response body again, so neither dropping a
//! subscriber's channel nor ending its stream closes a client that stopped reading: its socket
//! and buffers would stay forever. This wrapper fails a write that has made no progress for the
//! write timeout, which ends the connection; the socket is then reset (zero linger) so the
//! kernel frees its send queue at once instead of retrying an unread peer.
//!
//! The stream is shared (`Arc`): a subscriber connection lends it to the fan-out, which writes
//! a lone viewer's token while the connection's task is idle (`subscriber.rs`). Reads and
//! writes go through readiness and `try_*`, which take the stream by reference.

use std::{
    io,
    net::Shutdown,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};

use socket2::SockRef;

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{Instant, Sleep},
};
use tracing::debug;

use crate::metrics;

pub struct WriteTimeout {
    stream: Arc<TcpStream>,
    timeout: Duration,
    /// Allocated the first time a write blocks; most connections never need it.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether `timer` is counting a write that is blocked now.
    armed: bool,
}

impl WriteTimeout {
    pub fn new(stream: TcpStream, timeout: Duration) -> Self {
        Self {
            stream: Arc::new(stream),
            timeout,
            timer: None,
            armed: false,
        }
    }

    pub fn stream(&self) -> &Arc<TcpStream> {
        &self.stream
    }

    /// Called with the result of a write: progress disarms the timer, a blocked write arms it
    /// (once) and fails when it fires.
    fn check<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.armed = false;
            return poll;
        }
        let deadline = Instant::now() + self.timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
        }
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        debug!("peer accepted no bytes for the write timeout; closing the connection");
        ::metrics::counter!(metrics::WRITE_TIMEOUTS).increment(1);
        // Best effort: if it fails the socket still closes, only less abruptly.
        let _ = self.stream.set_zero_linger();
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "write timed out",
        )))
    }
}

use std::future::Future;

/// Runs a non-blocking socket call until it does not report `WouldBlock`, waiting for readiness
/// in between (what `TcpStream`'s own `poll_*` do, by reference).
fn poll_io<T>(
    cx: &mut Context<'_>,
    mut poll_ready: impl FnMut(&mut Context<'_>) -> Poll<io::Result<()>>,
    mut call: impl FnMut() -> io::Result<T>,
) -> Poll<io::Result<T>> {
    loop {
        ready!(poll_ready(cx))?;
        match call() {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            result => return Poll::Ready(result),
        }
    }
}

impl AsyncRead for WriteTimeout {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let stream = &self.stream;
        let read = ready!(poll_io(
            cx,
            |cx| stream.poll_read_ready(cx),
            || stream.try_read(buf.initialize_unfilled())
        ))?;
        buf.advance(read);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for WriteTimeout {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let stream = &this.stream;
        let poll = poll_io(
            cx,
            |cx| stream.poll_write_ready(cx),
            || stream.try_write(buf),
        );
        this.check(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let stream = &this.stream;
        let poll = poll_io(
            cx,
            |cx| stream.poll_write_ready(cx),
            || stream.try_write_vectored(bufs),
        );
        this.check(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the socket: nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(SockRef::from(&*self.stream).shutdown(Shutdown::Write))
    }
}
