//! The Redis a `cluster` run shares between its gateway instances: started on a free loopback
//! port with persistence off (nothing to fsync in the measurement, nothing left on disk),
//! stopped at the end of the run.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::process::Child;

use crate::gateway::{command_line, free_port, start};
use crate::metrics::redis::command;

const REDIS_BIN: &str = "redis-server";
const READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize)]
pub struct StoreInfo {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    pub command: String,
}

pub struct RedisServer {
    pub info: StoreInfo,
    child: Child,
}

impl RedisServer {
    /// Starts `redis-server` from `PATH`, logging to `log`, and waits until it answers PING.
    pub async fn spawn(log: &Path) -> Result<Self> {
        let addr = free_port()?;
        let args: Vec<String> = [
            "--port",
            &addr.port().to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .map(String::from)
        .into();
        let bin = Path::new(REDIS_BIN);
        let child = start(bin, &args, &[], log)
            .context("start redis-server (Debian package `redis-server`) for the cluster run")?;
        let started = Instant::now();
        loop {
            match command(addr, &["PING"]).await {
                Ok(reply) if reply == "PONG" => break,
                _ if started.elapsed() > READY_TIMEOUT => {
                    bail!("redis-server on {addr} did not answer PING within {READY_TIMEOUT:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        Ok(Self {
            info: StoreInfo {
                addr,
                pid: child.id(),
                command: command_line(&[], bin, &args),
            },
            child,
        })
    }

    /// Persistence is off, so there is nothing to lose by killing it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
