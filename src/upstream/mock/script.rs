//! What the mock says, and when: a seeded, reproducible script for one completion.
//!
//! A [`Script`] knows nothing of HTTP or JSON. It yields [`Beat`]s (role, token, finish, fault)
//! after the right delay; `wire` encodes them as SSE chunks or one completion object.

use std::{
    fmt::Write as _,
    io,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio_util::sync::CancellationToken;

use super::Interval;

/// splitmix64. Tiny, fast, and — unlike rand's `SmallRng`/`StdRng`, whose algorithms may change
/// between releases — its output is fixed forever, so a seed names the same text in every build.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` by multiply-shift: no division, bias far below anything observable.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// FNV-1a over everything written to it. Unlike std's `RandomState` it is the same in every
/// process, so the default seed of a prompt (the hash of its `messages`) is stable across runs.
#[derive(Debug)]
pub(super) struct Fnv1a {
    hash: u64,
    bytes: u64,
}

impl Default for Fnv1a {
    fn default() -> Self {
        Self {
            hash: 0xCBF2_9CE4_8422_2325,
            bytes: 0,
        }
    }
}

impl Fnv1a {
    pub(super) fn hash(&self) -> u64 {
        self.hash
    }

    /// How many bytes were hashed.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl io::Write for Fnv1a {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &byte in buf {
            self.hash = (self.hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01B3);
        }
        self.bytes += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Common English words: enough variety for the text to look like prose in a demo.
const WORDS: &[&str] = &[
    "the", "a", "stream", "token", "model", "answer", "question", "river", "light", "signal",
    "network", "every", "small", "quiet", "bright", "clear", "simple", "careful", "long", "new",
    "server", "client", "message", "story", "world", "hello", "window", "garden", "morning",
    "evening", "city", "voice", "letter", "number", "idea", "reason", "moment", "place", "way",
    "flows", "waits", "sends", "reads", "writes", "finds", "keeps", "brings", "turns", "holds",
    "moves", "and", "but", "so", "then", "of", "to", "in", "on", "with", "from", "over", "under",
    "through", "between", "after", "before", "again", "always", "never", "often", "here", "there",
    "we", "you", "it", "they", "is", "was", "will", "can",
];

/// Turns a seeded generator into English-looking tokens: `"Hello"`, `" world"`, `","`, `"."`.
#[derive(Debug)]
struct Prose {
    rng: SplitMix64,
    words_in_sentence: u32,
    after_comma: bool,
    started: bool,
}

impl Prose {
    fn new(seed: u64) -> Self {
        Self {
            rng: SplitMix64(seed),
            words_in_sentence: 0,
            after_comma: false,
            started: false,
        }
    }

    fn push_next(&mut self, out: &mut String) {
        let words = self.words_in_sentence;
        if words >= 14 || (words >= 4 && self.rng.below(6) == 0) {
            out.push('.');
            self.words_in_sentence = 0;
        } else if words >= 2 && !self.after_comma && self.rng.below(8) == 0 {
            out.push(',');
            self.after_comma = true;
        } else {
            self.push_word(out);
        }
    }

    fn push_word(&mut self, out: &mut String) {
        let word = WORDS[self.rng.below(WORDS.len() as u64) as usize];
        if self.started {
            out.push(' ');
        }
        let mut chars = word.chars();
        if let (0, Some(first)) = (self.words_in_sentence, chars.next()) {
            out.push(first.to_ascii_uppercase());
            out.push_str(chars.as_str());
        } else {
            out.push_str(word);
        }
        self.started = true;
        self.after_comma = false;
        self.words_in_sentence += 1;
    }
}

/// A broken provider's behaviour, struck after a number of tokens. Most end the script early;
/// an injected chunk is sent once and the script goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    /// Drop the connection.
    Fail,
    /// Send an error object and end.
    Error,
    /// Send nothing more until the server shuts down.
    Hang,
    /// End the body cleanly, with neither a finish_reason nor `[DONE]`.
    End,
    /// Inject a chunk that is not valid JSON, then go on.
    InvalidJson,
    /// Inject a chunk without `choices` (nor usage, nor error), then go on.
    NoChoices,
}

impl Fault {
    /// An injected chunk does not end the script.
    fn goes_on(self) -> bool {
        matches!(self, Self::InvalidJson | Self::NoChoices)
    }
}

/// Everything a script needs, already validated and resolved against the server defaults.
#[derive(Debug)]
pub(super) struct Spec {
    pub seed: u64,
    /// Answer tokens, unless `tool_calls` replaces the answer.
    pub tokens: u32,
    /// Reasoning tokens streamed before the answer.
    pub reasoning: u32,
    /// The functions to call, in parallel (one after the other on the wire, as OpenAI does);
    /// empty: answer with text.
    pub finish_reason: &'static str,
    pub interval: Interval,
    pub first_token: Duration,
    pub stamp: bool,
    pub token_bytes: usize,
    /// The fault and after how many content tokens it strikes.
    pub fault: Option<(Fault, u32)>,
    pub tool_calls: Vec<String>,
}

/// How far behind its schedule a script may stream faster than its interval to catch up.
const MAX_CATCH_UP: Duration = Duration::from_millis(10);

/// Argument fragments are this many bytes: a tool call's JSON arrives in many chunks, as from a
/// real model.
const ARGUMENT_FRAGMENT_BYTES: usize = 4;

/// One tool call the script makes: its arguments are generated from the seed.
#[derive(Debug)]
struct PlannedCall {
    id: String,
    name: String,
    arguments: String,
}

/// One beat of tool-call streaming: call `call`'s opening (id and name) or a piece of its
/// arguments.
#[derive(Debug, Clone)]
struct Fragment {
    call: usize,
    opening: bool,
    arguments: std::ops::Range<usize>,
}

/// One step of a completion, produced when it is due.
#[derive(Debug)]
pub(super) enum Beat<'a> {
    /// The opening chunk that names the assistant role.
    Role,
    Token(&'a str),
    Reasoning(&'a str),
    ToolCall {
        index: u32,
        id: Option<&'a str>,
        name: Option<&'a str>,
        arguments: &'a str,
    },
    Finish {
        reason: &'static str,
        completion_tokens: u32,
    },
    /// `error_after`: an error object ends the stream.
    Error,
    /// `fail_after`: the connection must be dropped now.
    Fail,
    /// A `hang_after` stream was released by shutdown.
    Released,
    /// `end_after`: the body ends here, cleanly.
    End,
    /// `invalid_json_after`: a chunk that is not JSON.
    InvalidJson,
    /// `no_choices_after`: a chunk without choices.
    NoChoices,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    Body,
    Done,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Role,
    Token,
    Finish,
    Fault(Fault),
}

/// The plan of one completion, played one [`Beat`] at a time by [`Script::advance`].
#[derive(Debug)]
pub(super) struct Script {
    prose: Prose,
    /// A separate stream for delays, so the text for a seed does not depend on timing knobs.
    timing: SplitMix64,
    spec: Spec,
    sent: u32,
    phase: Phase,
    /// The current token, reused so a token costs no allocation of its own.
    text: String,
    /// When the last beat was due. Beats follow a schedule, not a delay after the previous one,
    /// so that intervals below the timer's millisecond average out right (`[0, 1]` ms streams
    /// 2,000 tokens/s, in small bunches, as a fast provider does).
    due: Option<tokio::time::Instant>,
    calls: Vec<PlannedCall>,
    /// The tool-call beats, in order; empty when the answer is text.
    fragments: Vec<Fragment>,
}

impl Script {
    pub(super) fn new(mut spec: Spec) -> Self {
        let mut prose = Prose::new(spec.seed);
        let calls = plan_calls(&spec, &mut prose);
        let fragments = fragments(&calls);
        // From here on `tokens` counts every streamed beat: reasoning, then answer or calls.
        let answer = if calls.is_empty() {
            spec.tokens
        } else {
            u32::try_from(fragments.len()).unwrap_or(u32::MAX)
        };
        spec.tokens = spec.reasoning.saturating_add(answer);
        // A fault set beyond the last token replaces the normal ending.
        spec.fault = spec.fault.map(|(fault, at)| (fault, at.min(spec.tokens)));
        Self {
            prose,
            timing: SplitMix64(spec.seed ^ 0x5449_4D49_4E47_0000),
            spec,
            sent: 0,
            phase: Phase::Start,
            text: String::new(),
            due: None,
            calls,
            fragments,
        }
    }

    /// Waits until the next beat is due and returns it; `None` once the script has ended.
    /// `stopping` releases a hanging script.
    pub(super) async fn advance(&mut self, stopping: &CancellationToken) -> Option<Beat<'_>> {
        let (delay, step) = self.next_step()?;
        let now = tokio::time::Instant::now();
        // A schedule that fell far behind (the mock itself was held up) restarts from now
        // rather than bursting to catch up.
        let floor = now.checked_sub(MAX_CATCH_UP).unwrap_or(now);
        let due = self.due.map_or(now, |due| due.max(floor)) + delay;
        self.due = Some(due);
        if due > now {
            tokio::time::sleep_until(due).await;
        }
        Some(match step {
            Step::Role => Beat::Role,
            Step::Token => self.token_beat(),
            Step::Finish => Beat::Finish {
                reason: self.spec.finish_reason,
                completion_tokens: self.sent,
            },
            Step::Fault(Fault::Error) => Beat::Error,
            Step::Fault(Fault::Fail) => {
                // Let hyper flush what was sent before the connection is dropped: the fault
                // must cut the stream after token N, not swallow it.
                tokio::task::yield_now().await;
                Beat::Fail
            }
            Step::Fault(Fault::Hang) => {
                stopping.cancelled().await;
                Beat::Released
            }
            Step::Fault(Fault::End) => Beat::End,
            Step::Fault(Fault::InvalidJson) => Beat::InvalidJson,
            Step::Fault(Fault::NoChoices) => Beat::NoChoices,
        })
    }

    fn next_step(&mut self) -> Option<(Duration, Step)> {
        let fault_now = self
            .spec
            .fault
            .filter(|&(_, at)| at == self.sent)
            .map(|(fault, _)| fault);
        match self.phase {
            Phase::Done => return None,
            // A fault at 0 strikes right after the headers, before even the role chunk.
            Phase::Start if fault_now.is_none() => {
                self.phase = Phase::Body;
                return Some((Duration::ZERO, Step::Role));
            }
            Phase::Start | Phase::Body => {}
        }
        if fault_now.is_none() && self.sent == self.spec.tokens {
            self.phase = Phase::Done;
            return Some((Duration::ZERO, Step::Finish));
        }
        Some(match fault_now {
            // Sent at once and only once; the role chunk or the next token follows.
            Some(fault) if fault.goes_on() => {
                self.spec.fault = None;
                (Duration::ZERO, Step::Fault(fault))
            }
            Some(fault) => {
                self.phase = Phase::Done;
                (self.next_delay(), Step::Fault(fault))
            }
            None => {
                self.phase = Phase::Body;
                let delay = self.next_delay();
                self.sent += 1;
                (delay, Step::Token)
            }
        })
    }

    fn next_delay(&mut self) -> Duration {
        if self.sent == 0 {
            return self.spec.first_token;
        }
        let Interval { min, max } = self.spec.interval;
        let span = u64::try_from(max.saturating_sub(min).as_micros()).unwrap_or(u64::MAX);
        min.saturating_add(Duration::from_micros(
            self.timing.below(span.saturating_add(1)),
        ))
    }

    /// The beat of the token just counted in `sent`: reasoning first, then a tool-call
    /// fragment or answer text.
    fn token_beat(&mut self) -> Beat<'_> {
        let at = self.sent.saturating_sub(1);
        if at < self.spec.reasoning {
            self.text.clear();
            self.prose.push_next(&mut self.text);
            return Beat::Reasoning(&self.text);
        }
        let beat = usize::try_from(at - self.spec.reasoning).unwrap_or(usize::MAX);
        match self.fragments.get(beat) {
            Some(fragment) => {
                let call = &self.calls[fragment.call];
                Beat::ToolCall {
                    index: u32::try_from(fragment.call).unwrap_or(u32::MAX),
                    id: fragment.opening.then_some(call.id.as_str()),
                    name: fragment.opening.then_some(call.name.as_str()),
                    arguments: &call.arguments[fragment.arguments.clone()],
                }
            }
            None => {
                self.write_token();
                Beat::Token(&self.text)
            }
        }
    }

    fn write_token(&mut self) {
        self.text.clear();
        if self.spec.stamp {
            let micros = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_micros();
            // Writing into a String cannot fail.
            let _ = write!(self.text, "{micros} ");
        }
        self.prose.push_next(&mut self.text);
        let padding = self.spec.token_bytes.saturating_sub(self.text.len());
        self.text.extend(std::iter::repeat_n(' ', padding));
    }
}

/// The calls of `spec.tool_calls`, with ids and JSON arguments drawn from the seed.
fn plan_calls(spec: &Spec, prose: &mut Prose) -> Vec<PlannedCall> {
    let mut ids = SplitMix64(spec.seed ^ 0x4341_4C4C_0000_0000);
    spec.tool_calls
        .iter()
        .enumerate()
        .map(|(n, name)| {
            let mut query = String::new();
            for _ in 0..3 {
                prose.push_word(&mut query);
            }
            PlannedCall {
                id: format!("call_{:016x}", ids.next_u64()),
                name: name.clone(),
                // Serializing a map of strings and a number cannot fail.
                arguments: serde_json::json!({"query": query.trim(), "n": n}).to_string(),
            }
        })
        .collect()
}

/// Each call's opening, then its arguments in [`ARGUMENT_FRAGMENT_BYTES`] pieces.
fn fragments(calls: &[PlannedCall]) -> Vec<Fragment> {
    let mut fragments = Vec::new();
    for (call, planned) in calls.iter().enumerate() {
        fragments.push(Fragment {
            call,
            opening: true,
            arguments: 0..0,
        });
        // The arguments are ASCII (JSON of prose words and a number): any cut is a boundary.
        let len = planned.arguments.len();
        fragments.extend(
            (0..len)
                .step_by(ARGUMENT_FRAGMENT_BYTES)
                .map(|start| Fragment {
                    call,
                    opening: false,
                    arguments: start..(start + ARGUMENT_FRAGMENT_BYTES).min(len),
                }),
        );
    }
    fragments
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_delays(seed: u64) -> Vec<Duration> {
        let mut script = Script::new(Spec {
            seed,
            tokens: 50,
            finish_reason: "stop",
            interval: Interval {
                min: Duration::from_millis(20),
                max: Duration::from_millis(80),
            },
            first_token: Duration::from_millis(5),
            stamp: false,
            token_bytes: 0,
            fault: None,
            reasoning: 0,
            tool_calls: Vec::new(),
        });
        std::iter::from_fn(|| script.next_step())
            .filter(|(_, step)| matches!(step, Step::Token))
            .map(|(delay, _)| delay)
            .collect()
    }

    #[test]
    fn pacing_is_reproducible_for_a_seed_and_within_the_interval() {
        let delays = token_delays(1);
        assert_eq!(delays.len(), 50);
        assert_eq!(delays[0], Duration::from_millis(5), "first token delay");
        let range = Duration::from_millis(20)..=Duration::from_millis(80);
        assert!(delays[1..].iter().all(|delay| range.contains(delay)));
        assert_eq!(delays, token_delays(1));
        assert_ne!(delays, token_delays(2));
    }
}
