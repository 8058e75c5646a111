//! The coordinator's side of the worker processes: spawn them (this same binary, subcommand
//! `worker`), hand each its spec, collect their JSON lines, send them commands (generations
//! created during the run, `leave`), reap them.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::client::stats::Counters;
use crate::metrics::latency::{Buckets, BySide};
use crate::metrics::proc::{read_cpu_seconds, read_rss};
use crate::worker::{Target, WorkerCommand, WorkerReport, WorkerSpec};

/// A worker line, or `None` when its stdout closed.
type Message = (usize, Option<WorkerReport>);

/// What one worker reported when it finished.
#[derive(Clone)]
pub struct Final {
    pub counters: Counters,
    pub latency: BySide<Buckets>,
    pub direct_latency: Buckets,
    pub handover_gap: Buckets,
}

pub struct Fleet {
    children: Vec<Child>,
    commands: Commands,
    rx: mpsc::UnboundedReceiver<Message>,
    progress: Vec<Counters>,
    finals: Vec<Option<Final>>,
    /// Workers whose output ended without a final report.
    pub lost_workers: Vec<usize>,
}

impl Fleet {
    pub async fn spawn(specs: &[WorkerSpec]) -> Result<Self> {
        let exe = std::env::current_exe().context("locate own executable for workers")?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut children = Vec::new();
        let mut commands = Vec::new();
        for (index, spec) in specs.iter().enumerate() {
            let mut child = Command::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("spawn worker")?;
            let mut stdin = child.stdin.take().context("worker stdin")?;
            let mut line = serde_json::to_vec(spec).context("encode worker spec")?;
            line.push(b'\n');
            stdin.write_all(&line).await.context("send worker spec")?;
            let stdout = child.stdout.take().context("worker stdout")?;
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(report) = serde_json::from_str(&line) {
                        let _ = tx.send((index, Some(report)));
                    }
                }
                let _ = tx.send((index, None));
            });
            // Commands go through a writer task, so they can be sent from anywhere without
            // waiting on a worker's pipe.
            let (command_tx, mut command_rx) = mpsc::unbounded_channel::<WorkerCommand>();
            tokio::spawn(async move {
                while let Some(command) = command_rx.recv().await {
                    let Ok(mut line) = serde_json::to_vec(&command) else {
                        continue;
                    };
                    line.push(b'\n');
                    if stdin.write_all(&line).await.is_err()
                        || matches!(command, WorkerCommand::Leave)
                    {
                        break;
                    }
                }
                // Dropping stdin closes it: a worker also leaves on EOF.
            });
            children.push(child);
            commands.push(command_tx);
        }
        Ok(Self {
            children,
            commands: Commands(commands),
            rx,
            progress: vec![Counters::default(); specs.len()],
            finals: vec![None; specs.len()],
            lost_workers: Vec::new(),
        })
    }

    /// Takes in every line the workers have written so far.
    pub fn poll(&mut self) {
        while let Ok((index, message)) = self.rx.try_recv() {
            match message {
                Some(WorkerReport::Progress(counters)) => self.progress[index] = counters,
                Some(WorkerReport::Final {
                    counters,
                    latency,
                    direct_latency,
                    handover_gap,
                }) => {
                    self.progress[index] = counters.clone();
                    self.finals[index] = Some(Final {
                        counters,
                        latency,
                        direct_latency,
                        handover_gap,
                    });
                }
                None if self.finals[index].is_none() => {
                    self.lost_workers.push(index);
                    self.finals[index] = Some(Final {
                        counters: self.progress[index].clone(),
                        latency: BySide::default(),
                        direct_latency: Buckets::default(),
                        handover_gap: Buckets::default(),
                    });
                }
                None => {}
            }
        }
    }

    /// The latest counters of all workers, summed.
    pub fn totals(&self) -> Counters {
        let mut sum = Counters::default();
        for counters in &self.progress {
            sum.add(counters);
        }
        sum
    }

    pub fn all_final(&self) -> bool {
        self.finals.iter().all(Option::is_some)
    }

    /// Asks every worker to close its clients' streams and finish.
    pub fn leave(&self) {
        self.commands.send(|| WorkerCommand::Leave);
    }

    /// A handle that tells every worker about generations created during the run.
    pub fn commands(&self) -> Commands {
        self.commands.clone()
    }

    /// CPU seconds the worker processes have used so far: shows whether the load client,
    /// which shares the machine with the gateway, was itself the bottleneck.
    pub fn cpu_seconds(&self) -> f64 {
        self.children
            .iter()
            .filter_map(|child| read_cpu_seconds(child.id()?).ok())
            .sum()
    }

    /// Resident memory of the worker processes, summed.
    pub fn rss_bytes(&self) -> u64 {
        self.children
            .iter()
            .filter_map(|child| read_rss(child.id()?).ok())
            .sum()
    }

    pub fn finals(&self) -> impl Iterator<Item = &Final> {
        self.finals.iter().flatten()
    }

    /// Reaps the workers, killing any that do not exit within `grace`. Their stdin is closed
    /// first: a worker's runtime cannot shut down while its read of an open stdin is pending.
    pub async fn reap(mut self, grace: Duration) {
        // Dropping the senders ends the writer tasks, which drop the pipes.
        self.commands.0.clear();
        for child in &mut self.children {
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
    }
}

/// The command channels of every worker of a fleet.
#[derive(Clone)]
pub struct Commands(Vec<mpsc::UnboundedSender<WorkerCommand>>);

impl Commands {
    /// Tells every worker a generation exists (or could not be created: `id` is `None`).
    pub fn announce(&self, target: &Target) {
        self.send(|| WorkerCommand::Generation(target.clone()));
    }

    /// A worker that has already left or exited no longer listens; that is not an error.
    fn send(&self, command: impl Fn() -> WorkerCommand) {
        for worker in &self.0 {
            let _ = worker.send(command());
        }
    }
}
