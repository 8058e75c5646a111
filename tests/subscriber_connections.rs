//! Subscriber connections at the HTTP/1.1 level, over raw sockets: a fresh connection that
//! subscribes is served without hyper (`server/subscriber.rs`), so its framing, its errors and
//! its hang-up detection are checked here byte for byte.

mod common;

use std::time::{Duration, Instant};

use common::{parse_events, process::GatewayProcess, raw_exchange, Gateway};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The head of a raw response, lower-cased, and its body.
fn split(response: &str) -> (String, &str) {
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete head in {response:?}"));
    (head.to_ascii_lowercase(), body)
}

#[tokio::test]
async fn a_subscription_streams_on_its_own_connection_and_closes_it_at_the_end() {
    let gateway = Gateway::start().await;
    let id = gateway
        .create(json!({"tokens": 5, "interval_ms": 20}))
        .await;
    let request = format!("GET /v1/generations/{id}/events HTTP/1.1\r\nHost: t\r\n\r\n");

    let response = raw_exchange(gateway.addr, request.as_bytes()).await;

    let (head, body) = split(&response);
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    for field in [
        "content-type: text/event-stream",
        "cache-control: no-cache",
        "connection: close",
        "date: ",
    ] {
        assert!(head.contains(field), "{field} missing in {head}");
    }
    // The body ends with the connection, so it is neither chunked nor sized.
    assert!(!head.contains("transfer-encoding") && !head.contains("content-length"));
    let events = parse_events(body);
    assert_eq!(events.len(), 6, "five tokens and done: {body}");
    assert_eq!(events.last().unwrap().event, "done", "{body}");
    gateway.shutdown().await;
}

#[tokio::test]
async fn refusals_on_the_subscription_path_are_sized_json_and_close_the_connection() {
    let gateway = Gateway::start_with(|c| c.limits.max_header_bytes = 8192).await;
    let id = gateway.create(json!({"tokens": 1})).await;
    let events = format!("/v1/generations/{id}/events");
    let cases = [
        (
            format!("GET {events} HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"),
            400,
            "malformed_request",
        ),
        (
            format!("GET {events} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            400,
            "malformed_request",
        ),
        (
            format!("GET {events} HTTP/1.1\r\nBad Name: x\r\n\r\n"),
            400,
            "malformed_request",
        ),
        (
            format!(
                "GET {events} HTTP/1.1\r\nX-Big: {}\r\n\r\n",
                "a".repeat(9000)
            ),
            431,
            "head_too_large",
        ),
        (
            format!("GET {events} HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(101)),
            431,
            "head_too_large",
        ),
        (
            format!("GET {events} HTTP/1.1\r\nLast-Event-ID: 99x\r\n\r\n"),
            400,
            "invalid_last_event_id",
        ),
        (
            "GET /v1/generations/gen_nope/events HTTP/1.1\r\n\r\n".to_owned(),
            404,
            "generation_not_found",
        ),
    ];
    for (request, status, code) in cases {
        let started = Instant::now();
        let response = raw_exchange(gateway.addr, request.as_bytes()).await;
        let (head, body) = split(&response);
        assert!(
            head.starts_with(&format!("http/1.1 {status} ")),
            "{request:.80}: {head}"
        );
        assert!(head.contains("connection: close"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let error: Value = serde_json::from_str(body).unwrap();
        assert_eq!(error["error"]["code"], code, "{request:.80}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "connection kept open"
        );
    }
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_subscription_after_other_requests_on_a_kept_alive_connection_is_served() {
    let gateway = Gateway::start().await;
    let id = gateway.create(json!({"tokens": 3, "interval_ms": 0})).await;
    gateway.wait_finished(&id).await;
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();

    stream
        .write_all(b"GET /livez HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut first = vec![0; 4096];
    let read = stream.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..read]).starts_with("HTTP/1.1 200"));
    let request =
        format!("GET /v1/generations/{id}/events HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(common::WAIT, stream.read_to_end(&mut rest))
        .await
        .expect("the stream did not end")
        .unwrap();

    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    assert!(rest.contains("event: done"), "{rest}");
    gateway.shutdown().await;
}

/// A request line that arrives in pieces is answered all the same (by hyper, which reads as
/// bytes come, once a second look at the line did not settle it).
#[tokio::test]
async fn a_request_line_sent_in_pieces_is_answered() {
    let gateway = Gateway::start().await;
    let id = gateway.create(json!({"tokens": 3, "interval_ms": 0})).await;
    gateway.wait_finished(&id).await;
    let request = format!("GET /v1/generations/{id}/events HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    for piece in request.as_bytes().chunks(12) {
        stream.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut response = Vec::new();
    let mut buf = [0; 4096];
    let events = tokio::time::timeout(common::WAIT, async {
        loop {
            let read = stream.read(&mut buf).await.unwrap();
            assert!(read > 0, "closed before the end of the stream");
            response.extend_from_slice(&buf[..read]);
            let text = String::from_utf8_lossy(&response).into_owned();
            if text.contains("event: done") {
                return text;
            }
        }
    })
    .await
    .expect("no answer");
    assert!(events.starts_with("HTTP/1.1 200"), "{events}");
    for id in 0..3 {
        assert!(
            events.contains(&format!("id: {id}\n")),
            "token {id} missing: {events}"
        );
    }
    gateway.shutdown().await;
}

/// A generation that sends nothing for a minute: nothing is written to its subscribers, so only
/// watching the socket tells that they left.
#[tokio::test]
async fn subscribers_that_hang_up_on_a_silent_generation_are_let_go_at_once() {
    // A process of its own, so its gauges count this test's clients only.
    let gateway = GatewayProcess::start(&["--keepalive-interval", "1h"]).await;
    let silent = json!({"tokens": 2, "interval_ms": 60_000});
    let id = common::create_generation(&gateway.http, &gateway.url(""), silent).await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut stream = tokio::net::TcpStream::connect(&gateway.addr).await.unwrap();
        let request = format!("GET /v1/generations/{id}/events HTTP/1.1\r\nHost: t\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut head = [0; 1024];
        let _ = stream.read(&mut head).await.unwrap();
        clients.push(stream);
    }
    gateway
        .wait_metric("tokenfan_subscribers_open", |n| n == 10.0)
        .await;

    let left = Instant::now();
    drop(clients);

    gateway
        .wait_metric("tokenfan_subscribers_open", |n| n == 0.0)
        .await;
    assert!(
        left.elapsed() < Duration::from_secs(5),
        "{:?}",
        left.elapsed()
    );
}
