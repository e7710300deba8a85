//! The arithmetic of the figures: bus-bandwidth factors, FLOP counts, MFU, robust step times.
//!
//! FLOP counts follow PaLM (Chowdhery et al. 2022, appendix B): a training step of a dense model
//! with `N` matmul parameters over `D` tokens costs `6·N·D` FLOPs (2 forward, 4 backward per
//! parameter and token), and causal self-attention adds `12·L·H·Q·T` FLOPs per token (`L`
//! layers, `H` heads, head width `Q`, sequence length `T`: the `QKᵀ` and `AV` products, forward
//! and backward). Embedding lookups are not matmuls, so `wte` and `wpe` are left out of `N`; the
//! untied `lm_head` is counted. The MLP counts every weight and bias: `6·N·batch`. Both are model
//! FLOPs (what the model needs), not hardware FLOPs (what a kernel happens to do).

use serde::{Deserialize, Serialize};

use crate::nn::GptConfig;

/// A collective, for its nccl-tests bus-bandwidth factor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Collective {
    /// Every member receives the reduction of all inputs.
    AllReduce,
    /// Every member receives every input, concatenated.
    AllGather,
    /// Member `i` receives part `i` of the reduction.
    ReduceScatter,
    /// Every member receives the root's tensor.
    Broadcast,
    /// The root receives the reduction.
    Reduce,
    /// Member `i` receives part `i` of every input.
    AllToAll,
}

impl Collective {
    /// Every collective, in the order the tables list them.
    pub const ALL: [Collective; 6] = [
        Collective::AllReduce,
        Collective::AllGather,
        Collective::ReduceScatter,
        Collective::Broadcast,
        Collective::Reduce,
        Collective::AllToAll,
    ];

    /// The name nccl-tests uses (`all_reduce`, …).
    pub fn name(self) -> &'static str {
        match self {
            Collective::AllReduce => "all_reduce",
            Collective::AllGather => "all_gather",
            Collective::ReduceScatter => "reduce_scatter",
            Collective::Broadcast => "broadcast",
            Collective::Reduce => "reduce",
            Collective::AllToAll => "all_to_all",
        }
    }

    /// busbw / algbw for `ranks` members (nccl-tests' `doc/PERFORMANCE.md`): all-reduce
    /// `2(n−1)/n`; all-gather, reduce-scatter and all-to-all `(n−1)/n`; broadcast and reduce 1.
    pub fn bus_factor(self, ranks: usize) -> f64 {
        let n = ranks.max(1) as f64;
        match self {
            Collective::AllReduce => 2.0 * (n - 1.0) / n,
            Collective::AllGather | Collective::ReduceScatter | Collective::AllToAll => {
                (n - 1.0) / n
            }
            Collective::Broadcast | Collective::Reduce => 1.0,
        }
    }
}

/// Algorithm bandwidth in GB/s: `bytes / seconds` (nccl-tests' size is the largest buffer a rank
/// holds: the full tensor for all-reduce, the gathered output for all-gather, the input for
/// reduce-scatter).
pub fn algorithm_bandwidth(bytes: usize, seconds: f64) -> f64 {
    bytes as f64 / seconds / 1e9
}

/// Bus bandwidth in GB/s: the algorithm bandwidth times the collective's factor.
pub fn bus_bandwidth(collective: Collective, ranks: usize, bytes: usize, seconds: f64) -> f64 {
    algorithm_bandwidth(bytes, seconds) * collective.bus_factor(ranks)
}

/// Parameters of a GPT that take part in matmuls: all of them but the `wte` and `wpe` tables.
pub fn gpt_matmul_parameters(config: &GptConfig) -> usize {
    config.parameters() - config.vocab * config.d_model - config.ctx * config.d_model
}

/// PaLM model FLOPs of one training step of a GPT over `batch` sequences of `tokens` positions:
/// `(6·N + 12·L·H·Q·T) · batch · T` with `N` from [`gpt_matmul_parameters`].
pub fn gpt_step_flops(config: &GptConfig, batch: usize, tokens: usize) -> f64 {
    let n = gpt_matmul_parameters(config) as f64;
    let head = (config.d_model / config.n_head) as f64;
    let attention = 12.0 * (config.n_layer * config.n_head) as f64 * head * tokens as f64;
    (6.0 * n + attention) * (batch * tokens) as f64
}

/// Parameters (weights and biases) of an MLP with layer widths `sizes`.
pub fn mlp_parameters(sizes: &[usize]) -> usize {
    sizes.windows(2).map(|pair| pair[0] * pair[1] + pair[1]).sum()
}

/// Model FLOPs of one training step of an MLP: `6 · parameters · batch`.
pub fn mlp_step_flops(sizes: &[usize], batch: usize) -> f64 {
    6.0 * mlp_parameters(sizes) as f64 * batch as f64
}

/// Model FLOPs utilisation: achieved FLOP/s over the peak FLOP/s (0 when the peak is unknown).
pub fn mfu(flops_per_step: f64, step_seconds: f64, peak_flops_per_second: f64) -> f64 {
    if peak_flops_per_second <= 0.0 || step_seconds <= 0.0 {
        return 0.0;
    }
    flops_per_step / step_seconds / peak_flops_per_second
}

/// The median of samples (the mean of the middle two for an even count; 0 for none).
pub fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The relative change from `old` to `new` (`new / old − 1`; 0 when `old` is 0).
pub fn relative_change(old: f64, new: f64) -> f64 {
    if old == 0.0 {
        return 0.0;
    }
    new / old - 1.0
}
