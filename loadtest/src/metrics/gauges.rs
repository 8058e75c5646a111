//! The gateway's own gauges of what is open and running, read from its `/metrics` (Prometheus
//! text format): after a soak every one must be back to zero.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::client::http::request;

const CONNECTIONS_OPEN: &str = "tokenfan_connections_open";
const SUBSCRIBERS_OPEN: &str = "tokenfan_subscribers_open";
const GENERATIONS_RUNNING: &str = "tokenfan_generations_running";

/// One scrape; `None` where the gateway did not export the gauge.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Gauges {
    /// Includes the connection the scrape itself came on.
    pub connections_open: Option<f64>,
    pub subscribers_open: Option<f64>,
    pub generations_running: Option<f64>,
}

impl Gauges {
    pub fn parse(text: &str) -> Self {
        Self {
            connections_open: value(text, CONNECTIONS_OPEN),
            subscribers_open: value(text, SUBSCRIBERS_OPEN),
            generations_running: value(text, GENERATIONS_RUNNING),
        }
    }

    /// Nothing is open or running but the scraping connection.
    pub fn idle(&self) -> bool {
        self.connections_open == Some(1.0)
            && self.subscribers_open == Some(0.0)
            && self.generations_running == Some(0.0)
    }

    /// No generation is running (subscribers and connections may still be open).
    pub fn nothing_running(&self) -> bool {
        self.generations_running == Some(0.0)
    }
}

/// `GET /metrics` on a fresh connection (which the gateway counts as open while it answers).
pub async fn scrape(addr: SocketAddr) -> Result<Gauges> {
    let resp = request(addr, "GET", "/metrics", None, Duration::from_secs(5)).await?;
    if resp.status != 200 {
        bail!("GET /metrics answered {}", resp.status);
    }
    Ok(Gauges::parse(&String::from_utf8_lossy(&resp.body)))
}

/// The value of an unlabelled sample `name value [timestamp]`.
fn value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some(name)).then(|| fields.next()?.parse().ok())?
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_unlabelled_gauges_and_knows_idle() {
        let text = "# HELP tokenfan_connections_open Client TCP connections open now\n\
                    # TYPE tokenfan_connections_open gauge\n\
                    tokenfan_connections_open 1\n\
                    tokenfan_connections_open_total 9\n\
                    tokenfan_subscribers_open 0\n\
                    tokenfan_generations_running 0 1700000000000\n";
        let gauges = Gauges::parse(text);
        assert_eq!(gauges.connections_open, Some(1.0));
        assert_eq!(gauges.generations_running, Some(0.0));
        assert!(gauges.idle());
        let busy = Gauges::parse("tokenfan_connections_open 3\ntokenfan_subscribers_open 2\n");
        assert_eq!(busy.generations_running, None);
        assert!(!busy.idle() && !busy.nothing_running());
    }
}
