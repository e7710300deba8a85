//! Every generated GPU kernel compiles with NVRTC to a CUBIN for Hopper (sm_90) and Ampere
//! (sm_80). NVRTC needs no GPU: the test runs wherever libnvrtc loads (CI has none and skips with
//! a message; `scripts/gpu-check/pack.sh` runs it with the NVRTC wheel's library).

#![cfg(feature = "cuda")]

use std::collections::BTreeSet;

use meshflow_ops::cuda::source::{self, KernelSource};
use meshflow_ops::cuda::table::{self, KERNELS};
use meshflow_ops::cuda::{self as backend};
use meshflow_ops::{DType, Error};

/// Every source the backend can generate for the ops in the table, for every dtype an op takes
/// on the GPU (the table's [`table::sources`], so a new kernel family is covered here at once),
/// and the copy kernels of every element size.
fn every_source() -> Vec<KernelSource> {
    let mut sources = Vec::new();
    for &(op, _) in KERNELS {
        for dtype in DType::ALL {
            match table::sources(op, dtype) {
                Ok(generated) => sources.extend(generated),
                Err(Error::DType { .. }) if !dtype.is_float() => {}
                Err(error) => panic!("{op} {dtype:?}: {error}"),
            }
        }
    }
    for bytes in [1, 2, 4, 8] {
        sources.push(source::copy_kernel(bytes).expect("a copy kernel"));
    }
    sources.sort_by(|a, b| a.entry.cmp(&b.entry));
    sources.dedup();
    sources
}

/// The GPT's ops that lacked a device kernel until now each compile in every float dtype.
#[test]
fn the_network_ops_have_kernels_in_every_float_dtype() {
    let entries: BTreeSet<String> = every_source().into_iter().map(|s| s.entry).collect();
    for kind in [
        "embedding",
        "embedding_grad",
        "cross_entropy_rows",
        "block_total",
        "cross_entropy_grad",
        "layer_norm_grad_rows",
        "rms_norm_grad_rows",
        "norm_columns",
        "norm_finish",
        "attention_probabilities",
        "attention_recompute",
        "attention_score_grad",
        "route_max_grad",
        "update_sgd",
        "select_where",
        "reduce_rows_whole_sum",
        "reduce_rows_partial_max",
        "reduce_columns_combine_mean",
    ] {
        for dtype in ["f32", "f64", "bf16", "f16"] {
            let wanted = format!("meshflow_{kind}_{dtype}");
            assert!(entries.contains(&wanted), "no {wanted}");
        }
    }
    assert!(entries.contains("meshflow_dropout_bf16_i64"), "dropout with an i64 step");
}

#[test]
fn every_generated_kernel_compiles_to_a_cubin() {
    let probe = source::fill_kernel(DType::F32);
    match backend::compile_cubin(&probe, (9, 0)) {
        Err(Error::Device { reason, .. }) if reason.contains("cannot load libnvrtc") => {
            eprintln!("skipped: libnvrtc is not loadable here ({reason})");
            return;
        }
        other => {
            other.expect("the probe compiles");
        }
    }
    let sources = every_source();
    assert!(sources.len() > 300, "{} sources", sources.len());
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get()).min(16);
    for architecture in [(9, 0), (8, 0)] {
        // NVRTC compiles independent programs on several threads at once.
        let shares: Vec<&[KernelSource]> =
            sources.chunks(sources.len().div_ceil(threads)).collect();
        std::thread::scope(|scope| {
            for share in shares {
                scope.spawn(move || share.iter().for_each(|source| compiles(source, architecture)));
            }
        });
    }
}

/// `source` compiles for `architecture` to a CUBIN (an ELF image, not PTX).
fn compiles(source: &KernelSource, architecture: (i32, i32)) {
    let cubin = backend::compile_cubin(source, architecture).unwrap_or_else(|e| {
        panic!("{} for sm_{}{}: {e}", source.entry, architecture.0, architecture.1)
    });
    assert_eq!(&cubin[..4], b"\x7fELF", "{}: a CUBIN is an ELF image, not PTX", source.entry);
}

#[test]
fn a_compile_error_is_a_typed_error_with_the_log() {
    let broken = KernelSource {
        entry: "broken".into(),
        code: "extern \"C\" __global__ void broken() { undefined_name; }".into(),
    };
    match backend::compile_cubin(&broken, (9, 0)) {
        Err(Error::Device { reason, .. }) if reason.contains("cannot load libnvrtc") => {}
        Err(Error::Device { reason, .. }) => {
            assert!(reason.contains("broken") && reason.contains("undefined_name"), "{reason}")
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}
