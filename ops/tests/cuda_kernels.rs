//! Every generated GPU kernel compiles with NVRTC to a CUBIN for Hopper (sm_90) and Ampere
//! (sm_80). NVRTC needs no GPU: the test runs wherever libnvrtc loads (CI has none and skips with
//! a message; `scripts/gpu-check/pack.sh` runs it with the NVRTC wheel's library).

#![cfg(feature = "cuda")]

use meshflow_ops::cuda::source::{self, KernelSource};
use meshflow_ops::cuda::table::{Kernel, KERNELS};
use meshflow_ops::cuda::{self as backend};
use meshflow_ops::{DType, Error};

/// Every source the backend can generate for the ops in the table.
fn every_source() -> Vec<KernelSource> {
    let floats = [DType::F32, DType::F64, DType::BF16, DType::F16];
    let all = DType::ALL;
    let mut sources = Vec::new();
    for &(op, kernel) in KERNELS {
        for dtype in floats {
            let generated = match kernel {
                Kernel::Map => source::map_kernel(op, dtype),
                Kernel::MapGrad => source::derivative_kernel(op, dtype),
                Kernel::Binary => source::binary_kernel(op, dtype),
                Kernel::Reduce => source::reduce_kernel(op, dtype),
                Kernel::Rows => source::rows_kernel(op, dtype),
                Kernel::Update if op == "adamw" => source::adamw_kernel(dtype),
                Kernel::Masked => source::masked_fill_kernel(dtype),
                _ => continue,
            };
            sources.push(generated.expect("a source for every float dtype"));
        }
    }
    for from in all {
        sources.push(source::fill_kernel(from));
        for to in all {
            if from != to {
                sources.push(source::cast_kernel(from, to));
            }
        }
    }
    for bytes in [1, 2, 4, 8] {
        sources.push(source::copy_kernel(bytes).expect("a copy kernel"));
    }
    sources
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
    assert!(sources.len() > 150, "{} sources", sources.len());
    for architecture in [(9, 0), (8, 0)] {
        for source in &sources {
            let cubin = backend::compile_cubin(source, architecture).unwrap_or_else(|e| {
                panic!("{} for sm_{}{}: {e}", source.entry, architecture.0, architecture.1)
            });
            assert_eq!(
                &cubin[..4],
                b"\x7fELF",
                "{}: a CUBIN is an ELF image, not PTX",
                source.entry
            );
        }
    }
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
