//! Matrix products through cuBLAS (`cublasGemmStridedBatchedEx`): f32 and f64 natively, bf16 and
//! f16 on tensor cores with f32 accumulation.
//!
//! cuBLAS is column-major. A row-major `[rows, cols]` matrix is the column-major matrix of its
//! transpose, so the row-major `y = op(a) · op(b)` is computed as the column-major
//! `yᵀ = op(b)ᵀ · op(a)ᵀ`: cuBLAS's first operand is `b`, its second `a`, and its `m`, `n` are
//! our `n`, `m` ([`super::launch::gemm_shape`]).

use std::ffi::c_void;

use cudarc::cublas::result as cublas;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};

use super::kernels::{output, pointer};
use super::launch::{folded_sum_batch, gemm_shape, GemmShape};
use super::lt::Issued;
use super::{downcast, CudaDevice};
use crate::ops::matmul::{MatMul, MatMulSumBatch};
use crate::{DType, Error, Op, Result, Tensor, TensorMeta};

/// Runs a `matmul` or `matmul_sum_batch` on the device.
pub(super) fn product(
    device: &CudaDevice,
    op: &dyn Op,
    inputs: &[Tensor],
    meta: &TensorMeta,
) -> Result<Vec<Tensor>> {
    let (transpose, sum_batch) = if let Some(op) = downcast::<MatMul>(op) {
        ((op.transpose_a, op.transpose_b), false)
    } else if let Some(op) = downcast::<MatMulSumBatch>(op) {
        ((op.transpose_a, op.transpose_b), true)
    } else {
        return Err(Error::argument(op.name(), "not a product the GPU backend knows"));
    };
    let (a, b) = (&inputs[0], &inputs[1]);
    let shape = gemm_shape(a.dims(), b.dims(), transpose)?;
    let y = output(device, meta)?;
    if y.numel() == 0 {
        return Ok(vec![y]);
    }
    let pointers = (pointer(b)?, pointer(a)?, pointer(&y)?);
    if let Some(folded) = folded_sum_batch(a.dims(), b.dims(), transpose, sum_batch) {
        return gemm(
            device,
            Types::same(meta.dtype),
            folded.shape("matmul_sum_batch")?,
            pointers,
            (1.0, 0.0),
        )
        .map(|()| vec![y]);
    }
    if sum_batch {
        // Σ_b: one product per batch, accumulating into y (beta = 1 after the first).
        let size = meta.dtype.size() as u64;
        for batch in 0..shape.batches as u64 {
            let at = |pointer: u64, stride: i64| pointer + batch * stride as u64 * size;
            let one = GemmShape { batches: 1, ..shape };
            let batch_pointers =
                (at(pointers.0, shape.strides.0), at(pointers.1, shape.strides.1), pointers.2);
            let beta = if batch == 0 { 0.0 } else { 1.0 };
            gemm(device, Types::same(meta.dtype), one, batch_pointers, (1.0, beta))?;
        }
    } else {
        gemm(device, Types::same(meta.dtype), shape, pointers, (1.0, 0.0))?;
    }
    Ok(vec![y])
}

fn operation(transpose: bool) -> cublasOperation_t {
    if transpose {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

/// The cuBLAS data type of `dtype`.
fn data_type(dtype: DType) -> Result<cudaDataType_t> {
    Ok(match dtype {
        DType::F32 => cudaDataType_t::CUDA_R_32F,
        DType::F64 => cudaDataType_t::CUDA_R_64F,
        DType::BF16 => cudaDataType_t::CUDA_R_16BF,
        DType::F16 => cudaDataType_t::CUDA_R_16F,
        other => return Err(Error::dtype("matmul", &[other], "cuBLAS products take float dtypes")),
    })
}

/// The dtypes of one product: both operands share `inputs`; the result is `output` (the
/// operands' dtype, or f32 for 16-bit operands, f64 for f64: the accumulation type).
#[derive(Clone, Copy, Debug)]
pub(super) struct Types {
    /// The operands' dtype.
    pub inputs: DType,
    /// The result's dtype.
    pub output: DType,
}

impl Types {
    /// Operands and result of one dtype.
    pub fn same(dtype: DType) -> Self {
        Types { inputs: dtype, output: dtype }
    }
}

/// One strided batched product `C = alpha·A·B + beta·C` on the device's stream, computed in
/// f64 for f64 operands and in f32 (on tensor cores for 16-bit operands) otherwise: through
/// cuBLASLt ([`super::lt`]) where it has an algorithm for the shape and takes the call, else
/// through `cublasGemmStridedBatchedEx`.
pub(super) fn gemm(
    device: &CudaDevice,
    types: Types,
    shape: GemmShape,
    pointers: (u64, u64, u64),
    (alpha, beta): (f64, f64),
) -> Result<()> {
    let issued = match (device.lt(), types.inputs) {
        (Some(lt), inputs) if inputs != DType::F64 => {
            lt.product(types, shape, pointers, (alpha as f32, beta as f32))
        }
        _ => Issued::NoPlan,
    };
    device.count_product(&issued);
    if matches!(issued, Issued::Lt) {
        return Ok(());
    }
    classic_gemm(device, types, shape, pointers, (alpha, beta))
}

/// [`gemm`] through `cublasGemmStridedBatchedEx`.
fn classic_gemm(
    device: &CudaDevice,
    types: Types,
    shape: GemmShape,
    (first, second, result): (u64, u64, u64),
    (alpha, beta): (f64, f64),
) -> Result<()> {
    let (data, output) = (data_type(types.inputs)?, data_type(types.output)?);
    let double = types.inputs == DType::F64;
    let compute = if double {
        cublasComputeType_t::CUBLAS_COMPUTE_64F
    } else {
        cublasComputeType_t::CUBLAS_COMPUTE_32F
    };
    let (alpha32, beta32) = (alpha as f32, beta as f32);
    let (alpha, beta): (*const c_void, *const c_void) = if double {
        (&alpha as *const f64 as _, &beta as *const f64 as _)
    } else {
        (&alpha32 as *const f32 as _, &beta32 as *const f32 as _)
    };
    // SAFETY: the pointers address live device buffers of this device holding the operands and
    // the result in the shapes `shape` describes (checked by the callers); alpha and beta live
    // until the call returns (cuBLAS reads host scalars before returning).
    unsafe {
        cublas::gemm_strided_batched_ex(
            *device.blas().handle(),
            operation(shape.transpose_first),
            operation(shape.transpose_second),
            shape.m,
            shape.n,
            shape.k,
            alpha,
            first as *const c_void,
            data,
            shape.leading.0,
            shape.strides.0,
            second as *const c_void,
            data,
            shape.leading.1,
            shape.strides.1,
            beta,
            result as *mut c_void,
            output,
            shape.leading.2,
            shape.strides.2,
            shape.batches,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| Error::Device {
        device: device.device().to_string(),
        reason: format!("cublasGemmStridedBatchedEx: {e:?}"),
    })
}
