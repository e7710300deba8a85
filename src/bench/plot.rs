//! The SVG of a report (plotters, SVG backend only): step time per strategy for each model
//! (log scale; PyTorch's 1-device step as a marker at the first strategy) and busbw against
//! message size for each collective.

use std::path::Path;

use plotters::coord::{CoordTranslate, Shift};
use plotters::prelude::*;

use super::report::Report;
use super::train::Model;
use super::BenchError;

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn plot_error(error: impl std::fmt::Display) -> BenchError {
    BenchError::Plot(error.to_string())
}

/// Draws the two charts side by side into `path`.
pub fn draw(report: &Report, path: &Path) -> Result<(), BenchError> {
    let draw = || {
        let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let (left, right) = root.split_horizontally(600);
        scaling(report, &left)?;
        busbw(report, &right)?;
        root.present().map_err(plot_error)
    };
    draw().map_err(|error| match error {
        BenchError::Plot(reason) => BenchError::Plot(format!("{}: {reason}", path.display())),
        other => other,
    })
}

/// Strategy labels in the order they were measured.
pub fn strategy_labels(report: &Report) -> Vec<String> {
    let mut labels: Vec<String> = Vec::new();
    for f in &report.train {
        let label = f.label();
        if !labels.contains(&label) {
            labels.push(label);
        }
    }
    labels
}

fn scaling(report: &Report, area: &Area<'_>) -> Result<(), BenchError> {
    let labels = strategy_labels(report);
    let times: Vec<f64> = report
        .train
        .iter()
        .map(|f| f.times.median)
        .chain(report.torch.iter().map(|t| t.times.median))
        .map(|s| s * 1e3)
        .collect();
    if labels.is_empty() || times.is_empty() {
        return empty(area, "train: not measured");
    }
    let low = times.iter().copied().fold(f64::INFINITY, f64::min) / 1.5;
    let high = times.iter().copied().fold(0.0, f64::max) * 1.5;
    let mut chart = ChartBuilder::on(area)
        .caption("training step time per strategy", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..labels.len() as f64 - 0.5, (low..high).log_scale())
        .map_err(plot_error)?;
    let formatter = |x: &f64| labels.get(x.round() as usize).cloned().unwrap_or_default();
    chart
        .configure_mesh()
        .x_labels(labels.len())
        .x_label_formatter(&formatter)
        .y_desc("ms per step (median)")
        .draw()
        .map_err(plot_error)?;
    for (index, model) in Model::ALL.into_iter().enumerate() {
        let color = PALETTE[index % PALETTE.len()];
        let points: Vec<(f64, f64)> = report
            .train
            .iter()
            .filter(|f| f.model == model)
            .filter_map(|f| {
                let x = labels.iter().position(|l| *l == f.label())?;
                Some((x as f64, f.times.median * 1e3))
            })
            .collect();
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(plot_error)?
            .label(format!("meshflow {}", model.name()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(plot_error)?;
        if let Some(t) = report.torch.iter().find(|t| t.model == model && t.is_goal_reference()) {
            let marker = (0.0, t.times.median * 1e3);
            chart
                .draw_series(std::iter::once(Cross::new(marker, 7, color.stroke_width(2))))
                .map_err(plot_error)?
                .label(format!("PyTorch {} ×{}thr", model.name(), t.threads))
                .legend(move |(x, y)| Cross::new((x + 9, y), 5, color));
        }
    }
    legend(&mut chart)
}

fn busbw(report: &Report, area: &Area<'_>) -> Result<(), BenchError> {
    // Rows that moved no bytes (a broadcast sharing the root's buffer) have no bandwidth.
    let rows: Vec<_> = report.comm.iter().filter(|r| !r.shared).collect();
    if rows.is_empty() {
        return empty(area, "comm: not measured");
    }
    let sizes: Vec<f64> = rows.iter().map(|r| (r.bytes.max(1) as f64).log2()).collect();
    let (low, high) = sizes.iter().fold((f64::INFINITY, 0.0f64), |(l, h), &s| (l.min(s), h.max(s)));
    let top = rows.iter().map(|r| r.busbw).fold(0.0, f64::max) * 1.1;
    let transport = &rows[0].transport;
    let ranks = rows[0].ranks;
    let mut chart = ChartBuilder::on(area)
        .caption(format!("busbw, {ranks} ranks ({transport})"), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(low - 0.5..high + 0.5, 0.0..top.max(1e-3))
        .map_err(plot_error)?;
    let bytes = |x: &f64| human_bytes(2f64.powf(*x));
    chart
        .configure_mesh()
        .x_label_formatter(&bytes)
        .x_desc("message size")
        .y_desc("busbw (GB/s)")
        .draw()
        .map_err(plot_error)?;
    let mut collectives: Vec<_> = rows.iter().map(|r| r.collective).collect();
    collectives.dedup();
    for (index, collective) in collectives.into_iter().enumerate() {
        let color = PALETTE[index % PALETTE.len()];
        let points: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.collective == collective)
            .map(|r| ((r.bytes.max(1) as f64).log2(), r.busbw))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(plot_error)?
            .label(collective.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    legend(&mut chart)
}

fn legend<'a, Coordinates: CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Coordinates>,
) -> Result<(), BenchError> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)
}

fn empty(area: &Area<'_>, text: &str) -> Result<(), BenchError> {
    area.draw(&Text::new(text.to_string(), (40, 40), ("sans-serif", 18))).map_err(plot_error)
}

/// `8 B`, `64 KiB`, `16 MiB`, … (rounded to the nearest binary unit).
pub fn human_bytes(bytes: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.0} {}", units[unit])
}
