//! Every metric tokenfan exports, with its meaning, and the Prometheus recorder.
//!
//! Names are constants so that a grep finds every place a metric is touched. Hot-path counters
//! are updated once per token (with the number of subscribers reached), never once per
//! subscriber.

use std::{
    collections::BTreeSet,
    sync::{Mutex, OnceLock, PoisonError},
};

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, Counter, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

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
/// Counter: subscribers dropped from fan-out because their channel was full (label `reason`).
pub const EVICTIONS: &str = "tokenfan_evictions_total";
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

/// Installs the process-wide Prometheus recorder once and returns its handle. Every server in
/// the process (tests start several) shares it.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed, e.g. by an embedding program; then
            // that one receives the metrics and ours renders what it has.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_gauge!(CONNECTIONS_OPEN, "Client TCP connections open now");
    describe_counter!(CONNECTIONS_ACCEPTED, "Client TCP connections accepted");
    describe_counter!(
        WRITE_TIMEOUTS,
        "Connections closed because the peer stopped reading"
    );
    describe_gauge!(SUBSCRIBERS_OPEN, "SSE subscriber streams open now");
    describe_counter!(SUBSCRIPTIONS, "SSE subscriptions answered with a stream");
    describe_counter!(EVICTIONS, "Subscribers evicted from fan-out, by reason");
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
}

/// Distinct `model` labels at most: models are named by clients, so beyond this they are
/// counted as `other` rather than growing the registry without bound.
const MAX_MODEL_LABELS: usize = 64;
/// Longest `model` label; a longer name is counted as `other`.
const MAX_MODEL_LABEL_BYTES: usize = 64;

/// Counts a finished generation's token usage, whatever its status. `usage` is the provider's
/// object: OpenAI's `prompt_tokens`/`completion_tokens`, or Anthropic's
/// `input_tokens`/`output_tokens`.
pub fn record_usage(model: &str, key: &str, usage: Option<&serde_json::Value>) {
    let model = model_label(model);
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

/// `model` as a label, within [`MAX_MODEL_LABELS`] distinct values and
/// [`MAX_MODEL_LABEL_BYTES`].
fn model_label(model: &str) -> String {
    static SEEN: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let mut seen = SEEN.lock().unwrap_or_else(PoisonError::into_inner);
    let fits = model.len() <= MAX_MODEL_LABEL_BYTES && !model.is_empty();
    if fits && (seen.contains(model) || seen.len() < MAX_MODEL_LABELS) {
        seen.insert(model.to_owned());
        return model.to_owned();
    }
    "other".to_owned()
}

/// The per-token counters, looked up in the recorder once: `counter!` hashes the name and
/// searches the registry on every call, which showed in profiles of the token path.
struct TokenCounters {
    tokens: Counter,
    delivered: Counter,
    evicted: Counter,
}

/// Counts one token's fan-out: one update per token, whatever the number of subscribers.
/// Called only after [`install`] (by a generation's task), so the cached handles are the
/// recorder's.
pub fn record_fan_out(fan_out: FanOut) {
    static COUNTERS: OnceLock<TokenCounters> = OnceLock::new();
    let counters = COUNTERS.get_or_init(|| TokenCounters {
        tokens: counter!(TOKENS),
        delivered: counter!(EVENTS_DELIVERED),
        evicted: counter!(EVICTIONS, "reason" => "slow_consumer"),
    });
    counters.tokens.increment(1);
    counters.delivered.increment(fan_out.delivered);
    if fan_out.evicted > 0 {
        counters.evicted.increment(fan_out.evicted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_labels_are_bounded_in_number_and_length() {
        assert_eq!(model_label("gpt-4o-mini"), "gpt-4o-mini");
        assert_eq!(model_label(&"m".repeat(MAX_MODEL_LABEL_BYTES + 1)), "other");
        assert_eq!(model_label(""), "other");
        for n in 0..2 * MAX_MODEL_LABELS {
            model_label(&format!("model-{n}"));
        }
        assert_eq!(model_label("one-model-too-many"), "other");
        assert_eq!(
            model_label("gpt-4o-mini"),
            "gpt-4o-mini",
            "known models stay"
        );
    }
}
