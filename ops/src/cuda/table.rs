//! Which GPU kernel family serves each op: the one table, keyed by [`crate::Op::name`].
//!
//! A test reads every op file under `ops/src/ops/` and checks that each op name found there has
//! an entry, so a new op cannot be forgotten. Every family runs on the device (there is no host
//! fallback); [`sources`] lists the generated kernels of each op, so the compile test covers
//! them all.

use super::reduce::{Pass, Stage};
use super::source::KernelSource;
use super::source_nn::AttentionRows;
use super::spec::Spec;
use crate::{DType, Result};

/// How an op runs on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// A metadata change that shares the storage (reshape).
    View,
    /// `y = f(x)` element-wise; the name selects the expression in [`super::source::map_expression`].
    Map,
    /// `dx = g · f'(x)` element-wise from `[x, g]`.
    MapGrad,
    /// `y = f(x + b)` element-wise from `[x, b]`, `b` along the last axis; the name less its
    /// `bias_` prefix selects the expression of [`Kernel::Map`].
    BiasMap,
    /// `dx = g · f'(x + b)` from `[x, b, g]` as [`Kernel::BiasMap`], then `db`, the column sums
    /// of `dx`, as a `sum` [`Kernel::Reduce`].
    BiasMapGrad,
    /// `y = f(a, b)` element-wise with numpy broadcasting.
    Binary,
    /// A dtype conversion.
    Cast,
    /// `y = c` in the input's shape.
    Fill,
    /// A strided copy (transposes, broadcasts, windows, concatenation, splits).
    Copy,
    /// A reduction over axes (sum, mean, max).
    Reduce,
    /// A row kernel over the last axis (softmax, log-softmax, their gradients, norms).
    Rows,
    /// A matrix product through cuBLAS.
    Product,
    /// A fused optimizer update (AdamW, SGD).
    Update,
    /// A bool mask, broadcast, selects a constant (`masked_fill`) or a tensor (`where`).
    Select,
    /// The gradient of a max: the incoming gradient at each group's first maximum.
    Route,
    /// Dropout with the CPU's counter-based mask.
    Dropout,
    /// Embedding lookup and its scatter-add gradient.
    Embedding,
    /// Cross-entropy and its gradient (row kernels).
    CrossEntropy,
    /// The norms' gradient: row kernels for `dx`, column sums for the parameters.
    NormGrad,
    /// Fused causal attention and its gradient (cuBLAS products, row kernels).
    Attention,
    /// A fused CPU op that runs on the GPU as the ops it fuses, launched one after another
    /// (`skip_layer_norm`: two `add`s and a `layer_norm`; its gradient: `layer_norm_grad`, an
    /// `add` and a `sum`): the kernels those ops already have, and their specs.
    Composite,
}

/// Every op by name and the family of its GPU kernel.
pub const KERNELS: &[(&str, Kernel)] = &[
    ("reshape", Kernel::View),
    ("to_sbp", Kernel::View),
    ("to_placement", Kernel::View),
    ("exp", Kernel::Map),
    ("log", Kernel::Map),
    ("sqrt", Kernel::Map),
    ("rsqrt", Kernel::Map),
    ("sigmoid", Kernel::Map),
    ("tanh", Kernel::Map),
    ("relu", Kernel::Map),
    ("silu", Kernel::Map),
    ("gelu", Kernel::Map),
    ("neg", Kernel::Map),
    ("add_scalar", Kernel::Map),
    ("mul_scalar", Kernel::Map),
    ("pow_scalar", Kernel::Map),
    ("relu_grad", Kernel::MapGrad),
    ("silu_grad", Kernel::MapGrad),
    ("gelu_grad", Kernel::MapGrad),
    ("bias_relu", Kernel::BiasMap),
    ("bias_silu", Kernel::BiasMap),
    ("bias_gelu", Kernel::BiasMap),
    ("bias_relu_grad", Kernel::BiasMapGrad),
    ("bias_silu_grad", Kernel::BiasMapGrad),
    ("bias_gelu_grad", Kernel::BiasMapGrad),
    ("add", Kernel::Binary),
    ("sub", Kernel::Binary),
    ("mul", Kernel::Binary),
    ("div", Kernel::Binary),
    ("pow", Kernel::Binary),
    ("cast", Kernel::Cast),
    ("fill", Kernel::Fill),
    ("broadcast_to", Kernel::Copy),
    ("permute", Kernel::Copy),
    ("narrow", Kernel::Copy),
    ("pad", Kernel::Copy),
    ("concat", Kernel::Copy),
    ("split", Kernel::Copy),
    ("sum", Kernel::Reduce),
    ("mean", Kernel::Reduce),
    ("max", Kernel::Reduce),
    ("softmax", Kernel::Rows),
    ("log_softmax", Kernel::Rows),
    ("softmax_grad", Kernel::Rows),
    ("log_softmax_grad", Kernel::Rows),
    ("layer_norm", Kernel::Rows),
    ("rms_norm", Kernel::Rows),
    ("matmul", Kernel::Product),
    ("matmul_sum_batch", Kernel::Product),
    ("max_grad", Kernel::Route),
    ("layer_norm_grad", Kernel::NormGrad),
    ("rms_norm_grad", Kernel::NormGrad),
    ("cross_entropy", Kernel::CrossEntropy),
    ("cross_entropy_grad", Kernel::CrossEntropy),
    ("embedding", Kernel::Embedding),
    ("embedding_grad", Kernel::Embedding),
    ("where", Kernel::Select),
    ("masked_fill", Kernel::Select),
    ("dropout", Kernel::Dropout),
    ("adamw", Kernel::Update),
    ("sgd", Kernel::Update),
    ("causal_attention", Kernel::Attention),
    ("causal_attention_grad", Kernel::Attention),
    ("skip_layer_norm", Kernel::Composite),
    ("skip_layer_norm_grad", Kernel::Composite),
];

/// The ops a [`Kernel::Composite`] op runs, by name.
pub fn composed_of(name: &str) -> &'static [&'static str] {
    match name {
        "skip_layer_norm" => &["add", "layer_norm"],
        "skip_layer_norm_grad" => &["layer_norm_grad", "add", "sum"],
        _ => &[],
    }
}

/// Ops declared outside `ops/src/ops/` (the graph's layout markers in `src/graph/to_layout.rs`,
/// identities on one device: the boxing around them is planned elsewhere).
pub const GRAPH_OPS: &[&str] = &["to_sbp", "to_placement"];

/// The kernel family of the op named `name`, or `None` for a name no op has.
pub fn kernel(name: &str) -> Option<Kernel> {
    KERNELS.iter().find(|(op, _)| *op == name).map(|&(_, kernel)| kernel)
}

/// The element-wise op a [`Kernel::BiasMap`] or [`Kernel::BiasMapGrad`] op applies after its
/// bias: `bias_gelu` -> `gelu`, `bias_gelu_grad` -> `gelu_grad`.
pub fn unbiased(name: &'static str) -> &'static str {
    name.strip_prefix("bias_").unwrap_or(name)
}

/// Every kernel the op named `name` launches for tensors of `dtype` (for `dropout`, with a step
/// of every dtype; for `where` and `masked_fill`, values of `dtype`; for reductions, every pass
/// and stage). Views and cuBLAS products generate nothing.
pub fn specs(name: &'static str, dtype: DType) -> Result<Vec<Spec>> {
    let Some(family) = kernel(name) else {
        return Err(crate::Error::argument(name, "no entry in the GPU kernel table"));
    };
    let accumulate = crate::ops::attention::lse_dtype(dtype);
    Ok(match family {
        Kernel::View | Kernel::Product => Vec::new(),
        Kernel::Map => vec![Spec::Map(name, dtype)],
        Kernel::MapGrad => vec![Spec::Derivative(name, dtype)],
        Kernel::BiasMap => vec![Spec::BiasMap(unbiased(name), dtype)],
        Kernel::BiasMapGrad => {
            let sums = [Pass::Rows, Pass::Columns]
                .into_iter()
                .flat_map(|pass| Stage::ALL.map(|stage| Spec::Reduce("sum", dtype, pass, stage)));
            [Spec::BiasDerivative(unbiased(name), dtype)].into_iter().chain(sums).collect()
        }
        Kernel::Binary => vec![Spec::Binary(name, dtype)],
        Kernel::Cast => DType::ALL.iter().map(|&to| Spec::Cast(dtype, to)).collect(),
        Kernel::Fill => vec![Spec::Fill(dtype)],
        Kernel::Copy => vec![Spec::Copy(dtype.size()), Spec::Fill(dtype)],
        Kernel::Reduce => [Pass::Rows, Pass::Columns]
            .into_iter()
            .flat_map(|pass| Stage::ALL.map(|stage| Spec::Reduce(name, dtype, pass, stage)))
            .collect(),
        Kernel::Rows => vec![Spec::Rows(name, dtype)],
        Kernel::Update if name == "sgd" => vec![Spec::Sgd(dtype)],
        Kernel::Update => vec![Spec::AdamW(dtype)],
        Kernel::Select => vec![Spec::Select(dtype, name == "masked_fill")],
        Kernel::Route => vec![Spec::MaxGrad(dtype), Spec::Fill(dtype)],
        Kernel::Dropout => DType::ALL.iter().map(|&step| Spec::Dropout(dtype, step)).collect(),
        Kernel::Embedding if name == "embedding" => vec![Spec::Embedding(dtype)],
        Kernel::Embedding => {
            vec![Spec::EmbeddingGrad(dtype), Spec::Fill(accumulate), Spec::Cast(accumulate, dtype)]
        }
        Kernel::CrossEntropy if name == "cross_entropy" => {
            vec![Spec::CrossEntropyRows(dtype), Spec::BlockTotal(dtype)]
        }
        Kernel::CrossEntropy => vec![Spec::CrossEntropyGrad(dtype)],
        Kernel::NormGrad => vec![
            Spec::NormGradRows(dtype, name == "layer_norm_grad"),
            Spec::NormColumns(dtype),
            Spec::NormFinish(dtype),
            Spec::Fill(dtype),
        ],
        Kernel::Attention => {
            AttentionRows::ALL.iter().map(|&kind| Spec::AttentionRows(kind, dtype)).collect()
        }
        Kernel::Composite => {
            let mut all = Vec::new();
            for &part in composed_of(name) {
                all.extend(specs(part, dtype)?);
            }
            all
        }
    })
}

/// The sources of [`specs`]: an op that refuses the dtype on the GPU (integers for float ops)
/// gives [`crate::Error::DType`].
pub fn sources(name: &'static str, dtype: DType) -> Result<Vec<KernelSource>> {
    specs(name, dtype)?.into_iter().map(Spec::source).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Op names declared in the op files: `const NAME: &'static str = "…"`,
    /// `const GRAD_NAME: &'static str = "…"` and `fn name(&self) -> &'static str { "…" }`.
    fn declared_op_names() -> BTreeSet<String> {
        let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/src/ops");
        let mut names = BTreeSet::new();
        for entry in std::fs::read_dir(folder).expect("the ops folder is readable") {
            let path = entry.expect("a directory entry").path();
            let text = std::fs::read_to_string(&path).expect("an op file is readable");
            let mut lines = text.lines().map(str::trim).peekable();
            while let Some(line) = lines.next() {
                let declared = ["NAME: &'static str = \"", "NAME: &str = \""];
                let literal = if declared.iter().any(|d| line.contains(d)) {
                    Some(line)
                } else if line.starts_with("fn name(&self) -> &'static str {") {
                    lines.peek().copied().filter(|next| next.starts_with('"'))
                } else {
                    None
                };
                if let Some(name) = literal.and_then(|l| l.split('"').nth(1)) {
                    names.insert(name.to_string());
                }
            }
        }
        names
    }

    #[test]
    fn every_op_has_a_gpu_kernel_entry() {
        let declared = declared_op_names();
        assert!(declared.len() >= 50, "the scan found the ops: {declared:?}");
        let missing: Vec<&String> = declared.iter().filter(|n| kernel(n).is_none()).collect();
        assert!(missing.is_empty(), "ops without an entry in cuda::table::KERNELS: {missing:?}");
        let stale: Vec<&str> = KERNELS
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| !declared.contains(*n) && !GRAPH_OPS.contains(n))
            .collect();
        assert!(stale.is_empty(), "entries for ops that do not exist: {stale:?}");
    }

    #[test]
    fn names_are_unique_and_every_float_op_has_device_kernels() {
        let unique: BTreeSet<&str> = KERNELS.iter().map(|(n, _)| *n).collect();
        assert_eq!(unique.len(), KERNELS.len());
        assert_eq!(kernel("matmul"), Some(Kernel::Product));
        assert_eq!(kernel("no_such_op"), None);
        let mut entries = BTreeSet::new();
        for &(name, family) in KERNELS {
            for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
                let sources = sources(name, dtype).unwrap_or_else(|e| panic!("{name}: {e}"));
                let generated = !matches!(family, Kernel::View | Kernel::Product);
                assert_eq!(!sources.is_empty(), generated, "{name} {dtype:?}");
                for source in sources {
                    assert!(source.code.contains(&format!("void {}(", source.entry)), "{name}");
                    entries.insert(source.entry);
                }
            }
        }
        assert!(entries.len() > 200, "{} distinct kernels", entries.len());
        let refused = sources("cross_entropy", DType::I64).expect_err("integer logits");
        assert!(matches!(refused, crate::Error::DType { .. }), "{refused}");
        assert_eq!(sources("where", DType::I64).map(|s| s.len()).ok(), Some(1));
        assert!(sources("no_such_op", DType::F32).is_err());
    }
}
