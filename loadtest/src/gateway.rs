//! The gateway under test: spawned (with the mock LLM as a separate process, so the mock's CPU
//! and memory are not counted as the gateway's) or attached to by `--url` and `--pid`.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::process::{Child, Command};

use crate::client::http::request;

const READY_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Serialize)]
pub struct GatewayInfo {
    pub mode: &'static str,
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    pub command: Option<String>,
    pub mock_command: Option<String>,
    /// The spawned mock LLM's pid, to report its CPU beside the gateway's.
    pub mock_pid: Option<u32>,
}

pub struct Gateway {
    pub info: GatewayInfo,
    child: Option<Child>,
    mock: Option<Child>,
}

/// How the gateway process ended.
#[derive(Debug, Clone, Serialize)]
pub struct Exit {
    pub code: Option<i32>,
    pub after_s: f64,
}

impl Gateway {
    /// Starts `bin mock-upstream` and `bin serve` on free loopback ports; their output goes to
    /// `<log_prefix>.mock.log` and `<log_prefix>.gateway.log`. `env` (`NAME=value`) is set
    /// for the gateway only.
    pub async fn spawn(
        bin: &Path,
        extra_args: &[String],
        env: &[String],
        log_prefix: &Path,
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

        let addr = free_port()?;
        let mut args = vec![
            "serve".to_string(),
            "--listen".into(),
            addr.to_string(),
            "--upstream-url".into(),
            format!("http://{mock_addr}/v1"),
        ];
        args.extend_from_slice(extra_args);
        let env = env
            .iter()
            .map(|pair| {
                pair.split_once('=')
                    .with_context(|| format!("gateway environment {pair:?} is not NAME=value"))
            })
            .collect::<Result<Vec<_>>>()?;
        let child = start(bin, &args, &env, &log_file(log_prefix, "gateway")?)?;
        wait_until(addr, "/livez")
            .await
            .context("gateway did not become live")?;
        Ok(Self {
            info: GatewayInfo {
                mode: "spawned",
                addr,
                pid: child.id(),
                command: Some(command_line(&env, bin, &args)),
                mock_command: Some(command_line(&[], bin, &mock_args)),
                mock_pid: mock.id(),
            },
            child: Some(child),
            mock: Some(mock),
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
                addr,
                pid,
                command: None,
                mock_command: None,
                mock_pid: None,
            },
            child: None,
            mock: None,
        })
    }

    pub fn sigterm(&self) -> Result<()> {
        let pid = self
            .info
            .pid
            .context("no gateway pid to signal (pass --pid)")?;
        let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
        // SAFETY: kill has no memory-safety preconditions.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            bail!("kill -TERM {pid}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether the gateway has exited: `Some(exit code)` once it has (`None` inside when it
    /// was attached and its code is unknowable, or it died by a signal).
    pub fn try_exit(&mut self) -> Result<Option<Option<i32>>> {
        if let Some(child) = self.child.as_mut() {
            return Ok(child
                .try_wait()
                .context("poll gateway process")?
                .map(|status| status.code()));
        }
        let pid = self.info.pid.context("no gateway pid to watch")?;
        Ok((!Path::new(&format!("/proc/{pid}")).exists()).then_some(None))
    }

    /// Stops what we spawned: SIGTERM, a short grace, then SIGKILL. Attached gateways are left alone.
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            if self.sigterm().is_ok()
                && tokio::time::timeout(Duration::from_secs(5), child.wait())
                    .await
                    .is_err()
            {
                let _ = child.kill().await;
            }
        }
        if let Some(mut mock) = self.mock.take() {
            let _ = mock.kill().await;
        }
    }
}

fn start(bin: &Path, args: &[String], env: &[(&str, &str)], log: &Path) -> Result<Child> {
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

fn log_file(prefix: &Path, what: &str) -> Result<PathBuf> {
    let mut name = prefix
        .file_name()
        .context("log prefix has no file name")?
        .to_os_string();
    name.push(format!(".{what}.log"));
    Ok(prefix.with_file_name(name))
}

fn command_line(env: &[(&str, &str)], bin: &Path, args: &[String]) -> String {
    env.iter()
        .map(|(name, value)| format!("{name}={value}"))
        .chain(std::iter::once(bin.display().to_string()))
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A loopback port that was free a moment ago (the small race is acceptable for a test tool).
fn free_port() -> Result<SocketAddr> {
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
