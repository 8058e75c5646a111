//! A real `redis-server` for the multi-instance tests: its own port, persistence off, killed
//! and restarted on the same port for the fault tests. `.ci/install-client-deps` installs it.

use std::{process::Stdio, time::Duration};

use tokio::process::{Child, Command};

use super::WAIT;

pub struct RedisServer {
    child: Child,
    pub port: u16,
    /// The other nodes of a cluster (their files in `_dir`).
    others: Vec<Child>,
    _dir: Option<TempDir>,
}

impl RedisServer {
    pub async fn start() -> Self {
        let port = free_port();
        let child = spawn(port, &[]);
        let server = Self {
            child,
            port,
            others: Vec::new(),
            _dir: None,
        };
        server.wait_ready().await;
        server
    }

    /// A Redis Cluster of `nodes` primaries (no replicas); `url()` names its first node.
    pub async fn start_cluster(nodes: usize) -> Self {
        let dir = TempDir::new();
        let ports: Vec<u16> = (0..nodes).map(|_| free_port()).collect();
        let mut children: Vec<Child> = ports
            .iter()
            .map(|port| {
                let conf = dir.0.join(format!("nodes-{port}.conf"));
                spawn(
                    *port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        conf.to_str().unwrap(),
                        "--dir",
                        dir.0.to_str().unwrap(),
                    ],
                )
            })
            .collect();
        let first = children.remove(0);
        let server = Self {
            child: first,
            port: ports[0],
            others: children,
            _dir: Some(dir),
        };
        for port in &ports {
            Self::wait_port_ready(*port).await;
        }
        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .expect("run redis-cli --cluster create");
        assert!(created.success(), "redis-cli --cluster create failed");
        tokio::time::timeout(WAIT, async {
            loop {
                let info: String = server.command(&["CLUSTER", "INFO"]).await;
                if info.contains("cluster_state:ok") {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the cluster never became ready");
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
        self.child = spawn(self.port, &[]);
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
        Self::wait_port_ready(self.port).await;
    }

    async fn wait_port_ready(port: u16) {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
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

fn spawn(port: u16, extra: &[&str]) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(extra)
        .args(["--save", "", "--appendonly", "no"])
        .args(["--loglevel", "warning"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start redis-server (is it installed? .ci/install-client-deps)")
}

/// A directory removed when dropped (cluster nodes write their config files there).
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("tokenfan-redis-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
