//! The PyTorch reference: `scripts/torch_train.py` run in the same `meshflow bench` run.

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
    gpt: Option<Times>,
    mlp: Option<Times>,
}

#[derive(Debug, Deserialize)]
struct Times {
    median_ms: f64,
    mean_ms: f64,
    steps: usize,
}

/// Runs the script for `models` with `threads` and `seconds` of timing per model.
/// `Ok(None)` when python3 or torch is missing (the reference is then skipped).
pub fn measure(
    script: &Path,
    models: &[Model],
    threads: usize,
    seconds: f64,
) -> Result<Option<Vec<TorchFigure>>, BenchError> {
    let probe = Command::new("python3").args(["-c", "import torch"]).output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        return Ok(None);
    }
    let mut command = Command::new("python3");
    command.arg(script).arg("--threads").arg(threads.to_string());
    command.arg("--seconds").arg(seconds.to_string());
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
    let figure = |model: Model, times: &Option<Times>| {
        times.as_ref().map(|t| TorchFigure {
            model,
            threads: output.threads,
            version: output.torch.clone(),
            times: StepTimes { median: t.median_ms / 1e3, mean: t.mean_ms / 1e3, steps: t.steps },
        })
    };
    Ok([figure(Model::Gpt, &output.gpt), figure(Model::Mlp, &output.mlp)]
        .into_iter()
        .flatten()
        .collect())
}
