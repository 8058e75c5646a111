//! Hostile and broken clients: each gets a clear error (or a closed connection) and nothing
//! else is affected.

mod common;

use std::time::{Duration, Instant};

use common::{chat_request, process::GatewayProcess, raw_exchange, Gateway};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn malformed_last_event_ids_are_400() {
    let gateway = Gateway::start().await;
    let id = gateway
        .create(json!({"tokens": 1000, "interval_ms": 20}))
        .await;
    let too_long = "1".repeat(10_000);
    let cases = [
        "-1",
        "abc",
        "1e3",
        "0x1f",
        " 5x",
        "18446744073709551615",
        "99999",
        &too_long,
    ];
    for bad in cases {
        let response = gateway
            .http
            .get(gateway.url(&format!("/v1/generations/{id}/events")))
            .header("last-event-id", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{bad:.20}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_last_event_id");
        // The query parameter is checked the same way.
        let response = gateway
            .http
            .get(gateway.url(&format!("/v1/generations/{id}/events")))
            .query(&[("last_event_id", bad)])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{bad:.20}");
    }
    // Non-UTF-8 in the header.
    let raw = format!(
        "GET /v1/generations/{id}/events HTTP/1.1\r\nHost: t\r\nLast-Event-ID: \u{ff}\u{fe}\r\nConnection: close\r\n\r\n"
    );
    let mut bytes = raw.into_bytes();
    bytes.retain(|&b| b != 0xc3); // leave raw 0xff / 0xfe bytes: invalid UTF-8
    assert!(raw_exchange(gateway.addr, &bytes)
        .await
        .starts_with("HTTP/1.1 400"));
    gateway.shutdown().await;
}

#[tokio::test]
async fn odd_generation_ids_are_simply_not_found() {
    let gateway = Gateway::start().await;
    let long = "a".repeat(4000);
    for id in [
        "..%2F..%2Fetc%2Fpasswd",
        "gen_%2e%2e",
        "gen_%00",
        "g%C3%A9n",
        "gen_%FF%FE",
        &long,
        "gen_ABCDEFABCDEFABCDEFABCDEFABCDEFAB",
    ] {
        for path in [
            format!("/v1/generations/{id}"),
            format!("/v1/generations/{id}/events"),
        ] {
            let response = gateway.http.get(gateway.url(&path)).send().await.unwrap();
            assert_eq!(response.status(), 404, "{path:.60}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "generation_not_found", "{path:.60}");
        }
    }
    gateway.shutdown().await;
}

#[tokio::test]
async fn bodies_that_are_not_what_they_claim_get_clear_errors() {
    let gateway = Gateway::start().await;
    let url = gateway.url("/v1/generations");
    let json_post = |body: Vec<u8>| {
        gateway
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0xff, 0xfe, b'{', b'}'], "invalid_json"),
        (b"".to_vec(), "invalid_json"),
        (b"null".to_vec(), "invalid_request"),
        (
            br#"{"model":"m","messages":[{}],"stream":"yes"}"#.to_vec(),
            "invalid_request",
        ),
        (
            br#"{"model":"m","messages":[{}],"n":1.5}"#.to_vec(),
            "invalid_request",
        ),
        (
            br#"{"model":"m","messages":[{}],"mock":{"tokens":"many"}}"#.to_vec(),
            "upstream_http_error",
        ),
    ];
    for (body, code) in cases {
        let response = json_post(body.clone()).await.unwrap();
        if code.starts_with("upstream") {
            // Passed through to the provider, whose refusal ends the generation clearly.
            assert_eq!(response.status(), 201);
            let id = response.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned();
            let snapshot = gateway.wait_finished(&id).await;
            assert_eq!(snapshot["error"]["code"], code);
            continue;
        }
        assert_eq!(response.status(), 400, "{}", String::from_utf8_lossy(&body));
        let error: Value = response.json().await.unwrap();
        assert_eq!(
            error["error"]["code"],
            code,
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    gateway.shutdown().await;
}

/// Both `Content-Length` and `Transfer-Encoding`: hyper lets Transfer-Encoding win, drops
/// Content-Length and closes the connection after answering — RFC 9112 §6.3's "answer and
/// close" — so whatever a front proxy thought the body was, nothing is smuggled behind it.
#[tokio::test]
async fn request_smuggling_shapes_are_answered_once_and_the_connection_closed() {
    let gateway = Gateway::start().await;
    let body = serde_json::to_string(&chat_request(json!({"tokens": 1}))).unwrap();
    let request = format!(
        "POST /v1/generations HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n\
         GET /livez HTTP/1.1\r\nHost: t\r\n\r\n",
        body.len(),
        body.len()
    );
    let started = Instant::now();
    let response = raw_exchange(gateway.addr, request.as_bytes()).await;
    let head = response
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 400") || head.contains("connection: close"),
        "answered and kept the connection open: {response}"
    );
    assert!(
        !response.contains("\"status\":\"ok\""),
        "the smuggled request was served: {response}"
    );
    assert_eq!(response.matches("HTTP/1.1").count(), 1, "{response}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "connection not closed"
    );
    gateway.shutdown().await;
}

/// Both servers of a connection: hyper (here: a request line that trickles in), and the
/// subscriber path (a subscription's request line sent at once, then headers that trickle).
#[tokio::test]
async fn slowloris_headers_are_cut_off() {
    let gateway =
        Gateway::start_with(|c| c.connection.header_read_timeout = Duration::from_millis(300))
            .await;
    for (at_once, trickled) in [
        (&b""[..], &b"GET /livez HTTP/1.1\r\nHost: t\r\nX-Slow: "[..]),
        (
            b"GET /v1/generations/gen_x/events HTTP/1.1\r\n",
            b"Host: t\r\nX-Slow: ",
        ),
    ] {
        let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
        let started = Instant::now();
        let trickle = async {
            stream.write_all(at_once).await.unwrap();
            for byte in trickled.iter().chain(b"a".repeat(1000).iter()) {
                if stream.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
            rest
        };
        let answered = tokio::time::timeout(common::WAIT, trickle)
            .await
            .expect("the trickling client was never cut off");
        let head = String::from_utf8_lossy(at_once);
        assert!(
            answered.is_empty(),
            "{head}: {}",
            String::from_utf8_lossy(&answered)
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{head}: cut off only after {:?}",
            started.elapsed()
        );
    }
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_head_trickled_past_the_look_at_its_request_line_is_due_at_the_header_timeout() {
    let timeout = Duration::from_secs(1);
    let gateway = Gateway::start_with(|c| c.connection.header_read_timeout = timeout).await;
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let started = Instant::now();
    // Silent for most of the timeout, then a byte at a time: the look at the request line
    // cannot tell yet and hands the connection to hyper, which must not start a new timeout.
    tokio::time::sleep(timeout.mul_f64(0.9)).await;
    let trickle = async {
        for byte in b"GET /v1/generations/gen_x/events HTTP/1.1\r\nX-Slow: ".iter() {
            if stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
    };
    tokio::time::timeout(common::WAIT, trickle)
        .await
        .expect("the trickling client was never cut off");
    assert!(
        started.elapsed() < timeout.mul_f64(1.6),
        "cut off only after {:?}",
        started.elapsed()
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn clients_leaving_mid_replay_or_mid_stream_leave_nothing_behind() {
    // A process of its own, so its gauges count this test's clients only.
    let gateway = GatewayProcess::start(&[]).await;
    let create = |knobs: Value| {
        gateway
            .http
            .post(gateway.url("/v1/generations"))
            .json(&chat_request(knobs))
            .send()
    };
    let finished: Value = create(json!({"tokens": 2000, "interval_ms": 0, "token_bytes": 500}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let running: Value = create(json!({"tokens": 100_000, "interval_ms": 5}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for generation in [&finished, &running] {
        let id = generation["id"].as_str().unwrap();
        for _ in 0..20 {
            let mut stream = tokio::net::TcpStream::connect(&gateway.addr).await.unwrap();
            let request = format!("GET /v1/generations/{id}/events HTTP/1.1\r\nHost: t\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut first = [0; 1024];
            let _ = stream.read(&mut first).await.unwrap();
            drop(stream);
        }
    }
    gateway
        .wait_metric("tokenfan_subscribers_open", |n| n == 0.0)
        .await;
    gateway
        .wait_metric("tokenfan_connections_open", |n| n <= 1.0)
        .await;
}
