//! SVG charts: gateway RSS against open connections (sampled during the run), the soak's RSS
//! and open connections over time, and the latency distribution on a "nines" axis. SVG needs
//! no fonts or system libraries to render.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::soak::Soak;
use crate::metrics::snapshot::RampPoint;

const MIB: f64 = 1024.0 * 1024.0;
const SIZE: (u32, u32) = (900, 540);

type Canvas<'p> = DrawingArea<SVGBackend<'p>, plotters::coord::Shift>;

/// A white SVG canvas written to `path`.
fn canvas(path: &Path) -> Result<Canvas<'_>> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("chart: {e}"))?;
    Ok(root)
}

/// What every chart shares: its title, margin, and room for the axis labels.
fn framed<'a, 'b, 'p>(
    root: &'a Canvas<'p>,
    title: &'b str,
) -> ChartBuilder<'a, 'b, SVGBackend<'p>> {
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70);
    builder
}

pub fn rss_against_connections(points: &[RampPoint], path: &Path) -> Result<()> {
    let max_x = points.iter().map(|p| p.connected).max().unwrap_or(0).max(1) as f64;
    let max_y = points.iter().map(|p| p.rss_bytes).max().unwrap_or(0) as f64 / MIB * 1.1 + 1.0;
    let root = canvas(path)?;
    let mut chart = framed(&root, "Gateway RSS against open SSE connections")
        .build_cartesian_2d(0f64..max_x * 1.02, 0f64..max_y)
        .map_err(|e| anyhow!("chart: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("open SSE connections")
        .y_desc("gateway RSS (MiB)")
        .draw()
        .map_err(|e| anyhow!("chart: {e}"))?;
    let series = points
        .iter()
        .map(|p| (p.connected.max(0) as f64, p.rss_bytes as f64 / MIB));
    chart
        .draw_series(PointSeries::of_element(series, 2, &BLUE, &|c, s, st| {
            Circle::new(c, s, st.filled())
        }))
        .map_err(|e| anyhow!("chart: {e}"))?;
    root.present().map_err(|e| anyhow!("chart: {e}"))
}

/// The soak's chart: gateway RSS and open connections over the run, with the baseline and
/// the margin RSS must come back under.
pub fn rss_over_time(points: &[RampPoint], soak: &Soak, path: &Path) -> Result<()> {
    // Headroom above both curves keeps the legend clear of them.
    let max_t = points.iter().map(|p| p.at_s).fold(1.0, f64::max);
    let max_mib = points.iter().map(|p| p.rss_bytes).max().unwrap_or(0) as f64 / MIB * 1.35 + 1.0;
    let max_conn = points.iter().map(|p| p.connected).max().unwrap_or(0).max(1) as f64 * 1.35;
    let root = canvas(path)?;
    let mut chart = framed(
        &root,
        "Gateway RSS and open SSE connections during the soak",
    )
    .right_y_label_area_size(70)
    .build_cartesian_2d(0f64..max_t, 0f64..max_mib)
    .map_err(|e| anyhow!("chart: {e}"))?
    .set_secondary_coord(0f64..max_t, 0f64..max_conn);
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc("gateway RSS (MiB)")
        .draw()
        .map_err(|e| anyhow!("chart: {e}"))?;
    chart
        .configure_secondary_axes()
        .y_desc("open SSE connections")
        .draw()
        .map_err(|e| anyhow!("chart: {e}"))?;
    chart
        .draw_secondary_series(LineSeries::new(
            points.iter().map(|p| (p.at_s, p.connected.max(0) as f64)),
            &GREEN,
        ))
        .map_err(|e| anyhow!("chart: {e}"))?
        .label("open connections (right)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GREEN));
    let limits = soak
        .baseline_rss_bytes
        .zip(soak.margin_bytes)
        .map(|(base, margin)| {
            [
                (base, "baseline", BLACK),
                (base + margin, "baseline + margin", RED),
            ]
        });
    for (bytes, label, color) in limits.into_iter().flatten() {
        let y = bytes as f64 / MIB;
        chart
            .draw_series(LineSeries::new([(0.0, y), (max_t, y)], &color))
            .map_err(|e| anyhow!("chart: {e}"))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
    }
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.at_s, p.rss_bytes as f64 / MIB)),
            &BLUE,
        ))
        .map_err(|e| anyhow!("chart: {e}"))?
        .label("gateway RSS (left)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| anyhow!("chart: {e}"))?;
    root.present().map_err(|e| anyhow!("chart: {e}"))
}

/// `curve` is (quantile, latency µs) as made by `metrics::latency::quantile_curve`.
pub fn latency_distribution(curve: &[(f64, u64)], title: &str, path: &Path) -> Result<()> {
    let nines = |q: f64| -(1.0 - q).max(1e-5).log10();
    let max_ms = curve.iter().map(|p| p.1).max().unwrap_or(1) as f64 / 1000.0;
    let min_ms = curve.iter().map(|p| p.1).min().unwrap_or(1).max(1) as f64 / 1000.0;
    let root = canvas(path)?;
    let mut chart = framed(&root, title)
        .build_cartesian_2d(0f64..5f64, (min_ms * 0.8..max_ms * 1.25).log_scale())
        .map_err(|e| anyhow!("chart: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("delivery latency, receipt − emit (ms)")
        .x_labels(6)
        .x_label_formatter(&|x| match x.round() as i64 {
            0 => "0%".into(),
            1 => "90%".into(),
            2 => "99%".into(),
            3 => "99.9%".into(),
            4 => "99.99%".into(),
            _ => "max".into(),
        })
        .draw()
        .map_err(|e| anyhow!("chart: {e}"))?;
    chart
        .draw_series(LineSeries::new(
            curve.iter().map(|&(q, us)| (nines(q), us as f64 / 1000.0)),
            &RED,
        ))
        .map_err(|e| anyhow!("chart: {e}"))?;
    root.present().map_err(|e| anyhow!("chart: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::latency::{new_histogram, quantile_curve};

    #[test]
    fn writes_both_charts_as_svg() {
        let dir = std::env::temp_dir().join(format!("tokenfan-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let points: Vec<RampPoint> = (0..50)
            .map(|i| RampPoint {
                at_s: f64::from(i) / 4.0,
                connected: i64::from(i) * 100,
                rss_bytes: 20 * 1024 * 1024 + u64::from(i as u32) * 100 * 12_000,
            })
            .collect();
        rss_against_connections(&points, &dir.join("rss.svg")).unwrap();
        let mut hist = new_histogram().unwrap();
        for v in 1..5000u64 {
            hist.record(200 + v).unwrap();
        }
        latency_distribution(&quantile_curve(&hist), "latency", &dir.join("lat.svg")).unwrap();
        for name in ["rss.svg", "lat.svg"] {
            let svg = std::fs::read_to_string(dir.join(name)).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("<text"), "{name}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
