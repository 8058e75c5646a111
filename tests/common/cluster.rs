//! Several real `tokenfan serve` processes sharing one real `redis-server` and one mock LLM
//! (in the test process, so that its `/mock/stats` counts the upstream calls of all of them),
//! and a viewer that reads a generation across reconnects, checking every token once, in order.

use std::{net::SocketAddr, time::Duration};

use futures_util::StreamExt;
use rand::Rng;
use serde_json::Value;

use super::{parse_events, process::GatewayProcess, redis::RedisServer, start_mock, Event, WAIT};

pub struct Cluster {
    pub redis: RedisServer,
    pub mock: SocketAddr,
    pub instances: Vec<GatewayProcess>,
    pub http: reqwest::Client,
}

impl Cluster {
    /// Starts Redis, the mock, and `n` instances named `i0`, `i1`, … with these extra flags.
    pub async fn start(n: usize, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mock = start_mock().await;
        Self::start_on(RedisServer::start().await, mock, n, args, env).await
    }

    /// Like [`Cluster::start`], on this Redis (e.g. a Redis Cluster) and this mock.
    pub async fn start_on(
        redis: RedisServer,
        mock: SocketAddr,
        n: usize,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut instances = Vec::new();
        for i in 0..n {
            instances.push(start_instance(&redis, mock, i, args, env).await);
        }
        Self {
            redis,
            mock,
            instances,
            http: reqwest::Client::new(),
        }
    }

    /// Starts instance `i` again (after it was killed), with the same flags.
    pub async fn restart(&mut self, i: usize, args: &[&str], env: &[(&str, &str)]) {
        self.instances[i] = start_instance(&self.redis, self.mock, i, args, env).await;
    }

    pub fn base(&self, i: usize) -> String {
        format!("http://{}", self.instances[i].addr)
    }

    pub fn bases(&self) -> Vec<String> {
        (0..self.instances.len()).map(|i| self.base(i)).collect()
    }

    /// `GET /v1/generations/{id}` on instance `i`: status and body.
    pub async fn snapshot(&self, i: usize, id: &str) -> (u16, Value) {
        self.answer(self.http.get(self.generation_url(i, id))).await
    }

    /// `DELETE /v1/generations/{id}` on instance `i`: status and body.
    pub async fn cancel(&self, i: usize, id: &str) -> (u16, Value) {
        self.answer(self.http.delete(self.generation_url(i, id)))
            .await
    }

    fn generation_url(&self, i: usize, id: &str) -> String {
        format!("{}/v1/generations/{id}", self.base(i))
    }

    async fn answer(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Creates a generation on instance `owner` and starts viewers that move as `roams` say;
    /// returns its id and the viewers' task.
    pub async fn watch(
        &self,
        owner: usize,
        knobs: Value,
        roams: Vec<Roam>,
    ) -> (String, tokio::task::JoinHandle<Vec<Viewed>>) {
        let bases = self.bases();
        let id = super::create_generation(&self.http, &bases[owner], knobs).await;
        let (http, watched) = (self.http.clone(), id.clone());
        let viewers = tokio::spawn(async move {
            let views = roams
                .into_iter()
                .map(|roam| view(&http, &bases, &watched, roam));
            futures_util::future::join_all(views).await
        });
        (id, viewers)
    }

    pub async fn mock_stats(&self) -> Value {
        let url = format!("http://{}/mock/stats", self.mock);
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

async fn start_instance(
    redis: &RedisServer,
    mock: SocketAddr,
    i: usize,
    args: &[&str],
    env: &[(&str, &str)],
) -> GatewayProcess {
    let (url, name, upstream) = (redis.url(), format!("i{i}"), format!("http://{mock}/v1"));
    let mut all = vec![
        "--store-url",
        &url,
        "--instance-id",
        &name,
        "--upstream-url",
        &upstream,
        "--upstream-retry-backoff",
        "10ms",
    ];
    all.extend_from_slice(args);
    GatewayProcess::start_with_env(&all, env).await
}

/// What a viewer saw of one generation, over all its connections.
#[derive(Debug)]
pub struct Viewed {
    /// Every log entry in order: a token's text, or `kind: data` for the other kinds.
    pub texts: Vec<String>,
    pub terminal: Event,
    pub connections: usize,
    /// The instance each stream said it was served by (its `instance` event), in order.
    pub instances: Vec<String>,
}

/// How a viewer moves between instances.
#[derive(Clone, Copy)]
pub enum Roam {
    /// Stays on one instance (reconnecting there only when told to).
    Stay(usize),
    /// Leaves after a random 0.5–3 s and reconnects to a random instance with `Last-Event-ID`.
    Randomly,
    /// Starts on one instance; when told to reconnect (or refused), goes to the next one, as a
    /// load balancer would send it away from a draining instance.
    Failover(usize),
}

/// Reads generation `id` to its terminal event, reconnecting with `Last-Event-ID` like a
/// browser's `EventSource`; asserts that token ids come in order with no gap and no duplicate.
pub async fn view(http: &reqwest::Client, bases: &[String], id: &str, roam: Roam) -> Viewed {
    let mut texts: Vec<String> = Vec::new();
    let mut instances = Vec::new();
    let mut connections = 0;
    let mut failover = match roam {
        Roam::Failover(first) => first,
        _ => 0,
    };
    let deadline = tokio::time::Instant::now() + WAIT * 6;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "viewer of {id} never saw the end ({} tokens)",
            texts.len()
        );
        let (base, stay_for) = match roam {
            Roam::Stay(i) => (&bases[i], None),
            Roam::Failover(_) => {
                let base = &bases[failover % bases.len()];
                failover += 1;
                (base, None)
            }
            Roam::Randomly => {
                let mut rng = rand::rng();
                let i = rng.random_range(0..bases.len());
                (
                    &bases[i],
                    Some(Duration::from_millis(rng.random_range(500..3000))),
                )
            }
        };
        let mut request = http.get(format!("{base}/v1/generations/{id}/events"));
        if let Some(last) = texts.len().checked_sub(1) {
            request = request.header("last-event-id", last.to_string());
        }
        connections += 1;
        let response = match request.send().await {
            Ok(response) => response,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let status = response.status().as_u16();
        if status != 200 {
            // A store outage answers 503 before the stream starts: come back later.
            assert!(status == 503, "viewer of {id} got {status} from {base}");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        if let Some(terminal) =
            read_connection(response, &mut texts, &mut instances, stay_for).await
        {
            return Viewed {
                texts,
                terminal,
                connections,
                instances,
            };
        }
    }
}

/// Reads one connection; `Some(terminal)` at the end of the generation, `None` when the
/// connection ended first (reconnect, leave, or cut).
async fn read_connection(
    response: reqwest::Response,
    texts: &mut Vec<String>,
    instances: &mut Vec<String>,
    stay_for: Option<Duration>,
) -> Option<Event> {
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let leave = tokio::time::sleep(stay_for.unwrap_or(WAIT * 10));
    tokio::pin!(leave);
    loop {
        let chunk = tokio::select! {
            chunk = stream.next() => chunk,
            () = &mut leave => return None,
        };
        let Some(Ok(chunk)) = chunk else { return None };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        let Some(complete) = buffer.rfind("\n\n") else {
            continue;
        };
        let events = parse_events(&buffer[..complete + 2]);
        buffer.drain(..complete + 2);
        for event in events {
            match event.event.as_str() {
                kind @ ("token" | "reasoning" | "refusal" | "tool_call") => {
                    let expected = texts.len().to_string();
                    assert_eq!(
                        event.id.as_deref(),
                        Some(expected.as_str()),
                        "gap or duplicate"
                    );
                    // A token is its text; other log entries are kept whole, with their kind.
                    texts.push(match kind {
                        "token" => event.json()["text"].as_str().unwrap().to_owned(),
                        _ => format!("{kind}: {}", event.data),
                    });
                }
                "instance" => {
                    assert!(
                        event.id.is_none(),
                        "the instance event must not move Last-Event-ID"
                    );
                    instances.push(event.json()["instance"].as_str().unwrap().to_owned());
                }
                "done" | "error" => return Some(event),
                "reconnect" => return None,
                other => panic!("unexpected event {other}"),
            }
        }
    }
}
