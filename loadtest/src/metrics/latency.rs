//! Delivery latency: an HDR histogram per worker, shipped to the coordinator as its recorded
//! buckets (value, count) and merged there, then summarised as percentiles.

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// 1 µs to 10 min at 3 significant digits: covers a loopback hop and a badly overloaded run.
pub fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 600_000_000, 3).context("latency histogram bounds")
}

/// A histogram as its non-empty buckets, small enough for a JSON line.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Buckets(pub Vec<(u64, u64)>);

impl Buckets {
    pub fn from_histogram(hist: &Histogram<u64>) -> Self {
        Self(
            hist.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }

    pub fn add_to(&self, hist: &mut Histogram<u64>) -> Result<()> {
        for &(value, count) in &self.0 {
            hist.record_n(value, count)
                .with_context(|| format!("latency {value} µs out of histogram range"))?;
        }
        Ok(())
    }
}

/// Something kept apart by where the viewer was connected when a token reached it: on the
/// generation's owner (or the only gateway), or on another instance, fed through the store.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct BySide<T> {
    pub owner: T,
    pub non_owner: T,
}

impl<T> BySide<T> {
    pub fn side(&mut self, on_owner: bool) -> &mut T {
        if on_owner {
            &mut self.owner
        } else {
            &mut self.non_owner
        }
    }

    pub fn map<U>(&self, f: impl Fn(&T) -> U) -> BySide<U> {
        BySide {
            owner: f(&self.owner),
            non_owner: f(&self.non_owner),
        }
    }
}

impl BySide<Histogram<u64>> {
    pub fn new() -> Result<Self> {
        Ok(Self {
            owner: new_histogram()?,
            non_owner: new_histogram()?,
        })
    }

    /// Both sides in one histogram.
    pub fn merged(&self) -> Result<Histogram<u64>> {
        let mut all = new_histogram()?;
        all.add(&self.owner).context("merge latency histograms")?;
        all.add(&self.non_owner)
            .context("merge latency histograms")?;
        Ok(all)
    }
}

impl BySide<Buckets> {
    pub fn add_to(&self, hist: &mut BySide<Histogram<u64>>) -> Result<()> {
        self.owner.add_to(&mut hist.owner)?;
        self.non_owner.add_to(&mut hist.non_owner)
    }
}

/// Percentiles in microseconds.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl LatencySummary {
    pub fn of(hist: &Histogram<u64>) -> Self {
        if hist.is_empty() {
            return Self::default();
        }
        Self {
            count: hist.len(),
            mean_us: hist.mean(),
            p50_us: hist.value_at_quantile(0.5),
            p90_us: hist.value_at_quantile(0.9),
            p99_us: hist.value_at_quantile(0.99),
            p999_us: hist.value_at_quantile(0.999),
            max_us: hist.max(),
        }
    }
}

/// (quantile, latency µs) points for the latency-distribution chart, denser in the tail.
pub fn quantile_curve(hist: &Histogram<u64>) -> Vec<(f64, u64)> {
    if hist.is_empty() {
        return Vec::new();
    }
    let mut points = Vec::new();
    let mut q = 0.0f64;
    while q < 0.99999 {
        points.push((q, hist.value_at_quantile(q)));
        // Step a tenth of the remaining distance to 1: even spacing on a "nines" axis.
        q += ((1.0 - q) / 10.0).max(0.000_001);
    }
    points.push((1.0, hist.max()));
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_trip_preserves_percentiles() {
        let mut a = new_histogram().unwrap();
        for v in 1..=10_000u64 {
            a.record(v * 7).unwrap();
        }
        let json = serde_json::to_string(&Buckets::from_histogram(&a)).unwrap();
        let buckets: Buckets = serde_json::from_str(&json).unwrap();
        let mut merged = new_histogram().unwrap();
        buckets.add_to(&mut merged).unwrap();
        buckets.add_to(&mut merged).unwrap();
        assert_eq!(merged.len(), 20_000);
        let (sa, sm) = (LatencySummary::of(&a), LatencySummary::of(&merged));
        assert_eq!(
            (sa.p50_us, sa.p99_us, sa.max_us),
            (sm.p50_us, sm.p99_us, sm.max_us)
        );
    }

    #[test]
    fn quantile_curve_is_monotonic_and_ends_at_max() {
        let mut h = new_histogram().unwrap();
        for v in [5, 10, 10, 20, 1000] {
            h.record(v).unwrap();
        }
        let curve = quantile_curve(&h);
        assert!(curve
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        assert_eq!(curve.last().unwrap().1, h.max());
        assert!(quantile_curve(&new_histogram().unwrap()).is_empty());
    }
}
