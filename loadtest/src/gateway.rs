//! The gateway under test: spawned (with the mock LLM as a separate process, so the mock's CPU
//! and memory are not counted as the gateway's; in `cluster`, several instances on a Redis
//! started for the run) or attached to by `--url` and `--pid`.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::process::{Child, Command};

use crate::client::http::request;
use crate::scenario::ClusterKnobs;
use crate::store::{RedisServer, StoreInfo};

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// One `tokenfan serve` process.
#[derive(Debug, Clone, Serialize)]
pub struct Instance {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    pub command: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GatewayInfo {
    pub mode: &'static str,
    /// Every gateway process; all scenarios but `cluster` have exactly one.
    pub instances: Vec<Instance>,
    pub mock_command: Option<String>,
    /// The spawned mock LLM's address: `chatpath` reads streams from it directly too.
    pub mock_addr: Option<SocketAddr>,
    /// The spawned mock LLM's pid, to report its CPU beside the gateway's.
    pub mock_pid: Option<u32>,
    /// The Redis the instances share, when the run started one.
    pub store: Option<StoreInfo>,
}

impl GatewayInfo {
    /// The first instance: the one single-gateway scenarios talk to, signal and watch.
    pub fn pid(&self) -> Option<u32> {
        self.instances.first().and_then(|i| i.pid)
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.instances.iter().map(|i| i.addr).collect()
    }

    /// The pids of all instances, or none when any is unknown (attached without `--pid`).
    pub fn pids(&self) -> Vec<u32> {
        self.instances
            .iter()
            .map(|i| i.pid)
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default()
    }
}

pub struct Gateway {
    pub info: GatewayInfo,
    children: Vec<Child>,
    mock: Option<Child>,
    store: Option<RedisServer>,
}

/// How the gateway process ended.
#[derive(Debug, Clone, Serialize)]
pub struct Exit {
    pub code: Option<i32>,
    pub after_s: f64,
}

impl Gateway {
    /// Starts `bin mock-upstream`, with `cluster` a `redis-server`, and `bin serve` once per
    /// instance, all on free loopback ports; their output goes to `<log_prefix>.mock.log`,
    /// `<log_prefix>.redis.log` and `<log_prefix>.gateway.log` (`.gateway-K.log` with several
    /// instances). `env` (`NAME=value`) is set for the gateways only.
    pub async fn spawn(
        bin: &Path,
        extra_args: &[String],
        env: &[String],
        log_prefix: &Path,
        cluster: Option<&ClusterKnobs>,
    ) -> Result<Self> {
        if !bin.exists() {
            bail!(
                "gateway binary {} not found: build it with `cargo build --release` or pass --gateway-bin",
                bin.display()
            );
        }
        let mock_addr = free_port()?;
        let mock_args = vec![
            "mock-upstream".to_string(),
            "--listen".into(),
            mock_addr.to_string(),
        ];
        let mock = start(bin, &mock_args, &[], &log_file(log_prefix, "mock")?)?;
        wait_until(mock_addr, "/mock/stats")
            .await
            .context("mock upstream did not start")?;
        let store = match cluster.filter(|c| c.store) {
            Some(_) => Some(RedisServer::spawn(&log_file(log_prefix, "redis")?).await?),
            None => None,
        };
        let env = env
            .iter()
            .map(|pair| {
                pair.split_once('=')
                    .with_context(|| format!("gateway environment {pair:?} is not NAME=value"))
            })
            .collect::<Result<Vec<_>>>()?;
        let count = cluster.map_or(1, |c| c.instances);
        let mut instances = Vec::new();
        let mut children = Vec::new();
        for k in 0..count {
            let addr = free_port()?;
            let mut args = vec![
                "serve".to_string(),
                "--listen".into(),
                addr.to_string(),
                "--upstream-url".into(),
                format!("http://{mock_addr}/v1"),
            ];
            if let Some(store) = &store {
                args.push(format!("--store-url=redis://{}", store.info.addr));
                args.push(format!("--instance-id=loadtest-{k}"));
            }
            args.extend_from_slice(extra_args);
            let log = match count {
                1 => log_file(log_prefix, "gateway")?,
                _ => log_file(log_prefix, &format!("gateway-{k}"))?,
            };
            let child = start(bin, &args, &env, &log)?;
            instances.push(Instance {
                addr,
                pid: child.id(),
                command: Some(command_line(&env, bin, &args)),
            });
            children.push(child);
        }
        for instance in &instances {
            wait_until(instance.addr, "/livez")
                .await
                .with_context(|| format!("gateway {} did not become live", instance.addr))?;
        }
        Ok(Self {
            info: GatewayInfo {
                mode: "spawned",
                instances,
                mock_command: Some(command_line(&[], bin, &mock_args)),
                mock_addr: Some(mock_addr),
                mock_pid: mock.id(),
                store: store.as_ref().map(|s| s.info.clone()),
            },
            children,
            mock: Some(mock),
            store,
        })
    }

    /// Uses a running gateway at `url` (`http://127.0.0.1:8080`); `pid` enables memory and CPU.
    pub async fn attach(url: &str, pid: Option<u32>) -> Result<Self> {
        let authority = url
            .strip_prefix("http://")
            .context("--url must start with http://")?
            .trim_end_matches('/');
        let addr: SocketAddr = authority.parse().with_context(|| {
            format!("--url needs a numeric loopback address, got {authority:?}")
        })?;
        if !addr.ip().is_loopback() {
            bail!("--url {url}: the load test only targets loopback addresses");
        }
        wait_until(addr, "/livez")
            .await
            .context("gateway is not live")?;
        Ok(Self {
            info: GatewayInfo {
                mode: "attached",
                instances: vec![Instance {
                    addr,
                    pid,
                    command: None,
                }],
                mock_command: None,
                mock_addr: None,
                mock_pid: None,
                store: None,
            },
            children: Vec::new(),
            mock: None,
            store: None,
        })
    }

    /// SIGTERM to the first instance.
    pub fn sigterm(&self) -> Result<()> {
        let pid = self
            .info
            .pid()
            .context("no gateway pid to signal (pass --pid)")?;
        signal_term(pid)
    }

    /// Whether the first instance has exited: `Some(exit code)` once it has (`None` inside
    /// when it was attached and its code is unknowable, or it died by a signal).
    pub fn try_exit(&mut self) -> Result<Option<Option<i32>>> {
        if let Some(child) = self.children.first_mut() {
            return Ok(child
                .try_wait()
                .context("poll gateway process")?
                .map(|status| status.code()));
        }
        let pid = self.info.pid().context("no gateway pid to watch")?;
        Ok((!Path::new(&format!("/proc/{pid}")).exists()).then_some(None))
    }

    /// Stops what we spawned: SIGTERM to every instance, a short grace, then SIGKILL; then the
    /// mock and Redis. Attached gateways are left alone.
    pub async fn stop(self) {
        for child in &self.children {
            if let Some(pid) = child.id() {
                let _ = signal_term(pid);
            }
        }
        let grace = tokio::time::Instant::now() + Duration::from_secs(5);
        for mut child in self.children {
            if tokio::time::timeout_at(grace, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
        if let Some(mut mock) = self.mock {
            let _ = mock.kill().await;
        }
        if let Some(store) = self.store {
            store.stop().await;
        }
    }
}

fn signal_term(pid: u32) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        bail!("kill -TERM {pid}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn start(
    bin: &Path,
    args: &[String],
    env: &[(&str, &str)],
    log: &Path,
) -> Result<Child> {
    let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone().context("clone log file handle")?;
    Command::new(bin)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawn {}", command_line(env, bin, args)))
}

pub(crate) fn log_file(prefix: &Path, what: &str) -> Result<PathBuf> {
    let mut name = prefix
        .file_name()
        .context("log prefix has no file name")?
        .to_os_string();
    name.push(format!(".{what}.log"));
    Ok(prefix.with_file_name(name))
}

pub(crate) fn command_line(env: &[(&str, &str)], bin: &Path, args: &[String]) -> String {
    env.iter()
        .map(|(name, value)| format!("{name}={value}"))
        .chain(std::iter::once(bin.display().to_string()))
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A loopback port that was free a moment ago (the small race is acceptable for a test tool).
pub(crate) fn free_port() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    listener.local_addr().context("free port address")
}

/// Polls `GET path` until it answers 200.
async fn wait_until(addr: SocketAddr, path: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        let answer = request(addr, "GET", path, None, Duration::from_secs(2)).await;
        match answer {
            Ok(resp) if resp.status == 200 => return Ok(()),
            _ if start.elapsed() > READY_TIMEOUT => {
                bail!("GET http://{addr}{path} did not answer 200 within {READY_TIMEOUT:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
