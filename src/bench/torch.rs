//! The PyTorch reference: `scripts/torch_train.py` run in the same `meshflow bench` run. The
//! GPT comes twice: the script's model (explicit softmax, what the goal compares with) and the
//! same model on torch's fused attention (`torch-sdpa`). Data-parallel strategies get
//! `scripts/torch_ddp.py` (DistributedDataParallel over gloo, as many processes as the strategy
//! has devices) next to them.

use std::path::Path;
use std::process::Command;

use serde::Deserialize;

use super::report::TorchFigure;
use super::train::{Model, StepTimes, TrainDevice};
use super::BenchError;

/// The script's JSON.
#[derive(Debug, Deserialize)]
struct Output {
    torch: String,
    threads: usize,
    /// Processes of a DDP run (absent: one).
    #[serde(default)]
    world: Option<usize>,
    /// `cpu` or `cuda` (absent: the CPU).
    #[serde(default)]
    device: TrainDevice,
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
/// `--world N` when `world` is given: the DDP script; `--device cuda` on a GPU). `Ok(None)`
/// when python3 or torch is missing, or, for `cuda`, torch sees no GPU (the reference is then
/// skipped).
pub fn measure(
    script: &Path,
    models: &[Model],
    threads: usize,
    seconds: f64,
    world: Option<usize>,
    device: TrainDevice,
) -> Result<Option<Vec<TorchFigure>>, BenchError> {
    let probe = Command::new("python3").args(["-c", probe(device)]).output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        return Ok(None);
    }
    let mut command = Command::new("python3");
    command.arg(script).arg("--threads").arg(threads.to_string());
    command.arg("--seconds").arg(seconds.to_string());
    if let Some(world) = world {
        command.arg("--world").arg(world.to_string());
    }
    if !device.is_cpu() {
        command.arg("--device").arg(device.name());
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

/// The Python that succeeds when the reference can run on `device`.
pub fn probe(device: TrainDevice) -> &'static str {
    match device {
        TrainDevice::Cpu => "import torch",
        TrainDevice::Cuda => "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)",
    }
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
            device: output.device,
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
        assert_eq!(parse(old).expect("parse")[0].device, TrainDevice::Cpu, "absent: the CPU");
    }

    #[test]
    fn a_gpu_run_is_labelled_cuda() {
        let times = r#"{"median_ms": 4.5, "mean_ms": 4.6, "steps": 40}"#;
        let line = format!(
            r#"{{"torch": "2.x", "threads": 1, "device": "cuda", "gpt": {times}, "gpt_sdpa": {times}}}"#
        );
        let figures = parse(&line).expect("parse");
        let labels: Vec<String> = figures.iter().map(TorchFigure::label).collect();
        assert_eq!(labels, ["torch@cuda", "sdpa@cuda"]);
        assert!(figures.iter().all(|f| f.device == TrainDevice::Cuda));
        assert!(figures[0].is_goal_reference());
        assert!(probe(TrainDevice::Cuda).contains("torch.cuda.is_available()"));
        assert_eq!(probe(TrainDevice::Cpu), "import torch");
    }
}
