//! Which GPU kernel family serves each op: the one table, keyed by [`crate::Op::name`].
//!
//! A test reads every op file under `ops/src/ops/` and checks that each op name found there has
//! an entry, so a new op cannot be forgotten. [`Kernel::Host`] marks the ops that still run their
//! CPU kernel on host copies when given GPU tensors (correct, slow); everything else runs on the
//! device.

/// How an op runs on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// A metadata change that shares the storage (reshape).
    View,
    /// `y = f(x)` element-wise; the name selects the expression in [`super::source::map_expression`].
    Map,
    /// `dx = g · f'(x)` element-wise from `[x, g]`.
    MapGrad,
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
    /// A fused optimizer update (AdamW on the device; others on the host).
    Update,
    /// `masked_fill`: a bool mask, broadcast, selects a constant or the input.
    Masked,
    /// The CPU kernel on host copies, then the outputs copied back to the device.
    Host,
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
    ("max_grad", Kernel::Host),
    ("layer_norm_grad", Kernel::Host),
    ("rms_norm_grad", Kernel::Host),
    ("cross_entropy", Kernel::Host),
    ("cross_entropy_grad", Kernel::Host),
    ("embedding", Kernel::Host),
    ("embedding_grad", Kernel::Host),
    ("where", Kernel::Host),
    ("masked_fill", Kernel::Masked),
    ("dropout", Kernel::Host),
    ("adamw", Kernel::Update),
    ("sgd", Kernel::Host),
    ("causal_attention", Kernel::Host),
    ("causal_attention_grad", Kernel::Host),
];

/// Ops declared outside `ops/src/ops/` (the graph's layout markers in `src/graph/to_layout.rs`,
/// identities on one device: the boxing around them is planned elsewhere).
pub const GRAPH_OPS: &[&str] = &["to_sbp", "to_placement"];

/// The kernel family of the op named `name`, or `None` for a name no op has.
pub fn kernel(name: &str) -> Option<Kernel> {
    KERNELS.iter().find(|(op, _)| *op == name).map(|&(_, kernel)| kernel)
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
    fn names_are_unique_and_most_ops_run_on_the_device() {
        let unique: BTreeSet<&str> = KERNELS.iter().map(|(n, _)| *n).collect();
        assert_eq!(unique.len(), KERNELS.len());
        let host = KERNELS.iter().filter(|(_, k)| *k == Kernel::Host).count();
        assert!(host * 3 < KERNELS.len(), "{host} of {} ops fall back to the host", KERNELS.len());
        assert_eq!(kernel("matmul"), Some(Kernel::Product));
        assert_eq!(kernel("no_such_op"), None);
    }
}
