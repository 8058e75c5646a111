//! The real `tokenfan` binary as a child process, for tests that need real signals.

use std::{
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use super::WAIT;

pub struct GatewayProcess {
    child: Child,
    pub addr: String,
    pub http: reqwest::Client,
    /// Everything the process printed so far, stdout and stderr.
    pub output: Arc<Mutex<Vec<String>>>,
}

impl GatewayProcess {
    /// Starts `tokenfan serve --listen 127.0.0.1:0 ARGS…` (embedded mock LLM) and waits for its
    /// "listening on" line.
    pub async fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[]).await
    }

    /// Like [`start`](Self::start), with extra environment variables.
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tokenfan"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("TOKENFAN_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start tokenfan");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (listening, addr) = tokio::sync::oneshot::channel();
        let mut listening = Some(listening);
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = output.clone();
        // Keep reading its output so that it never blocks on a full pipe.
        tokio::spawn(async move {
            loop {
                let line = tokio::select! {
                    Ok(Some(line)) = stdout.next_line() => line,
                    Ok(Some(line)) = stderr.next_line() => line,
                    else => break,
                };
                eprintln!("[tokenfan] {line}");
                if let Some((_, addr)) = line.split_once("listening on ") {
                    // The address ends the text line, or the JSON line's message string.
                    let addr = addr.split(['"', ' ']).next().unwrap_or_default();
                    if let Some(listening) = listening.take() {
                        let _ = listening.send(addr.to_owned());
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = tokio::time::timeout(WAIT, addr)
            .await
            .expect("tokenfan did not start listening")
            .expect("tokenfan exited before listening");
        Self {
            child,
            addr,
            http: reqwest::Client::new(),
            output,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("process still running")
    }

    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(self.child.id().expect("process still running") as i32);
        nix::sys::signal::kill(pid, signal).expect("send signal");
    }

    /// Waits for the process to exit; returns its status and how long that took from `since`.
    pub async fn exit(&mut self, since: Instant, limit: Duration) -> (ExitStatus, Duration) {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("tokenfan still running {limit:?} after the signal"))
            .unwrap();
        (status, since.elapsed())
    }

    /// Polls `/readyz` until it answers `status`.
    pub async fn wait_readyz(&self, status: u16) {
        tokio::time::timeout(WAIT, async {
            loop {
                let response = self.http.get(self.url("/readyz")).send().await;
                if response.is_ok_and(|r| r.status().as_u16() == status) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("/readyz never answered {status}"));
    }

    pub async fn metrics_text(&self) -> String {
        super::get_text(&self.http, &self.url("/metrics")).await
    }

    /// Reads a counter or gauge from `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .filter(|line| line.starts_with(name) && !line.starts_with('#'))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Polls a metric until `ready` holds.
    pub async fn wait_metric(&self, name: &str, ready: impl Fn(f64) -> bool) {
        tokio::time::timeout(WAIT, async {
            while !ready(self.metric(name).await) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{name} never reached the expected value"));
    }
}
