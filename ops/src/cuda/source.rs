//! CUDA C of the generated kernels: one source per (kernel, dtype), compiled by NVRTC to a CUBIN
//! for the device's architecture and cached.
//!
//! Every source starts with [`prelude`]: the storage and accumulation types of each dtype and
//! their conversions (bf16 and f16 through bit operations and `cvt`, so no CUDA header is
//! needed), the [`Layout`] struct of strided kernels, and block reductions. Half-precision values
//! are computed in f32, f64 in f64, integers in f64 (casts only).

use crate::{DType, Error, Result};

/// Axes a strided kernel handles ([`Layout`]).
pub const MAX_RANK: usize = 8;

/// One generated kernel: its entry point and its CUDA C.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KernelSource {
    /// The `extern "C"` function to launch.
    pub entry: String,
    /// The complete translation unit.
    pub code: String,
}

/// Index arithmetic of strided kernels, by value as a kernel parameter (same layout as the C
/// struct in [`prelude`]): element `i` of a row-major iteration over `dims` sits at
/// `first_base + Σ idx_d · first[d]` in one tensor and `second_base + Σ idx_d · second[d]` in
/// the other.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// Sizes of the iterated axes.
    pub dims: [i64; MAX_RANK],
    /// Element strides of the first tensor.
    pub first: [i64; MAX_RANK],
    /// Element strides of the second tensor.
    pub second: [i64; MAX_RANK],
    /// Number of axes in use.
    pub rank: i64,
    /// Offset of element 0 in the first tensor.
    pub first_base: i64,
    /// Offset of element 0 in the second tensor.
    pub second_base: i64,
}

impl Layout {
    /// A layout over `dims` with strides for both tensors; `op` names the op in errors.
    pub fn new(
        op: &'static str,
        dims: &[usize],
        first: &[usize],
        second: &[usize],
    ) -> Result<Self> {
        if dims.len() > MAX_RANK || first.len() != dims.len() || second.len() != dims.len() {
            let reason = format!("GPU strided kernels take up to {MAX_RANK} axes, got {dims:?}");
            return Err(Error::argument(op, reason));
        }
        let mut layout = Layout { rank: dims.len() as i64, ..Layout::default() };
        for (d, &size) in dims.iter().enumerate() {
            layout.dims[d] = size as i64;
            layout.first[d] = first[d] as i64;
            layout.second[d] = second[d] as i64;
        }
        Ok(layout)
    }

    /// Elements the layout iterates over.
    pub fn count(&self) -> usize {
        self.dims[..self.rank as usize].iter().product::<i64>() as usize
    }
}

/// Row-major strides of `dims`.
pub fn contiguous_strides(dims: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; dims.len()];
    for d in (0..dims.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * dims[d + 1];
    }
    strides
}

/// The C names of a dtype: (storage type, accumulation type, suffix of its load/store).
fn c_types(dtype: DType) -> (&'static str, &'static str, &'static str) {
    match dtype {
        DType::F32 => ("float", "float", "f32"),
        DType::F64 => ("double", "double", "f64"),
        DType::BF16 => ("unsigned short", "float", "bf16"),
        DType::F16 => ("unsigned short", "float", "f16"),
        DType::I64 => ("long long", "double", "i64"),
        DType::I32 => ("int", "double", "i32"),
        DType::U8 => ("unsigned char", "double", "u8"),
        DType::Bool => ("unsigned char", "double", "bool"),
    }
}

const CONVERSIONS: &str = r#"
__device__ __forceinline__ float load_f32(float v) { return v; }
__device__ __forceinline__ float store_f32(float v) { return v; }
__device__ __forceinline__ double load_f64(double v) { return v; }
__device__ __forceinline__ double store_f64(double v) { return v; }
__device__ __forceinline__ float load_bf16(unsigned short v) { return __uint_as_float(((unsigned int)v) << 16); }
__device__ __forceinline__ unsigned short store_bf16(float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)0x7fc0u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
__device__ __forceinline__ float load_f16(unsigned short v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f; }
__device__ __forceinline__ unsigned short store_f16(float v) { unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h; }
__device__ __forceinline__ double load_i64(long long v) { return (double)v; }
__device__ __forceinline__ long long store_i64(double v) { return (long long)v; }
__device__ __forceinline__ double load_i32(int v) { return (double)v; }
__device__ __forceinline__ int store_i32(double v) { return (int)v; }
__device__ __forceinline__ double load_u8(unsigned char v) { return (double)v; }
__device__ __forceinline__ unsigned char store_u8(double v) { return (unsigned char)v; }
__device__ __forceinline__ double load_bool(unsigned char v) { return v != 0 ? 1.0 : 0.0; }
__device__ __forceinline__ unsigned char store_bool(double v) { return v != 0.0 ? 1 : 0; }
"#;

const LAYOUT: &str = r#"
#define MAX_RANK 8
struct Layout {
    long long dims[MAX_RANK];
    long long first[MAX_RANK];
    long long second[MAX_RANK];
    long long rank;
    long long first_base;
    long long second_base;
};
__device__ __forceinline__ void offsets(const Layout& l, long long i, long long* a, long long* b) {
    long long oa = l.first_base, ob = l.second_base;
    for (int d = (int)l.rank - 1; d >= 0; --d) {
        long long idx = i % l.dims[d];
        i /= l.dims[d];
        oa += idx * l.first[d];
        ob += idx * l.second[d];
    }
    *a = oa;
    *b = ob;
}
#define GRID_LOOP(i, n) for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)
"#;

const REDUCTIONS: &str = r#"
__device__ __forceinline__ A neg_inf() { return (A)__longlong_as_double(0xfff0000000000000LL); }
__device__ __forceinline__ A nan_value() { return (A)__longlong_as_double(0x7ff8000000000000LL); }
__device__ __forceinline__ A add_op(A a, A b) { return a + b; }
__device__ __forceinline__ A max_op(A a, A b) { return fmax(a, b); }
#define BLOCK_REDUCE(NAME, OP, IDENTITY) \
__device__ __forceinline__ A warp_##NAME(A v) { \
    for (int o = 16; o > 0; o >>= 1) v = OP(v, __shfl_xor_sync(0xffffffffu, v, o)); \
    return v; \
} \
__device__ A block_##NAME(A v) { \
    __shared__ A partial[32]; \
    __shared__ A total; \
    v = warp_##NAME(v); \
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5; \
    if (lane == 0) partial[warp] = v; \
    __syncthreads(); \
    if (warp == 0) { \
        v = lane < (int)((blockDim.x + 31) >> 5) ? partial[lane] : (IDENTITY); \
        v = warp_##NAME(v); \
        if (lane == 0) total = v; \
    } \
    __syncthreads(); \
    const A result = total; \
    __syncthreads(); \
    return result; \
}
BLOCK_REDUCE(sum, add_op, (A)0)
BLOCK_REDUCE(max, max_op, neg_inf())
"#;

/// The common head of every kernel source, with `T`, `A`, `load` and `store` bound to `dtype`.
pub fn prelude(dtype: DType) -> String {
    let (storage, accumulate, suffix) = c_types(dtype);
    format!(
        "{CONVERSIONS}{LAYOUT}typedef {storage} T;\ntypedef {accumulate} A;\n\
         __device__ __forceinline__ A load(T v) {{ return load_{suffix}(v); }}\n\
         __device__ __forceinline__ T store(A v) {{ return store_{suffix}(v); }}\n{REDUCTIONS}"
    )
}

fn float_only(op: &'static str, dtype: DType) -> Result<()> {
    if dtype.is_float() {
        Ok(())
    } else {
        Err(Error::dtype(op, &[dtype], "GPU kernels of this op take float dtypes"))
    }
}

fn entry(kind: &str, name: &str, dtype: DType) -> String {
    format!("meshflow_{kind}_{name}_{}", dtype.name())
}

/// The body of `y = f(v)` with parameter `p` (the op's scalar), assigning `r`.
pub fn map_expression(name: &str) -> Option<&'static str> {
    Some(match name {
        "exp" => "r = exp(v);",
        "log" => "r = log(v);",
        "sqrt" => "r = sqrt(v);",
        "rsqrt" => "r = (A)1 / sqrt(v);",
        "sigmoid" => "r = (A)1 / ((A)1 + exp(-v));",
        "tanh" => "r = tanh(v);",
        "relu" => "r = v > (A)0 ? v : (A)0;",
        "silu" => "r = v / ((A)1 + exp(-v));",
        "gelu" => {
            "if (p != (A)0) { r = (A)0.5 * v * ((A)1 + tanh((A)0.7978845608028654 * (v + (A)0.044715 * v * v * v))); } \
             else { r = (A)0.5 * v * ((A)1 + erf(v * (A)0.7071067811865476)); }"
        }
        "neg" => "r = -v;",
        "add_scalar" => "r = v + p;",
        "mul_scalar" => "r = v * p;",
        "pow_scalar" => "r = p == (A)2 ? v * v : pow(v, p);",
        _ => return None,
    })
}

/// The body of `f'(v)` (the derivative at `v`, parameter `p`), assigning `r`; the kernel
/// multiplies by the incoming gradient.
pub fn derivative_expression(name: &str) -> Option<&'static str> {
    Some(match name {
        "relu_grad" => "r = v > (A)0 ? (A)1 : (A)0;",
        "silu_grad" => "{ const A s = (A)1 / ((A)1 + exp(-v)); r = s * ((A)1 + v * ((A)1 - s)); }",
        "gelu_grad" => {
            "if (p != (A)0) { const A t = tanh((A)0.7978845608028654 * (v + (A)0.044715 * v * v * v)); \
             r = (A)0.5 * ((A)1 + t) + (A)0.5 * v * ((A)1 - t * t) * (A)0.7978845608028654 * ((A)1 + (A)0.134145 * v * v); } \
             else { r = (A)0.5 * ((A)1 + erf(v * (A)0.7071067811865476)) + v * exp((A)-0.5 * v * v) * (A)0.3989422804014327; }"
        }
        _ => return None,
    })
}

/// The expression of `f(a, b)`.
pub fn binary_expression(name: &str) -> Option<&'static str> {
    Some(match name {
        "add" => "a + b",
        "sub" => "a - b",
        "mul" => "a * b",
        "div" => "a / b",
        "pow" => "pow(a, b)",
        _ => return None,
    })
}

/// `y[i] = f(x[i])` (`map`) for an op with a [`map_expression`]:
/// `(const T* x, T* y, long long n, double p)`.
pub fn map_kernel(op: &'static str, dtype: DType) -> Result<KernelSource> {
    float_only(op, dtype)?;
    let body = map_expression(op).ok_or_else(|| no_expression(op))?;
    Ok(pointwise_kernel(entry("map", op, dtype), dtype, body, Operands::MAP))
}

/// `dx[i] = g[i] · f'(x[i])` for an op with a [`derivative_expression`]:
/// `(const T* x, const T* g, T* dx, long long n, double p)`.
pub fn derivative_kernel(op: &'static str, dtype: DType) -> Result<KernelSource> {
    float_only(op, dtype)?;
    let body = derivative_expression(op).ok_or_else(|| no_expression(op))?;
    Ok(pointwise_kernel(entry("grad", op, dtype), dtype, body, Operands::GRADIENT))
}

/// `y[i] = f(x[i] + b[i % w])` for an op with a [`map_expression`] (`bias_gelu` is `gelu`'s):
/// `(const T* x, const T* b, T* y, long long n, long long w, double p)`.
pub fn bias_map_kernel(op: &'static str, dtype: DType) -> Result<KernelSource> {
    float_only(op, dtype)?;
    let body = map_expression(op).ok_or_else(|| no_expression(op))?;
    let operands = Operands { bias: true, ..Operands::MAP };
    Ok(pointwise_kernel(entry("bias_map", op, dtype), dtype, body, operands))
}

/// `dx[i] = g[i] · f'(x[i] + b[i % w])` for an op with a [`derivative_expression`]:
/// `(const T* x, const T* b, const T* g, T* dx, long long n, long long w, double p)`.
pub fn bias_derivative_kernel(op: &'static str, dtype: DType) -> Result<KernelSource> {
    float_only(op, dtype)?;
    let body = derivative_expression(op).ok_or_else(|| no_expression(op))?;
    let operands = Operands { bias: true, ..Operands::GRADIENT };
    Ok(pointwise_kernel(entry("bias_grad", op, dtype), dtype, body, operands))
}

/// What a [`pointwise_kernel`] reads besides `x`.
#[derive(Clone, Copy)]
struct Operands {
    /// A bias `b` along the last axis (`w` wide), added to `x` in the compute type.
    bias: bool,
    /// The incoming gradient `g`, multiplied into the result.
    gradient: bool,
}

impl Operands {
    const MAP: Operands = Operands { bias: false, gradient: false };
    const GRADIENT: Operands = Operands { bias: false, gradient: true };
}

/// The one template of the element-wise map kernels: `body` assigns `r` from `v` (and the
/// parameter `p`); `operands` say whether `v` is `x[i]` or `x[i] + b[i % w]`, and whether the
/// result is multiplied by `g[i]`.
fn pointwise_kernel(entry: String, dtype: DType, body: &str, operands: Operands) -> KernelSource {
    let mut inputs = String::from("const T* __restrict__ x");
    let (mut value, mut result, mut width) = ("load(x[i])", "r", "");
    if operands.bias {
        inputs.push_str(", const T* __restrict__ b");
        (value, width) = ("load(x[i]) + load(b[i % w])", ", long long w");
    }
    if operands.gradient {
        inputs.push_str(", const T* __restrict__ g");
        result = "load(g[i]) * r";
    }
    let code = format!(
        "{}\nextern \"C\" __global__ void {entry}({inputs}, T* __restrict__ y, long long n{width}, double param) {{\n\
         const A p = (A)param;\n GRID_LOOP(i, n) {{ const A v = {value}; A r; {body} y[i] = store({result}); }}\n}}\n",
        prelude(dtype)
    );
    KernelSource { entry, code }
}

/// `y[i] = f(a[ia], b[ib])` over the output with broadcasting strides in a [`Layout`]
/// (`first` for `a`, `second` for `b`): `(const T* a, const T* b, T* y, long long n, Layout l)`.
pub fn binary_kernel(op: &'static str, dtype: DType) -> Result<KernelSource> {
    float_only(op, dtype)?;
    let expression = binary_expression(op).ok_or_else(|| no_expression(op))?;
    let entry = entry("binary", op, dtype);
    let code = format!(
        "{}\nextern \"C\" __global__ void {entry}(const T* __restrict__ x, const T* __restrict__ z, T* __restrict__ y, long long n, Layout l) {{\n\
         GRID_LOOP(i, n) {{ long long ia, ib; offsets(l, i, &ia, &ib); const A a = load(x[ia]); const A b = load(z[ib]); y[i] = store({expression}); }}\n}}\n",
        prelude(dtype)
    );
    Ok(KernelSource { entry, code })
}

/// `y[i] = (to) x[i]`: `(const From* x, To* y, long long n)`.
pub fn cast_kernel(from: DType, to: DType) -> KernelSource {
    let (from_storage, _, from_suffix) = c_types(from);
    let (to_storage, _, to_suffix) = c_types(to);
    let entry = format!("meshflow_cast_{}_{}", from.name(), to.name());
    let code = format!(
        "{}\nextern \"C\" __global__ void {entry}(const {from_storage}* __restrict__ x, {to_storage}* __restrict__ y, long long n) {{\n\
         GRID_LOOP(i, n) {{ y[i] = store_{to_suffix}(load_{from_suffix}(x[i])); }}\n}}\n",
        prelude(to)
    );
    KernelSource { entry, code }
}

/// `y[i] = value`: `(T* y, long long n, double value)`.
pub fn fill_kernel(dtype: DType) -> KernelSource {
    let entry = entry("fill", "constant", dtype);
    let code = format!(
        "{}\nextern \"C\" __global__ void {entry}(T* __restrict__ y, long long n, double value) {{\n\
         const T v = store((A)value);\n GRID_LOOP(i, n) {{ y[i] = v; }}\n}}\n",
        prelude(dtype)
    );
    KernelSource { entry, code }
}

/// `y[ob] = x[oa]` over a [`Layout`] (`first` for `x`, `second` for `y`), for elements of
/// `element_bytes` bytes (1, 2, 4 or 8): `(const E* x, E* y, long long n, Layout l)`.
pub fn copy_kernel(element_bytes: usize) -> Result<KernelSource> {
    let element = match element_bytes {
        1 => "unsigned char",
        2 => "unsigned short",
        4 => "unsigned int",
        8 => "unsigned long long",
        other => return Err(Error::argument("copy", format!("no {other}-byte elements"))),
    };
    let entry = format!("meshflow_copy_{element_bytes}");
    let code = format!(
        "{LAYOUT}\nextern \"C\" __global__ void {entry}(const {element}* __restrict__ x, {element}* __restrict__ y, long long n, Layout l) {{\n\
         GRID_LOOP(i, n) {{ long long ia, ib; offsets(l, i, &ia, &ib); y[ib] = x[ia]; }}\n}}\n"
    );
    Ok(KernelSource { entry, code })
}

/// The body of a row kernel: one block per row of `cols` elements; `x` is the first input's row,
/// `u` and `w` the second's and third's (rows, or the norms' weight and bias vectors), `y` the
/// output row, `eps` the op's epsilon.
pub fn rows_body(name: &str) -> Option<&'static str> {
    Some(match name {
        "softmax" | "log_softmax" => {
            r#"
    A m = neg_inf();
    for (long long c = threadIdx.x; c < cols; c += blockDim.x) m = fmax(m, load(x[c]));
    m = block_max(m);
    A s = (A)0;
    for (long long c = threadIdx.x; c < cols; c += blockDim.x) s += exp(load(x[c]) - m);
    s = block_sum(s);
    for (long long c = threadIdx.x; c < cols; c += blockDim.x) {
        const A e = load(x[c]) - m;
        y[c] = store(LOG_OUTPUT ? e - log(s) : exp(e) / s);
    }"#
        }
        "softmax_grad" => {
            r#"
    A s = (A)0;
    for (long long c = threadIdx.x; c < cols; c += blockDim.x) s += load(x[c]) * load(u[c]);
    s = block_sum(s);
    for (long long c = threadIdx.x; c < cols; c += blockDim.x) y[c] = store(load(x[c]) * (load(u[c]) - s));"#
        }
        "log_softmax_grad" => {
            r#"
    A s = (A)0;
    for (long long c = threadIdx.x; c < cols; c += blockDim.x) s += load(u[c]);
    s = block_sum(s);
    for (long long c = threadIdx.x; c < cols; c += blockDim.x) y[c] = store(load(u[c]) - exp(load(x[c])) * s);"#
        }
        "layer_norm" => {
            r#"
    A s = (A)0;
    for (long long c = threadIdx.x; c < cols; c += blockDim.x) s += load(x[c]);
    const A mean = block_sum(s) / (A)cols;
    A q = (A)0;
    for (long long c = threadIdx.x; c < cols; c += blockDim.x) { const A d = load(x[c]) - mean; q += d * d; }
    const A rstd = (A)1 / sqrt(block_sum(q) / (A)cols + (A)eps);
    for (long long c = threadIdx.x; c < cols; c += blockDim.x) y[c] = store((load(x[c]) - mean) * rstd * load(u[c]) + load(w[c]));"#
        }
        "rms_norm" => {
            r#"
    A q = (A)0;
    for (long long c = threadIdx.x; c < cols; c += blockDim.x) { const A v = load(x[c]); q += v * v; }
    const A rstd = (A)1 / sqrt(block_sum(q) / (A)cols + (A)eps);
    for (long long c = threadIdx.x; c < cols; c += blockDim.x) y[c] = store(load(x[c]) * rstd * load(u[c]));"#
        }
        _ => return None,
    })
}

/// True when the op's second and third inputs are whole rows (not per-column vectors).
pub fn rows_take_row_inputs(name: &str) -> bool {
    name.ends_with("_grad")
}

/// A row kernel: `(const T* x, const T* u, const T* w, T* y, long long rows, long long cols,
/// double eps)`; `u` and `w` advance by a row per row when [`rows_take_row_inputs`].
pub fn rows_kernel(op: &'static str, dtype: DType) -> Result<KernelSource> {
    float_only(op, dtype)?;
    let body = rows_body(op).ok_or_else(|| no_expression(op))?;
    let log_output = if op == "log_softmax" { 1 } else { 0 };
    let row_inputs = if rows_take_row_inputs(op) { 1 } else { 0 };
    let entry = entry("rows", op, dtype);
    let code = format!(
        "{}\n#define LOG_OUTPUT {log_output}\n\
         extern \"C\" __global__ void {entry}(const T* __restrict__ x0, const T* __restrict__ u0, const T* __restrict__ w0, T* __restrict__ y0, long long rows, long long cols, double eps) {{\n\
         for (long long row = blockIdx.x; row < rows; row += gridDim.x) {{\n\
           const T* x = x0 + row * cols; T* y = y0 + row * cols;\n\
           const T* u = u0 + ({row_inputs} ? row * cols : 0); const T* w = w0;\n{body}\n}}\n}}\n",
        prelude(dtype)
    );
    Ok(KernelSource { entry, code })
}

/// `y[i] = mask[im] ? then : other[io]`, every operand read through broadcasting strides: the
/// mask through `l.first`, `other` through `l.second`, `then` through `m.first`, or the constant
/// `value` when `constant` (`masked_fill`; `where` takes a tensor): `(const unsigned char* mask,
/// const T* then, const T* other, T* y, long long n, Layout l, Layout m, double value)`. Any
/// dtype (the values are copied, not computed).
pub fn select_kernel(dtype: DType, constant: bool) -> KernelSource {
    let (name, then) = if constant { ("masked_fill", "fill") } else { ("where", "a[ia]") };
    let entry = entry("select", name, dtype);
    let code = format!(
        "{}\nextern \"C\" __global__ void {entry}(const unsigned char* __restrict__ mask, const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, long long n, Layout l, Layout m, double value) {{\n\
         const T fill = store((A)value);\n\
         GRID_LOOP(i, n) {{ long long im, ib, ia, unused; offsets(l, i, &im, &ib); offsets(m, i, &ia, &unused); y[i] = mask[im] != 0 ? {then} : b[ib]; }}\n}}\n",
        prelude(dtype)
    );
    KernelSource { entry, code }
}

/// The gradient of a max: `dx[at] = g[o]` at the first position (row-major) of each group `o`
/// where `x == y[o]` (`dx` is zero-filled first); one thread per group, `kept` iterating the
/// groups' first elements and `reduced` a group's elements (input strides in `first`):
/// `(const T* x, const T* y, const T* g, T* dx, long long outputs, Layout kept, Layout reduced,
/// long long count)`.
pub fn max_grad_kernel(dtype: DType) -> Result<KernelSource> {
    float_only("max_grad", dtype)?;
    let entry = entry("route", "max_grad", dtype);
    let code = format!(
        "{}\nextern \"C\" __global__ void {entry}(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ g, T* __restrict__ dx, long long outputs, Layout kept, Layout reduced, long long count) {{\n\
         GRID_LOOP(i, outputs) {{\n  long long base, unused; offsets(kept, i, &base, &unused);\n  const A peak = load(y[i]);\n\
           for (long long j = 0; j < count; ++j) {{ long long at, other; offsets(reduced, j, &at, &other); if (load(x[base + at]) == peak) {{ dx[base + at] = g[i]; break; }} }}\n}}\n}}\n",
        prelude(dtype)
    );
    Ok(KernelSource { entry, code })
}

/// Dropout with the counter-based hash of `crate::random` (bit-equal to the CPU mask): element
/// `i` keeps `x` (times `scale`) when `uniform(seed', index) >= p`, its index in the logical
/// tensor from `l.first` (strides) and `l.first_base` (the shard's offset); `seed'` is the seed,
/// or `hash(seed, step)` when `has_step` (the step read as a number of dtype `step_dtype`):
/// `(const T* x, T* y, long long n, Layout l, unsigned long long seed, const S* step,
/// int has_step, float p, double scale)`.
pub fn dropout_kernel(dtype: DType, step_dtype: DType) -> Result<KernelSource> {
    float_only("dropout", dtype)?;
    let (step_storage, _, step_suffix) = c_types(step_dtype);
    let entry = format!("meshflow_dropout_{}_{}", dtype.name(), step_dtype.name());
    let code = format!(
        "{}{HASH}\nextern \"C\" __global__ void {entry}(const T* __restrict__ x, T* __restrict__ y, long long n, Layout l, unsigned long long seed, const {step_storage}* __restrict__ step, int has_step, float p, double scale) {{\n\
         if (has_step) {{ const double s = (double)load_{step_suffix}(step[0]); seed = mix(seed, s >= 18446744073709551615.0 ? ~0ull : (s > 0.0 ? (unsigned long long)s : 0ull)); }}\n\
         GRID_LOOP(i, n) {{ long long at, unused; offsets(l, i, &at, &unused);\n\
           const float u = (float)(mix(seed, (unsigned long long)at) >> 40) / 16777216.0f;\n\
           y[i] = store(u >= p ? load(x[i]) * (A)scale : (A)0); }}\n}}\n",
        prelude(dtype)
    );
    Ok(KernelSource { entry, code })
}

/// `crate::random::hash` in C.
const HASH: &str = r#"
__device__ __forceinline__ unsigned long long mix(unsigned long long seed, unsigned long long index) {
    unsigned long long z = seed * 0x9e3779b97f4a7c15ull + (index + 1ull) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
"#;

/// The SGD update of `ops::sgd` (torch's order of operations), arithmetic in the accumulate
/// type: `(const T* p, const T* g, const T* b, T* p_out, T* b_out, long long n, SgdScalars s)`.
pub fn sgd_kernel(dtype: DType) -> Result<KernelSource> {
    float_only("sgd", dtype)?;
    let entry = entry("update", "sgd", dtype);
    let code = format!(
        "{}\nstruct SgdScalars {{ double decay, momentum, keep, step, first; }};\n\
         extern \"C\" __global__ void {entry}(const T* __restrict__ p, const T* __restrict__ g, const T* __restrict__ b, \
         T* __restrict__ p_out, T* __restrict__ b_out, long long n, SgdScalars s) {{\n\
         GRID_LOOP(i, n) {{\n\
           const A pi = load(p[i]); A d = load(g[i]);\n\
           if (s.decay != 0.0) d += (A)s.decay * pi;\n\
           A buffer = load(b[i]);\n\
           if (s.momentum != 0.0) {{ buffer = s.first != 0.0 ? d : buffer * (A)s.momentum + (A)s.keep * d; d = buffer; }}\n\
           p_out[i] = store(pi + (A)s.step * d); b_out[i] = store(buffer);\n\
         }}\n}}\n",
        prelude(dtype)
    );
    Ok(KernelSource { entry, code })
}

/// The scalars of one SGD update as [`sgd_kernel`] takes them (same layout as its C struct).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SgdScalars {
    /// The weight decay (L2 penalty).
    pub decay: f64,
    /// The momentum factor (0: no buffer).
    pub momentum: f64,
    /// `1 - dampening`.
    pub keep: f64,
    /// `-lr`.
    pub step: f64,
    /// 1 on the first step (the buffer starts as the gradient), else 0.
    pub first: f64,
}

impl SgdScalars {
    /// The scalars of `config`'s update (as `ops::sgd` computes them).
    pub fn of(config: &crate::ops::sgd::Sgd) -> Self {
        SgdScalars {
            decay: config.weight_decay,
            momentum: config.momentum,
            keep: 1.0 - config.dampening,
            step: -config.lr,
            first: f64::from(u8::from(config.step == 1)),
        }
    }
}

/// The fused AdamW update of `ops::adamw` (torch's order of operations, `lerp` as torch computes
/// it), arithmetic in the accumulate type: `(const T* p, const T* g, const T* m, const T* v,
/// T* p_out, T* m_out, T* v_out, long long n, AdamScalars s)`, the scalars by value
/// ([`AdamScalars`]).
pub fn adamw_kernel(dtype: DType) -> Result<KernelSource> {
    float_only("adamw", dtype)?;
    let entry = entry("update", "adamw", dtype);
    let code = format!(
        "{}\nstruct AdamScalars {{ double decay, lerp, beta2, one_minus_beta2, bias2_sqrt, eps, step_size; }};\n\
         extern \"C\" __global__ void {entry}(const T* __restrict__ p, const T* __restrict__ g, const T* __restrict__ m, const T* __restrict__ v, \
         T* __restrict__ p_out, T* __restrict__ m_out, T* __restrict__ v_out, long long n, AdamScalars s) {{\n\
         const A decay = (A)s.decay, weight = (A)s.lerp, beta2 = (A)s.beta2, one_minus_beta2 = (A)s.one_minus_beta2;\n\
         const A bias2_sqrt = (A)s.bias2_sqrt, eps = (A)s.eps, step_size = (A)s.step_size;\n\
         GRID_LOOP(i, n) {{\n\
           const A pi = load(p[i]) * decay, gi = load(g[i]), m0 = load(m[i]);\n\
           const A mi = weight < (A)0.5 ? m0 + weight * (gi - m0) : gi - (gi - m0) * ((A)1 - weight);\n\
           const A vi = load(v[i]) * beta2 + one_minus_beta2 * gi * gi;\n\
           const A denom = sqrt(vi) / bias2_sqrt + eps;\n\
           p_out[i] = store(pi + step_size * (mi / denom)); m_out[i] = store(mi); v_out[i] = store(vi);\n\
         }}\n}}\n",
        prelude(dtype)
    );
    Ok(KernelSource { entry, code })
}

/// The scalars of one AdamW update as the kernel of [`adamw_kernel`] takes them (same layout as
/// its C struct).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdamScalars {
    /// `1 - lr · weight_decay`.
    pub decay: f64,
    /// `1 - beta1` (the weight of `lerp(m, g, ·)`).
    pub lerp: f64,
    /// `beta2`.
    pub beta2: f64,
    /// `1 - beta2`.
    pub one_minus_beta2: f64,
    /// `sqrt(1 - beta2^t)`.
    pub bias2_sqrt: f64,
    /// `eps`.
    pub eps: f64,
    /// `-lr / (1 - beta1^t)`.
    pub step_size: f64,
}

impl AdamScalars {
    /// The scalars of `config`'s update (as `ops::adamw` computes them).
    pub fn of(config: &crate::ops::adamw::AdamW) -> Self {
        let t = config.step as f64;
        AdamScalars {
            decay: 1.0 - config.lr * config.weight_decay,
            lerp: 1.0 - config.beta1,
            beta2: config.beta2,
            one_minus_beta2: 1.0 - config.beta2,
            bias2_sqrt: (1.0 - config.beta2.powf(t)).sqrt(),
            eps: config.eps,
            step_size: -(config.lr / (1.0 - config.beta1.powf(t))),
        }
    }
}

fn no_expression(op: &'static str) -> Error {
    Error::argument(op, "no GPU kernel source for this op")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::table::{Kernel, KERNELS};

    fn balanced(code: &str) -> bool {
        let mut depth = 0i64;
        for c in code.chars() {
            depth += match c {
                '{' => 1,
                '}' => -1,
                _ => 0,
            };
            if depth < 0 {
                return false;
            }
        }
        depth == 0
    }

    #[test]
    fn every_generated_op_has_a_source_for_every_float_dtype() {
        let floats = [DType::F32, DType::F64, DType::BF16, DType::F16];
        for &(op, kernel) in KERNELS {
            for dtype in floats {
                let source = match kernel {
                    Kernel::Map => map_kernel(op, dtype),
                    Kernel::MapGrad => derivative_kernel(op, dtype),
                    Kernel::Binary => binary_kernel(op, dtype),
                    Kernel::Rows => rows_kernel(op, dtype),
                    _ => continue,
                };
                let source = source.unwrap_or_else(|e| panic!("{op} {dtype:?}: {e}"));
                assert!(source.code.contains(&format!("void {}(", source.entry)), "{op}");
                assert!(balanced(&source.code), "{op} {dtype:?}: unbalanced braces");
            }
        }
    }

    #[test]
    fn the_adamw_source_takes_the_scalars_struct() {
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            let source = adamw_kernel(dtype).expect("a float dtype");
            assert!(source.code.contains(&format!("void {}(", source.entry)));
            assert!(source.code.contains("AdamScalars s)"), "{}", source.code);
            assert!(balanced(&source.code));
        }
        assert!(adamw_kernel(DType::I32).is_err());
        let masked = select_kernel(DType::BF16, true);
        assert!(masked.code.contains("mask[im] != 0 ? fill : b[ib]") && balanced(&masked.code));
        let chosen = select_kernel(DType::I64, false);
        assert!(chosen.code.contains("mask[im] != 0 ? a[ia] : b[ib]") && balanced(&chosen.code));
        assert_eq!(std::mem::size_of::<AdamScalars>(), 7 * 8);
        let config = crate::ops::adamw::AdamW { step: 2, ..crate::ops::adamw::AdamW::new(0.1) };
        let scalars = AdamScalars::of(&config);
        assert!((scalars.step_size + 0.1 / (1.0 - 0.81)).abs() < 1e-12);
        assert!((scalars.bias2_sqrt - (1.0f64 - 0.999 * 0.999).sqrt()).abs() < 1e-12);
        assert!((scalars.decay - 0.999).abs() < 1e-12);
    }

    #[test]
    fn integer_dtypes_are_refused_by_float_kernels() {
        let error = map_kernel("exp", DType::I64).expect_err("exp of i64");
        assert!(matches!(error, Error::DType { op: "exp", .. }), "{error}");
        assert!(cast_kernel(DType::I64, DType::BF16).code.contains("store_bf16(load_i64(x[i]))"));
        assert!(copy_kernel(3).is_err());
    }

    #[test]
    fn layouts_hold_strides_and_count_their_elements() {
        let layout = Layout::new("permute", &[2, 3, 4], &[1, 8, 2], &[12, 4, 1]).expect("fits");
        assert_eq!(layout.count(), 24);
        assert_eq!(layout.first[..3], [1, 8, 2]);
        assert_eq!(std::mem::size_of::<Layout>(), 8 * (3 * MAX_RANK + 3));
        assert!(Layout::new("permute", &[1; 9], &[1; 9], &[1; 9]).is_err());
        assert_eq!(contiguous_strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(contiguous_strides(&[]), Vec::<usize>::new());
    }
}
