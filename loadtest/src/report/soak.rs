//! The soak's part of a result: every round (the warm-up, then the soak rounds), the RSS
//! baseline and its margin, and the three checks that fail the run.

use serde::Serialize;

use crate::client::stats::Counters;
use crate::metrics::gauges::Gauges;
use crate::metrics::snapshot::Snapshot;

use super::mib;

/// How far above the baseline the settled RSS after a soak round may be. Below 8 MiB the
/// allocator's own slack (a few partly used 2 MiB huge-page-sized extents per arena, thread
/// caches) is of that order; above it, a tenth of what the warmed-up process holds.
pub const MARGIN_RULE: &str = "max(8 MiB, 10 % of the baseline)";

pub fn margin_for(baseline_bytes: u64) -> u64 {
    (8 << 20).max(baseline_bytes / 10)
}

#[derive(Debug, Serialize)]
pub struct Soak {
    pub rounds: Vec<SoakRound>,
    /// The fresh gateway's RSS: not a baseline, since what the first load grows (allocator
    /// extents, pools) legitimately stays.
    pub rss_before_traffic_bytes: Option<u64>,
    /// Settled RSS after the warm-up: what the gateway keeps once it has served this load
    /// (allocator extents, hyper and tokio pools) with nothing open, running or retained.
    pub baseline_rss_bytes: Option<u64>,
    pub margin_bytes: Option<u64>,
    pub margin_rule: &'static str,
    /// The highest RSS sampled in any round.
    pub peak_rss_bytes: Option<u64>,
    pub checks: SoakChecks,
}

#[derive(Debug, Serialize)]
pub struct SoakChecks {
    /// Every client that stayed got every token once, in order, and the ending the mock was
    /// told to produce (`zero_loss`).
    pub delivery: bool,
    /// After every round, no connection (but the scrape's), subscriber or generation left.
    pub gauges: bool,
    /// After every soak round, settled RSS within the margin of the baseline; `None`: RSS was
    /// not measured (no gateway pid).
    pub rss: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct SoakRound {
    pub name: String,
    /// The warm-up's settled RSS is the baseline; it is not itself compared.
    pub warm_up: bool,
    pub churn_s: f64,
    pub clients: u64,
    pub generations: u64,
    pub generations_planned_to_fail: u64,
    /// Generations the gateway refused to create (their clients never started).
    pub creation_errors: u64,
    pub delivery: Counters,
    /// The last scrape of the settle, and how long after the last client finished the gauges
    /// were all back (`None`: they were not, within the settle time).
    pub gauges: Option<Gauges>,
    pub gauges_idle_after_s: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
    /// Taken once the retention freed every finished generation and RSS stopped falling.
    pub settled: Option<Snapshot>,
    pub rss_settle_s: f64,
    pub duration_s: f64,
}

impl Soak {
    pub fn new(
        rounds: Vec<SoakRound>,
        rss_before_traffic_bytes: Option<u64>,
        baseline_rss_bytes: Option<u64>,
        delivery: bool,
    ) -> Self {
        let margin_bytes = baseline_rss_bytes.map(margin_for);
        let soaked: Vec<&SoakRound> = rounds.iter().filter(|r| !r.warm_up).collect();
        let rss = baseline_rss_bytes
            .zip(margin_bytes)
            .and_then(|(base, margin)| {
                soaked
                    .iter()
                    .map(|r| Some(r.settled.as_ref()?.rss_bytes <= base + margin))
                    .collect::<Option<Vec<bool>>>()
                    .map(|within| within.iter().all(|&ok| ok))
            });
        Self {
            peak_rss_bytes: rounds.iter().filter_map(|r| r.peak_rss_bytes).max(),
            checks: SoakChecks {
                delivery,
                gauges: rounds.iter().all(|r| r.gauges.is_some_and(|g| g.idle())),
                rss,
            },
            rounds,
            rss_before_traffic_bytes,
            baseline_rss_bytes,
            margin_bytes,
            margin_rule: MARGIN_RULE,
        }
    }

    /// The checks that failed, by name.
    pub fn failures(&self) -> Vec<&'static str> {
        let c = &self.checks;
        [
            (!c.delivery).then_some("delivery"),
            (!c.gauges).then_some("gauges back to 0"),
            (c.rss == Some(false)).then_some("RSS back to baseline"),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Summary rows for the Markdown table.
    pub fn rows(&self) -> Vec<(String, String)> {
        let verdict = |ok: Option<bool>| match ok {
            Some(true) => "pass",
            Some(false) => "FAIL",
            None => "not measured",
        };
        let c = &self.checks;
        let opt_mib = |b: Option<u64>| b.map_or_else(|| "–".into(), mib);
        let mut rows = vec![(
            "soak checks: delivery / gauges back to 0 / RSS back to baseline".to_string(),
            format!(
                "{} / {} / {}",
                verdict(Some(c.delivery)),
                verdict(Some(c.gauges)),
                verdict(c.rss)
            ),
        )];
        rows.push((
            "RSS before any traffic / baseline (settled after warm-up) / margin / peak".into(),
            format!(
                "{} / {} / {} ({}) / {}",
                opt_mib(self.rss_before_traffic_bytes),
                opt_mib(self.baseline_rss_bytes),
                opt_mib(self.margin_bytes),
                self.margin_rule,
                opt_mib(self.peak_rss_bytes)
            ),
        ));
        for r in &self.rounds {
            let d = &r.delivery;
            let name = &r.name;
            rows.push((
                format!("`{name}`: clients / generations (told to fail) / creation errors"),
                format!(
                    "{} / {} ({}) / {} over {:.0} s of churn",
                    r.clients,
                    r.generations,
                    r.generations_planned_to_fail,
                    r.creation_errors,
                    r.churn_s
                ),
            ));
            rows.push((
                format!("`{name}`: done / error / left mid-stream"),
                format!(
                    "{} / {} / {}",
                    d.done, d.generation_errors, d.left_midstream
                ),
            ));
            rows.push((
                format!("`{name}`: stalled / evicted / closed and came back / reconnects"),
                format!(
                    "{} / {} / {} / {}",
                    d.stalls, d.evictions, d.disconnects, d.reconnects
                ),
            ));
            let gauge = |v: Option<f64>| v.map_or_else(|| "–".into(), |v| format!("{v}"));
            rows.push((
                format!("`{name}`: gauges after (connections incl. the scrape / subscribers / generations running)"),
                match r.gauges {
                    Some(g) => format!(
                        "{} / {} / {}, {}",
                        gauge(g.connections_open),
                        gauge(g.subscribers_open),
                        gauge(g.generations_running),
                        r.gauges_idle_after_s.map_or("NOT back to 0".into(), |s| {
                            format!("idle {s:.1} s after the last client")
                        })
                    ),
                    None => "not scraped".into(),
                },
            ));
            rows.push((
                format!("`{name}`: RSS peak / settled"),
                format!(
                    "{} / {} (settled in {:.1} s after the retention){}",
                    opt_mib(r.peak_rss_bytes),
                    opt_mib(r.settled.as_ref().map(|s| s.rss_bytes)),
                    r.rss_settle_s,
                    match (r.warm_up, &r.settled, self.baseline_rss_bytes) {
                        (false, Some(s), Some(base)) => format!(
                            ", {:+.1} MiB against the baseline",
                            (s.rss_bytes as f64 - base as f64) / (1024.0 * 1024.0)
                        ),
                        _ => String::new(),
                    }
                ),
            ));
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn round(name: &str, warm_up: bool, settled_mib: u64, gauges_idle: bool) -> SoakRound {
        SoakRound {
            name: name.into(),
            warm_up,
            churn_s: 10.0,
            clients: 100,
            generations: 20,
            generations_planned_to_fail: 4,
            creation_errors: 0,
            delivery: Counters::default(),
            gauges: Some(Gauges {
                connections_open: Some(1.0),
                subscribers_open: Some(if gauges_idle { 0.0 } else { 3.0 }),
                generations_running: Some(0.0),
            }),
            gauges_idle_after_s: gauges_idle.then_some(0.3),
            peak_rss_bytes: Some((settled_mib + 40) << 20),
            settled: Some(Snapshot {
                at_s: 0.0,
                connected: 0,
                rss_bytes: settled_mib << 20,
                instance_rss_bytes: vec![settled_mib << 20],
                smaps: BTreeMap::new(),
                tcp: Default::default(),
                cpu_s: 0.0,
                client_rss_bytes: 0,
            }),
            rss_settle_s: 3.0,
            duration_s: 20.0,
        }
    }

    /// A warm-up settled at 40 MiB, then one soak round.
    fn soak(settled_mib: u64, gauges_idle: bool) -> Soak {
        let rounds = vec![
            round("warm-up", true, 40, true),
            round("soak", false, settled_mib, gauges_idle),
        ];
        Soak::new(rounds, Some(10 << 20), Some(40 << 20), true)
    }

    #[test]
    fn rss_within_the_margin_of_the_warmed_up_baseline_passes() {
        assert_eq!(margin_for(40 << 20), 8 << 20);
        assert_eq!(margin_for(200 << 20), 20 << 20);
        let ok = soak(47, true);
        assert_eq!(ok.checks.rss, Some(true));
        assert!(ok.failures().is_empty());
        assert_eq!(ok.peak_rss_bytes, Some(87 << 20));
        let leak = soak(49, false);
        assert_eq!(
            leak.failures(),
            ["gauges back to 0", "RSS back to baseline"]
        );
        let unmeasured = Soak::new(vec![round("soak", false, 49, true)], None, None, false);
        assert_eq!(unmeasured.checks.rss, None);
        assert_eq!(unmeasured.failures(), ["delivery"]);
    }
}
