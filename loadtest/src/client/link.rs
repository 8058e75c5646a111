//! A slow network path on loopback: a relay in front of a gateway that holds every chunk for a
//! one-way delay, in both directions, with at most `window` bytes on the way in each
//! direction. Like a long link with a bounded TCP window, and unlike an infinite buffer, it
//! reads from the gateway only as fast as the window empties: the gateway's socket fills and
//! its writes wait, as they would behind a real 100 ms path.
//!
//! It runs in the worker, on the clients' thread; each relayed connection leaves from its
//! client's source address, so the gateway still sees one peer per client.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpListener, TcpStream,
    },
    sync::{mpsc, Semaphore},
    time::Instant,
};

use super::connect::connect_from;

/// Most bytes taken from a socket at once.
const CHUNK: usize = 16 * 1024;

/// The path between the clients and the gateway.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct LinkKnobs {
    /// Round-trip time; each direction holds its bytes for half of it.
    pub rtt_ms: u64,
    /// Bytes in flight per direction at most (the link's window): the path carries at most
    /// `window / (rtt / 2)` bytes per second.
    pub window: u32,
}

/// Starts a relay to `gateway` with `link`'s delay; returns the address clients connect to.
pub async fn start(gateway: SocketAddr, link: LinkKnobs) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::task::spawn_local(async move {
        loop {
            match listener.accept().await {
                Ok((client, peer)) => {
                    tokio::task::spawn_local(relay(client, peer.ip(), gateway, link));
                }
                Err(error) => eprintln!("link: accept failed: {error}"),
            }
        }
    });
    Ok(addr)
}

async fn relay(client: TcpStream, source: IpAddr, gateway: SocketAddr, link: LinkKnobs) {
    let IpAddr::V4(source) = source else {
        return;
    };
    // The relay's own receive buffer is part of the path: keep it to one window too.
    let upstream = match connect_from(source, gateway, Some(link.window)).await {
        Ok(upstream) => upstream,
        Err(error) => {
            eprintln!("link: connect to {gateway} failed: {error}");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let one_way = Duration::from_millis(link.rtt_ms / 2);
    let window = link.window as usize;
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    // A direction that ends (EOF, reset) has shut down its far side; once both have, done.
    tokio::join!(
        carry(client_read, upstream_write, one_way, window),
        carry(upstream_read, client_write, one_way, window),
    );
}

/// Carries one direction: what is read now is written `delay` later, with at most `window`
/// bytes read and not yet written.
async fn carry(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration, window: usize) {
    let room = Semaphore::new(window);
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reading = async {
        let chunk = CHUNK.min(window);
        loop {
            let Ok(permit) = room.acquire_many(chunk as u32).await else {
                break;
            };
            let mut buf = Vec::with_capacity(chunk);
            let read = match from.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            // Keep room for what was read only; the writer gives it back once written.
            permit.forget();
            room.add_permits(chunk - read);
            if tx.send((Instant::now() + delay, buf)).is_err() {
                break;
            }
        }
        drop(tx);
    };
    let writing = async {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
            room.add_permits(bytes.len());
        }
        // The far side learns of the end as it would over the link, after what was sent.
        let _ = to.shutdown().await;
        room.close();
    };
    tokio::join!(reading, writing);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_round_trip_through_the_link_takes_its_rtt() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let echo_addr = echo.local_addr().unwrap();
                tokio::task::spawn_local(async move {
                    let (mut stream, _) = echo.accept().await.unwrap();
                    let mut buf = [0; 5];
                    stream.read_exact(&mut buf).await.unwrap();
                    stream.write_all(&buf).await.unwrap();
                });
                let link = LinkKnobs {
                    rtt_ms: 100,
                    window: 65_536,
                };
                let relay = start(echo_addr, link).await.unwrap();
                let started = std::time::Instant::now();
                let mut client = TcpStream::connect(relay).await.unwrap();
                client.write_all(b"hello").await.unwrap();
                let mut buf = [0; 5];
                client.read_exact(&mut buf).await.unwrap();
                assert_eq!(&buf, b"hello");
                let rtt = started.elapsed();
                assert!(rtt >= Duration::from_millis(100), "{rtt:?}");
                assert!(rtt < Duration::from_secs(2), "{rtt:?}");
            })
            .await;
    }
}
