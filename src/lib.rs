//! tokenfan: a gateway that streams LLM tokens to many clients over Server-Sent Events.
//!
//! [`serve`] is what `main` and every test call: it takes a bound listener, the configuration
//! and a shutdown future, runs until the shutdown future resolves, then drains.
//! See ARCHITECTURE.md for the module map and the path of a token.

pub mod access;
pub mod api;
pub mod config;
pub mod drain;
pub mod hub;
pub mod metrics;
pub mod server;
pub mod signal;
pub mod store;
mod store_health;
pub mod telemetry;
pub mod upstream;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::info;

pub use config::Config;
pub use server::bind;

use crate::{
    api::App,
    drain::Drain,
    hub::{frame, Hub, HubSettings},
    server::Server,
    upstream::{mock, InvalidUpstream, Upstream, UpstreamError, Upstreams},
};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid upstream configuration: {0}")]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    UpstreamsFile(#[from] config::UpstreamsFileError),
    #[error("invalid upstream configuration: {0}")]
    NamedUpstream(#[from] InvalidUpstream),
    #[error("could not start the embedded mock LLM: {0}")]
    Mock(std::io::Error),
    #[error(transparent)]
    Access(#[from] access::AccessError),
    #[error(transparent)]
    Cors(#[from] api::InvalidOrigin),
    #[error(
        "refusing to serve {0} without API keys: set TOKENFAN_API_KEYS, listen on a loopback \
         address, or pass --allow-unauthenticated"
    )]
    Unauthenticated(std::net::SocketAddr),
    #[error("could not read the listener's address: {0}")]
    Listener(std::io::Error),
    #[error("could not open the store (--store-url): {0}")]
    Store(#[from] store::StoreError),
    #[error("could not listen to the other instances: {0}")]
    Hub(#[from] hub::HubError),
    #[error(
        "with a shared store (--store-url) and API keys, every instance must sign subscribe \
         tokens with the same key: set TOKENFAN_SUBSCRIBE_TOKEN_KEY"
    )]
    SharedTokenKey,
}

/// Serves the gateway on `listener` until `shutdown` resolves, then drains and returns.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let prometheus = metrics::install();
    let access = access::Access::new(&config.access, &config.limits)?;
    let addr = listener.local_addr().map_err(ServeError::Listener)?;
    check_exposure(&access, &config, addr)?;
    let cors = api::cors_layer(&config.access.cors_origins)?;
    let mock_shutdown = CancellationToken::new();
    let upstreams = upstreams(&config, &mock_shutdown).await?;
    let shared = open_store(&config, &access).await?;
    let store_health = shared.as_ref().map(|shared| {
        store_health::StoreHealth::watch(shared.store.clone(), config.store.unready_after)
    });
    let hub = Hub::new(
        HubSettings {
            channel_capacity: config.stream.channel_capacity as usize,
            max_viewer_lag: config.stream.max_viewer_lag,
            max_viewer_lag_bytes: config.stream.max_viewer_lag_bytes,
            keepalive_interval: config.stream.keepalive_interval,
            retention: config.stream.retention,
            cancel_unwatched_after: config.stream.cancel_unwatched_after,
            max_generations: config.limits.max_generations,
            log_limits: hub::LogLimits {
                max_tokens: config.limits.max_generation_tokens,
                max_bytes: config.limits.max_generation_bytes,
            },
            log_memory_budget: config.limits.log_memory_budget,
        },
        upstreams,
        shared,
    );
    hub.listen_to_instances().await?;
    let default_spread = if config.store.url.is_some() {
        HANDOFF_RECONNECT_SPREAD
    } else {
        DRAIN_RECONNECT_SPREAD
    };
    let drain = Drain::new(config.drain.reconnect_spread.unwrap_or(default_spread));
    let slow_retry_ms =
        u64::try_from(config.stream.slow_consumer_retry.as_millis()).unwrap_or(u64::MAX);
    let app = Arc::new(App {
        hub: hub.clone(),
        access,
        max_subscribers_per_generation: config.limits.max_subscribers_per_generation,
        drain: drain.clone(),
        prometheus,
        max_request_body: config.connection.max_request_body,
        max_header_bytes: config.limits.max_header_bytes as usize,
        slow_consumer_frame: frame::reconnect(slow_retry_ms, "slow_consumer"),
        store_health,
        instance_frame: hub.instance().map(|instance| {
            frame::event(
                None,
                "instance",
                &serde_json::json!({ "instance": instance }),
            )
        }),
    });
    let connections = TaskTracker::new();
    info!("listening on {addr}");
    let server = Server {
        listener,
        router: api::router(app, cors),
        over_capacity_router: api::over_capacity_router(),
        config: config.connection.clone(),
        max_connections: config
            .limits
            .max_connections
            .unwrap_or_else(server::default_max_connections),
        max_header_bytes: config.limits.max_header_bytes as usize,
        drain: drain.clone(),
        connections: connections.clone(),
    };
    let accept_loop = tokio::spawn(server.run());
    let keepalive = tokio::spawn(keepalive_ticker(
        hub.clone(),
        config.stream.keepalive_interval,
    ));

    shutdown.await;
    drain::run(&drain, &hub, &connections, config.drain.drain_deadline).await;
    keepalive.abort();
    let _ = accept_loop.await;
    mock_shutdown.cancel();
    Ok(())
}

/// `--reconnect-spread` by default: alone, viewers come back to a replacement pod after the
/// deadline; with a store, another instance serves them at once.
const DRAIN_RECONNECT_SPREAD: Duration = Duration::from_secs(5);
const HANDOFF_RECONNECT_SPREAD: Duration = Duration::from_secs(1);

/// The upstreams of `--upstreams-file`; else the one of `--upstream-url`; else the embedded
/// mock, started here (stopped by `mock_shutdown`).
async fn upstreams(
    config: &Config,
    mock_shutdown: &CancellationToken,
) -> Result<Upstreams, ServeError> {
    if let Some(named) = config.named_upstreams()? {
        for upstream in &named {
            info!(
                upstream = %upstream.name,
                kind = %upstream.settings.kind,
                models = upstream.models.len(),
                prefix = upstream.prefix.as_deref().unwrap_or(""),
                default = upstream.default,
                "upstream configured"
            );
        }
        return Ok(Upstreams::new(named)?);
    }
    let base_url = match &config.upstream.url {
        Some(url) => url.clone(),
        None => start_embedded_mock(config, mock_shutdown.clone()).await?,
    };
    Ok(Upstream::new(&config.upstream, &base_url)?.into())
}

/// Connects to the shared store, when one is configured.
async fn open_store(
    config: &Config,
    access: &access::Access,
) -> Result<Option<hub::Shared>, ServeError> {
    let Some(url) = &config.store.url else {
        return Ok(None);
    };
    if access.keys_required() && config.access.subscribe_token_key.is_none() {
        return Err(ServeError::SharedTokenKey);
    }
    let lifetimes = store::Lifetimes {
        lease: config.store.owner_lease,
        retention: config.stream.retention,
        // No generation outlives its upstream deadline; the margin covers the end's write.
        max_age: config.upstream.total_timeout + Duration::from_secs(60),
    };
    let store = store::open(url.expose(), lifetimes).await?;
    let instance = config
        .store
        .instance_id
        .clone()
        .unwrap_or_else(default_instance_id);
    info!(instance = %instance, "serving generations from the shared store");
    Ok(Some(hub::Shared {
        store,
        instance,
        lease: config.store.owner_lease,
    }))
}

/// The host name (a pod's name on Kubernetes) and a random suffix, so that several processes
/// on one host never share an owner name.
fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "tokenfan".to_owned());
    format!("{host}-{:04x}", rand::random::<u16>())
}

/// An open API on a non-loopback address is a mistake unless the operator says otherwise.
fn check_exposure(
    access: &access::Access,
    config: &Config,
    addr: std::net::SocketAddr,
) -> Result<(), ServeError> {
    if access.keys_required() || addr.ip().is_loopback() {
        return Ok(());
    }
    if !config.access.allow_unauthenticated {
        return Err(ServeError::Unauthenticated(addr));
    }
    tracing::warn!(
        %addr,
        "SERVING WITHOUT AUTHENTICATION on a non-loopback address (--allow-unauthenticated): \
         anyone who can reach it can start generations on your upstream account"
    );
    Ok(())
}

/// One ticker for the whole process sends keep-alives, rather than a timer per connection.
async fn keepalive_ticker(hub: Arc<Hub>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        hub.keepalive();
    }
}

/// Starts the mock LLM on a loopback port and returns its base URL; the gateway then reaches it
/// through the same HTTP client path as a real provider.
async fn start_embedded_mock(
    config: &Config,
    shutdown: CancellationToken,
) -> Result<String, ServeError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(ServeError::Mock)?;
    let addr = listener.local_addr().map_err(ServeError::Mock)?;
    let mock_config = config.mock.clone();
    tokio::spawn(async move {
        if let Err(error) = mock::serve(listener, mock_config, shutdown.cancelled_owned()).await {
            tracing::error!(%error, "embedded mock LLM stopped");
        }
    });
    let url = format!("http://{addr}/v1");
    info!("no upstream configured (--upstream-url / TOKENFAN_UPSTREAM_URL): using the embedded mock LLM at {url}");
    Ok(url)
}
