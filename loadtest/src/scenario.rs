//! Named load shapes. Each preset is a full set of knobs; any knob can be overridden by a flag,
//! and the resolved knobs go into the JSON result so a run can be repeated exactly.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::{Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScenarioName {
    /// A few hundred connections for a few seconds: the CI check.
    Smoke,
    /// N subscribers on long, slow generations: memory per connection.
    Idle,
    /// G generations × 1–3 subscribers, tokens every 20–80 ms: latency and CPU.
    Chat,
    /// 1 generation × N subscribers at 20 tokens/s: fan-out latency and CPU.
    Broadcast,
    /// A fraction of clients stop reading: they are evicted, the others' latency holds.
    Slow,
    /// SIGTERM the gateway under load: time until every client got reconnect/done, exit time.
    Drain,
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

/// How a run ends once every client is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// Clients read until their generation's `done`.
    AllDone,
    /// Clients hold their streams for `hold_s`, then all close them (memory scenarios).
    Leave,
    /// After `drain_after_s` of streaming the gateway gets SIGTERM.
    Drain,
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
    /// Tokens a stalling client reads before it stops reading.
    #[arg(long)]
    pub stall_after: Option<u64>,
    /// Seconds a stalling client stops reading, then resumes like a browser would.
    #[arg(long)]
    pub stall_s: Option<f64>,
    /// Seconds of streaming before SIGTERM (drain).
    #[arg(long)]
    pub drain_after_s: Option<f64>,
    /// Passed to the spawned gateway as `--drain-deadline`, e.g. `5s`.
    #[arg(long)]
    pub drain_deadline: Option<String>,
    /// Hard limit for the whole run in seconds; the run stops itself there.
    #[arg(long)]
    pub time_limit_s: Option<u64>,
}

/// How many clients and which generation each one follows.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// `connections` clients assigned round-robin to the generations.
    Spread { connections: u64 },
    /// Each generation gets a drawn number of subscribers.
    PerGeneration { subscribers: Range },
}

#[derive(Debug, Clone, Serialize)]
pub struct StallKnobs {
    pub fraction: f64,
    pub after_tokens: u64,
    pub pause_s: f64,
    /// SO_RCVBUF of stalling clients, so back-pressure reaches the gateway after kilobytes.
    pub recv_buffer: u32,
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
    pub stall: Option<StallKnobs>,
    pub drain_after_s: f64,
    /// Flags this scenario gives a spawned gateway (`--name=value`), before `--gateway-arg`s.
    pub gateway_args: Vec<String>,
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
            stall: None,
            drain_after_s: 0.0,
            gateway_args: Vec::new(),
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
            // A stalled reader is evicted once the gateway's socket send buffer, hyper's write
            // queue and the 64-slot channel are full. Kernel autotuning would let that buffer
            // grow to tcp_wmem's max (4 MiB), more than a generation may log (4 MiB), so the
            // gateway gets a fixed 64 KB SO_SNDBUF, its production setting for this case;
            // 1 KB tokens at 20/s then evict a stalled client in ~8 s. It resumes reading at
            // 12 s, before the 10 s write timeout cuts the evicted socket, and so reads the
            // `event: reconnect` behind its backlog (stall longer to see cut streams instead).
            ScenarioName::Slow => Self {
                shape: Shape::Spread { connections: 1000 },
                generations: 10,
                tokens: Range::fixed(600),
                interval_ms: Range::fixed(50),
                token_bytes: Some(1024),
                stall: Some(StallKnobs {
                    fraction: 0.05,
                    after_tokens: 20,
                    pause_s: 12.0,
                    recv_buffer: 4096,
                }),
                gateway_args: vec!["--socket-send-buffer=65536".into()],
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
        }
    }

    /// The preset for `name` with `overrides` applied and a time limit filled in.
    pub fn resolve(name: ScenarioName, o: &Overrides) -> Result<Self> {
        let mut s = Self::preset(name);
        if let Some(n) = o.connections {
            s.shape = Shape::Spread { connections: n };
        }
        if let Some(subscribers) = o.subscribers {
            if o.connections.is_some() {
                bail!("give --connections or --subscribers, not both");
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
        if s.generations == 0 || s.ramp_rate == 0 {
            bail!("--generations and --ramp-rate must be at least 1");
        }
        s.time_limit_s = o.time_limit_s.unwrap_or_else(|| s.default_time_limit());
        Ok(s)
    }

    fn apply_stall_overrides(&mut self, o: &Overrides) {
        if o.stall_fraction.is_none() && o.stall_after.is_none() && o.stall_s.is_none() {
            return;
        }
        let stall = self.stall.get_or_insert(StallKnobs {
            fraction: 0.05,
            after_tokens: 20,
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

    /// Seconds the ramp takes at the configured rate, for `connections` clients.
    pub fn ramp_s(&self, connections: u64) -> f64 {
        connections as f64 / self.ramp_rate as f64
    }

    /// Seconds the longest generation streams.
    pub fn stream_s(&self) -> f64 {
        (self.tokens.max * self.interval_ms.max) as f64 / 1000.0
    }

    fn default_time_limit(&self) -> u64 {
        let connections = match self.shape {
            Shape::Spread { connections } => connections,
            Shape::PerGeneration { subscribers } => self.generations * subscribers.max,
        };
        let setup =
            self.generations as f64 / 500.0 + self.ramp_s(connections) + self.start_margin_s;
        let body = match self.ending {
            Ending::AllDone => self.stream_s() + self.stall.as_ref().map_or(0.0, |s| s.pause_s),
            Ending::Leave => self.hold_s + 10.0,
            Ending::Drain => self.drain_after_s + 60.0,
        };
        (setup + body + 60.0).ceil() as u64
    }
}

/// One generation to create: its token count is drawn from the scenario's range.
#[derive(Debug, Clone, Copy)]
pub struct GenerationPlan {
    pub tokens: u64,
}

/// Which generations exist and which one each client follows.
#[derive(Debug, Clone)]
pub struct Plan {
    pub generations: Vec<GenerationPlan>,
    /// `assignments[client] = generation index`.
    pub assignments: Vec<u32>,
}

impl Plan {
    pub fn build(s: &Scenario, seed: u64) -> Result<Self> {
        let g = u32::try_from(s.generations).context("too many generations")?;
        let generations = (0..u64::from(g))
            .map(|i| GenerationPlan {
                tokens: s.tokens.pick(mix(seed ^ i)),
            })
            .collect();
        let assignments = match s.shape {
            Shape::Spread { connections } => (0..connections)
                .map(|c| (c % u64::from(g)) as u32)
                .collect(),
            Shape::PerGeneration { subscribers } => (0..g)
                .flat_map(|gen| {
                    let k = subscribers.pick(mix(seed ^ (u64::from(gen) << 32) ^ 0x5bd1));
                    std::iter::repeat_n(gen, k as usize)
                })
                .collect(),
        };
        Ok(Self {
            generations,
            assignments,
        })
    }

    pub fn connections(&self) -> u64 {
        self.assignments.len() as u64
    }

    /// Keeps the first `max` clients (the N cap when the gateway cannot hold more).
    pub fn cap(&mut self, max: u64) {
        self.assignments.truncate(max as usize);
    }
}

/// splitmix64: a fixed, dependency-free way to draw per-generation and per-client values.
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Whether client `index` is one of the stalling ones (a fixed pseudo-random subset).
pub fn stalls(index: u64, fraction: f64) -> bool {
    (mix(index ^ 0x51a11) % 1_000_000) < (fraction * 1_000_000.0) as u64
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
    fn stall_subset_has_the_requested_fraction() {
        let stalled = (0..100_000).filter(|&i| stalls(i, 0.05)).count();
        assert!((4_500..5_500).contains(&stalled), "{stalled}");
        assert_eq!((0..1000).filter(|&i| stalls(i, 0.0)).count(), 0);
    }
}
