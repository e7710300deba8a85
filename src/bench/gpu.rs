//! `bench train --device cuda`: the GPUs the sessions run on, checked before anything is timed
//! (a machine without a driver or a GPU gets the typed [`crate::ops::Error::Device`] naming the
//! device, not a panic), and the peak that MFU divides by there.

use crate::ops::cuda::CudaDevice;
use crate::ops::ops::matmul::MatMul;
use crate::ops::{DType, Tensor};
use crate::plan::strategies::SessionStrategy;

use super::train::{time_steps, Timing};
use super::BenchError;

/// The size of the product whose rate is the GPU's peak: `n×n · n×n`.
pub const PEAK_SIZE: usize = 4096;

/// Opens every GPU the strategies need (device rank `i` on GPU `i`) and returns GPU 0; refuses
/// strategies over launched processes, which `--device cuda` does not run.
pub fn open(strategies: &[SessionStrategy]) -> Result<CudaDevice, BenchError> {
    if let Some(launched) = strategies.iter().find(|s| s.processes > 1) {
        return Err(BenchError::Meshflow(crate::Error::Runtime(format!(
            "bench train --device cuda runs its strategies in this process; {} launches {} \
             processes",
            launched.label(),
            launched.processes
        ))));
    }
    let first = CudaDevice::new(0)?;
    let needed = strategies.iter().map(SessionStrategy::devices).max().unwrap_or(1);
    for ordinal in 1..needed {
        CudaDevice::new(ordinal)?;
    }
    Ok(first)
}

/// FLOP/s of the f32 [`MatMul`] op at [`PEAK_SIZE`]³ on `device` (cuBLAS with f32 compute, the
/// products the sessions run in f32), the median of `timing`'s calls, each synchronised.
pub fn matmul_peak(device: &CudaDevice, timing: Timing) -> Result<f64, BenchError> {
    let n = PEAK_SIZE;
    let operand = device.to_device(&Tensor::randn(vec![n, n], 0.0, 1.0, DType::F32, 5)?)?;
    let inputs = [operand.clone(), operand];
    let product = MatMul::default();
    let step = || -> Result<(), BenchError> {
        drop(device.forward(&product, &inputs)?);
        Ok(device.synchronize()?)
    };
    let times = time_steps(timing, step, || {})?;
    Ok(2.0 * (n as f64).powi(3) / times.median)
}

/// Where `peak_flops` came from, for the report.
pub fn peak_source(device: &CudaDevice) -> String {
    format!("MatMul f32 {PEAK_SIZE}³ on {} (cuBLAS), measured in this run", device.device())
}
