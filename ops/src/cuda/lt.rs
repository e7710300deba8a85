//! Products through cuBLASLt (f32, bf16 and f16 operands, f32 accumulation: on tensor cores for
//! the 16-bit types; f32 without TF32, as `torch.backends.cuda.matmul.allow_tf32 = False`).
//!
//! Each device owns one cuBLASLt handle and one workspace: 32 MiB on Hopper and newer, 4 MiB
//! before (NVIDIA's recommended sizes; 32 MiB lets the heuristic pick the Hopper kernels of an
//! 8192³ product). A product's plan (its descriptor, its three layouts and the algorithm the
//! heuristic ranks first for them and the workspace) is made once per (shape, dtypes, operand
//! alignment) and cached, so a training step asks the heuristic nothing after its first step.
//! The alignment is part of the key because attention's strided operands start inside a row: the
//! heuristic is told the real alignment and excludes kernels that need more. A shape the
//! heuristic serves with no algorithm goes to the classic `cublasGemmStridedBatchedEx`
//! ([`super::matmul::gemm`]); so does any f64 product.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::launch::GemmShape;
use super::matmul::Types;
use crate::DType;

/// Workspace bytes for compute capability `major` (NVIDIA's recommendation for cuBLASLt).
pub(super) fn workspace_bytes(major: i32) -> usize {
    if major >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

/// The largest power of two (at most 256) that divides every byte offset in `offsets`: the
/// alignment a kernel may assume of an operand whose batches start at these offsets.
pub(super) fn alignment(offsets: &[u64]) -> u32 {
    offsets.iter().fold(256u32, |align, &offset| match offset {
        0 => align,
        offset => align.min(1 << offset.trailing_zeros().min(8)),
    })
}

/// How [`Lt::product`] went.
pub(super) enum Issued {
    /// Enqueued through cuBLASLt.
    Lt,
    /// cuBLASLt has no algorithm for the product.
    NoPlan,
    /// cuBLASLt refused the call (nothing was enqueued; [`Lt::refusal`] keeps the first reason).
    Refused,
}

/// What a plan depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PlanKey {
    shape: GemmShape,
    inputs: DType,
    output: DType,
    /// Alignment in bytes of cuBLAS's first operand, second operand and result.
    alignment: [u32; 3],
}

/// A device's cuBLASLt handle, workspace and plans.
pub(super) struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    workspace_bytes: usize,
    stream: Arc<CudaStream>,
    /// `None` for a key the heuristic had no algorithm for.
    plans: Mutex<HashMap<PlanKey, Option<Arc<Plan>>>>,
    /// The first call cuBLASLt refused, and why.
    refusal: std::sync::OnceLock<String>,
}

// SAFETY: a cuBLASLt handle may be used from any thread; every call through this one is issued
// on the device's one stream, so the shared workspace is used by one product at a time.
unsafe impl Send for Lt {}
// SAFETY: as above; the plan table is behind a mutex.
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: the handle came from `create_handle` and is destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

impl Lt {
    /// A handle and a workspace of `workspace_bytes` on `stream`'s device; `None` when either
    /// cannot be made (the products then take the classic path).
    pub(super) fn new(stream: Arc<CudaStream>, workspace_bytes: usize) -> Option<Self> {
        // SAFETY: the workspace is scratch memory that cuBLASLt writes before reading.
        let workspace = unsafe { stream.alloc::<u8>(workspace_bytes) }.ok()?;
        let handle = lt::create_handle().ok()?;
        let plans = Mutex::new(HashMap::new());
        let refusal = std::sync::OnceLock::new();
        Some(Lt { handle, workspace, workspace_bytes, stream, plans, refusal })
    }

    /// Issues `C = alpha·op(A)·op(B) + beta·C` (the classic call's arguments) on the stream, or
    /// says why it did not: no algorithm for the shape, or cuBLASLt refused the call (nothing was
    /// enqueued; the key then goes to the classic path from now on).
    pub(super) fn product(
        &self,
        types: Types,
        shape: GemmShape,
        pointers: (u64, u64, u64),
        scalars: (f32, f32),
    ) -> Issued {
        let key = self.key(types, shape, pointers);
        let Some(plan) = self.plan(key) else { return Issued::NoPlan };
        match self.launch(&plan, pointers, scalars) {
            Ok(()) => Issued::Lt,
            Err(error) => {
                self.lock_plans().insert(key, None);
                let _ = self.refusal.set(format!("{error:?} for {key:?}"));
                Issued::Refused
            }
        }
    }

    /// The first call cuBLASLt refused (its status and the product's key), if any.
    pub(super) fn refusal(&self) -> Option<&str> {
        self.refusal.get().map(String::as_str)
    }

    fn key(
        &self,
        types: Types,
        shape: GemmShape,
        (first, second, result): (u64, u64, u64),
    ) -> PlanKey {
        // Batch strides move the operands only when there are several batches.
        let batched = u64::from(shape.batches > 1);
        let bytes = |pointer: u64, stride: i64, dtype: DType| {
            [pointer, batched * stride.unsigned_abs() * dtype.size() as u64]
        };
        PlanKey {
            shape,
            inputs: types.inputs,
            output: types.output,
            alignment: [
                alignment(&bytes(first, shape.strides.0, types.inputs)),
                alignment(&bytes(second, shape.strides.1, types.inputs)),
                alignment(&bytes(result, shape.strides.2, types.output)),
            ],
        }
    }

    fn launch(
        &self,
        plan: &Plan,
        (first, second, result): (u64, u64, u64),
        (alpha, beta): (f32, f32),
    ) -> Result<(), CublasError> {
        let (workspace, _record) = self.workspace.device_ptr(&self.stream);
        // SAFETY: the pointers address live device buffers holding the operands and the result
        // in the layouts of the plan (the caller's shapes); alpha and beta are host scalars read
        // before the call returns; the workspace holds `workspace_bytes`.
        unsafe {
            lt::matmul(
                self.handle,
                plan.description,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                first as *const c_void,
                plan.layouts[0],
                second as *const c_void,
                plan.layouts[1],
                result as *const c_void,
                plan.layouts[2],
                result as *mut c_void,
                plan.layouts[2],
                &plan.algorithm,
                workspace as *mut c_void,
                self.workspace_bytes,
                self.stream.cu_stream() as _,
            )
        }
    }

    fn lock_plans(&self) -> std::sync::MutexGuard<'_, HashMap<PlanKey, Option<Arc<Plan>>>> {
        self.plans.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn plan(&self, key: PlanKey) -> Option<Arc<Plan>> {
        let mut plans = self.lock_plans();
        if let Some(plan) = plans.get(&key) {
            return plan.clone();
        }
        // No algorithm, or a layout cuBLASLt refuses: the classic call serves this key.
        let plan = Plan::new(self.handle, key, self.workspace_bytes).ok().map(Arc::new);
        plans.insert(key, plan.clone());
        plan
    }
}

/// A descriptor, the layouts of cuBLAS's first operand, second operand and result, and the
/// algorithm for them.
struct Plan {
    description: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algorithm: sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the descriptors are not changed after `Plan::new`; cuBLASLt only reads them.
unsafe impl Send for Plan {}
// SAFETY: as above.
unsafe impl Sync for Plan {}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each non-null object was created by `Plan::new` and is destroyed once.
        unsafe {
            for layout in self.layouts.into_iter().filter(|l| !l.is_null()) {
                let _ = lt::destroy_matrix_layout(layout);
            }
            if !self.description.is_null() {
                let _ = lt::destroy_matmul_desc(self.description);
            }
        }
    }
}

fn data_type(dtype: DType) -> sys::cudaDataType {
    match dtype {
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
        DType::F64 => sys::cudaDataType_t::CUDA_R_64F,
        _ => sys::cudaDataType_t::CUDA_R_32F,
    }
}

impl Plan {
    fn new(
        handle: sys::cublasLtHandle_t,
        key: PlanKey,
        workspace: usize,
    ) -> Result<Self, CublasError> {
        let shape = key.shape;
        let f32_scale = sys::cudaDataType_t::CUDA_R_32F;
        let mut plan = Plan {
            description: lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                f32_scale,
            )?,
            layouts: [std::ptr::null_mut(); 3],
            // SAFETY: plain data, overwritten by the heuristic's choice below.
            algorithm: unsafe { std::mem::zeroed() },
        };
        let (m, n, k) = (shape.m as u64, shape.n as u64, shape.k as u64);
        let first = if shape.transpose_first { (k, m) } else { (m, k) };
        let second = if shape.transpose_second { (n, k) } else { (k, n) };
        let inputs = data_type(key.inputs);
        let sizes = [
            (inputs, first, shape.leading.0, shape.strides.0),
            (inputs, second, shape.leading.1, shape.strides.1),
            (data_type(key.output), (m, n), shape.leading.2, shape.strides.2),
        ];
        for (slot, (dtype, (rows, cols), leading, stride)) in plan.layouts.iter_mut().zip(sizes) {
            *slot = lt::create_matrix_layout(dtype, rows, cols, i64::from(leading))?;
            if shape.batches > 1 {
                set_layout(*slot, Layout::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &shape.batches)?;
                set_layout(*slot, Layout::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride)?;
            }
        }
        // cublasOperation_t as an int32: 0 = N, 1 = T.
        let operation = |transpose: bool| i32::from(transpose);
        set_description(
            plan.description,
            Description::CUBLASLT_MATMUL_DESC_TRANSA,
            &operation(shape.transpose_first),
        )?;
        set_description(
            plan.description,
            Description::CUBLASLT_MATMUL_DESC_TRANSB,
            &operation(shape.transpose_second),
        )?;
        plan.algorithm = heuristic(handle, &plan, key.alignment, workspace)?;
        Ok(plan)
    }
}

type Layout = sys::cublasLtMatrixLayoutAttribute_t;
type Description = sys::cublasLtMatmulDescAttributes_t;
type Preference = sys::cublasLtMatmulPreferenceAttributes_t;

fn set_layout<T>(
    layout: sys::cublasLtMatrixLayout_t,
    attribute: Layout,
    value: &T,
) -> Result<(), CublasError> {
    // SAFETY: `value` is the attribute's documented type and lives for the call.
    unsafe {
        lt::set_matrix_layout_attribute(
            layout,
            attribute,
            value as *const T as *const c_void,
            size_of::<T>(),
        )
    }
}

fn set_description<T>(
    description: sys::cublasLtMatmulDesc_t,
    attribute: Description,
    value: &T,
) -> Result<(), CublasError> {
    // SAFETY: as in `set_layout`.
    unsafe {
        lt::set_matmul_desc_attribute(
            description,
            attribute,
            value as *const T as *const c_void,
            size_of::<T>(),
        )
    }
}

/// The algorithm the heuristic ranks first for `plan` within `workspace` bytes, told the
/// operands' real alignment.
fn heuristic(
    handle: sys::cublasLtHandle_t,
    plan: &Plan,
    [first, second, result]: [u32; 3],
    workspace: usize,
) -> Result<sys::cublasLtMatmulAlgo_t, CublasError> {
    let preference = lt::create_matmul_pref()?;
    let set = |attribute: Preference, value: *const c_void, bytes: usize| {
        // SAFETY: `value` points to the attribute's documented type for the call.
        unsafe { lt::set_matmul_pref_attribute(preference, attribute, value, bytes) }
    };
    let workspace = workspace as u64;
    let result_of = (|| {
        set(
            Preference::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &workspace as *const u64 as _,
            8,
        )?;
        for (attribute, align) in [
            (Preference::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, first),
            (Preference::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, second),
            (Preference::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, result),
            (Preference::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, result),
        ] {
            set(attribute, &align as *const u32 as _, 4)?;
        }
        let [a, b, c] = plan.layouts;
        // SAFETY: every object is live; the heuristic writes one result.
        unsafe { lt::get_matmul_algo_heuristic(handle, plan.description, a, b, c, c, preference) }
    })();
    // SAFETY: created above, destroyed once.
    let _ = unsafe { lt::destroy_matmul_pref(preference) };
    Ok(result_of?.algo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_the_largest_power_of_two_dividing_every_offset() {
        assert_eq!(alignment(&[0x7f00_0000_0000, 0]), 256, "a fresh buffer, no batch stride");
        assert_eq!(alignment(&[0x7f00_0000_0010, 0]), 16);
        // Attention's k starts one head (D = 64 bf16 = 128 bytes) into the packed row.
        assert_eq!(alignment(&[0x7f00_0000_0080, 3 * 768 * 2]), 128);
        assert_eq!(alignment(&[0x7f00_0000_0000, 6]), 2, "a batch stride of 3 bf16 values");
        assert_eq!(workspace_bytes(9), 32 << 20);
        assert_eq!(workspace_bytes(8), 4 << 20);
    }
}
