//! Every knob of the gateway, in one struct.
//!
//! Each field is a CLI flag and a `TOKENFAN_*` environment variable (clap), with its default
//! written on the field. Durations use the usual notation (`500ms`, `25s`, `5m`). Nothing else in
//! the crate reads the environment: the upstreams file (`--upstreams-file`), which names the
//! variables holding its keys, is read and checked here too ([`Config::named_upstreams`]).

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Args;
use serde::Deserialize;

/// Parses `500ms`, `25s`, `5m`, … for clap.
pub fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// A value that must never reach a log, a metric, an error message or a panic.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: one line per event, span fields as context.
    Text,
    /// For a log pipeline: one JSON object per line, stable field names (`telemetry`).
    Json,
}

/// Logs and traces, for every subcommand (`TOKENFAN_LOG` is the log filter).
#[derive(Debug, Clone, Args)]
pub struct TelemetryConfig {
    /// Log line format: `text` or `json`.
    #[arg(
        long = "log-format",
        env = "TOKENFAN_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    /// OTLP/HTTP endpoint traces are sent to, the full URL (e.g.
    /// `http://collector:4318/v1/traces`; plain HTTP). Unset: no traces.
    #[arg(long = "otlp-endpoint", env = "TOKENFAN_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
}

/// Configuration of `tokenfan serve`.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "TOKENFAN_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Listen backlog. Reconnect bursts after a drain need far more than tokio's 128; the kernel
    /// caps it at net.core.somaxconn.
    #[arg(long, env = "TOKENFAN_LISTEN_BACKLOG", default_value_t = 65_535)]
    pub listen_backlog: u32,

    #[command(flatten)]
    pub upstream: UpstreamConfig,

    /// TOML file of named upstreams, each with its kind, URL, key, headers and the models routed
    /// to it (README.md, "Several upstreams"). It replaces the single-upstream flags, which may
    /// not be given with it (a startup error, rather than one of them silently losing); the
    /// timeouts and retries apply to every upstream.
    #[arg(
        long = "upstreams-file",
        env = "TOKENFAN_UPSTREAMS_FILE",
        conflicts_with_all = ["url", "kind", "api_key", "headers", "proxy", "ca_file"]
    )]
    pub upstreams_file: Option<PathBuf>,

    #[command(flatten)]
    pub stream: StreamConfig,

    #[command(flatten)]
    pub store: StoreConfig,

    #[command(flatten)]
    pub drain: DrainConfig,

    #[command(flatten)]
    pub connection: ConnectionConfig,

    #[command(flatten)]
    pub access: AccessConfig,

    #[command(flatten)]
    pub limits: LimitsConfig,

    /// Defaults of the embedded mock LLM, used when no upstream URL is set.
    #[command(flatten)]
    pub mock: crate::upstream::mock::MockConfig,
}

/// The store shared by several instances, so that any instance serves any generation.
#[derive(Debug, Clone, Args)]
pub struct StoreConfig {
    /// `redis://[user:password@]host:port[/db]` (`rediss://` for TLS). Unset: generations live in
    /// this process only, and every request about one must reach this instance. Never logged.
    #[arg(
        id = "store_url",
        long = "store-url",
        env = "TOKENFAN_STORE_URL",
        hide_env_values = true
    )]
    pub url: Option<Secret>,

    /// This instance's name in the store (the owner of the generations it runs). Default: the
    /// host name and a random suffix, unique per process.
    #[arg(long = "instance-id", env = "TOKENFAN_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// The owner's lease on a running generation: when an owner dies, other instances end its
    /// generations `failed` (`owner_lost`) about one to two leases later.
    #[arg(long = "owner-lease", env = "TOKENFAN_OWNER_LEASE", default_value = "5s", value_parser = parse_duration)]
    pub owner_lease: Duration,

    /// `/readyz` answers 503 once the store has been unreachable this long, not at the first
    /// failed ping, so that a brief blip does not take every instance out of service at once.
    #[arg(long = "store-unready-after", env = "TOKENFAN_STORE_UNREADY_AFTER", default_value = "30s", value_parser = parse_duration)]
    pub unready_after: Duration,
}

/// The provider the generations are streamed from.
#[derive(Debug, Clone, Args)]
pub struct UpstreamConfig {
    /// Base URL of the provider's API, ending in `/v1` (tokenfan calls `{url}/chat/completions`,
    /// or `{url}/messages` for Anthropic). Unset: an embedded mock LLM is started on a loopback
    /// port (it speaks both dialects).
    #[arg(long = "upstream-url", env = "TOKENFAN_UPSTREAM_URL")]
    pub url: Option<String>,

    /// The provider's API dialect: OpenAI-compatible chat completions, or Anthropic Messages
    /// (key in `x-api-key`, with `anthropic-version`; requests are translated from OpenAI's).
    #[arg(
        long = "upstream-kind",
        env = "TOKENFAN_UPSTREAM_KIND",
        value_enum,
        default_value_t = UpstreamKind::Openai
    )]
    pub kind: UpstreamKind,

    /// Bearer key sent to the upstream. Never logged.
    #[arg(
        long = "upstream-api-key",
        env = "TOKENFAN_UPSTREAM_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<Secret>,

    /// Extra header sent to the upstream, `Name: value`; repeat the flag (or separate with `;`
    /// in the variable) for several.
    #[arg(
        long = "upstream-header",
        env = "TOKENFAN_UPSTREAM_HEADERS",
        value_delimiter = ';',
        hide_env_values = true
    )]
    pub headers: Vec<String>,

    /// HTTP proxy to reach the upstream through, `http://[user:password@]host:port`; every
    /// connection is tunnelled with `CONNECT`. Never logged. `HTTPS_PROXY`, `HTTP_PROXY` and
    /// `NO_PROXY` are not read.
    #[arg(
        long = "upstream-proxy",
        env = "TOKENFAN_UPSTREAM_PROXY",
        hide_env_values = true
    )]
    pub proxy: Option<Secret>,

    /// PEM file of CA certificates to trust for an `https` upstream, besides the public web PKI
    /// roots (for a provider behind a private CA).
    #[arg(long = "upstream-ca-file", env = "TOKENFAN_UPSTREAM_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,

    /// Deadline for opening the TCP/TLS connection to the upstream.
    #[arg(long = "upstream-connect-timeout", env = "TOKENFAN_UPSTREAM_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Deadline from sending the request to receiving the first token (retries included).
    #[arg(long = "upstream-first-token-timeout", env = "TOKENFAN_UPSTREAM_FIRST_TOKEN_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub first_token_timeout: Duration,

    /// Longest silence allowed between two chunks of a running stream.
    #[arg(long = "upstream-idle-timeout", env = "TOKENFAN_UPSTREAM_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Deadline for a whole generation.
    #[arg(long = "upstream-total-timeout", env = "TOKENFAN_UPSTREAM_TOTAL_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub total_timeout: Duration,

    /// Retries on connect errors, 429 and 5xx; only before the first token.
    #[arg(
        long = "upstream-max-retries",
        env = "TOKENFAN_UPSTREAM_MAX_RETRIES",
        default_value_t = 3
    )]
    pub max_retries: u32,

    /// First retry delay; doubled on each retry, with jitter, unless `Retry-After` says otherwise.
    #[arg(long = "upstream-retry-backoff", env = "TOKENFAN_UPSTREAM_RETRY_BACKOFF", default_value = "250ms", value_parser = parse_duration)]
    pub retry_backoff: Duration,
}

/// The API dialect of an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    Openai,
    Anthropic,
}

/// As written in the flag and the upstreams file, for log lines.
impl fmt::Display for UpstreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Openai => "openai",
            Self::Anthropic => "anthropic",
        })
    }
}

/// How generations are kept and streamed to subscribers.
#[derive(Debug, Clone, Args)]
pub struct StreamConfig {
    /// Slots in each subscriber's channel. A subscriber that falls this many events behind
    /// leaves the live fan-out and catches up from the log (in batches), then goes live again;
    /// it is disconnected only past `--max-viewer-lag` or `--max-viewer-lag-bytes`.
    #[arg(long, env = "TOKENFAN_CHANNEL_CAPACITY", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub channel_capacity: u32,

    /// A subscriber catching up from the log after its channel filled up is disconnected with
    /// `event: reconnect` (reason `slow_consumer`) once the next token it lacks has been logged
    /// for longer than this: it reads slower than the generation writes. Bursts do not count:
    /// a reader that catches up within this time stays.
    #[arg(long, env = "TOKENFAN_MAX_VIEWER_LAG", default_value = "10s", value_parser = parse_duration)]
    pub max_viewer_lag: Duration,

    /// The same, in bytes of frames between the next token such a subscriber lacks and the
    /// log's end.
    #[arg(long, env = "TOKENFAN_MAX_VIEWER_LAG_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_viewer_lag_bytes: u64,

    /// Interval of keep-alive comment lines on idle streams.
    #[arg(long, env = "TOKENFAN_KEEPALIVE_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub keepalive_interval: Duration,

    /// How long a finished generation stays readable (snapshot and replay) before it is freed.
    #[arg(long, env = "TOKENFAN_RETENTION", default_value = "5m", value_parser = parse_duration)]
    pub retention: Duration,

    /// Cancel a running generation nobody has watched for this long. Off by default: the
    /// backend owns a generation, and viewers come and go.
    #[arg(long, env = "TOKENFAN_CANCEL_UNWATCHED_AFTER", value_parser = parse_duration)]
    pub cancel_unwatched_after: Option<Duration>,

    /// `retry:` sent with `event: reconnect` to a subscriber evicted for being slow.
    #[arg(long, env = "TOKENFAN_SLOW_CONSUMER_RETRY", default_value = "1s", value_parser = parse_duration)]
    pub slow_consumer_retry: Duration,
}

/// Shutdown behaviour on SIGTERM/SIGINT.
#[derive(Debug, Clone, Args)]
pub struct DrainConfig {
    /// Running generations may finish streaming until this deadline; then every remaining
    /// subscriber is told to reconnect and the rest is cancelled.
    #[arg(long, env = "TOKENFAN_DRAIN_DEADLINE", default_value = "25s", value_parser = parse_duration)]
    pub drain_deadline: Duration,

    /// `retry:` values sent at shutdown are spread uniformly over this window, so that thousands
    /// of clients do not reconnect in the same millisecond. Default: 5s alone; 1s with a shared
    /// store, where viewers are handed over at once and wait for nothing but their reconnect.
    #[arg(long, env = "TOKENFAN_RECONNECT_SPREAD", value_parser = parse_duration)]
    pub reconnect_spread: Option<Duration>,
}

/// Limits on each client connection.
#[derive(Debug, Clone, Args)]
pub struct ConnectionConfig {
    /// A connection whose peer accepts no bytes for this long is closed, freeing its socket.
    #[arg(long, env = "TOKENFAN_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// Kernel send buffer of each client socket, in bytes (SO_SNDBUF). Unset: the kernel's
    /// autotuning, which lets one unread socket pin up to net.ipv4.tcp_wmem's maximum (often
    /// 4 MiB) until the write timeout; a fixed size bounds that.
    #[arg(long, env = "TOKENFAN_SOCKET_SEND_BUFFER")]
    pub socket_send_buffer: Option<usize>,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "TOKENFAN_MAX_REQUEST_BODY", default_value_t = 4 * 1024 * 1024)]
    pub max_request_body: usize,

    /// Deadline for receiving a request's headers (slowloris protection).
    #[arg(long, env = "TOKENFAN_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
}

/// Who may do what.
#[derive(Debug, Clone, Args)]
pub struct AccessConfig {
    /// API keys accepted on the backend API (`Authorization: Bearer <key>`); several for
    /// rotation (comma-separated in the variable). None: the API is open, which tokenfan
    /// allows only on a loopback address unless `--allow-unauthenticated` is given.
    #[arg(
        long = "api-key",
        env = "TOKENFAN_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<Secret>,

    /// Serve without API keys on a non-loopback address (loudly logged).
    #[arg(long, env = "TOKENFAN_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,

    /// Key that signs subscribe tokens (at least 32 bytes). Several instances behind one load
    /// balancer need the same key. Unset: a random key at start (one instance only).
    #[arg(long, env = "TOKENFAN_SUBSCRIBE_TOKEN_KEY", hide_env_values = true)]
    pub subscribe_token_key: Option<Secret>,

    /// How long a subscribe token stays valid.
    #[arg(long, env = "TOKENFAN_SUBSCRIBE_TOKEN_TTL", default_value = "1h", value_parser = parse_duration)]
    pub subscribe_token_ttl: Duration,

    /// Browser origins allowed by CORS (e.g. `https://app.example.com`; comma-separated in
    /// the variable). None by default.
    #[arg(
        long = "cors-origin",
        env = "TOKENFAN_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
}

/// Admission control: every limit answers with a clear error and is counted in metrics.
#[derive(Debug, Clone, Args)]
pub struct LimitsConfig {
    /// Client connections served at once. Beyond, new subscribers are told to reconnect later
    /// and backend calls get 503. Unset: the open-files limit minus a reserve for upstream
    /// connections.
    #[arg(long, env = "TOKENFAN_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Generations running at once; beyond, creation answers 503.
    #[arg(long, env = "TOKENFAN_MAX_GENERATIONS", default_value_t = 10_000)]
    pub max_generations: usize,

    /// Subscribers of one generation at once; beyond, 429.
    #[arg(
        long,
        env = "TOKENFAN_MAX_SUBSCRIBERS_PER_GENERATION",
        default_value_t = 100_000
    )]
    pub max_subscribers_per_generation: usize,

    /// Tokens one generation may log; beyond, it ends `failed` with code `too_large`.
    #[arg(
        long,
        env = "TOKENFAN_MAX_GENERATION_TOKENS",
        default_value_t = 100_000
    )]
    pub max_generation_tokens: usize,

    /// Bytes of text one generation may log; beyond, it ends `failed` with code `too_large`.
    #[arg(long, env = "TOKENFAN_MAX_GENERATION_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_generation_bytes: usize,

    /// Memory all generation logs may use together, in bytes. Beyond, the oldest finished
    /// generations are forgotten first; if running ones alone exceed it, creation answers 503.
    #[arg(long, env = "TOKENFAN_LOG_MEMORY_BUDGET", default_value_t = 1024 * 1024 * 1024)]
    pub log_memory_budget: usize,

    /// Generations each API key may create per second, on average.
    #[arg(long, env = "TOKENFAN_CREATE_RATE", default_value_t = 50.0)]
    pub create_rate: f64,

    /// Generations each API key may create in a burst above the rate.
    #[arg(long, env = "TOKENFAN_CREATE_BURST", default_value_t = 100)]
    pub create_burst: u32,

    /// Largest request head (request line and headers), in bytes; beyond, 431.
    #[arg(long, env = "TOKENFAN_MAX_HEADER_BYTES", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u64).range(8192..))]
    pub max_header_bytes: u64,
}

impl Config {
    /// The defaults, as `tokenfan serve` with no flags and no environment would have them.
    pub fn defaults() -> Self {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            config: Config,
        }
        use clap::Parser;
        Wrapper::parse_from(["tokenfan"]).config
    }
}

impl Config {
    /// The upstreams of `--upstreams-file`, read and checked, with their keys taken from the
    /// environment; `None` without a file (the single-upstream flags then apply).
    pub fn named_upstreams(&self) -> Result<Option<Vec<NamedUpstream>>, UpstreamsFileError> {
        let Some(path) = &self.upstreams_file else {
            return Ok(None);
        };
        let failed = |problem| UpstreamsFileError {
            path: path.clone(),
            problem,
        };
        let text =
            std::fs::read_to_string(path).map_err(|error| failed(FileProblem::Read(error)))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        parse_upstreams(&text, dir, &self.upstream, |name| std::env::var(name).ok())
            .map(Some)
            .map_err(failed)
    }
}

/// One upstream of the upstreams file, checked: its client settings (the file's, with the
/// global timeouts and retries) and the routes that lead to it.
#[derive(Debug, Clone)]
pub struct NamedUpstream {
    pub name: String,
    /// `url` is always set.
    pub settings: UpstreamConfig,
    /// Models routed here by exact name, sent as they are.
    pub models: Vec<String>,
    /// Models starting with this are routed here, sent without it.
    pub prefix: Option<String>,
    /// Models no other route takes come here.
    pub default: bool,
}

/// Why the upstreams file was refused: the gateway does not start.
#[derive(Debug, thiserror::Error)]
#[error("upstreams file {}: {problem}", path.display())]
pub struct UpstreamsFileError {
    pub path: PathBuf,
    pub problem: FileProblem,
}

#[derive(Debug, thiserror::Error)]
pub enum FileProblem {
    #[error("{0}")]
    Read(std::io::Error),
    /// Not TOML, or not the file's schema (an unknown field or kind, a wrong type).
    #[error("line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("no upstream is configured: add an [[upstream]] table")]
    Empty,
    /// Values are never quoted: keys, header values and URLs may hold secrets.
    #[error("upstream `{upstream}`, field `{field}`: {reason}")]
    Field {
        upstream: String,
        field: &'static str,
        reason: String,
    },
}

/// The upstreams file as written. Unknown fields are errors, so that a misspelt `prefx` does
/// not silently route nothing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamsFile {
    #[serde(default)]
    upstream: Vec<FileUpstream>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    name: String,
    kind: UpstreamKind,
    url: String,
    /// The variable holding the key, so that keys stay in Secrets, out of files and ConfigMaps.
    api_key_env: Option<String>,
    api_key: Option<Secret>,
    #[serde(default)]
    headers: BTreeMap<String, Secret>,
    proxy: Option<Secret>,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    models: Vec<String>,
    prefix: Option<String>,
    #[serde(default)]
    default: bool,
}

/// Longest upstream name: names appear in logs and in `/v1/models`.
const MAX_UPSTREAM_NAME: usize = 64;

/// Parses and checks the upstreams file's `text`; relative `ca_file`s are under `dir`, keys
/// are looked up with `env`.
fn parse_upstreams(
    text: &str,
    dir: &Path,
    global: &UpstreamConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Vec<NamedUpstream>, FileProblem> {
    let file: UpstreamsFile = toml::from_str(text).map_err(|error| syntax(text, &error))?;
    if file.upstream.is_empty() {
        return Err(FileProblem::Empty);
    }
    let mut checked: Vec<NamedUpstream> = Vec::with_capacity(file.upstream.len());
    // Which upstream each name, model and prefix belongs to, to refuse ambiguous routes.
    let mut names = HashMap::new();
    let mut models = HashMap::new();
    let mut prefixes = HashMap::new();
    let mut default = None;
    for entry in file.upstream {
        let name = entry.name.clone();
        let field = |field, reason: String| FileProblem::Field {
            upstream: name.clone(),
            field,
            reason,
        };
        if name.is_empty()
            || name.len() > MAX_UPSTREAM_NAME
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(field(
                "name",
                format!("must be 1 to {MAX_UPSTREAM_NAME} of A-Z a-z 0-9 - _ ."),
            ));
        }
        if names.insert(name.clone(), ()).is_some() {
            return Err(field("name", "another upstream has this name".into()));
        }
        for model in &entry.models {
            if model.is_empty() {
                return Err(field("models", "a model name is empty".into()));
            }
            if let Some(other) = models.insert(model.clone(), name.clone()) {
                return Err(field(
                    "models",
                    format!("`{model}` is routed to upstream `{other}` already"),
                ));
            }
        }
        if let Some(prefix) = &entry.prefix {
            if prefix.is_empty() {
                return Err(field(
                    "prefix",
                    "is empty (use `default = true` to route every other model here)".into(),
                ));
            }
            if let Some(other) = prefixes.insert(prefix.clone(), name.clone()) {
                return Err(field(
                    "prefix",
                    format!("upstream `{other}` has the same prefix"),
                ));
            }
        }
        if entry.default {
            if let Some(other) = default.replace(name.clone()) {
                return Err(field(
                    "default",
                    format!("upstream `{other}` is the default already"),
                ));
            }
        }
        if entry.models.is_empty() && entry.prefix.is_none() && !entry.default {
            return Err(field(
                "models",
                "no model is routed here: give `models`, a `prefix` or `default = true`".into(),
            ));
        }
        let settings = client_settings(&entry, dir, global, &env)
            .map_err(|(name, reason)| field(name, reason))?;
        checked.push(NamedUpstream {
            name,
            settings,
            models: entry.models,
            prefix: entry.prefix,
            default: entry.default,
        });
    }
    Ok(checked)
}

/// The client settings of one upstream: the global ones with the entry's URL, kind, key,
/// headers, proxy and CA file; or the field at fault and why.
fn client_settings(
    entry: &FileUpstream,
    dir: &Path,
    global: &UpstreamConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<UpstreamConfig, (&'static str, String)> {
    match url::Url::parse(&entry.url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
        Ok(_) => return Err(("url", "must be an http:// or https:// URL".into())),
        Err(error) => return Err(("url", format!("not a valid URL: {error}"))),
    }
    let api_key = match (&entry.api_key, &entry.api_key_env) {
        (Some(_), Some(_)) => {
            return Err((
                "api_key",
                "give `api_key` or `api_key_env`, not both".into(),
            ))
        }
        (Some(key), None) => Some(key.clone()),
        (None, Some(variable)) => match env(variable).filter(|key| !key.is_empty()) {
            Some(key) => Some(Secret::new(key)),
            None => {
                return Err((
                    "api_key_env",
                    format!("the environment variable `{variable}` is not set or empty"),
                ))
            }
        },
        (None, None) => None,
    };
    let mut headers = Vec::with_capacity(entry.headers.len());
    for (name, value) in &entry.headers {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(("headers", format!("`{name}` is not a valid header name")));
        }
        if http::HeaderValue::from_str(value.expose()).is_err() {
            return Err((
                "headers",
                format!("the value of `{name}` is not a valid header value"),
            ));
        }
        headers.push(format!("{name}: {}", value.expose()));
    }
    if let Some(proxy) = &entry.proxy {
        if url::Url::parse(proxy.expose()).is_err() {
            return Err(("proxy", "not a valid URL".into()));
        }
    }
    Ok(UpstreamConfig {
        url: Some(entry.url.clone()),
        kind: entry.kind,
        api_key,
        headers,
        proxy: entry.proxy.clone(),
        // Relative to the file, as an operator who ships both together expects.
        ca_file: entry.ca_file.as_ref().map(|file| dir.join(file)),
        ..global.clone()
    })
}

/// A TOML or schema error with its position, without the source line that `toml` would quote
/// (it may hold a key).
fn syntax(text: &str, error: &toml::de::Error) -> FileProblem {
    let offset = error.span().map_or(0, |span| span.start).min(text.len());
    let before = text.get(..offset).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |last| last.chars().count())
        + 1;
    FileProblem::Syntax {
        line,
        column,
        message: error.message().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text` parsed as an upstreams file in `/etc/tokenfan`, where only `OPENAI_KEY` and
    /// `ANTHROPIC_KEY` are set.
    fn parse(text: &str) -> Result<Vec<NamedUpstream>, String> {
        let env = |name: &str| match name {
            "OPENAI_KEY" => Some("sk-openai".to_owned()),
            "ANTHROPIC_KEY" => Some("sk-ant".to_owned()),
            "EMPTY_KEY" => Some(String::new()),
            _ => None,
        };
        let global = Config::defaults().upstream;
        parse_upstreams(text, Path::new("/etc/tokenfan"), &global, env)
            .map_err(|problem| problem.to_string())
    }

    const TWO: &str = r#"
        [[upstream]]
        name = "openai"
        kind = "openai"
        url = "https://api.openai.com/v1"
        api_key_env = "OPENAI_KEY"
        headers = { "OpenAI-Organization" = "org-1" }
        models = ["gpt-4o"]
        default = true

        [[upstream]]
        name = "anthropic"
        kind = "anthropic"
        url = "https://api.anthropic.com/v1"
        api_key_env = "ANTHROPIC_KEY"
        prefix = "anthropic/"
        ca_file = "private-ca.pem"
        proxy = "http://proxy:3128"
    "#;

    #[test]
    fn an_upstreams_file_gives_each_upstream_its_url_kind_key_headers_and_routes() {
        let upstreams = parse(TWO).unwrap();
        let global = Config::defaults().upstream;
        let [openai, anthropic] = &upstreams[..] else {
            panic!("{upstreams:?}");
        };
        assert_eq!(openai.name, "openai");
        assert_eq!(openai.settings.kind, UpstreamKind::Openai);
        assert_eq!(
            openai.settings.url.as_deref(),
            Some("https://api.openai.com/v1")
        );
        assert_eq!(openai.settings.api_key, Some(Secret::new("sk-openai")));
        assert_eq!(openai.settings.headers, ["OpenAI-Organization: org-1"]);
        assert_eq!(
            (&openai.models[..], openai.default),
            (&["gpt-4o".to_owned()][..], true)
        );
        assert_eq!(anthropic.settings.kind, UpstreamKind::Anthropic);
        assert_eq!(anthropic.settings.api_key, Some(Secret::new("sk-ant")));
        assert_eq!(anthropic.prefix.as_deref(), Some("anthropic/"));
        assert!(!anthropic.default);
        // A relative CA file is the file's neighbour.
        assert_eq!(
            anthropic.settings.ca_file.as_deref(),
            Some(Path::new("/etc/tokenfan/private-ca.pem"))
        );
        assert!(anthropic.settings.proxy.is_some());
        // Timeouts and retries stay global.
        assert_eq!(anthropic.settings.total_timeout, global.total_timeout);
        assert_eq!(anthropic.settings.max_retries, global.max_retries);
        // Keys never show in a debug print.
        assert!(!format!("{upstreams:?}").contains("sk-"));
    }

    /// The error for `TWO` with `from` replaced by `to`.
    fn error_with(from: &str, to: &str) -> String {
        assert!(TWO.contains(from), "{from}");
        parse(&TWO.replacen(from, to, 1)).unwrap_err()
    }

    #[test]
    fn every_mistake_is_refused_naming_the_upstream_and_the_field() {
        let cases = [
            (
                r#"name = "anthropic""#,
                r#"name = "openai""#,
                "upstream `openai`, field `name`: another upstream has this name",
            ),
            (
                r#"name = "anthropic""#,
                r#"name = "an thropic""#,
                "upstream `an thropic`, field `name`: must be 1 to 64",
            ),
            (
                r#"url = "https://api.anthropic.com/v1""#,
                r#"url = "api.anthropic.com""#,
                "upstream `anthropic`, field `url`: not a valid URL",
            ),
            (
                r#"url = "https://api.anthropic.com/v1""#,
                r#"url = "ftp://api.anthropic.com/v1""#,
                "upstream `anthropic`, field `url`: must be an http:// or https:// URL",
            ),
            (
                r#"api_key_env = "ANTHROPIC_KEY""#,
                r#"api_key_env = "MISSING_KEY""#,
                "upstream `anthropic`, field `api_key_env`: the environment variable \
                 `MISSING_KEY` is not set or empty",
            ),
            (
                r#"api_key_env = "ANTHROPIC_KEY""#,
                r#"api_key_env = "EMPTY_KEY""#,
                "field `api_key_env`: the environment variable `EMPTY_KEY` is not set",
            ),
            (
                r#"api_key_env = "ANTHROPIC_KEY""#,
                r#"api_key_env = "ANTHROPIC_KEY"
                api_key = "sk-literal""#,
                "upstream `anthropic`, field `api_key`: give `api_key` or `api_key_env`",
            ),
            (
                r#"headers = { "OpenAI-Organization" = "org-1" }"#,
                r#"headers = { "Bad Name" = "org-1" }"#,
                "upstream `openai`, field `headers`: `Bad Name` is not a valid header name",
            ),
            (
                r#"headers = { "OpenAI-Organization" = "org-1" }"#,
                "headers = { \"X-Key\" = \"sk-secret\\nInjected: 1\" }",
                "upstream `openai`, field `headers`: the value of `X-Key` is not a valid",
            ),
            (
                r#"prefix = "anthropic/""#,
                r#"models = ["gpt-4o"]"#,
                "upstream `anthropic`, field `models`: `gpt-4o` is routed to upstream `openai` \
                 already",
            ),
            (
                r#"prefix = "anthropic/""#,
                r#"prefix = """#,
                "upstream `anthropic`, field `prefix`: is empty",
            ),
            (
                r#"prefix = "anthropic/""#,
                "default = true",
                "upstream `anthropic`, field `default`: upstream `openai` is the default already",
            ),
            (
                r#"prefix = "anthropic/""#,
                "",
                "upstream `anthropic`, field `models`: no model is routed here",
            ),
            (
                r#"proxy = "http://proxy:3128""#,
                r#"proxy = "not a url""#,
                "upstream `anthropic`, field `proxy`: not a valid URL",
            ),
        ];
        for (from, to, expected) in cases {
            let error = error_with(from, to);
            assert!(error.contains(expected), "{to}: {error}");
            assert!(!error.contains("sk-"), "{error}");
        }
    }

    #[test]
    fn schema_errors_say_where_without_quoting_the_line() {
        let error = error_with(r#"kind = "anthropic""#, r#"kind = "antropic""#);
        assert!(error.starts_with("line 13, column 16: "), "{error}");
        assert!(error.contains("unknown variant `antropic`"), "{error}");
        let error = error_with(r#"prefix = "anthropic/""#, r#"prefx = "anthropic/""#);
        assert!(error.contains("unknown field `prefx`"), "{error}");
        let error = error_with(r#"name = "openai""#, "");
        assert!(error.contains("missing field `name`"), "{error}");
        // A broken line holding a key: the key is not quoted back.
        let error = parse(r#"[[upstream]] api_key = "sk-half"#).unwrap_err();
        assert!(error.starts_with("line 1, column "), "{error}");
        assert!(!error.contains("sk-half"), "{error}");
        assert_eq!(
            parse("").unwrap_err(),
            "no upstream is configured: add an [[upstream]] table"
        );
    }

    #[test]
    fn the_file_and_the_single_upstream_flags_exclude_each_other() {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            config: Config,
        }
        use clap::Parser;
        let file = ["tokenfan", "--upstreams-file", "upstreams.toml"];
        let config = Wrapper::try_parse_from(file).unwrap().config;
        assert_eq!(
            config.upstreams_file.as_deref(),
            Some(Path::new("upstreams.toml"))
        );
        for flag in [
            &["--upstream-url", "http://127.0.0.1:9/v1"][..],
            &["--upstream-kind", "anthropic"],
            &["--upstream-api-key", "sk-x"],
            &["--upstream-header", "X-A: b"],
        ] {
            let args = file.iter().chain(flag);
            let error = Wrapper::try_parse_from(args).err().unwrap();
            assert_eq!(
                error.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{flag:?}"
            );
        }
        // Timeouts and retries apply to every upstream of the file.
        let args = file.iter().chain(&["--upstream-max-retries", "1"]);
        assert!(Wrapper::try_parse_from(args).is_ok());
    }
}
