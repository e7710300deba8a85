//! The PyTorch reference: `scripts/torch_train.py` run in the same `meshflow bench` run. The
//! GPT comes twice: the script's model (explicit softmax, what the goal compares with) and the
//! same model on torch's fused attention (`torch-sdpa`). Data-parallel strategies get
//! `scripts/torch_ddp.py` (DistributedDataParallel over gloo, as many processes as the strategy
//! has devices) next to them.

use std::path::Path;
use std::process::Command;

use serde::Deserialize;

use super::report::TorchFigure;
use super::train::{Model, StepTimes};
use super::BenchError;

/// The script's JSON.
#[derive(Debug, Deserialize)]
struct Output {
    torch: String,
    threads: usize,
    /// Processes of a DDP run (absent: one).
    #[serde(default)]
    world: Option<usize>,
    gpt: Option<Times>,
    /// The GPT with torch's fused attention (`F.scaled_dot_product_attention`).
    #[serde(default)]
    gpt_sdpa: Option<Times>,
    mlp: Option<Times>,
}

#[derive(Debug, Deserialize)]
struct Times {
    median_ms: f64,
    mean_ms: f64,
    steps: usize,
}

/// Runs the script for `models` with `threads` and `seconds` of timing per model (and
/// `--world N` when `world` is given: the DDP script). `Ok(None)` when python3 or torch is
/// missing (the reference is then skipped).
pub fn measure(
    script: &Path,
    models: &[Model],
    threads: usize,
    seconds: f64,
    world: Option<usize>,
) -> Result<Option<Vec<TorchFigure>>, BenchError> {
    let probe = Command::new("python3").args(["-c", "import torch"]).output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        return Ok(None);
    }
    let mut command = Command::new("python3");
    command.arg(script).arg("--threads").arg(threads.to_string());
    command.arg("--seconds").arg(seconds.to_string());
    if let Some(world) = world {
        command.arg("--world").arg(world.to_string());
    }
    if let [only] = models {
        command.arg("--only").arg(only.name());
    }
    let output =
        command.output().map_err(|e| BenchError::Torch(format!("{}: {e}", script.display())))?;
    if !output.status.success() {
        return Err(BenchError::Torch(format!(
            "{} failed ({}): {}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        )));
    }
    parse(&String::from_utf8_lossy(&output.stdout)).map(Some)
}

/// The figures of the script's JSON output (its last line).
pub fn parse(stdout: &str) -> Result<Vec<TorchFigure>, BenchError> {
    let line = stdout.lines().last().unwrap_or_default();
    let output: Output = serde_json::from_str(line)
        .map_err(|e| BenchError::Torch(format!("unreadable output {line:?}: {e}")))?;
    let figure = |model: Model, times: &Option<Times>, fused_attention: bool| {
        times.as_ref().map(|t| TorchFigure {
            model,
            threads: output.threads,
            version: output.torch.clone(),
            times: StepTimes {
                median: t.median_ms / 1e3,
                mean: t.mean_ms / 1e3,
                steps: t.steps,
                rounds: Vec::new(),
            },
            fused_attention,
            processes: output.world.unwrap_or(1),
        })
    };
    Ok([
        figure(Model::Gpt, &output.gpt, false),
        figure(Model::Gpt, &output.gpt_sdpa, true),
        figure(Model::Mlp, &output.mlp, false),
    ]
    .into_iter()
    .flatten()
    .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fused_attention_gpt_is_a_second_gpt_figure() {
        let times = |ms: f64| format!(r#"{{"median_ms": {ms}, "mean_ms": {ms}, "steps": 5}}"#);
        let line = format!(
            r#"{{"torch": "2.x", "threads": 2, "gpt": {}, "gpt_sdpa": {}, "mlp": {}}}"#,
            times(120.0),
            times(90.0),
            times(17.0)
        );
        let figures = parse(&format!("warming up\n{line}")).expect("parse");
        let summary: Vec<(Model, bool, f64)> =
            figures.iter().map(|f| (f.model, f.fused_attention, f.times.median)).collect();
        assert_eq!(
            summary,
            [(Model::Gpt, false, 0.12), (Model::Gpt, true, 0.09), (Model::Mlp, false, 0.017)]
        );
        let ddp = times(300.0);
        let line = format!(r#"{{"torch": "2.x", "threads": 1, "world": 2, "gpt": {ddp}}}"#);
        let figures = parse(&line).expect("parse");
        assert_eq!(
            (figures.len(), figures[0].processes, figures[0].label()),
            (1, 2, "ddp2×1thr".into())
        );
        assert!(!figures[0].is_goal_reference());
        let old =
            r#"{"torch": "2.x", "threads": 2, "gpt": {"median_ms": 1, "mean_ms": 1, "steps": 1}}"#;
        assert_eq!(parse(old).expect("parse").len(), 1);
    }
}
