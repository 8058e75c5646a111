//! A subscriber that cannot keep up — behind past a lag budget, or a socket that accepts
//! nothing — is dropped with `event: reconnect` or its socket closed; the others are not
//! slowed, and the dropped one loses nothing on resume.

mod common;

use std::time::Duration;

use common::{token_texts, Gateway, WAIT};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

/// Big tokens, fast: a client that does not read falls behind within milliseconds.
fn flood(tokens: u64, interval_ms: u64) -> serde_json::Value {
    json!({"tokens": tokens, "interval_ms": interval_ms, "token_bytes": 4000, "first_token_ms": 200})
}

/// Opens an event stream over a raw socket with a tiny receive buffer and does not read it.
async fn stalled_subscriber(gateway: &Gateway, id: &str, last_event_id: Option<u64>) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(gateway.addr).await.unwrap();
    let resume = last_event_id
        .map(|id| format!("Last-Event-ID: {id}\r\n"))
        .unwrap_or_default();
    let request =
        format!("GET /v1/generations/{id}/events HTTP/1.1\r\nHost: tokenfan\r\n{resume}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// Reads a raw response until the server closes the connection (EOF or reset), or until the
/// chunked body's last chunk when `until_body_end`.
async fn read_raw(stream: &mut TcpStream, until_body_end: bool) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
            if until_body_end && received.ends_with(b"\r\n0\r\n\r\n") {
                break;
            }
        }
    })
    .await
    .expect("the response did not end");
    received
}

#[tokio::test]
async fn slow_subscriber_is_evicted_with_reconnect_and_resumes_without_loss() {
    // A long write timeout: this client is slow, not dead, and must see the reconnect event.
    // It is evicted for the bytes it is behind (3.6 MB logged while it does not read), not for
    // a full channel: that only sends it to the log. 2 MB/s, not faster: a debug-build reader
    // on a loaded machine was seen 2.2 MB behind a 4 MB/s flood.
    let gateway = Gateway::start_with(|c| {
        c.stream.channel_capacity = 8;
        c.stream.max_viewer_lag_bytes = 2 * 1024 * 1024;
        c.connection.socket_send_buffer = Some(16 * 1024);
        c.connection.write_timeout = Duration::from_secs(30);
    })
    .await;
    let id = gateway.create(flood(900, 2)).await;
    let mut slow = stalled_subscriber(&gateway, &id, None).await;
    let fast = gateway.events(&id, None).await;

    // The fast subscriber got everything while the slow one was not reading.
    let snapshot = gateway.wait_finished(&id).await;
    let last = fast.last().unwrap();
    assert_eq!(
        last.event,
        "done",
        "{} events, then {:?}",
        fast.len(),
        last.data
    );
    assert_eq!(token_texts(&fast, 0).concat(), snapshot["text"]);

    // Now the slow client reads what it was sent: tokens, then the reconnect event, then the
    // end of the body.
    let raw = String::from_utf8_lossy(&read_raw(&mut slow, true).await).into_owned();
    let reconnect = raw.find("event: reconnect").expect("no reconnect event");
    assert!(raw[reconnect..].contains(r#"data: {"reason":"slow_consumer"}"#));
    assert!(
        raw[..reconnect].contains("retry: "),
        "reconnect without retry"
    );
    let last_id = raw[..reconnect]
        .rmatch_indices("\nid: ")
        .next()
        .map(|(at, _)| {
            raw[at + 5..]
                .split('\n')
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .expect("no token before the reconnect");
    assert!(last_id < 899, "evicted only after the last token");

    // Resuming from its last id gives exactly the rest.
    let rest = gateway.events(&id, Some(last_id)).await;
    let texts = token_texts(&rest, last_id + 1);
    assert_eq!(texts.len() as u64, 900 - last_id - 1);
    assert_eq!(rest.last().unwrap().event, "done");
    gateway.shutdown().await;
}

#[tokio::test]
async fn subscriber_that_stops_reading_has_its_socket_closed() {
    let gateway = Gateway::start_with(|c| {
        c.stream.channel_capacity = 8;
        c.connection.socket_send_buffer = Some(16 * 1024);
        c.connection.write_timeout = Duration::from_millis(300);
    })
    .await;
    let id = gateway.create(flood(400, 1)).await;
    let mut dead = stalled_subscriber(&gateway, &id, None).await;
    gateway.wait_finished(&id).await;

    // The client never read; the server must have given up on it and reset the connection,
    // so reading now ends (reset or EOF) instead of waiting forever.
    let started = std::time::Instant::now();
    let received = read_raw(&mut dead, false).await;
    assert!(
        received.len() < 400 * 4000,
        "the whole generation fit in the socket buffers"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let metrics = common::get_text(&gateway.http, &gateway.url("/metrics")).await;
    assert!(
        metrics.contains("tokenfan_write_timeouts_total"),
        "{metrics}"
    );
    gateway.shutdown().await;
}
