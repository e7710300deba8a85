//! [`Spec`]: which generated kernel a launch needs, as a small value. It keys the device's table
//! of loaded functions and the process's table of compiled CUBINs, so a launch hashes a few
//! words to find its function; the CUDA C is generated ([`Spec::source`]) only on the first
//! use of a spec in the process.

use super::reduce::{self, Pass, Stage};
use super::source;
use super::source::KernelSource;
use super::source_nn::{self, AttentionRows};
use crate::{DType, Result};

/// One generated kernel: its family, the dtypes it is generated for and the parameters that
/// change its code. Op names are the ops' own `&'static str` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Spec {
    /// [`source::map_kernel`].
    Map(&'static str, DType),
    /// [`source::derivative_kernel`].
    Derivative(&'static str, DType),
    /// [`source::bias_map_kernel`] of the element-wise op named (`gelu`).
    BiasMap(&'static str, DType),
    /// [`source::bias_derivative_kernel`] of the derivative op named (`gelu_grad`).
    BiasDerivative(&'static str, DType),
    /// [`source::binary_kernel`].
    Binary(&'static str, DType),
    /// [`source::cast_kernel`] from the first dtype to the second.
    Cast(DType, DType),
    /// [`source::fill_kernel`].
    Fill(DType),
    /// [`source::copy_kernel`] of elements of this many bytes.
    Copy(usize),
    /// [`reduce::reduce_kernel`].
    Reduce(&'static str, DType, Pass, Stage),
    /// [`source::rows_kernel`].
    Rows(&'static str, DType),
    /// [`source::select_kernel`]; `true` for a constant (`masked_fill`).
    Select(DType, bool),
    /// [`source::max_grad_kernel`].
    MaxGrad(DType),
    /// [`source::dropout_kernel`] of values of the first dtype and a step of the second.
    Dropout(DType, DType),
    /// [`source::sgd_kernel`].
    Sgd(DType),
    /// [`source::adamw_kernel`].
    AdamW(DType),
    /// [`source_nn::embedding_kernel`].
    Embedding(DType),
    /// [`source_nn::embedding_grad_kernel`].
    EmbeddingGrad(DType),
    /// [`source_nn::cross_entropy_rows_kernel`].
    CrossEntropyRows(DType),
    /// [`source_nn::block_total_kernel`].
    BlockTotal(DType),
    /// [`source_nn::cross_entropy_grad_kernel`].
    CrossEntropyGrad(DType),
    /// [`source_nn::norm_grad_rows_kernel`]; `true` for layer norm (centred).
    NormGradRows(DType, bool),
    /// [`source_nn::norm_columns_kernel`].
    NormColumns(DType),
    /// [`source_nn::norm_finish_kernel`].
    NormFinish(DType),
    /// [`source_nn::attention_rows_kernel`].
    AttentionRows(AttentionRows, DType),
}

impl Spec {
    /// The kernel's CUDA C (and its entry point); an op refusing the dtype gives
    /// [`crate::Error::DType`].
    pub fn source(self) -> Result<KernelSource> {
        match self {
            Spec::Map(op, dtype) => source::map_kernel(op, dtype),
            Spec::Derivative(op, dtype) => source::derivative_kernel(op, dtype),
            Spec::BiasMap(op, dtype) => source::bias_map_kernel(op, dtype),
            Spec::BiasDerivative(op, dtype) => source::bias_derivative_kernel(op, dtype),
            Spec::Binary(op, dtype) => source::binary_kernel(op, dtype),
            Spec::Cast(from, to) => Ok(source::cast_kernel(from, to)),
            Spec::Fill(dtype) => Ok(source::fill_kernel(dtype)),
            Spec::Copy(bytes) => source::copy_kernel(bytes),
            Spec::Reduce(op, dtype, pass, stage) => reduce::reduce_kernel(op, dtype, pass, stage),
            Spec::Rows(op, dtype) => source::rows_kernel(op, dtype),
            Spec::Select(dtype, constant) => Ok(source::select_kernel(dtype, constant)),
            Spec::MaxGrad(dtype) => source::max_grad_kernel(dtype),
            Spec::Dropout(dtype, step) => source::dropout_kernel(dtype, step),
            Spec::Sgd(dtype) => source::sgd_kernel(dtype),
            Spec::AdamW(dtype) => source::adamw_kernel(dtype),
            Spec::Embedding(dtype) => source_nn::embedding_kernel(dtype),
            Spec::EmbeddingGrad(dtype) => source_nn::embedding_grad_kernel(dtype),
            Spec::CrossEntropyRows(dtype) => source_nn::cross_entropy_rows_kernel(dtype),
            Spec::BlockTotal(dtype) => source_nn::block_total_kernel(dtype),
            Spec::CrossEntropyGrad(dtype) => source_nn::cross_entropy_grad_kernel(dtype),
            Spec::NormGradRows(dtype, centred) => source_nn::norm_grad_rows_kernel(dtype, centred),
            Spec::NormColumns(dtype) => source_nn::norm_columns_kernel(dtype),
            Spec::NormFinish(dtype) => source_nn::norm_finish_kernel(dtype),
            Spec::AttentionRows(kind, dtype) => source_nn::attention_rows_kernel(kind, dtype),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Instant;

    use super::*;

    #[test]
    fn specs_name_their_kernels_one_to_one() {
        let specs = [
            Spec::Map("exp", DType::F32),
            Spec::Map("exp", DType::BF16),
            Spec::Map("log", DType::F32),
            Spec::BiasMap("gelu", DType::F32),
            Spec::Derivative("gelu_grad", DType::F32),
            Spec::BiasDerivative("gelu_grad", DType::F32),
            Spec::Cast(DType::F32, DType::BF16),
            Spec::Cast(DType::BF16, DType::F32),
            Spec::Reduce("sum", DType::F32, Pass::Rows, Stage::Whole),
            Spec::Reduce("sum", DType::F32, Pass::Columns, Stage::Whole),
            Spec::Reduce("sum", DType::F32, Pass::Columns, Stage::Partial),
            Spec::Select(DType::F16, true),
            Spec::Select(DType::F16, false),
            Spec::NormGradRows(DType::F32, true),
            Spec::NormGradRows(DType::F32, false),
            Spec::AttentionRows(AttentionRows::Recompute, DType::F16),
        ];
        let mut entries = HashMap::new();
        for spec in specs {
            let source = spec.source().expect("a float kernel");
            assert_eq!(spec.source().expect("again"), source, "generation is a pure function");
            assert!(entries.insert(source.entry.clone(), spec).is_none(), "{} twice", source.entry);
        }
        assert!(Spec::Map("exp", DType::I64).source().is_err());
    }

    /// What a launch saves: the lookup hashes the spec, where it used to format the source (the
    /// figure is printed, not asserted: `cargo test -p meshflow-ops spec -- --nocapture`).
    #[test]
    fn a_lookup_hashes_a_spec_without_generating_source() {
        let spec = Spec::Binary("add", DType::BF16);
        let mut table = HashMap::new();
        table.insert(spec, 7usize);
        let rounds = 2000;
        let started = Instant::now();
        let mut found = 0;
        for _ in 0..rounds {
            found += table.get(&std::hint::black_box(spec)).copied().unwrap_or(0);
        }
        let lookup = started.elapsed();
        let started = Instant::now();
        let mut bytes = 0;
        for _ in 0..rounds {
            bytes += std::hint::black_box(spec).source().expect("bf16 add").code.len();
        }
        let generate = started.elapsed();
        assert_eq!(found, 7 * rounds);
        assert!(bytes > 1000 * rounds, "a source is a few KB");
        println!(
            "per launch: spec lookup {:.0} ns, source generation {:.0} ns",
            lookup.as_nanos() as f64 / rounds as f64,
            generate.as_nanos() as f64 / rounds as f64
        );
    }
}
