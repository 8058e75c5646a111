//! Idle keep-alive connections to the upstream, reused newest first. A connection is given out
//! only if the peer has not closed it (nor sent anything unasked) and it has been idle for less
//! than the timeout.

use std::{collections::VecDeque, sync::Mutex, time::Duration};

use super::Conn;
use tokio::time::Instant;

/// Idle keep-alive connections, newest at the back.
pub(super) struct Pool {
    idle: Mutex<VecDeque<(Instant, Conn)>>,
    idle_timeout: Duration,
}

impl Pool {
    pub(super) fn new(idle_timeout: Duration) -> Self {
        Self {
            idle: Mutex::new(VecDeque::new()),
            idle_timeout,
        }
    }

    /// The newest idle connection that is still open.
    pub(super) fn take(&self) -> Option<Conn> {
        let mut idle = self.lock();
        self.expire(&mut idle);
        while let Some((_, mut conn)) = idle.pop_back() {
            if conn.is_idle_and_open() {
                return Some(conn);
            }
        }
        None
    }

    pub(super) fn put(&self, conn: Conn) {
        let mut idle = self.lock();
        self.expire(&mut idle);
        idle.push_back((Instant::now(), conn));
    }

    /// Closes connections idle for longer than the timeout (the oldest are at the front).
    fn expire(&self, idle: &mut VecDeque<(Instant, Conn)>) {
        while idle
            .front()
            .is_some_and(|(since, _)| since.elapsed() >= self.idle_timeout)
        {
            idle.pop_front();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, Conn)>> {
        // A panic while holding the lock leaves a valid queue behind.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use hyper::client::conn::http1::Builder;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpStream;
    use tokio_util::either::Either;

    use super::*;

    /// A connected loopback pair: the client end as an idle connection, and the server end.
    async fn idle_connection() -> (Conn, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (sender, driver) = Builder::new()
            .handshake(TokioIo::new(Either::Left(client)))
            .await
            .unwrap();
        let conn = Conn {
            sender,
            driver,
            closed: false,
        };
        (conn, server)
    }

    #[tokio::test]
    async fn the_pool_gives_out_open_connections_only() {
        let pool = Pool::new(Duration::from_secs(60));
        let (conn, server) = idle_connection().await;
        pool.put(conn);
        let open = pool.take().expect("an open idle connection is reused");
        pool.put(open);

        drop(server);

        // The peer's FIN reaches the socket's readiness within moments on loopback.
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Some(conn) = pool.take() {
            assert!(
                Instant::now() < deadline,
                "a closed connection stayed reusable"
            );
            pool.put(conn);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn the_pool_closes_connections_idle_past_the_timeout() {
        let pool = Pool::new(Duration::ZERO);
        let (conn, _server) = idle_connection().await;
        pool.put(conn);
        assert!(pool.take().is_none());
    }
}
