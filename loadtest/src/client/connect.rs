//! Opening a subscriber socket from a chosen loopback source address.
//!
//! One source address has ~28K ephemeral ports towards one gateway port; spreading clients over
//! 127.0.0.2–127.0.0.254 multiplies that by 253. `IP_BIND_ADDRESS_NO_PORT` defers the port
//! choice to `connect`, so the kernel picks per (source, destination) pair instead of reserving a
//! port per source address at `bind`.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;

use tokio::net::{TcpSocket, TcpStream};

/// First and count of the source addresses used for clients.
const FIRST_SOURCE: u8 = 2;
const SOURCES: u32 = 253;

/// The source address of the `index`-th client (over all workers).
pub fn source_address(index: u64) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, FIRST_SOURCE + (index % u64::from(SOURCES)) as u8)
}

/// How many source addresses clients are spread over.
pub fn source_count() -> u32 {
    SOURCES
}

/// Connects to `dest` from `source`. `recv_buffer` shrinks the receive buffer of clients that
/// will stall, so the gateway sees back-pressure after kilobytes rather than megabytes.
pub async fn connect_from(
    source: Ipv4Addr,
    dest: SocketAddr,
    recv_buffer: Option<u32>,
) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    bind_address_no_port(&socket)?;
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    socket.bind(SocketAddr::new(source.into(), 0))?;
    let stream = socket.connect(dest).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn bind_address_no_port(socket: &TcpSocket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: the fd is a live socket owned by `socket`; the option value is a c_int whose
    // address and size we pass correctly.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_cycle_over_127_0_0_2_to_254() {
        assert_eq!(source_address(0), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(source_address(252), Ipv4Addr::new(127, 0, 0, 254));
        assert_eq!(source_address(253), Ipv4Addr::new(127, 0, 0, 2));
    }

    #[tokio::test]
    async fn connects_from_a_non_default_loopback_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dest = listener.local_addr().unwrap();
        let client = connect_from(source_address(5), dest, Some(4096))
            .await
            .unwrap();
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7)));
        assert_eq!(client.local_addr().unwrap(), peer);
    }
}
