//! Every metric tokenfan exports, with its meaning, and the Prometheus recorder.
//!
//! Names are constants so that a grep finds every place a metric is touched. Hot-path counters
//! are updated once per token (with the number of subscribers reached), never once per
//! subscriber; the per-subscriber fan-out lag is sampled on one token in [`LAG_SAMPLE_EVERY`].
//!
//! Label sets are bounded: `model` is one of the first [`MAX_MODELS`] model names seen (then
//! `other`), `code`, `reason`, `status` and `class` come from fixed lists in the code; no
//! metric carries an id.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, OnceLock, PoisonError,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Histogram, SharedString, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::{Map, Value};

use crate::hub::generation::FanOut;

/// Gauge: client TCP connections open now.
pub const CONNECTIONS_OPEN: &str = "tokenfan_connections_open";
/// Counter: client TCP connections accepted.
pub const CONNECTIONS_ACCEPTED: &str = "tokenfan_connections_accepted_total";
/// Counter: connections closed because the peer accepted no bytes for the write timeout.
pub const WRITE_TIMEOUTS: &str = "tokenfan_write_timeouts_total";
/// Gauge: SSE subscriber streams open now (replaying or live).
pub const SUBSCRIBERS_OPEN: &str = "tokenfan_subscribers_open";
/// Counter: SSE subscriptions answered with a stream.
pub const SUBSCRIPTIONS: &str = "tokenfan_subscriptions_total";
/// Counter: subscribers disconnected with `event: reconnect`, by `reason`: `slow_consumer`
/// (behind past `--max-viewer-lag` or `--max-viewer-lag-bytes`), `shutdown` (told to reconnect
/// at the drain deadline).
pub const EVICTIONS: &str = "tokenfan_evictions_total";
/// Counter: live subscribers whose channel was full when a token came: they left the live
/// fan-out to catch up from the log (not disconnected; see `EVICTIONS`).
pub const FELL_BEHIND: &str = "tokenfan_subscribers_fell_behind_total";
/// Gauge: generations whose upstream call is running.
pub const GENERATIONS_RUNNING: &str = "tokenfan_generations_running";
/// Counter: generations started.
pub const GENERATIONS_STARTED: &str = "tokenfan_generations_started_total";
/// Counter: generations ended, by final `status`.
pub const GENERATIONS_FINISHED: &str = "tokenfan_generations_finished_total";
/// Counter: finished generations forgotten before their retention to fit the log budget.
pub const GENERATIONS_EVICTED: &str = "tokenfan_generations_evicted_total";
/// Counter: requests refused by a limit (label `limit`).
pub const LIMITED: &str = "tokenfan_limited_total";
/// Counter: connections answered "over capacity" because `--max-connections` was reached.
pub const CONNECTIONS_SHED: &str = "tokenfan_connections_shed_total";
/// Counter: requests refused for missing or bad credentials (label `reason`).
pub const AUTH_FAILURES: &str = "tokenfan_auth_failures_total";
/// Counter: prompt tokens the provider reported, by `model` and API `key` (label, never the key).
pub const USAGE_PROMPT_TOKENS: &str = "tokenfan_usage_prompt_tokens_total";
/// Counter: completion tokens the provider reported, by `model` and API `key`.
pub const USAGE_COMPLETION_TOKENS: &str = "tokenfan_usage_completion_tokens_total";
/// Counter: generations that ended without a usage report (cancelled, failed early, or a
/// provider that sends none), by `model` and API `key`.
pub const USAGE_UNREPORTED: &str = "tokenfan_usage_unreported_total";
/// Counter: tokens received from the upstream.
pub const TOKENS: &str = "tokenfan_tokens_total";
/// Log entries a replica took from the shared store (another instance's upstream call).
pub const RELAYED_TOKENS: &str = "tokenfan_relayed_tokens_total";
/// Counter: token events queued to live subscribers (replays not included).
pub const EVENTS_DELIVERED: &str = "tokenfan_events_delivered_total";
/// Counter: times a drain began.
pub const DRAIN_STARTED: &str = "tokenfan_drain_started_total";
/// Counter: subscribers told to reconnect because of a shutdown.
pub const DRAIN_RECONNECTS: &str = "tokenfan_drain_reconnects_total";
/// Counter: generations interrupted at the drain deadline.
pub const DRAIN_INTERRUPTED: &str = "tokenfan_drain_generations_interrupted_total";
/// Histogram: seconds from the shutdown signal to the end of the drain.
pub const DRAIN_DURATION: &str = "tokenfan_drain_duration_seconds";
/// Gauge: 1 while a drain runs (a scrape during the drain sees it; the histogram above is
/// recorded only as the process exits).
pub const DRAINING: &str = "tokenfan_draining";
/// Gauge: Unix time the drain began (0: none), for "drain running longer than its deadline".
pub const DRAIN_STARTED_AT: &str = "tokenfan_drain_started_timestamp_seconds";
/// Gauge: `--drain-deadline`, in seconds.
pub const DRAIN_DEADLINE: &str = "tokenfan_drain_deadline_seconds";
/// Histogram: generation created → first token received, by `model` (retries included).
pub const TIME_TO_FIRST_TOKEN: &str = "tokenfan_time_to_first_token_seconds";
/// Histogram: time between two tokens of one generation, by `model`.
pub const INTER_TOKEN_GAP: &str = "tokenfan_inter_token_gap_seconds";
/// Histogram: generation created → ended, by `model` and final `status`.
pub const GENERATION_DURATION: &str = "tokenfan_generation_duration_seconds";
/// Histogram: one upstream request attempt, sent → response head (or failure), by `model` and
/// `class` (`2xx`, `4xx`, `5xx`, `timeout`, `error`: no HTTP status).
pub const UPSTREAM_REQUEST_DURATION: &str = "tokenfan_upstream_request_duration_seconds";
/// Counter: upstream request attempts retried, by `model`.
pub const UPSTREAM_RETRIES: &str = "tokenfan_upstream_retries_total";
/// Counter: generations ended by an upstream failure, by `model` and error `code`.
pub const UPSTREAM_ERRORS: &str = "tokenfan_upstream_errors_total";
/// Histogram: token received from the provider → its frame handed to a live viewer's
/// connection writer, one sample per viewer on one token in [`LAG_SAMPLE_EVERY`].
pub const FAN_OUT_LAG: &str = "tokenfan_fan_out_lag_seconds";
/// Histogram: events waiting in a live viewer's queue when it takes a sampled token.
pub const SUBSCRIBER_QUEUE_DEPTH: &str = "tokenfan_subscriber_queue_depth";
/// Counter: token events served from the log to subscribers catching up (replays).
pub const REPLAYED_EVENTS: &str = "tokenfan_replayed_events_total";
/// Counter: catch-up reads served from the log (a late or resuming viewer takes one or more).
pub const REPLAYS: &str = "tokenfan_replays_total";
/// Gauge: bytes held by all generation logs.
pub const LOG_MEMORY: &str = "tokenfan_log_memory_bytes";
/// Gauge: `--log-memory-budget`, in bytes.
pub const LOG_MEMORY_BUDGET: &str = "tokenfan_log_memory_budget_bytes";
/// Gauge: file descriptors the process has open.
pub const OPEN_FILES: &str = "tokenfan_open_files";
/// Gauge: the open-files soft limit.
pub const OPEN_FILES_LIMIT: &str = "tokenfan_open_files_limit";
/// Gauge: resident memory of the process, bytes.
pub const RESIDENT_MEMORY: &str = "tokenfan_process_resident_memory_bytes";
/// Counter: CPU time used by the process (user + system), milliseconds.
pub const CPU: &str = "tokenfan_process_cpu_milliseconds_total";
/// Gauge: always 1, labelled with the `version` and `commit` the binary was built from.
pub const BUILD_INFO: &str = "tokenfan_build_info";

/// One viewer-side fan-out lag sample per this many tokens of a generation: the sample costs
/// a clock read and a histogram record per viewer, so it is taken rarely enough that the
/// per-delivery cost stays what `tests/allocations.rs` measures.
pub const LAG_SAMPLE_EVERY: u64 = 64;
/// Distinct `model` label values; later models are counted as `other`.
pub const MAX_MODELS: usize = 32;
/// Longest model name used as a label; longer ones are `other`.
const MAX_MODEL_LEN: usize = 64;

/// Buckets per histogram, each chosen for what it measures.
const BUCKETS: &[(&str, &[f64])] = &[
    (
        TIME_TO_FIRST_TOKEN,
        &[
            0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0,
        ],
    ),
    (
        INTER_TOKEN_GAP,
        &[
            0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
            5.0,
        ],
    ),
    (
        GENERATION_DURATION,
        &[
            0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
        ],
    ),
    (
        UPSTREAM_REQUEST_DURATION,
        &[
            0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ],
    ),
    (
        FAN_OUT_LAG,
        &[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ],
    ),
    (
        SUBSCRIBER_QUEUE_DEPTH,
        &[
            0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 256.0, 1024.0, 65536.0,
        ],
    ),
    (
        DRAIN_DURATION,
        &[
            1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 45.0, 60.0, 120.0,
        ],
    ),
];

/// How often histogram samples are folded into their buckets. The exporter keeps samples until
/// then; without it, memory would grow with every token until the next scrape.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the process-wide Prometheus recorder once and returns its handle. Every server in
/// the process (tests start several) shares it.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new();
            for (name, buckets) in BUCKETS {
                // Fails only for an empty list, which BUCKETS has not (tested below).
                builder = builder
                    .set_buckets_for_metric(Matcher::Full((*name).to_owned()), buckets)
                    .unwrap_or_else(|_| PrometheusBuilder::new());
            }
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed, e.g. by an embedding program; then
            // that one receives the metrics and ours renders what it has.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "commit" => COMMIT).set(1.0);
            let upkeep = handle.clone();
            // A plain thread: the recorder is process-wide and outlives any one runtime.
            let _ = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                });
            handle
        })
        .clone()
}

/// The commit the binary was built from (`build.rs`: `TOKENFAN_COMMIT` or `git`), or `unknown`.
const COMMIT: &str = match option_env!("TOKENFAN_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

fn describe() {
    describe_gauge!(CONNECTIONS_OPEN, "Client TCP connections open now");
    describe_counter!(CONNECTIONS_ACCEPTED, "Client TCP connections accepted");
    describe_counter!(
        WRITE_TIMEOUTS,
        "Connections closed because the peer stopped reading"
    );
    describe_gauge!(SUBSCRIBERS_OPEN, "SSE subscriber streams open now");
    describe_counter!(SUBSCRIPTIONS, "SSE subscriptions answered with a stream");
    describe_counter!(
        EVICTIONS,
        "Subscribers disconnected with event: reconnect, by reason"
    );
    describe_counter!(
        FELL_BEHIND,
        "Live subscribers whose channel filled up and who went on from the log"
    );
    describe_gauge!(
        GENERATIONS_RUNNING,
        "Generations whose upstream call is running"
    );
    describe_counter!(GENERATIONS_STARTED, "Generations started");
    describe_counter!(GENERATIONS_FINISHED, "Generations ended, by status");
    describe_counter!(
        GENERATIONS_EVICTED,
        "Finished generations forgotten early for memory"
    );
    describe_counter!(LIMITED, "Requests refused by a limit, by limit");
    describe_counter!(CONNECTIONS_SHED, "Connections answered over capacity");
    describe_counter!(AUTH_FAILURES, "Requests refused for credentials, by reason");
    describe_counter!(
        USAGE_PROMPT_TOKENS,
        "Prompt tokens reported by the provider, by model and API key"
    );
    describe_counter!(
        USAGE_COMPLETION_TOKENS,
        "Completion tokens reported by the provider, by model and API key"
    );
    describe_counter!(
        USAGE_UNREPORTED,
        "Generations ended without a usage report, by model and API key"
    );
    describe_counter!(TOKENS, "Tokens received from the upstream");
    describe_counter!(
        RELAYED_TOKENS,
        "Log entries a replica took from the shared store"
    );
    describe_counter!(EVENTS_DELIVERED, "Token events queued to live subscribers");
    describe_counter!(DRAIN_STARTED, "Drains begun");
    describe_counter!(
        DRAIN_RECONNECTS,
        "Subscribers told to reconnect at shutdown"
    );
    describe_counter!(
        DRAIN_INTERRUPTED,
        "Generations interrupted at the drain deadline"
    );
    describe_histogram!(
        DRAIN_DURATION,
        Unit::Seconds,
        "Time from shutdown signal to drain end"
    );
    describe_gauge!(DRAINING, "1 while a drain runs");
    describe_gauge!(DRAIN_STARTED_AT, Unit::Seconds, "Unix time the drain began");
    describe_gauge!(
        DRAIN_DEADLINE,
        Unit::Seconds,
        "The configured drain deadline"
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "Generation created to first token, by model"
    );
    describe_histogram!(
        INTER_TOKEN_GAP,
        Unit::Seconds,
        "Time between two tokens, by model"
    );
    describe_histogram!(
        GENERATION_DURATION,
        Unit::Seconds,
        "Generation created to ended, by model and status"
    );
    describe_histogram!(
        UPSTREAM_REQUEST_DURATION,
        Unit::Seconds,
        "Upstream attempt to response head, by model and status class"
    );
    describe_counter!(UPSTREAM_RETRIES, "Upstream attempts retried, by model");
    describe_counter!(
        UPSTREAM_ERRORS,
        "Generations failed upstream, by model and code"
    );
    describe_histogram!(
        FAN_OUT_LAG,
        Unit::Seconds,
        "Token received to frame handed to a viewer's writer (sampled)"
    );
    describe_histogram!(
        SUBSCRIBER_QUEUE_DEPTH,
        "Events queued for a viewer at a sampled token"
    );
    describe_counter!(REPLAYED_EVENTS, "Token events replayed from the log");
    describe_counter!(REPLAYS, "Catch-up reads served from the log");
    describe_gauge!(LOG_MEMORY, Unit::Bytes, "Memory of all generation logs");
    describe_gauge!(LOG_MEMORY_BUDGET, Unit::Bytes, "The log memory budget");
    describe_gauge!(OPEN_FILES, "Open file descriptors");
    describe_gauge!(OPEN_FILES_LIMIT, "Open files soft limit");
    describe_gauge!(RESIDENT_MEMORY, Unit::Bytes, "Process resident memory");
    describe_counter!(CPU, Unit::Milliseconds, "Process CPU time, user + system");
    describe_gauge!(BUILD_INFO, "Version and commit of the binary");
}

/// The `model` label of a chat request: its `model` if it is one of the first [`MAX_MODELS`]
/// short names seen, `other` otherwise (a client chooses the name; the label set must stay
/// bounded).
pub fn model_label(request: &Map<String, Value>) -> SharedString {
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let Some(model) = request.get("model").and_then(Value::as_str) else {
        return SharedString::const_str("none");
    };
    if model.len() > MAX_MODEL_LEN || model.chars().any(char::is_control) {
        return SharedString::const_str("other");
    }
    let seen = SEEN.get_or_init(Mutex::default);
    // A poisoned set is still a valid set.
    let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
    if !seen.contains(model) {
        if seen.len() >= MAX_MODELS {
            return SharedString::const_str("other");
        }
        seen.insert(model.to_owned());
    }
    SharedString::from(model.to_owned())
}

/// What one generation records: its histograms looked up once, at its start, so that a token
/// costs a clock read and one histogram record.
pub struct GenerationMetrics {
    model: SharedString,
    started: Instant,
    last_token: Option<Instant>,
    time_to_first_token: Histogram,
    inter_token_gap: Histogram,
}

impl GenerationMetrics {
    pub fn start(model: SharedString) -> Self {
        Self {
            time_to_first_token: histogram!(TIME_TO_FIRST_TOKEN, "model" => model.clone()),
            inter_token_gap: histogram!(INTER_TOKEN_GAP, "model" => model.clone()),
            model,
            started: Instant::now(),
            last_token: None,
        }
    }

    /// A token was logged.
    pub fn token(&mut self) {
        let now = Instant::now();
        match self.last_token.replace(now) {
            None => self.time_to_first_token.record(now - self.started),
            Some(last) => self.inter_token_gap.record(now - last),
        }
    }

    /// The generation failed upstream with this error code.
    pub fn upstream_error(&self, code: &'static str) {
        counter!(UPSTREAM_ERRORS, "model" => self.model.clone(), "code" => code).increment(1);
    }

    pub fn finish(&self, status: &'static str) {
        histogram!(GENERATION_DURATION, "model" => self.model.clone(), "status" => status)
            .record(self.started.elapsed());
    }
}

/// One upstream attempt ended after `took`, with an HTTP status or none (`timeout`: the
/// deadline passed first).
pub fn record_upstream_attempt(
    model: &SharedString,
    status: Option<u16>,
    timeout: bool,
    took: Duration,
) {
    let class = match status {
        Some(200..=299) => "2xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        Some(_) => "other",
        None if timeout => "timeout",
        None => "error",
    };
    histogram!(UPSTREAM_REQUEST_DURATION, "model" => model.clone(), "class" => class).record(took);
}

pub fn record_upstream_retry(model: &SharedString) {
    counter!(UPSTREAM_RETRIES, "model" => model.clone()).increment(1);
}

/// The sampled token of a generation and when it arrived, packed in one word so that a viewer
/// never pairs one sample's index with another's time: the sample number (token index /
/// [`LAG_SAMPLE_EVERY`], low 24 bits) above the arrival in µs since `base` (40 bits, 12 days).
#[derive(Debug)]
pub struct LagSample {
    base: Instant,
    packed: AtomicU64,
}

const ARRIVAL_BITS: u32 = 40;
const ARRIVAL_MASK: u64 = (1 << ARRIVAL_BITS) - 1;

impl Default for LagSample {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            packed: AtomicU64::new(u64::MAX),
        }
    }
}

impl LagSample {
    fn sample_number(index: u64) -> Option<u64> {
        (index % LAG_SAMPLE_EVERY == 0).then_some((index / LAG_SAMPLE_EVERY) & 0xff_ffff)
    }

    /// Token `index` was received from the provider now.
    pub fn received(&self, index: u64) {
        let Some(sample) = Self::sample_number(index) else {
            return;
        };
        let micros = u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX);
        if micros <= ARRIVAL_MASK {
            self.packed
                .store(sample << ARRIVAL_BITS | micros, Ordering::Relaxed);
        }
    }

    /// A live viewer takes token `index` to write it now; `queued` tells how many events wait
    /// behind it (asked only for a sampled token: it takes the queue's lock).
    pub fn delivered(&self, index: u64, queued: impl FnOnce() -> usize) {
        let Some(sample) = Self::sample_number(index) else {
            return;
        };
        let packed = self.packed.load(Ordering::Relaxed);
        if packed >> ARRIVAL_BITS != sample {
            return; // a later sample replaced it: this viewer is far behind; its queue says so
        }
        // Looked up once: a lookup allocates, and this runs once per viewer.
        static HISTOGRAMS: OnceLock<(Histogram, Histogram)> = OnceLock::new();
        let (lag, depth) = HISTOGRAMS
            .get_or_init(|| (histogram!(FAN_OUT_LAG), histogram!(SUBSCRIBER_QUEUE_DEPTH)));
        let arrived = self.base + Duration::from_micros(packed & ARRIVAL_MASK);
        lag.record(arrived.elapsed());
        depth.record(queued() as f64);
    }
}

/// A subscription replayed `events` token events from the log.
pub fn record_replay(events: u64) {
    if events > 0 {
        counter!(REPLAYS).increment(1);
        counter!(REPLAYED_EVENTS).increment(events);
    }
}

/// The drain began (`Some(deadline)`) or ended (`None`).
pub fn record_draining(deadline: Option<Duration>) {
    match deadline {
        Some(deadline) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            gauge!(DRAINING).set(1.0);
            gauge!(DRAIN_STARTED_AT).set(now.as_secs_f64());
            gauge!(DRAIN_DEADLINE).set(deadline.as_secs_f64());
        }
        None => gauge!(DRAINING).set(0.0),
    }
}

/// Gauges read at scrape time: log memory against its budget, open files against the limit,
/// the process's resident memory and CPU time (Linux `/proc`; absent elsewhere).
pub fn record_process(log_bytes: usize, log_budget: usize) {
    gauge!(LOG_MEMORY).set(log_bytes as f64);
    gauge!(LOG_MEMORY_BUDGET).set(log_budget as f64);
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        gauge!(OPEN_FILES).set(entries.count() as f64);
    }
    if let Ok((soft, _hard)) = rlimit::Resource::NOFILE.get() {
        gauge!(OPEN_FILES_LIMIT).set(soft as f64);
    }
    if let Some(rss) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(resident_kib)
    {
        gauge!(RESIDENT_MEMORY).set((rss * 1024) as f64);
    }
    if let Some(ticks) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .as_deref()
        .and_then(cpu_ticks)
    {
        // /proc counts in USER_HZ, which Linux fixes at 100 for userspace.
        counter!(CPU).absolute(ticks * 10);
    }
}

/// `VmRSS` of `/proc/self/status`, in KiB.
fn resident_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of `/proc/self/stat` (fields 14 and 15), in clock ticks. The command name
/// (field 2) may hold spaces, so fields are counted after its closing parenthesis.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// Counts a finished generation's token usage, whatever its status. `usage` is the provider's
/// object: OpenAI's `prompt_tokens`/`completion_tokens`, or Anthropic's
/// `input_tokens`/`output_tokens`.
pub fn record_usage(model: &SharedString, key: &str, usage: Option<&serde_json::Value>) {
    let model = model.clone();
    let count = |names: [&str; 2]| names.iter().find_map(|name| usage?.get(name)?.as_u64());
    let prompt = count(["prompt_tokens", "input_tokens"]);
    let completion = count(["completion_tokens", "output_tokens"]);
    if prompt.is_none() && completion.is_none() {
        counter!(USAGE_UNREPORTED, "model" => model, "key" => key.to_owned()).increment(1);
        return;
    }
    counter!(USAGE_PROMPT_TOKENS, "model" => model.clone(), "key" => key.to_owned())
        .increment(prompt.unwrap_or(0));
    counter!(USAGE_COMPLETION_TOKENS, "model" => model, "key" => key.to_owned())
        .increment(completion.unwrap_or(0));
}

/// The per-token counters, looked up in the recorder once: `counter!` hashes the name and
/// searches the registry on every call, which showed in profiles of the token path.
struct TokenCounters {
    tokens: Counter,
    relayed: Counter,
    delivered: Counter,
    fell_behind: Counter,
}

/// Where a logged token came from: this instance's upstream call, or (a replica) the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Upstream,
    Store,
}

/// Counts one token's fan-out: one update per token, whatever the number of subscribers.
/// Called only after [`install`] (by a generation's task), so the cached handles are the
/// recorder's.
pub fn record_fan_out(fan_out: FanOut, source: TokenSource) {
    static COUNTERS: OnceLock<TokenCounters> = OnceLock::new();
    let counters = COUNTERS.get_or_init(|| TokenCounters {
        tokens: counter!(TOKENS),
        relayed: counter!(RELAYED_TOKENS),
        delivered: counter!(EVENTS_DELIVERED),
        fell_behind: counter!(FELL_BEHIND),
    });
    match source {
        TokenSource::Upstream => counters.tokens.increment(1),
        TokenSource::Store => counters.relayed.increment(1),
    }
    counters.delivered.increment(fan_out.delivered);
    if fan_out.fell_behind > 0 {
        counters.fell_behind.increment(fan_out.fell_behind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_histogram_has_rising_buckets() {
        // `install` relies on it: the exporter refuses an empty bucket list.
        for (name, buckets) in BUCKETS {
            assert!(!buckets.is_empty(), "{name}");
            assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{name}");
        }
    }

    #[test]
    fn proc_files_are_read_field_by_field() {
        let status = "Name:\ttokenfan\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(resident_kib(status), Some(12345));
        let stat = "42 (token fan) S 1 42 42 0 -1 4194560 100 0 0 0 250 30 0 0 20 0 3 0";
        assert_eq!(cpu_ticks(stat), Some(280));
    }

    #[test]
    fn a_lag_sample_is_taken_on_every_nth_token_only() {
        assert_eq!(LagSample::sample_number(0), Some(0));
        assert_eq!(LagSample::sample_number(LAG_SAMPLE_EVERY * 3), Some(3));
        assert_eq!(LagSample::sample_number(LAG_SAMPLE_EVERY + 1), None);
        let sample = LagSample::default();
        sample.received(LAG_SAMPLE_EVERY);
        assert_eq!(sample.packed.load(Ordering::Relaxed) >> ARRIVAL_BITS, 1);
        sample.received(LAG_SAMPLE_EVERY + 1);
        assert_eq!(sample.packed.load(Ordering::Relaxed) >> ARRIVAL_BITS, 1);
    }

    #[test]
    fn model_labels_are_bounded() {
        let request = |model: &str| {
            let mut map = Map::new();
            map.insert("model".into(), Value::from(model));
            map
        };
        let label = |request: &Map<String, Value>| model_label(request).to_string();
        assert_eq!(label(&Map::new()), "none");
        assert_eq!(label(&request(&"m".repeat(65))), "other");
        for n in 0..MAX_MODELS + 5 {
            let model = format!("bounded-{n}");
            let label = label(&request(&model));
            assert!(label == model || label == "other", "{label}");
        }
        assert_eq!(label(&request("bounded-late-comer")), "other");
    }
}
