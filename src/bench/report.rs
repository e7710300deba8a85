//! What a `meshflow bench` run measured: the JSON document (`--json`), its flat list of metrics,
//! and the comparison of two runs (`--compare old.json`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::arithmetic::{relative_change, Collective};
use super::train::{Model, StepTimes, TrainDevice};
use super::BenchError;
use crate::plan::acts::OpTime;
use crate::plan::strategies::SessionStrategy;

/// Everything one run measured; sections that were not run are empty.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// The FLOP/s that MFU divides by (GEMM peak measured in the run, or `--peak-gflops`).
    pub peak_flops: f64,
    /// Where `peak_flops` comes from.
    pub peak_source: String,
    /// Training steps of meshflow.
    pub train: Vec<TrainFigure>,
    /// Training steps of PyTorch (`scripts/torch_train.py`), when torch is importable.
    pub torch: Vec<TorchFigure>,
    /// Kernels against their references.
    pub ops: Vec<Figure>,
    /// Collectives, nccl-tests style.
    pub comm: Vec<CommFigure>,
    /// The actor runtime against its references.
    pub actors: Vec<Figure>,
}

/// The machine a run was taken on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// Logical cores.
    pub cores: usize,
    /// 1-minute load average at the start (Linux), a hint of how noisy the figures are.
    pub load_average: Option<f64>,
    /// Seconds since the Unix epoch at the start.
    pub started_unix: u64,
}

/// One training figure of meshflow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainFigure {
    /// The model.
    pub model: Model,
    /// The mesh and threads.
    pub strategy: SessionStrategy,
    /// Step times.
    pub times: StepTimes,
    /// Tokens (GPT) or samples (MLP) per second, from the median step.
    pub items_per_second: f64,
    /// Model FLOP/s achieved (PaLM count over the median step).
    pub flops_per_second: f64,
    /// `flops_per_second / peak_flops`.
    pub mfu: f64,
    /// The loss of the last step (a sanity check that training ran).
    pub loss: f32,
    /// Where it ran (absent in reports of CPU runs).
    #[serde(default, skip_serializing_if = "TrainDevice::is_cpu")]
    pub device: TrainDevice,
    /// Where a traced session of the same model and strategy spent its step, per op
    /// (`--ops`; absent without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<OpsProfile>,
}

/// A training step's time per op ([`crate::plan::acts::op_profile`]) on its busiest rank.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpsProfile {
    /// The rank (of the strategy's devices) whose kernels took longest.
    pub rank: usize,
    /// Traced steps the medians are of (after warm-up steps).
    pub steps: usize,
    /// Per op, most seconds first.
    pub ops: Vec<OpTime>,
}

impl TrainFigure {
    /// The strategy's label on the CPU (`1dev×2thr`, `DP2×TP2`); on a GPU `1gpu` for one
    /// device (threads do not apply) and `DP2@cuda` for several.
    pub fn label(&self) -> String {
        match (self.device, self.strategy.devices()) {
            (TrainDevice::Cpu, _) => self.strategy.label(),
            (TrainDevice::Cuda, 1) => "1gpu".into(),
            (TrainDevice::Cuda, _) => format!("{}@cuda", self.strategy.label()),
        }
    }
}

/// One training figure of PyTorch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TorchFigure {
    /// The model.
    pub model: Model,
    /// `torch.get_num_threads()`.
    pub threads: usize,
    /// torch's version.
    pub version: String,
    /// Step times.
    pub times: StepTimes,
    /// The GPT's attention is `F.scaled_dot_product_attention` (torch's fused kernel) instead of
    /// the script's explicit softmax, which the goal is measured against.
    #[serde(default)]
    pub fused_attention: bool,
    /// Processes of a DistributedDataParallel run over gloo, each with `threads` threads and
    /// its share of the batch (1: one process, the goal's reference).
    #[serde(default = "one_process")]
    pub processes: usize,
    /// Where it ran: the CPU, or eager on GPU 0 (absent in reports of CPU runs).
    #[serde(default, skip_serializing_if = "TrainDevice::is_cpu")]
    pub device: TrainDevice,
}

fn one_process() -> usize {
    1
}

impl TorchFigure {
    /// Whether this is the reference the goal compares with: the script's model (explicit
    /// softmax) in one process.
    pub fn is_goal_reference(&self) -> bool {
        !self.fused_attention && self.processes == 1
    }

    /// `torch×2thr`, `sdpa×2thr` or `ddp2×1thr`; on a GPU `torch@cuda` or `sdpa@cuda`.
    pub fn label(&self) -> String {
        let kind = match (self.fused_attention, self.processes) {
            (true, _) => "sdpa".to_string(),
            (false, 1) => "torch".to_string(),
            (false, n) => format!("ddp{n}"),
        };
        match self.device {
            TrainDevice::Cpu => format!("{kind}×{}thr", self.threads),
            TrainDevice::Cuda => format!("{kind}@cuda"),
        }
    }
}

/// A measured value next to its reference measured in the same run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// What was measured (`matmul 1024³ ×2thr`, `hop latency`, …).
    pub name: String,
    /// The value.
    pub value: f64,
    /// Its unit (`GFLOP/s`, `GB/s`, `acts/s`, `µs`).
    pub unit: String,
    /// Whether a larger value is better.
    pub higher_is_better: bool,
    /// What it is compared with.
    pub reference: String,
    /// The reference's value, in the same unit.
    pub reference_value: f64,
}

impl Figure {
    /// `value / reference_value` (0 when the reference is 0).
    pub fn ratio(&self) -> f64 {
        if self.reference_value == 0.0 {
            return 0.0;
        }
        self.value / self.reference_value
    }
}

/// One row of an nccl-tests-style table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommFigure {
    /// `in-process` (device threads), `processes` (QUIC between launched processes) or `nccl`
    /// (this machine's GPUs).
    pub transport: String,
    /// The collective.
    pub collective: Collective,
    /// Members of the group.
    pub ranks: usize,
    /// nccl-tests' size in bytes.
    pub bytes: usize,
    /// Seconds per call (the slowest member's mean).
    pub seconds: f64,
    /// Algorithm bandwidth, GB/s.
    pub algbw: f64,
    /// Bus bandwidth, GB/s.
    pub busbw: f64,
    /// Output elements that differ from the closed form, summed over members.
    pub wrong: usize,
    /// Every member's output was the root's input buffer ([`super::comm::moved_nothing`]): no
    /// bytes moved, `algbw` and `busbw` are 0 and the row has no bandwidth to compare or plot.
    #[serde(default)]
    pub shared: bool,
}

impl CommFigure {
    /// The row as one that moved no bytes ([`CommFigure::shared`]).
    pub fn moving_nothing(self) -> Self {
        CommFigure { algbw: 0.0, busbw: 0.0, shared: true, ..self }
    }
}

/// One comparable number of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    /// A key unique within a run, equal across runs for the same measurement.
    pub key: String,
    /// The value.
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// Whether a larger value is better.
    pub higher_is_better: bool,
}

/// A metric present in both runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// The metric's key.
    pub key: String,
    /// Its unit.
    pub unit: String,
    /// The old value.
    pub old: f64,
    /// The new value.
    pub new: f64,
    /// `new / old − 1`.
    pub relative: f64,
    /// Whether the change is an improvement.
    pub better: bool,
}

impl Report {
    /// Reads a report written by [`Report::save`].
    pub fn load(path: &Path) -> Result<Report, BenchError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| BenchError::Io { path: path.to_path_buf(), source })?;
        serde_json::from_str(&text)
            .map_err(|source| BenchError::Json { path: path.to_path_buf(), source })
    }

    /// Writes the report as pretty JSON.
    pub fn save(&self, path: &Path) -> Result<(), BenchError> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|source| BenchError::Json { path: path.to_path_buf(), source })?;
        std::fs::write(path, text + "\n")
            .map_err(|source| BenchError::Io { path: path.to_path_buf(), source })
    }

    /// Every number of the run under a stable key.
    pub fn metrics(&self) -> Vec<Metric> {
        let metric = |key: String, value: f64, unit: &str, higher_is_better: bool| Metric {
            key,
            value,
            unit: unit.to_string(),
            higher_is_better,
        };
        let mut out = Vec::new();
        for f in &self.train {
            let key = format!("train/{}/{}", f.model.name(), f.label());
            out.push(metric(key, f.times.median * 1e3, "ms/step", false));
        }
        for f in &self.torch {
            let key = format!("torch/{}/{}", f.model.name(), f.label());
            out.push(metric(key, f.times.median * 1e3, "ms/step", false));
        }
        for (section, figures) in [("ops", &self.ops), ("actors", &self.actors)] {
            for f in figures {
                let key = format!("{section}/{}", f.name);
                out.push(metric(key, f.value, &f.unit, f.higher_is_better));
            }
        }
        for f in self.comm.iter().filter(|f| !f.shared) {
            let key = format!(
                "comm/{}/{}/{}ranks/{}B",
                f.transport,
                f.collective.name(),
                f.ranks,
                f.bytes
            );
            out.push(metric(key, f.busbw, "GB/s busbw", true));
        }
        out
    }
}

/// The metrics of `new` that `old` has too, with their relative change.
pub fn compare(old: &Report, new: &Report) -> Vec<Change> {
    let before = old.metrics();
    new.metrics()
        .into_iter()
        .filter_map(|m| {
            let previous = before.iter().find(|o| o.key == m.key)?;
            let relative = relative_change(previous.value, m.value);
            let better = if m.higher_is_better { relative > 0.0 } else { relative < 0.0 };
            Some(Change {
                key: m.key,
                unit: m.unit,
                old: previous.value,
                new: m.value,
                relative,
                better,
            })
        })
        .collect()
}

/// The comparison as a table.
pub fn format_changes(changes: &[Change]) -> String {
    let mut out =
        format!("{:<48} {:>12} {:>12} {:>9}  {}\n", "metric", "old", "new", "change", "unit");
    for c in changes {
        let verdict = if c.relative == 0.0 {
            ""
        } else if c.better {
            "better"
        } else {
            "worse"
        };
        out.push_str(&format!(
            "{:<48} {:>12.3} {:>12.3} {:>+8.1}%  {} {verdict}\n",
            c.key,
            c.old,
            c.new,
            c.relative * 100.0,
            c.unit
        ));
    }
    out
}
