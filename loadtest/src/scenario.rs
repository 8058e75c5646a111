//! Named load shapes. Each preset is a full set of knobs; any knob can be overridden by a flag,
//! and the resolved knobs go into the JSON result so a run can be repeated exactly.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::client::{
    link::LinkKnobs,
    subscriber::{Behaviour, Expected},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScenarioName {
    /// A few hundred connections for a few seconds: the CI check.
    Smoke,
    /// N subscribers on long, slow generations: memory per connection.
    Idle,
    /// G generations × 1–3 subscribers, tokens every 20–80 ms: latency and CPU.
    Chat,
    /// G generations × 1 viewer through the gateway beside G streams read straight from the
    /// mock, by the same client in the same run, then the relay floor at G pairs: the chat
    /// path's added latency, and its CPU per token against `floor --relay`.
    Chatpath,
    /// 1 generation × N subscribers at 20 tokens/s: fan-out latency and CPU.
    Broadcast,
    /// A fraction of clients stop reading: they are evicted, the others' latency holds.
    Slow,
    /// Generations that send thousands of tokens at once (mock interval 0) to viewers that
    /// read as fast as their sockets deliver: none may be evicted, none may lose a token.
    Burst,
    /// Viewers behind a 100 ms round trip (a delaying relay in the tool) on 2,000 tokens/s
    /// generations: none may be evicted, none may lose a token.
    Rtt,
    /// SIGTERM the gateway under load: time until every client got reconnect/done, exit time.
    Drain,
    /// Bounded churn: clients come, read, stall, drop and leave while generations start and
    /// fail; then gauges back to 0, RSS back to its warmed-up baseline, every token delivered.
    Soak,
    /// Several instances on one Redis the tool starts: viewers on the owner and on other
    /// instances side by side, moving between instances; Redis commands and memory per token.
    Cluster,
    /// The cluster under load, then SIGTERM to instance 0: its viewers are handed over to the
    /// other instances; the gap each sees, generations completed vs interrupted, its exit.
    #[serde(rename = "cluster-drain")]
    ClusterDrain,
}

/// An inclusive integer range, written `20-80` or `50`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub min: u64,
    pub max: u64,
}

impl Range {
    pub const fn fixed(value: u64) -> Self {
        Self {
            min: value,
            max: value,
        }
    }

    /// Picks a value with the given random word.
    pub fn pick(&self, random: u64) -> u64 {
        self.min + random % (self.max - self.min + 1)
    }

    /// The mock's `interval_ms` knob: a number, or `[min, max]` drawn uniformly.
    pub fn to_json(self) -> serde_json::Value {
        if self.min == self.max {
            self.min.into()
        } else {
            serde_json::json!([self.min, self.max])
        }
    }
}

impl FromStr for Range {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (min, max) = s.split_once('-').unwrap_or((s, s));
        let min = min
            .trim()
            .parse()
            .with_context(|| format!("bad range {s:?}"))?;
        let max = max
            .trim()
            .parse()
            .with_context(|| format!("bad range {s:?}"))?;
        if min > max {
            bail!("range {s:?} has min > max");
        }
        Ok(Self { min, max })
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

impl Serialize for Range {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Range {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// How a run ends once every client is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// Clients read until their generation's `done`.
    AllDone,
    /// Clients hold their streams for `hold_s`, then all close them (memory scenarios).
    Leave,
    /// After `drain_after_s` of streaming the gateway (instance 0 of a cluster) gets SIGTERM.
    Drain,
    /// Clients and generations keep arriving for a while (a warm-up, then the soak rounds);
    /// each round ends when its clients are done and the gateway has settled.
    Churn,
}

/// Knob overrides; every field left out keeps the preset's value.
#[derive(Debug, Clone, Default, Args)]
pub struct Overrides {
    /// Total SSE connections, spread round-robin over the generations.
    #[arg(long, short = 'n')]
    pub connections: Option<u64>,
    /// Number of generations created on the gateway.
    #[arg(long, short = 'g')]
    pub generations: Option<u64>,
    /// Subscribers per generation, e.g. `1-3` (instead of --connections; N is then their sum).
    #[arg(long)]
    pub subscribers: Option<Range>,
    /// Tokens per generation, e.g. `400` or `40-400` (drawn per generation).
    #[arg(long)]
    pub tokens: Option<Range>,
    /// Mock delay between tokens in ms, e.g. `50` or `20-80`.
    #[arg(long)]
    pub interval_ms: Option<Range>,
    /// Pad each token's text to this many bytes (mock `token_bytes`).
    #[arg(long)]
    pub token_bytes: Option<u64>,
    /// New connections per second during the ramp.
    #[arg(long)]
    pub ramp_rate: Option<u64>,
    /// Seconds between the planned end of the ramp and the first token.
    #[arg(long)]
    pub start_margin_s: Option<f64>,
    /// Seconds every client holds its stream at steady state before leaving (idle).
    #[arg(long)]
    pub hold_s: Option<f64>,
    /// Fraction of clients that stop reading (slow), e.g. 0.05.
    #[arg(long)]
    pub stall_fraction: Option<f64>,
    /// Tokens a stalling client reads before it stops reading, e.g. `20` or `10-40`.
    #[arg(long)]
    pub stall_after: Option<Range>,
    /// Seconds a stalling client stops reading, then resumes like a browser would.
    #[arg(long)]
    pub stall_s: Option<f64>,
    /// Fraction of clients that close their connection mid-stream and come back with
    /// `Last-Event-ID` (soak), e.g. 0.15.
    #[arg(long)]
    pub reconnect_fraction: Option<f64>,
    /// Fraction of clients that close their connection mid-stream for good (soak).
    #[arg(long)]
    pub leave_fraction: Option<f64>,
    /// Fraction of generations the mock fails: a dropped stream or an error object mid-stream,
    /// or an HTTP error before the first token (drawn per generation).
    #[arg(long)]
    pub fail_fraction: Option<f64>,
    /// Seconds of churn in each soak round (clients and generations keep arriving).
    #[arg(long)]
    pub churn_s: Option<f64>,
    /// Seconds of the same churn before the soak, after which the RSS baseline is taken.
    #[arg(long)]
    pub warmup_s: Option<f64>,
    /// Soak rounds after the warm-up; RSS is compared after each (a leak grows with rounds).
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Passed to the spawned gateway as `--retention`; the soak waits this long after the last
    /// generation ended before it measures RSS.
    #[arg(long)]
    pub retention_s: Option<f64>,
    /// Seconds of streaming before SIGTERM (drain).
    #[arg(long)]
    pub drain_after_s: Option<f64>,
    /// Passed to the spawned gateway as `--drain-deadline`, e.g. `5s`.
    #[arg(long)]
    pub drain_deadline: Option<String>,
    /// Hard limit for the whole run in seconds; the run stops itself there.
    #[arg(long)]
    pub time_limit_s: Option<u64>,
    /// `tokenfan serve` instances on one Redis (cluster).
    #[arg(long)]
    pub instances: Option<u32>,
    /// One instance on the in-memory store, no Redis: the cluster's comparison run.
    #[arg(long)]
    pub no_store: bool,
    /// Fraction of viewers whose first connection goes to an instance other than their
    /// generation's owner (cluster).
    #[arg(long)]
    pub non_owner_fraction: Option<f64>,
    /// Fraction of viewers that close their stream mid-way and resume on the next instance
    /// with `Last-Event-ID` (cluster).
    #[arg(long)]
    pub move_fraction: Option<f64>,
    /// Viewers connect through a relay in the tool that delays every chunk by half this
    /// round-trip time each way (0: directly).
    #[arg(long)]
    pub rtt_ms: Option<u64>,
    /// Bytes in flight per direction on that relay (its window), e.g. 65536.
    #[arg(long)]
    pub link_window: Option<u32>,
}

/// How many clients and which generation each one follows.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// `connections` clients assigned round-robin to the generations.
    Spread { connections: u64 },
    /// Each generation gets a drawn number of subscribers.
    PerGeneration { subscribers: Range },

    /// Clients arrive evenly over each round's churn time; each follows a generation created
    /// at most `stream` seconds before it arrives (see [`Plan::churn`]).
    Churn { connections: u64 },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StallKnobs {
    pub fraction: f64,
    pub after_tokens: Range,
    pub pause_s: f64,
    /// SO_RCVBUF of stalling clients, so back-pressure reaches the gateway after kilobytes.
    pub recv_buffer: u32,
}

/// Clients that close their connection mid-stream: some come back, some do not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DropKnobs {
    pub reconnect_fraction: f64,
    pub leave_fraction: f64,
    pub after_tokens: Range,
    /// How long a reconnecting client stays away before it resumes with `Last-Event-ID`.
    pub away_ms: Range,
}

/// What clients do besides reading to the end, as fractions of all clients.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientMix {
    pub stall: Option<StallKnobs>,
    pub drops: Option<DropKnobs>,
}

impl ClientMix {
    /// The behaviour of client `index`: a fixed pseudo-random draw for a seed, so a run is
    /// repeatable and the fractions hold over many clients.
    pub fn behaviour(&self, index: u64, seed: u64) -> Behaviour {
        let draw = mix(seed ^ mix(index ^ 0x51a11));
        let unit = (draw % 1_000_000) as f64 / 1_000_000.0;
        let second = mix(draw);
        let mut edge = 0.0;
        if let Some(s) = &self.stall {
            edge += s.fraction;
            if unit < edge {
                return Behaviour::Stall {
                    after_tokens: s.after_tokens.pick(second),
                    pause_ms: (s.pause_s * 1000.0) as u64,
                    recv_buffer: s.recv_buffer,
                };
            }
        }
        if let Some(d) = &self.drops {
            let after_tokens = d.after_tokens.pick(second);
            edge += d.reconnect_fraction;
            if unit < edge {
                return Behaviour::Reconnect {
                    after_tokens,
                    away_ms: d.away_ms.pick(mix(second)),
                };
            }
            edge += d.leave_fraction;
            if unit < edge {
                return Behaviour::Leave { after_tokens };
            }
        }
        Behaviour::Read
    }
}

/// The soak's rounds and timing.
#[derive(Debug, Clone, Serialize)]
pub struct SoakKnobs {
    pub churn_s: f64,
    pub warmup_s: f64,
    pub rounds: u32,
    /// The gateway's `--retention`: finished generations are freed this long after they end.
    pub retention_s: f64,
}

/// Several gateway instances sharing one store: who owns a generation, where a viewer
/// connects first.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterKnobs {
    /// `tokenfan serve` processes, all on the same mock (and Redis, with `store`).
    pub instances: u32,
    /// The instances share a Redis the tool starts; false: one instance on the in-memory store.
    pub store: bool,
    /// Share of viewers that connect first to an instance other than their generation's owner.
    pub non_owner_fraction: f64,
}

impl ClusterKnobs {
    /// Generations are created round-robin over the instances; the one that took the `POST`
    /// owns it.
    pub fn owner(&self, generation: u32) -> u32 {
        generation % self.instances
    }

    /// The instance client `index` of generation `generation` connects to first: a fixed draw
    /// for a seed puts `non_owner_fraction` of the clients on one of the other instances (spread
    /// evenly over them), the rest on the owner, so every instance gets about the same share.
    pub fn first_instance(&self, index: u64, generation: u32, seed: u64) -> u32 {
        let owner = self.owner(generation);
        if self.instances < 2 {
            return owner;
        }
        let draw = mix(seed ^ mix(index ^ 0x1c57_e000));
        let unit = (draw % 1_000_000) as f64 / 1_000_000.0;
        if unit >= self.non_owner_fraction {
            return owner;
        }
        let others = u64::from(self.instances - 1);
        (owner + 1 + (mix(draw) % others) as u32) % self.instances
    }
}

/// A fully resolved scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub name: ScenarioName,
    pub shape: Shape,
    pub generations: u64,
    pub tokens: Range,
    pub interval_ms: Range,
    pub token_bytes: Option<u64>,
    pub ramp_rate: u64,
    pub start_margin_s: f64,
    pub hold_s: f64,
    #[serde(flatten)]
    pub clients: ClientMix,
    /// Fraction of generations the mock is told to fail (see [`Fault`]).
    pub fail_fraction: f64,
    pub drain_after_s: f64,
    pub soak: Option<SoakKnobs>,
    pub cluster: Option<ClusterKnobs>,
    /// The path between viewers and gateway, when it is not plain loopback.
    pub link: Option<LinkKnobs>,
    /// Flags this scenario gives a spawned gateway (`--name=value`), before `--gateway-arg`s.
    pub gateway_args: Vec<String>,
    /// Environment (`NAME=value`) of a spawned gateway.
    pub gateway_env: Vec<String>,
    pub ending: Ending,
    pub time_limit_s: u64,
}

impl Scenario {
    pub fn preset(name: ScenarioName) -> Self {
        let base = Self {
            name,
            shape: Shape::Spread { connections: 200 },
            generations: 10,
            tokens: Range::fixed(40),
            interval_ms: Range { min: 20, max: 40 },
            token_bytes: None,
            ramp_rate: 2000,
            start_margin_s: 1.0,
            hold_s: 0.0,
            clients: ClientMix::default(),
            fail_fraction: 0.0,
            drain_after_s: 0.0,
            soak: None,
            cluster: None,
            link: None,
            gateway_args: Vec::new(),
            gateway_env: Vec::new(),
            ending: Ending::AllDone,
            time_limit_s: 0,
        };
        match name {
            ScenarioName::Smoke => Self {
                ramp_rate: 400,
                ..base
            },
            ScenarioName::Idle => Self {
                shape: Shape::Spread { connections: 5000 },
                generations: 50,
                tokens: Range::fixed(1000),
                interval_ms: Range::fixed(10_000),
                hold_s: 10.0,
                ending: Ending::Leave,
                ..base
            },
            ScenarioName::Chat => Self {
                shape: Shape::PerGeneration {
                    subscribers: Range { min: 1, max: 3 },
                },
                generations: 5000,
                tokens: Range::fixed(400),
                interval_ms: Range { min: 20, max: 80 },
                start_margin_s: 2.0,
                ..base
            },
            // Issue 14's comparison: 20 tokens/s per stream, one viewer per generation. The plan
            // interleaves the direct streams with the generations (see `Plan::build`).
            ScenarioName::Chatpath => Self {
                shape: Shape::PerGeneration {
                    subscribers: Range::fixed(1),
                },
                generations: 1000,
                tokens: Range::fixed(200),
                interval_ms: Range::fixed(50),
                start_margin_s: 2.0,
                ..base
            },
            ScenarioName::Broadcast => Self {
                shape: Shape::Spread {
                    connections: 10_000,
                },
                generations: 1,
                tokens: Range::fixed(600),
                interval_ms: Range::fixed(50),
                start_margin_s: 2.0,
                ..base
            },
            // A stalled reader falls out of the live fan-out once the gateway's socket send
            // buffer and the 64-slot channel are full. Kernel autotuning would let that buffer
            // grow to tcp_wmem's max (4 MiB), more than a generation may log (4 MiB), so the
            // gateway gets a fixed 64 KB SO_SNDBUF, its production setting for this case;
            // 1 KB tokens at 20/s then fill it in ~7 s. It resumes reading at 12 s, ~5 s behind:
            // past the 2 s `--max-viewer-lag` given here (the default 10 s would let it catch up
            // from the log), so it reads its backlog and then `event: reconnect`, before the 10 s
            // write timeout would cut it (stall longer to see cut streams instead).
            ScenarioName::Slow => Self {
                shape: Shape::Spread { connections: 1000 },
                generations: 10,
                tokens: Range::fixed(600),
                interval_ms: Range::fixed(50),
                token_bytes: Some(1024),
                clients: ClientMix {
                    stall: Some(StallKnobs {
                        fraction: 0.05,
                        after_tokens: Range::fixed(20),
                        pause_s: 12.0,
                        recv_buffer: 4096,
                    }),
                    drops: None,
                },
                gateway_args: vec![
                    "--socket-send-buffer=65536".into(),
                    "--max-viewer-lag=2s".into(),
                ],
                ..base
            },
            // Ten trials of the burst of issue 14 at once: a provider that sends 3,000 tokens
            // as fast as the gateway reads them, ten viewers each that read as fast as their
            // sockets deliver.
            ScenarioName::Burst => Self {
                shape: Shape::PerGeneration {
                    subscribers: Range::fixed(10),
                },
                generations: 10,
                tokens: Range::fixed(3000),
                interval_ms: Range::fixed(0),
                ..base
            },
            // 2,000 tokens/s (0-1 ms apart: the mock paces on a schedule, so they average
            // 0.5 ms) for 5 s, ten viewers each behind a 100 ms round trip whose window
            // (64 KiB each way) carries 1.3 MB/s, ten times what they need.
            ScenarioName::Rtt => Self {
                shape: Shape::PerGeneration {
                    subscribers: Range::fixed(10),
                },
                generations: 4,
                tokens: Range::fixed(10_000),
                interval_ms: Range { min: 0, max: 1 },
                link: Some(LinkKnobs {
                    rtt_ms: 100,
                    window: 64 * 1024,
                }),
                ..base
            },
            ScenarioName::Drain => Self {
                shape: Shape::Spread {
                    connections: 10_000,
                },
                generations: 1000,
                tokens: Range { min: 40, max: 400 },
                interval_ms: Range { min: 20, max: 80 },
                drain_after_s: 3.0,
                gateway_args: vec!["--drain-deadline=5s".into()],
                ending: Ending::Drain,
                ..base
            },
            // 2 KB tokens at 10-30 ms behind the `slow` preset's 64 KB send buffer: a stalled
            // reader falls behind ~2 s into its 3 s stall, well inside its generation's 3-9 s,
            // and catches up from the log when it reads again (until issue 14 it was evicted
            // and resumed with `Last-Event-ID`).
            // The retention outlasts a stall plus the 1 s `retry:`, so every resume finds its
            // generation; finished generations are freed 6 s after they end, before RSS is
            // compared. Background purging with a 1 s decay makes jemalloc hand freed pages
            // back within a second instead of keeping them dirty until the next allocations
            // (an idle process may never purge): RSS then shows what is still allocated.
            ScenarioName::Soak => Self {
                shape: Shape::Churn { connections: 2500 },
                generations: 400,
                tokens: Range { min: 150, max: 300 },
                interval_ms: Range { min: 10, max: 30 },
                token_bytes: Some(2048),
                start_margin_s: 0.0,
                clients: ClientMix {
                    stall: Some(StallKnobs {
                        fraction: 0.15,
                        after_tokens: Range { min: 10, max: 40 },
                        pause_s: 3.0,
                        recv_buffer: 4096,
                    }),
                    drops: Some(DropKnobs {
                        reconnect_fraction: 0.15,
                        leave_fraction: 0.10,
                        after_tokens: Range { min: 5, max: 150 },
                        away_ms: Range {
                            min: 100,
                            max: 2000,
                        },
                    }),
                },
                fail_fraction: 0.2,
                soak: Some(SoakKnobs {
                    churn_s: 60.0,
                    warmup_s: 10.0,
                    rounds: 1,
                    retention_s: 6.0,
                }),
                gateway_args: vec!["--socket-send-buffer=65536".into()],
                gateway_env: vec![format!(
                    "{JEMALLOC_CONF_VAR}=background_thread:true,dirty_decay_ms:1000"
                )],
                ending: Ending::Churn,
                ..base
            },
            // The comparison point: 1,000 generations at 20 tokens/s, two viewers each,
            // half of the viewers on an instance that does not own their generation.
            ScenarioName::Cluster => Self {
                shape: Shape::Spread { connections: 2000 },
                generations: 1000,
                tokens: Range::fixed(200),
                interval_ms: Range::fixed(50),
                start_margin_s: 2.0,
                cluster: Some(ClusterKnobs {
                    instances: 3,
                    store: true,
                    non_owner_fraction: 0.5,
                }),
                ..base
            },
            // The hand-over measurement: instance 0 owns a third of the generations and
            // carries a third of the viewers (half of them on generations owned elsewhere).
            // 20 s generations and SIGTERM 5 s into them: the owner's upstream calls outlive
            // the hand-over and finish inside the gateway's default 25 s drain deadline.
            ScenarioName::ClusterDrain => Self {
                shape: Shape::Spread { connections: 3000 },
                generations: 300,
                tokens: Range::fixed(400),
                interval_ms: Range::fixed(50),
                start_margin_s: 2.0,
                drain_after_s: 5.0,
                gateway_args: vec!["--drain-deadline=25s".into()],
                cluster: Some(ClusterKnobs {
                    instances: 3,
                    store: true,
                    non_owner_fraction: 0.5,
                }),
                ending: Ending::Drain,
                ..base
            },
        }
    }

    /// The preset for `name` with `overrides` applied and a time limit filled in.
    pub fn resolve(name: ScenarioName, o: &Overrides) -> Result<Self> {
        let mut s = Self::preset(name);
        if let Some(n) = o.connections {
            s.shape = match s.shape {
                Shape::Churn { .. } => Shape::Churn { connections: n },
                _ => Shape::Spread { connections: n },
            };
        }
        if let Some(subscribers) = o.subscribers {
            if o.connections.is_some() {
                bail!("give --connections or --subscribers, not both");
            }
            if s.soak.is_some() {
                bail!("soak clients arrive over time: give --connections, not --subscribers");
            }
            s.shape = Shape::PerGeneration { subscribers };
        }
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = o.$field.clone() { s.$field = v; } )* };
        }
        set!(
            generations,
            tokens,
            interval_ms,
            ramp_rate,
            start_margin_s,
            hold_s,
            drain_after_s
        );
        if o.token_bytes.is_some() {
            s.token_bytes = o.token_bytes;
        }
        if let Some(deadline) = &o.drain_deadline {
            s.gateway_args
                .retain(|a| !a.starts_with("--drain-deadline="));
            s.gateway_args.push(format!("--drain-deadline={deadline}"));
        }
        s.apply_stall_overrides(o);
        s.apply_drop_overrides(o);
        if let Some(f) = o.fail_fraction {
            s.fail_fraction = f.clamp(0.0, 1.0);
        }
        s.apply_soak_overrides(o)?;
        s.apply_cluster_overrides(o)?;
        s.apply_link_overrides(o);
        if s.generations == 0 || s.ramp_rate == 0 {
            bail!("--generations and --ramp-rate must be at least 1");
        }
        s.time_limit_s = o.time_limit_s.unwrap_or_else(|| s.default_time_limit());
        Ok(s)
    }

    /// `--rtt-ms 0` connects directly; a window alone keeps the preset's (or 100 ms) delay.
    fn apply_link_overrides(&mut self, o: &Overrides) {
        if let Some(rtt_ms) = o.rtt_ms {
            self.link = (rtt_ms > 0).then_some(LinkKnobs {
                rtt_ms,
                window: self.link.map_or(64 * 1024, |link| link.window),
            });
        }
        if let Some(window) = o.link_window {
            let link = self.link.get_or_insert(LinkKnobs {
                rtt_ms: 100,
                window,
            });
            link.window = window.max(1);
        }
    }

    fn apply_stall_overrides(&mut self, o: &Overrides) {
        if o.stall_fraction.is_none() && o.stall_after.is_none() && o.stall_s.is_none() {
            return;
        }
        let stall = self.clients.stall.get_or_insert(StallKnobs {
            fraction: 0.05,
            after_tokens: Range::fixed(20),
            pause_s: 20.0,
            recv_buffer: 4096,
        });
        if let Some(f) = o.stall_fraction {
            stall.fraction = f.clamp(0.0, 1.0);
        }
        if let Some(n) = o.stall_after {
            stall.after_tokens = n;
        }
        if let Some(s) = o.stall_s {
            stall.pause_s = s;
        }
    }

    fn apply_drop_overrides(&mut self, o: &Overrides) {
        if o.reconnect_fraction.is_none() && o.leave_fraction.is_none() {
            return;
        }
        let drops = self.clients.drops.get_or_insert(DropKnobs {
            reconnect_fraction: 0.0,
            leave_fraction: 0.0,
            after_tokens: Range { min: 5, max: 150 },
            away_ms: Range {
                min: 100,
                max: 2000,
            },
        });
        if let Some(f) = o.reconnect_fraction {
            drops.reconnect_fraction = f.clamp(0.0, 1.0);
        }
        if let Some(f) = o.leave_fraction {
            drops.leave_fraction = f.clamp(0.0, 1.0);
        }
    }

    /// Soak timing; the ramp rate follows from clients and churn time, and the gateway gets
    /// the retention the soak waits for.
    fn apply_soak_overrides(&mut self, o: &Overrides) -> Result<()> {
        let given = [o.churn_s, o.warmup_s, o.retention_s]
            .iter()
            .any(Option::is_some)
            || o.rounds.is_some();
        let (Some(soak), Shape::Churn { connections }) = (self.soak.as_mut(), self.shape) else {
            if given {
                bail!("--churn-s, --warmup-s, --rounds and --retention-s are soak knobs");
            }
            return Ok(());
        };
        if o.ramp_rate.is_some() {
            bail!("the soak's arrival rate is --connections / --churn-s: leave out --ramp-rate");
        }
        soak.churn_s = o.churn_s.unwrap_or(soak.churn_s);
        soak.warmup_s = o.warmup_s.unwrap_or(soak.warmup_s).max(0.0);
        soak.rounds = o.rounds.unwrap_or(soak.rounds);
        soak.retention_s = o.retention_s.unwrap_or(soak.retention_s);
        if soak.churn_s <= 0.0 || soak.rounds == 0 || soak.retention_s < 0.0 {
            bail!("--churn-s and --rounds must be positive, --retention-s not negative");
        }
        self.ramp_rate = (connections as f64 / soak.churn_s).ceil() as u64;
        let retention_ms = (soak.retention_s * 1000.0).round() as u64;
        self.gateway_args
            .push(format!("--retention={retention_ms}ms"));
        Ok(())
    }

    /// Instances, store, viewer placement and moves. `--no-store` means one instance (any
    /// other instance could not serve its generations); `--hold-s` turns the run into the idle
    /// shape: hold, then leave.
    fn apply_cluster_overrides(&mut self, o: &Overrides) -> Result<()> {
        let given = o.instances.is_some()
            || o.no_store
            || o.non_owner_fraction.is_some()
            || o.move_fraction.is_some();
        let Some(cluster) = self.cluster.as_mut() else {
            if given {
                bail!("--instances, --no-store, --non-owner-fraction and --move-fraction are cluster knobs");
            }
            return Ok(());
        };
        if o.no_store {
            cluster.store = false;
            cluster.instances = 1;
        }
        if let Some(n) = o.instances {
            cluster.instances = n;
        }
        if cluster.instances == 0 || (!cluster.store && cluster.instances > 1) {
            bail!("--no-store runs exactly one instance; the cluster needs --instances ≥ 1");
        }
        if let Some(f) = o.non_owner_fraction {
            cluster.non_owner_fraction = f.clamp(0.0, 1.0);
        }
        if let Some(f) = o.move_fraction {
            if o.reconnect_fraction.is_some() {
                bail!("give --move-fraction or --reconnect-fraction, not both");
            }
            // A move happens somewhere in the stream and comes back quickly, as a browser
            // whose connection was cut and that a load balancer sends elsewhere.
            self.clients.drops = Some(DropKnobs {
                reconnect_fraction: f.clamp(0.0, 1.0),
                leave_fraction: 0.0,
                after_tokens: Range {
                    min: 1,
                    max: self.tokens.min.saturating_sub(1).max(1),
                },
                away_ms: Range { min: 0, max: 200 },
            });
        }
        if o.hold_s.is_some() {
            self.ending = Ending::Leave;
        }
        Ok(())
    }

    /// A drain with other instances on the shared store: the draining instance's viewers
    /// resume elsewhere, and every client must see its generation end.
    pub fn hands_over(&self) -> bool {
        self.ending == Ending::Drain
            && (self.cluster.as_ref()).is_some_and(|c| c.store && c.instances > 1)
    }

    /// Gateway instances the run spawns.
    pub fn instances(&self) -> u32 {
        self.cluster.as_ref().map_or(1, |c| c.instances)
    }

    /// Upstream connections one instance holds at most: one per generation it owns.
    pub fn upstream_fds_per_instance(&self) -> u64 {
        self.generations.div_ceil(u64::from(self.instances()))
    }

    /// The instance generation `index` is created on (0 with one gateway).
    pub fn owner(&self, index: u32) -> u32 {
        self.cluster.as_ref().map_or(0, |c| c.owner(index))
    }

    /// Streams read straight from the mock beside the gateway's (`chatpath`: one per generation).
    pub fn direct_streams(&self) -> u64 {
        match self.name {
            ScenarioName::Chatpath => self.generations,
            _ => 0,
        }
    }

    /// Seconds the ramp takes at the configured rate, for `connections` clients.
    pub fn ramp_s(&self, connections: u64) -> f64 {
        connections as f64 / self.ramp_rate as f64
    }

    /// Seconds the longest generation streams.
    /// Whether a viewer told `slow_consumer` fails the run: where every viewer keeps up.
    pub fn allows_no_eviction(&self) -> bool {
        matches!(self.name, ScenarioName::Burst | ScenarioName::Rtt)
    }

    pub fn stream_s(&self) -> f64 {
        (self.tokens.max * self.interval_ms.max) as f64 / 1000.0
    }

    fn default_time_limit(&self) -> u64 {
        let connections = match self.shape {
            Shape::Spread { connections } | Shape::Churn { connections } => connections,
            Shape::PerGeneration { subscribers } => {
                self.generations * subscribers.max + self.direct_streams()
            }
        };
        let stall_s = self.clients.stall.as_ref().map_or(0.0, |s| s.pause_s);
        if let Some(soak) = &self.soak {
            // Each round: its churn, the last generations' streams, the retention (which
            // outlasts any resume), the settle polls; the warm-up is one more round.
            let tail = self.stream_s() + soak.retention_s + SOAK_TAIL_S;
            let churn = soak.warmup_s + soak.churn_s * f64::from(soak.rounds);
            return (churn + tail * f64::from(soak.rounds + 1) + 10.0).ceil() as u64;
        }
        let setup =
            self.generations as f64 / 500.0 + self.ramp_s(connections) + self.start_margin_s;
        let body = match self.ending {
            Ending::AllDone | Ending::Churn => self.stream_s() + stall_s,
            Ending::Leave => self.hold_s + 10.0,
            // Handed-over viewers read on to their generation's end.
            Ending::Drain if self.hands_over() => self.drain_after_s.max(self.stream_s()) + 60.0,
            Ending::Drain => self.drain_after_s + 60.0,
        };
        (setup + body + 60.0).ceil() as u64
    }
}

/// The variable tokenfan's allocator reads its options from: tikv-jemallocator builds jemalloc
/// with the `_rjem_` symbol prefix, so plain `MALLOC_CONF` is ignored.
pub const JEMALLOC_CONF_VAR: &str = "_RJEM_MALLOC_CONF";

/// Seconds a soak round may spend settling beyond its streams and retention: gauges back to 0
/// (up to 5 s) and RSS no longer falling (up to 15 s, typically 3).
pub const SOAK_TAIL_S: f64 = 8.0;

/// How the mock is told to fail a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `fail_after`: the upstream connection drops after this many tokens.
    Drop { after: u64 },
    /// `error_after`: the provider sends an error object after this many tokens.
    Error { after: u64 },
    /// `status`: the provider answers this HTTP error before any token (5xx are retried first).
    Status(u16),
}

/// Statuses a failing generation may get before its first token: one the gateway gives up on
/// at once, two it retries until its attempts run out.
const FAULT_STATUSES: [u16; 3] = [400, 500, 503];

/// One generation to create: its token count and fault are drawn from the scenario's knobs.
#[derive(Debug, Clone, Copy)]
pub struct GenerationPlan {
    pub tokens: u64,
    pub fault: Option<Fault>,
    /// Not a generation on the gateway: a stream its client asks the mock for directly.
    pub direct: bool,
}

impl GenerationPlan {
    fn draw(s: &Scenario, seed: u64, index: u64) -> Self {
        let tokens = s.tokens.pick(mix(seed ^ index));
        let draw = mix(seed ^ index ^ 0xfa17_0000_0000);
        let fails = ((draw % 1_000_000) as f64) < s.fail_fraction * 1_000_000.0;
        let fault = fails.then(|| {
            let which = mix(draw);
            // Mid-stream faults leave at least one token before and one after.
            let after = Range {
                min: 1,
                max: tokens.saturating_sub(1).max(1),
            }
            .pick(mix(which));
            match which % 3 {
                0 => Fault::Drop { after },
                1 => Fault::Error { after },
                _ => Fault::Status(FAULT_STATUSES[(mix(which) % 3) as usize]),
            }
        });
        Self {
            tokens,
            fault,
            direct: false,
        }
    }

    /// How the generation ends: with `done` after all its tokens, or with `error` after the
    /// tokens before its fault.
    pub fn expected(&self) -> Expected {
        let tokens = match self.fault {
            None => self.tokens,
            Some(Fault::Drop { after } | Fault::Error { after }) => after.min(self.tokens),
            Some(Fault::Status(_)) => 0,
        };
        Expected {
            tokens,
            completes: self.fault.is_none(),
        }
    }

    /// The mock knobs for this generation's length and fault.
    pub fn mock_knobs(&self) -> serde_json::Value {
        let mut knobs = serde_json::json!({ "tokens": self.tokens });
        match self.fault {
            None => {}
            Some(Fault::Drop { after }) => knobs["fail_after"] = after.into(),
            Some(Fault::Error { after }) => knobs["error_after"] = after.into(),
            Some(Fault::Status(status)) => knobs["status"] = status.into(),
        }
        knobs
    }
}

/// Which generations exist and which one each client follows.
#[derive(Debug, Clone)]
pub struct Plan {
    pub generations: Vec<GenerationPlan>,
    /// `assignments[client] = generation index`.
    pub assignments: Vec<u32>,
    /// `instances[client]` = the instance it connects to first (0 with one gateway).
    pub instances: Vec<u32>,
}

impl Plan {
    /// The plan of a whole run; for a churn scenario, of one soak round.
    pub fn build(s: &Scenario, seed: u64) -> Result<Self> {
        if let Some(soak) = &s.soak {
            return Self::churn(s, seed, soak.churn_s);
        }
        let mut generations = Self::draw_generations(s, seed, s.generations + s.direct_streams())?;
        if s.direct_streams() > 0 {
            // Every other one: the direct streams' first tokens fall between the generations'
            // (`first_token_phase`), so both sides meet the same load at the same moments.
            for direct in generations.iter_mut().skip(1).step_by(2) {
                direct.direct = true;
            }
        }
        let g = generations.len() as u32;
        let assignments: Vec<u32> = match s.shape {
            Shape::Spread { connections } | Shape::Churn { connections } => (0..connections)
                .map(|c| (c % u64::from(g)) as u32)
                .collect(),
            Shape::PerGeneration { subscribers } => (0..g)
                .flat_map(|gen| {
                    let k = subscribers.pick(mix(seed ^ (u64::from(gen) << 32) ^ 0x5bd1));
                    std::iter::repeat_n(gen, k as usize)
                })
                .collect(),
        };
        let instances = match &s.cluster {
            Some(cluster) => (assignments.iter().enumerate())
                .map(|(client, &gen)| cluster.first_instance(client as u64, gen, seed))
                .collect(),
            None => vec![0; assignments.len()],
        };
        Ok(Self {
            generations,
            assignments,
            instances,
        })
    }

    /// One churn round of `duration_s`, at the scenario's rates: generations are created evenly
    /// over the round and client `k` arrives at `k / N` of it. Each client follows a generation
    /// created up to one typical stream (shortest tokens × mean interval) before it arrives —
    /// never one not created yet — so most join a running generation part-way (replaying
    /// what they missed), some catch only its end.
    pub fn churn(s: &Scenario, seed: u64, duration_s: f64) -> Result<Self> {
        let (Shape::Churn { connections }, Some(soak)) = (s.shape, &s.soak) else {
            bail!("a churn plan needs a soak scenario");
        };
        let share = duration_s / soak.churn_s;
        let n = (connections as f64 * share).round() as u64;
        let g = ((s.generations as f64 * share).round() as u64).max(1);
        let generations = Self::draw_generations(s, seed, g)?;
        let typical_stream_s =
            (s.tokens.min * (s.interval_ms.min + s.interval_ms.max)) as f64 / 2.0 / 1000.0;
        let lag = Range {
            min: 0,
            max: (typical_stream_s * g as f64 / duration_s) as u64,
        };
        let assignments = (0..n)
            .map(|k| {
                let newest = k * g / n.max(1);
                newest.saturating_sub(lag.pick(mix(seed ^ k ^ 0x1a6))) as u32
            })
            .collect::<Vec<_>>();
        Ok(Self {
            generations,
            instances: vec![0; assignments.len()],
            assignments,
        })
    }

    fn draw_generations(s: &Scenario, seed: u64, count: u64) -> Result<Vec<GenerationPlan>> {
        u32::try_from(count).context("too many generations")?;
        Ok((0..count)
            .map(|i| GenerationPlan::draw(s, seed, i))
            .collect())
    }

    pub fn connections(&self) -> u64 {
        self.assignments.len() as u64
    }

    /// Keeps the first `max` clients (the N cap when the gateway cannot hold more).
    pub fn cap(&mut self, max: u64) {
        self.assignments.truncate(max as usize);
        self.instances.truncate(max as usize);
    }

    /// Clients that connect first to each of `instances` instances.
    pub fn clients_per_instance(&self, instances: u32) -> Vec<u64> {
        let mut counts = vec![0; instances as usize];
        for &i in &self.instances {
            counts[i as usize] += 1;
        }
        counts
    }
}

/// splitmix64: a fixed, dependency-free way to draw per-generation and per-client values.
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_print() {
        assert_eq!(
            "20-80".parse::<Range>().unwrap(),
            Range { min: 20, max: 80 }
        );
        assert_eq!("50".parse::<Range>().unwrap(), Range::fixed(50));
        assert!("80-20".parse::<Range>().is_err());
        assert_eq!(Range { min: 1, max: 3 }.to_string(), "1-3");
        assert_eq!(Range::fixed(50).to_json(), serde_json::json!(50));
        assert_eq!(
            Range { min: 20, max: 80 }.to_json(),
            serde_json::json!([20, 80])
        );
        let r = Range { min: 1, max: 3 };
        assert!((0..100)
            .map(|i| r.pick(mix(i)))
            .all(|v| (1..=3).contains(&v)));
    }

    #[test]
    fn overrides_replace_preset_knobs() {
        let o = Overrides {
            connections: Some(19_000),
            interval_ms: Some(Range::fixed(25)),
            ..Overrides::default()
        };
        let s = Scenario::resolve(ScenarioName::Broadcast, &o).unwrap();
        assert!(matches!(
            s.shape,
            Shape::Spread {
                connections: 19_000
            }
        ));
        assert_eq!(s.interval_ms, Range::fixed(25));
        assert_eq!(s.generations, 1);
        assert!(s.time_limit_s > 30);
        let both = Overrides {
            connections: Some(1),
            subscribers: Some(Range::fixed(1)),
            ..Overrides::default()
        };
        assert!(Scenario::resolve(ScenarioName::Chat, &both).is_err());
    }

    #[test]
    fn plans_spread_round_robin_or_per_generation() {
        let spread = Scenario::resolve(
            ScenarioName::Idle,
            &Overrides {
                connections: Some(120),
                ..Overrides::default()
            },
        )
        .unwrap();
        let plan = Plan::build(&spread, 1).unwrap();
        assert_eq!(plan.connections(), 120);
        assert_eq!(plan.assignments[51], 1);

        let chat = Scenario::resolve(
            ScenarioName::Chat,
            &Overrides {
                generations: Some(100),
                ..Overrides::default()
            },
        )
        .unwrap();
        let mut plan = Plan::build(&chat, 1).unwrap();
        assert!((100..=300).contains(&plan.connections()));
        for gen in 0..100 {
            let subs = plan.assignments.iter().filter(|&&g| g == gen).count();
            assert!((1..=3).contains(&subs));
        }
        plan.cap(10);
        assert_eq!(plan.connections(), 10);
    }

    #[test]
    fn chatpath_interleaves_a_direct_stream_with_each_generation() {
        let o = Overrides {
            generations: Some(100),
            ..Overrides::default()
        };
        let s = Scenario::resolve(ScenarioName::Chatpath, &o).unwrap();
        assert_eq!(s.direct_streams(), 100);
        let plan = Plan::build(&s, 1).unwrap();
        assert_eq!((plan.generations.len(), plan.connections()), (200, 200));
        let direct: Vec<bool> = plan.generations.iter().map(|g| g.direct).collect();
        assert!(direct.chunks(2).all(|pair| pair == [false, true]));
        // One client each, the same length and pace on both sides.
        assert!(plan
            .assignments
            .iter()
            .enumerate()
            .all(|(c, &g)| g == c as u32));
        assert!(plan.generations.iter().all(|g| g.tokens == 200));
        let chat = Scenario::resolve(ScenarioName::Chat, &o).unwrap();
        assert_eq!(chat.direct_streams(), 0);
        assert!(Plan::build(&chat, 1)
            .unwrap()
            .generations
            .iter()
            .all(|g| !g.direct));
    }

    #[test]
    fn cluster_drain_hands_over_only_with_other_instances_on_the_store() {
        let hand_over = Scenario::resolve(ScenarioName::ClusterDrain, &Overrides::default());
        let hand_over = hand_over.unwrap();
        assert!(hand_over.hands_over());
        assert_eq!((hand_over.instances(), hand_over.owner(3)), (3, 0));
        // The handed-over viewers read on to the end of their 20 s generations.
        assert!(hand_over.time_limit_s as f64 > hand_over.stream_s() + 60.0);
        let alone = Overrides {
            no_store: true,
            ..Overrides::default()
        };
        let alone = Scenario::resolve(ScenarioName::ClusterDrain, &alone).unwrap();
        assert!(!alone.hands_over());
        let drain = Scenario::resolve(ScenarioName::Drain, &Overrides::default()).unwrap();
        assert!(!drain.hands_over());
    }

    #[test]
    fn cluster_spreads_owners_round_robin_and_puts_the_asked_share_elsewhere() {
        let cluster = Scenario::resolve(
            ScenarioName::Cluster,
            &Overrides {
                connections: Some(60_000),
                instances: Some(6),
                move_fraction: Some(0.2),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!((cluster.instances(), cluster.owner(7)), (6, 1));
        assert_eq!(cluster.upstream_fds_per_instance(), 167);
        let drops = cluster.clients.drops.as_ref().unwrap();
        assert_eq!(
            (drops.reconnect_fraction, drops.after_tokens.max),
            (0.2, 199)
        );
        let plan = Plan::build(&cluster, 1).unwrap();
        let elsewhere = (plan.assignments.iter().zip(&plan.instances))
            .filter(|&(&gen, &instance)| cluster.owner(gen) != instance)
            .count();
        assert!((29_000..31_000).contains(&elsewhere), "{elsewhere}");
        // Every instance gets about a sixth: none hits its wall before the others.
        for load in plan.clients_per_instance(6) {
            assert!((9_500..10_500).contains(&load), "{load}");
        }
        let idle = Scenario::resolve(
            ScenarioName::Cluster,
            &Overrides {
                hold_s: Some(30.0),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(idle.ending, Ending::Leave);
        let memory = Scenario::resolve(
            ScenarioName::Cluster,
            &Overrides {
                no_store: true,
                ..Overrides::default()
            },
        )
        .unwrap();
        assert!(memory.cluster.as_ref().is_some_and(|c| !c.store));
        let everyone_on_owner = Plan::build(&memory, 1).unwrap();
        assert!(everyone_on_owner.instances.iter().all(|&i| i == 0));
        for wrong in [
            Overrides {
                no_store: true,
                instances: Some(2),
                ..Overrides::default()
            },
            Overrides {
                move_fraction: Some(0.1),
                reconnect_fraction: Some(0.1),
                ..Overrides::default()
            },
        ] {
            assert!(Scenario::resolve(ScenarioName::Cluster, &wrong).is_err());
        }
        let not_a_cluster = Overrides {
            instances: Some(2),
            ..Overrides::default()
        };
        assert!(Scenario::resolve(ScenarioName::Chat, &not_a_cluster).is_err());
    }

    #[test]
    fn behaviours_are_drawn_by_seed_in_the_requested_fractions() {
        let soak = Scenario::resolve(ScenarioName::Soak, &Overrides::default()).unwrap();
        let count = |seed: u64| {
            let mut counts = [0usize; 4];
            for index in 0..100_000 {
                counts[match soak.clients.behaviour(index, seed) {
                    Behaviour::Read => 0,
                    Behaviour::Stall { after_tokens, .. } => {
                        assert!((10..=40).contains(&after_tokens));
                        1
                    }
                    Behaviour::Reconnect { away_ms, .. } => {
                        assert!((100..=2000).contains(&away_ms));
                        2
                    }
                    Behaviour::Leave { .. } => 3,
                }] += 1;
            }
            counts
        };
        let counts = count(1);
        for (got, want) in counts.iter().zip([0.60, 0.15, 0.15, 0.10]) {
            let want = (want * 100_000.0) as usize;
            assert!(got.abs_diff(want) < 1_000, "{counts:?}");
        }
        assert_eq!(count(1), counts, "a seed fixes every client's behaviour");
        let changed = (0..1000)
            .filter(|&i| soak.clients.behaviour(i, 1) != soak.clients.behaviour(i, 2))
            .count();
        assert!(changed > 300, "another seed draws again: {changed}");
        let slow = Scenario::resolve(ScenarioName::Slow, &Overrides::default()).unwrap();
        let stalled = (0..100_000)
            .filter(|&i| slow.clients.behaviour(i, 1) != Behaviour::Read)
            .count();
        assert!((4_500..5_500).contains(&stalled), "{stalled}");
        assert!((0..1000).all(|i| ClientMix::default().behaviour(i, 1) == Behaviour::Read));
    }

    #[test]
    fn soak_fails_a_fifth_of_its_generations_in_every_way() {
        let soak = Scenario::resolve(ScenarioName::Soak, &Overrides::default()).unwrap();
        let plan = Plan::build(&soak, 1).unwrap();
        assert_eq!(plan.generations.len(), 400);
        let failing: Vec<_> = plan
            .generations
            .iter()
            .filter(|g| g.fault.is_some())
            .collect();
        assert!((60..=100).contains(&failing.len()), "{}", failing.len());
        for g in &plan.generations {
            let expected = g.expected();
            let knobs = g.mock_knobs();
            assert_eq!(knobs["tokens"], g.tokens);
            match g.fault {
                None => assert_eq!(
                    expected,
                    Expected {
                        tokens: g.tokens,
                        completes: true
                    }
                ),
                Some(Fault::Drop { after }) => {
                    assert!(after >= 1 && after < g.tokens);
                    assert_eq!(knobs["fail_after"], after);
                    assert_eq!(
                        expected,
                        Expected {
                            tokens: after,
                            completes: false
                        }
                    );
                }
                Some(Fault::Error { after }) => {
                    assert_eq!(knobs["error_after"], after);
                    assert_eq!(expected.tokens, after);
                }
                Some(Fault::Status(status)) => {
                    assert_eq!(knobs["status"], status);
                    assert_eq!(expected.tokens, 0);
                }
            }
        }
        for kind in 0..3 {
            assert!(failing.iter().any(|g| match g.fault {
                Some(Fault::Drop { .. }) => kind == 0,
                Some(Fault::Error { .. }) => kind == 1,
                Some(Fault::Status(_)) => kind == 2,
                None => false,
            }));
        }
    }

    #[test]
    fn churn_clients_follow_a_generation_created_shortly_before_they_arrive() {
        let soak = Scenario::resolve(
            ScenarioName::Soak,
            &Overrides {
                connections: Some(600),
                churn_s: Some(30.0),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(soak.ramp_rate, 20);
        assert!(soak
            .gateway_args
            .contains(&"--retention=6000ms".to_string()));
        let plan = Plan::build(&soak, 1).unwrap();
        assert_eq!((plan.connections(), plan.generations.len()), (600, 400));
        // A typical stream is 150 tokens × 20 ms = 3 s: 40 generations at 400 per 30 s.
        for (k, &g) in plan.assignments.iter().enumerate() {
            let newest = (k as u64 * 400 / 600) as u32;
            assert!(g <= newest && newest - g <= 40, "client {k} follows {g}");
        }
        let warm_up = Plan::churn(&soak, 7, 6.0).unwrap();
        assert_eq!(
            (warm_up.connections(), warm_up.generations.len()),
            (120, 80)
        );
        assert!(Scenario::resolve(
            ScenarioName::Chat,
            &Overrides {
                rounds: Some(2),
                ..Overrides::default()
            }
        )
        .is_err());
    }
}
