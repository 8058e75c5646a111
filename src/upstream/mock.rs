//! The embedded mock LLM (stub until the real one lands).

use std::future::Future;

use tokio::net::TcpListener;

/// Server-wide defaults of the mock.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MockConfig {}

pub fn router(_config: MockConfig) -> axum::Router {
    axum::Router::new()
}

pub async fn serve(
    listener: TcpListener,
    config: MockConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(config))
        .with_graceful_shutdown(shutdown)
        .await
}
