//! The `chatpath` part of the result: streams read straight from the mock beside the gateway's
//! viewers in the same run, what the gateway adds to their latency, and its CPU per token
//! against the relay floor measured right after the run at as many pairs — on one thread (the
//! floor the issue names) and on a runtime of as many workers as the gateway's (what the
//! runtime itself adds).

use serde::Serialize;

use super::{ms, RunResult};
use crate::floor::RelayFloor;
use crate::metrics::latency::LatencySummary;

#[derive(Debug, Serialize)]
pub struct ChatPath {
    /// Receipt − emit of the direct streams (the gateway's viewers are the run's `latency`).
    pub direct: LatencySummary,
    /// Through the gateway minus direct, at p50, p99 and max (µs; negative when direct was
    /// slower).
    pub added_p50_us: i64,
    pub added_p99_us: i64,
    pub added_max_us: i64,
    /// `floor --relay` at as many pairs as there were generations, the same pace; `None` when
    /// it failed (the error is in the warnings).
    pub relay_floor: Option<RelayFloor>,
    /// The gateway's CPU per delivered token over the relay floor's.
    pub cpu_over_floor: Option<f64>,
    /// The same floor on a multi-threaded runtime of one worker per core, as the gateway's.
    pub relay_floor_on_workers: Option<RelayFloor>,
    pub cpu_over_floor_on_workers: Option<f64>,
}

impl ChatPath {
    pub fn new(
        direct: LatencySummary,
        gateway: &LatencySummary,
        gateway_us_per_token: Option<f64>,
        relay_floor: Option<RelayFloor>,
        relay_floor_on_workers: Option<RelayFloor>,
    ) -> Self {
        let added = |through: u64, direct: u64| through as i64 - direct as i64;
        let over = |floor: &Option<RelayFloor>| {
            gateway_us_per_token
                .zip(floor.as_ref())
                .map(|(us, floor)| us / floor.us_per_token)
        };
        let cpu_over_floor = over(&relay_floor);
        let cpu_over_floor_on_workers = over(&relay_floor_on_workers);
        Self {
            added_p50_us: added(gateway.p50_us, direct.p50_us),
            added_p99_us: added(gateway.p99_us, direct.p99_us),
            added_max_us: added(gateway.max_us, direct.max_us),
            direct,
            relay_floor,
            cpu_over_floor,
            relay_floor_on_workers,
            cpu_over_floor_on_workers,
        }
    }
}

/// (metric, value) rows; none outside `chatpath`.
pub fn rows(result: &RunResult) -> Vec<(String, String)> {
    let Some(c) = &result.chatpath else {
        return Vec::new();
    };
    let signed_ms = |us: i64| format!("{:+.2} ms", us as f64 / 1000.0);
    let mut rows = vec![
        (
            "direct from the mock: latency p50 / p99 / max".into(),
            format!(
                "{} / {} / {} (n = {}, {} tokens)",
                ms(c.direct.p50_us),
                ms(c.direct.p99_us),
                ms(c.direct.max_us),
                c.direct.count,
                result.delivery.direct_tokens
            ),
        ),
        (
            "added by tokenfan (through − direct) p50 / p99 / max".into(),
            format!(
                "{} / {} / {}",
                signed_ms(c.added_p50_us),
                signed_ms(c.added_p99_us),
                signed_ms(c.added_max_us)
            ),
        ),
    ];
    let floors = [
        ("", &c.relay_floor, c.cpu_over_floor),
        (
            " on a runtime of one worker per core (`--relay-workers`)",
            &c.relay_floor_on_workers,
            c.cpu_over_floor_on_workers,
        ),
    ];
    for (which, floor, ratio) in floors {
        if let Some(floor) = floor {
            rows.push((
                format!("relay floor (`floor --relay`, after the run){which}: CPU per token"),
                format!(
                    "{:.2} µs ({} pairs, {} tokens)",
                    floor.us_per_token, floor.pairs, floor.tokens
                ),
            ));
        }
        if let Some(ratio) = ratio {
            rows.push((
                format!("gateway CPU per token / relay floor{which}"),
                format!("{ratio:.2}×"),
            ));
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_latency_is_through_minus_direct_and_cpu_is_over_the_floor() {
        let summary = |p50_us, p99_us, max_us| LatencySummary {
            p50_us,
            p99_us,
            max_us,
            ..LatencySummary::default()
        };
        let floor = RelayFloor {
            pairs: 100,
            rounds: 200,
            tokens: 20_000,
            cpu_s: 0.2,
            us_per_token: 10.0,
        };
        let on_workers = RelayFloor {
            us_per_token: 12.5,
            ..floor.clone()
        };
        let c = ChatPath::new(
            summary(300, 900, 2_000),
            &summary(500, 1_400, 1_500),
            Some(15.0),
            Some(floor),
            Some(on_workers),
        );
        assert_eq!(
            (c.added_p50_us, c.added_p99_us, c.added_max_us),
            (200, 500, -500)
        );
        assert_eq!(c.cpu_over_floor, Some(1.5));
        assert_eq!(c.cpu_over_floor_on_workers, Some(1.2));
        let no_floor = ChatPath::new(summary(1, 1, 1), &summary(1, 1, 1), Some(15.0), None, None);
        assert_eq!(no_floor.cpu_over_floor, None);
    }
}
