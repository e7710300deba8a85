//! The terminal tables of a report.

use std::fmt::Write;

use super::arithmetic::median;
use super::report::{CommFigure, Figure, OpsProfile, Report, TorchFigure, TrainFigure};
use super::train::{Model, StepTimes, TrainDevice};
use crate::plan::strategies::StrategyKind;

/// Goal of issue 7: meshflow's step time over PyTorch's, per model.
pub fn goal(model: Model) -> f64 {
    match model {
        Model::Gpt => 0.75,
        Model::Mlp => 0.7,
    }
}

/// The goal of `model` on `device`: issue 7's on the CPU ([`goal`]); on a GPU issue 8's GPT
/// step time at most 0.8× PyTorch eager's, and none for the MLP.
pub fn goal_on(model: Model, device: TrainDevice) -> Option<f64> {
    match (device, model) {
        (TrainDevice::Cpu, _) => Some(goal(model)),
        (TrainDevice::Cuda, Model::Gpt) => Some(0.8),
        (TrainDevice::Cuda, Model::Mlp) => None,
    }
}

/// meshflow's median step time over PyTorch's for `model` (1-device row against torch), if both
/// were measured: [`paired_ratio`].
pub fn torch_ratio(report: &Report, model: Model) -> Option<f64> {
    let (ours, theirs) = goal_pair(report, model)?;
    Some(paired_ratio(&ours.times, &theirs.times))
}

/// The 1-device figure of `model` and PyTorch's goal reference, if both were measured.
fn goal_pair(report: &Report, model: Model) -> Option<(&TrainFigure, &TorchFigure)> {
    let ours = report.train.iter().find(|f| f.model == model && f.strategy.devices() == 1)?;
    let theirs = report
        .torch
        .iter()
        .find(|t| t.model == model && t.is_goal_reference() && t.device == ours.device)?;
    Some((ours, theirs))
}

/// `ours` over `theirs`: the median of the rounds' ratios when both were timed in the same
/// alternating rounds (each round's two figures met the same spell of the host), else the
/// ratio of the medians.
pub fn paired_ratio(ours: &StepTimes, theirs: &StepTimes) -> f64 {
    match round_ratios(ours, theirs) {
        Some(ratios) => median(&ratios),
        None => ours.median / theirs.median,
    }
}

/// Each round's `ours / theirs`, when both were timed in the same rounds, several of them.
fn round_ratios(ours: &StepTimes, theirs: &StepTimes) -> Option<Vec<f64>> {
    let paired = ours.rounds.len() > 1 && ours.rounds.len() == theirs.rounds.len();
    paired.then(|| ours.rounds.iter().zip(&theirs.rounds).map(|(a, b)| a / b).collect())
}

/// `" (rounds 0.70 0.72 0.69)"`: each round's ratio ([`round_ratios`]), or nothing.
fn rounds_text(ours: &StepTimes, theirs: &StepTimes) -> String {
    let Some(ratios) = round_ratios(ours, theirs) else { return String::new() };
    let ratios: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    format!(" (rounds {})", ratios.join(" "))
}

/// The train table: one row per model and strategy, then PyTorch and the ratios to it.
pub fn train(report: &Report) -> String {
    let mut out = format!(
        "\n# train: step time (median), AdamW; MFU against {:.1} GFLOP/s ({})\n",
        report.peak_flops / 1e9,
        report.peak_source
    );
    let _ = writeln!(
        out,
        "{:<5} {:<11} {:>4} {:>10} {:>10} {:>6} {:>14} {:>9} {:>6} {:>8} {:>8}",
        "model",
        "strategy",
        "devs",
        "ms/step",
        "mean ms",
        "steps",
        "items/s",
        "GFLOP/s",
        "MFU",
        "vs 1dev",
        "loss"
    );
    for f in &report.train {
        let single = report
            .train
            .iter()
            .find(|g| g.model == f.model && g.device == f.device && g.strategy.devices() == 1)
            .map_or("-".to_string(), |g| format!("{:.2}x", g.times.median / f.times.median));
        let _ = writeln!(
            out,
            "{:<5} {:<11} {:>4} {:>10.1} {:>10.1} {:>6} {:>8.0} {:<5} {:>9.2} {:>5.1}% {:>8} {:>8.4}",
            f.model.name(),
            f.label(),
            f.strategy.devices(),
            f.times.median * 1e3,
            f.times.mean * 1e3,
            f.times.steps,
            f.items_per_second,
            f.model.item_name(),
            f.flops_per_second / 1e9,
            f.mfu * 100.0,
            single,
            f.loss
        );
    }
    for t in &report.torch {
        let _ = writeln!(
            out,
            "{:<5} {:<11} {:>4} {:>10.1} {:>10.1} {:>6} {:>8.0} {:<5} {:>9.2}",
            t.model.name(),
            t.label(),
            t.processes,
            t.times.median * 1e3,
            t.times.mean * 1e3,
            t.times.steps,
            t.model.items_per_step() as f64 / t.times.median,
            t.model.item_name(),
            t.model.step_flops() / t.times.median / 1e9,
        );
    }
    if report.torch.iter().any(|t| t.fused_attention) {
        let _ = writeln!(
            out,
            "# sdpa: the PyTorch GPT on F.scaled_dot_product_attention(is_causal=True), torch's \
             fused attention (the goal compares with the explicit-softmax torch row)"
        );
    }
    for f in &report.train {
        if let Some(profile) = &f.ops {
            out += &ops_table(f, profile);
        }
    }
    for t in report.torch.iter().filter(|t| t.processes > 1) {
        let ours = report.train.iter().find(|f| {
            f.model == t.model
                && f.strategy.kind() == StrategyKind::Data
                && f.strategy.devices() == t.processes
        });
        if let Some(ours) = ours {
            let _ = writeln!(
                out,
                "# {} {}: meshflow / PyTorch DDP (gloo, {} processes) step time = {:.2}{}",
                t.model.name(),
                ours.label(),
                t.processes,
                paired_ratio(&ours.times, &t.times),
                rounds_text(&ours.times, &t.times)
            );
        }
    }
    for model in Model::ALL {
        if let Some((ours, theirs)) = goal_pair(report, model) {
            let ratio = paired_ratio(&ours.times, &theirs.times);
            let verdict = match goal_on(model, ours.device) {
                Some(goal) if ratio <= goal => format!("goal <= {goal:.2}: met"),
                Some(goal) => format!("goal <= {goal:.2}: not met"),
                None => format!("no goal on {}", ours.device.name()),
            };
            let _ = writeln!(
                out,
                "# {}{}: meshflow / PyTorch step time = {ratio:.2} ({verdict}){}",
                model.name(),
                if ours.device.is_cpu() {
                    String::new()
                } else {
                    format!(" on {}", ours.device.name())
                },
                rounds_text(&ours.times, &theirs.times)
            );
        }
    }
    out
}

/// A table of figures with their references and ratios.
pub fn figures(title: &str, figures: &[Figure]) -> String {
    let mut out = format!("\n# {title}\n");
    let _ = writeln!(
        out,
        "{:<34} {:>12} {:<8} {:>12} {:<22} {:>7}",
        "figure", "value", "unit", "reference", "(reference)", "ratio"
    );
    for f in figures {
        let _ = writeln!(
            out,
            "{:<34} {:>12.3} {:<8} {:>12.3} {:<22} {:>7.2}",
            f.name,
            f.value,
            f.unit,
            f.reference_value,
            f.reference,
            f.ratio()
        );
    }
    out
}

/// The nccl-tests-style table, one block per transport and collective, with the memcpy
/// bandwidth of the same run.
pub fn comm(rows: &[CommFigure], memcpy: f64) -> String {
    let mut out = String::new();
    let mut previous = None;
    for r in rows {
        let block = (r.transport.as_str(), r.collective, r.ranks);
        if previous != Some(block) {
            let _ = writeln!(
                out,
                "\n# {} over {} ranks ({})",
                r.collective.name(),
                r.ranks,
                r.transport
            );
            let _ = writeln!(
                out,
                "#{:>12} {:>12} {:>6} {:>6} {:>12} {:>12} {:>12} {:>7}",
                "size",
                "count",
                "type",
                "redop",
                "time(us)",
                "algbw(GB/s)",
                "busbw(GB/s)",
                "#wrong"
            );
            previous = Some(block);
        }
        let bandwidth =
            |value: f64| if r.shared { "shared".to_string() } else { format!("{value:.3}") };
        let _ = writeln!(
            out,
            " {:>12} {:>12} {:>6} {:>6} {:>12.1} {:>12} {:>12} {:>7}",
            r.bytes,
            r.bytes / 4,
            "float",
            "sum",
            r.seconds * 1e6,
            bandwidth(r.algbw),
            bandwidth(r.busbw),
            r.wrong
        );
    }
    if rows.iter().any(|r| r.shared) {
        let _ = writeln!(
            out,
            "# shared: every member got the root's buffer itself (one process, immutable tensors): \
             no bytes moved, no bandwidth"
        );
    }
    let _ = writeln!(out, "# reference: memcpy {memcpy:.3} GB/s (read + write, one thread)");
    out
}

/// Where a figure's traced step went, per op ([`crate::bench::train::ops_profile`]).
pub fn ops_table(figure: &TrainFigure, profile: &OpsProfile) -> String {
    let total: f64 = profile.ops.iter().map(|op| op.seconds).sum();
    let mut out = format!(
        "\n# ops: {} {}, rank {}: median acts of {} traced steps, {:.1} ms of acts per step \
         (one kernel at a time)\n",
        figure.model.name(),
        figure.label(),
        profile.rank,
        profile.steps,
        total * 1e3
    );
    let _ = writeln!(
        out,
        "{:<28} {:>5} {:>9} {:>6} {:>9}",
        "op", "acts", "ms/step", "share", "GFLOP/s"
    );
    for op in &profile.ops {
        let share = if total > 0.0 { op.seconds / total * 100.0 } else { 0.0 };
        let rate = match op.flops {
            0 => "-".to_string(),
            _ => format!("{:.1}", op.flops_per_second() / 1e9),
        };
        let _ = writeln!(
            out,
            "{:<28} {:>5} {:>9.3} {:>5.1}% {:>9}",
            op.op,
            op.acts,
            op.seconds * 1e3,
            share,
            rate
        );
    }
    out
}
