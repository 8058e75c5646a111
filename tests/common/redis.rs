//! A real `redis-server` for the multi-instance tests: its own port, persistence off, killed
//! and restarted on the same port for the fault tests. `.ci/install-client-deps` installs it.

use std::{process::Stdio, time::Duration};

use tokio::process::{Child, Command};

use super::WAIT;

pub struct RedisServer {
    child: Child,
    pub port: u16,
}

impl RedisServer {
    pub async fn start() -> Self {
        let port = free_port();
        let child = spawn(port);
        let server = Self { child, port };
        server.wait_ready().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `kill -9`, then a new server on the same port, empty (persistence is off).
    pub async fn crash_and_restart(&mut self) {
        self.crash().await;
        self.restart().await;
    }

    /// `kill -9`.
    pub async fn crash(&mut self) {
        self.child.start_kill().expect("kill redis-server");
        let _ = self.child.wait().await;
    }

    /// A new, empty server on the same port.
    pub async fn restart(&mut self) {
        self.child = spawn(self.port);
        self.wait_ready().await;
    }

    /// Runs one command, e.g. `["CLIENT", "KILL", "TYPE", "pubsub"]`.
    pub async fn command<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let client = redis::Client::open(self.url()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        command.query_async(&mut connection).await.unwrap()
    }

    async fn wait_ready(&self) {
        let client = redis::Client::open(self.url()).unwrap();
        tokio::time::timeout(WAIT, async {
            loop {
                if let Ok(mut connection) = client.get_multiplexed_async_connection().await {
                    let pong: redis::RedisResult<String> =
                        redis::cmd("PING").query_async(&mut connection).await;
                    if pong.is_ok() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("redis-server did not start (is it installed? .ci/install-client-deps)");
    }
}

fn spawn(port: u16) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(["--loglevel", "warning"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start redis-server (is it installed? .ci/install-client-deps)")
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
