//! The shutdown signal of the binary: SIGTERM or SIGINT begins the drain, a second one exits at
//! once.

use std::future::Future;

use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

/// Exit status when a second signal cuts the drain short.
const FORCED_EXIT_STATUS: i32 = 1;

/// Registers the handlers now (so a signal that arrives early is not fatal) and returns the
/// future of the first signal.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received: draining"),
            _ = int.recv() => info!("SIGINT received: draining"),
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            warn!("second signal received: exiting now");
            std::process::exit(FORCED_EXIT_STATUS);
        });
    })
}
