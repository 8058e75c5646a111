//! Test harness: a real gateway and a real mock LLM on ephemeral loopback ports, and a small
//! SSE client over real sockets.
#![allow(dead_code)] // each test file uses a different part of the harness

pub mod cluster;
pub mod process;
pub mod redis;

use std::{net::SocketAddr, time::Duration};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokenfan::{upstream::mock, Config};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

/// Upper bound for any single wait in a test, so that a bug fails the test instead of hanging.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Gateway {
    pub addr: SocketAddr,
    pub mock_addr: SocketAddr,
    pub http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Gateway {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a mock LLM and a gateway using it; `tweak` adjusts the gateway's configuration.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let mock_addr = start_mock().await;

        let mut config = Config::defaults();
        config.upstream.url = Some(format!("http://{mock_addr}/v1"));
        config.upstream.retry_backoff = Duration::from_millis(10);
        // Tests end with generations still running; do not wait long for them.
        config.drain.drain_deadline = Duration::from_millis(500);
        tweak(&mut config);
        let listener = tokenfan::bind("127.0.0.1:0".parse().unwrap(), 1024).unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            tokenfan::serve(listener, config, async {
                let _ = stop.await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            mock_addr,
            http: reqwest::Client::new(),
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Creates a generation with these mock knobs and returns its id.
    pub async fn create(&self, mock: Value) -> String {
        let (status, body) = self.post_generation(chat_request(mock), &[]).await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    pub async fn post_generation(&self, body: Value, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut request = self.http.post(self.url("/v1/generations")).json(&body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Posts an OpenAI chat request to `/v1/chat/completions`, expecting 200.
    pub async fn chat_completions(&self, request: &Value) -> reqwest::Response {
        let response = self
            .http
            .post(self.url("/v1/chat/completions"))
            .json(request)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response
    }

    pub async fn snapshot(&self, id: &str) -> (u16, Value) {
        let response = self
            .http
            .get(self.url(&format!("/v1/generations/{id}")))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Polls the snapshot until the generation has ended.
    pub async fn wait_finished(&self, id: &str) -> Value {
        wait_finished(&self.http, &self.url(&format!("/v1/generations/{id}"))).await
    }

    pub async fn mock_stats(&self) -> Value {
        self.http
            .get(format!("http://{}/mock/stats", self.mock_addr))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Opens the event stream of a generation.
    pub async fn subscribe(&self, id: &str, last_event_id: Option<u64>) -> reqwest::Response {
        let mut request = self
            .http
            .get(self.url(&format!("/v1/generations/{id}/events")));
        if let Some(last) = last_event_id {
            request = request.header("last-event-id", last.to_string());
        }
        request.send().await.unwrap()
    }

    /// Subscribes and reads the whole stream.
    pub async fn events(&self, id: &str, last_event_id: Option<u64>) -> Vec<Event> {
        let response = self.subscribe(id, last_event_id).await;
        assert_eq!(response.status(), 200);
        read_events(response).await
    }

    pub async fn shutdown(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        }
    }
}

/// Starts the mock LLM on the current runtime; returns its address.
pub async fn start_mock() -> SocketAddr {
    start_mock_with(mock::MockConfig::default()).await
}

/// Starts the mock LLM with these defaults (for requests that set no knobs, like the demo
/// page's).
pub async fn start_mock_with(config: mock::MockConfig) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(mock::serve(listener, config, std::future::pending()));
    addr
}

/// Creates a generation with these mock knobs on the gateway at `base` (`http://host:port`)
/// and returns its id.
pub async fn create_generation(http: &reqwest::Client, base: &str, mock: Value) -> String {
    let response = http
        .post(format!("{base}/v1/generations"))
        .json(&chat_request(mock))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    created["id"].as_str().unwrap().to_owned()
}

/// A chat request for the mock with these knobs.
pub fn chat_request(mock: Value) -> Value {
    json!({
        "model": "tokenfan-mock",
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "mock": mock,
    })
}

/// One parsed SSE event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
    pub retry: Option<u64>,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap()
    }
}

/// Reads a response body to its end and parses its events (comments are dropped).
pub async fn read_events(response: reqwest::Response) -> Vec<Event> {
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    tokio::time::timeout(WAIT, async {
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk.unwrap());
        }
    })
    .await
    .expect("event stream did not end in time");
    parse_events(&String::from_utf8(body).unwrap())
}

/// Parses SSE text as the gateway writes it (LF line ends).
pub fn parse_events(text: &str) -> Vec<Event> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut event = Event {
                id: None,
                event: "message".into(),
                data: String::new(),
                retry: None,
            };
            let mut has_field = false;
            for line in block
                .lines()
                .filter(|l| !l.starts_with(':') && !l.is_empty())
            {
                let (field, value) = line.split_once(": ").unwrap_or((line, ""));
                has_field = true;
                match field {
                    "id" => event.id = Some(value.into()),
                    "event" => event.event = value.into(),
                    "data" => event.data = value.into(),
                    "retry" => event.retry = value.parse().ok(),
                    other => panic!("unexpected field {other}"),
                }
            }
            has_field.then_some(event)
        })
        .collect()
}

/// The token texts of a list of events, in order, checking that ids count up from `first`.
pub fn token_texts(events: &[Event], first: u64) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.event == "token")
        .enumerate()
        .map(|(i, e)| {
            let expected = first + i as u64;
            assert_eq!(
                e.id.as_deref(),
                Some(expected.to_string().as_str()),
                "ids out of order"
            );
            assert_eq!(e.json()["index"], expected);
            e.json()["text"].as_str().unwrap().to_owned()
        })
        .collect()
}

pub async fn get_text(http: &reqwest::Client, url: &str) -> String {
    http.get(url).send().await.unwrap().text().await.unwrap()
}

/// Sends raw bytes on a fresh connection and returns everything the server sends back until it
/// closes the connection (or `WAIT` passes).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut buf = [0; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => response.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the server kept the connection open");
    String::from_utf8_lossy(&response).into_owned()
}

/// Polls the snapshot at `url` (any gateway, in-process or not) until the generation has ended.
pub async fn wait_finished(http: &reqwest::Client, url: &str) -> Value {
    tokio::time::timeout(WAIT, async {
        loop {
            let response = http.get(url).send().await.unwrap();
            let snapshot: Value = response.json().await.unwrap_or(Value::Null);
            if snapshot["status"] != "running" {
                return snapshot;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("generation did not finish in time")
}
