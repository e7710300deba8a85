//! The scaling table: GPT-2 and 1.3B on 8, 64 and 512 devices, per strategy, predicted.

use std::fmt::Write as _;

use meshflow_placement::DeviceType;

use super::cluster::Cluster;
use super::model::{ModelSpec, Strategy, Workload};
use super::report::plan;
use crate::compile::CompileConfig;
use crate::Result;

/// Pipeline stages of the PP and 3-D rows (a micro-batch of one sequence each).
const PP_STAGES: usize = 4;

/// One row of the table: the strategies tried for one model with `heads` attention heads on
/// `devices` devices, `per_node` to a node. Tensor parallelism stays inside a node and splits
/// whole heads: its size is the largest that divides both the node and the heads (GPT-2's 12
/// heads on 8 GPUs a node: 4, as Megatron-LM requires too), a TP row that does not fill the
/// devices runs data parallel over the rest, and heads that share no factor with the node get
/// no tensor-parallel rows.
fn strategies(devices: usize, per_node: usize, heads: usize) -> Vec<(&'static str, Strategy)> {
    let node = per_node.min(devices);
    let tp =
        (1..=node).rev().find(|&t| node.is_multiple_of(t) && heads.is_multiple_of(t)).unwrap_or(1);
    let mut rows = vec![("DP", Strategy::Mesh { dp: devices, tp: 1, pp: 1 })];
    if tp > 1 && devices <= per_node {
        rows.push(("TP", Strategy::Mesh { dp: devices / tp, tp, pp: 1 }));
    }
    rows.push(("PP", Strategy::Mesh { dp: devices / PP_STAGES, tp: 1, pp: PP_STAGES }));
    if tp > 1 && devices > node {
        rows.push(("hybrid", Strategy::Mesh { dp: devices / tp, tp, pp: 1 }));
    }
    if tp > 1 && devices > node * PP_STAGES {
        let dp = devices / (tp * PP_STAGES);
        rows.push(("3-D", Strategy::Mesh { dp, tp, pp: PP_STAGES }));
    }
    rows.push(("auto", Strategy::Auto { devices }));
    rows
}

/// The markdown table of predicted step time, throughput, MFU and memory for GPT-2 (8 sequences
/// per data-parallel replica) and 1.3B (4 per replica) on 8, 64 and 512 devices of `cluster`'s
/// kind (8 per node). Pipelined rows run one sequence per micro-batch; tensor-parallel rows
/// split whole heads (`strategies`).
pub fn scale_table(cluster: &Cluster, compile: &CompileConfig) -> Result<String> {
    let mut out = String::new();
    let _ = writeln!(out, "device: {}", cluster.device.kind);
    let _ = writeln!(
        out,
        "| model | devices | strategy | batch | step ms | tokens/s | MFU | compute ms | comm ms | memory GB |"
    );
    let _ = writeln!(out, "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (model, per_replica) in [(ModelSpec::GPT2, 8), (ModelSpec::GPT_1_3B, 4)] {
        for devices in [8, 64, 512] {
            let mut sized = cluster.clone();
            sized.per_node = cluster.per_node.min(devices);
            sized.nodes = devices / sized.per_node;
            for (name, strategy) in strategies(devices, sized.per_node, model.config.n_head) {
                let replicas = match strategy {
                    Strategy::Mesh { dp, .. } => dp,
                    Strategy::Auto { devices } => devices,
                };
                let workload = Workload {
                    model,
                    strategy,
                    batch: per_replica * replicas,
                    pieces: match strategy {
                        Strategy::Mesh { pp, .. } if pp > 1 => per_replica as u32,
                        _ => 1,
                    },
                    device: DeviceType::Cuda,
                };
                let row = match plan(&workload, &sized, compile, false) {
                    Ok(r) => format!(
                        "| {} | {devices} | {name} ({strategy}) | {} | {:.1} | {:.0} | {:.1}% | {:.1} | {:.1} | {:.1} |",
                        model.name,
                        workload.batch,
                        r.prediction.step_seconds * 1e3,
                        r.tokens_per_second(),
                        r.mfu() * 100.0,
                        r.prediction.breakdown.compute * 1e3,
                        r.prediction.breakdown.communication * 1e3,
                        r.memory.total() as f64 / 1e9
                    ),
                    Err(e) => format!("| {} | {devices} | {name} ({strategy}) | — | failed: {e} |", model.name),
                };
                let _ = writeln!(out, "{row}");
                eprintln!("{row}");
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor_sizes(devices: usize, heads: usize) -> Vec<(&'static str, usize, usize)> {
        strategies(devices, 8, heads)
            .into_iter()
            .filter_map(|(name, strategy)| match strategy {
                Strategy::Mesh { dp, tp, pp } if tp > 1 => Some((name, dp * tp * pp, tp)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn tensor_parallel_rows_split_whole_heads_and_fill_the_devices() {
        // GPT-2's 12 heads: TP4 (8 devices: DP2 × TP4); the 1.3B's 16 heads: TP8.
        assert_eq!(tensor_sizes(8, 12), vec![("TP", 8, 4)]);
        assert_eq!(tensor_sizes(64, 12), vec![("hybrid", 64, 4), ("3-D", 64, 4)]);
        assert_eq!(tensor_sizes(512, 12), vec![("hybrid", 512, 4), ("3-D", 512, 4)]);
        assert_eq!(tensor_sizes(8, 16), vec![("TP", 8, 8)]);
        assert_eq!(tensor_sizes(64, 16), vec![("hybrid", 64, 8), ("3-D", 64, 8)]);
        // Heads that share no factor with the node: no tensor parallelism at all.
        assert!(tensor_sizes(8, 7).is_empty());
    }
}
