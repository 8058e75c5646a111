//! Every knob of the gateway, in one struct.
//!
//! Each field is a CLI flag and a `TOKENFAN_*` environment variable (clap), with its default
//! written on the field. Durations use the usual notation (`500ms`, `25s`, `5m`). Nothing else in
//! the crate reads the environment.

use std::{fmt, net::SocketAddr, time::Duration};

use clap::Args;

/// Parses `500ms`, `25s`, `5m`, … for clap.
pub fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// A value that must never reach a log, a metric, an error message or a panic.
#[derive(Clone, Default, PartialEq, Eq)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpstreamKind {
    Openai,
    Anthropic,
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
