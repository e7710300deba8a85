//! CUDA C of the network ops' kernels: embedding and its scatter-add gradient, cross-entropy and
//! its gradient, the norms' gradient, and the row kernels of causal attention (whose products
//! run through cuBLAS, [`crate::ops::attention`]).
//!
//! Same conventions as [`super::source`]: one source per (kernel, dtype), [`prelude`] first, `T`
//! the storage type and `A` the accumulation type (f32 for bf16/f16/f32, f64 for f64). Row kernels
//! take one block per row ([`super::launch::rows`]) and a grid-stride loop over rows.

use super::source::{prelude, KernelSource};
use crate::{DType, Error, Result};

/// Columns one block of [`norm_columns_kernel`] covers (a warp wide).
pub const COLUMN_TILE: usize = 32;
/// Row lanes of one block of [`norm_columns_kernel`] (the block is `COLUMN_TILE × ROW_LANES`).
pub const ROW_LANES: usize = 8;

fn floats(op: &'static str, dtype: DType) -> Result<()> {
    if dtype.is_float() {
        Ok(())
    } else {
        Err(Error::dtype(op, &[dtype], "GPU kernels of this op take float dtypes"))
    }
}

fn source(kind: &str, dtype: DType, head: &str, body: String) -> KernelSource {
    let entry = format!("meshflow_{kind}_{}", dtype.name());
    let code = format!("{}{head}\nextern \"C\" __global__ void {entry}{body}\n", prelude(dtype));
    KernelSource { entry, code }
}

/// Where id `id` lands in a table shard of `rows` rows from `offset` of a vocabulary of
/// `vocab`: `-2` outside the vocabulary, `-1` outside the shard, else the local row.
const SHARD_ROW: &str = r#"
__device__ __forceinline__ long long shard_row(long long id, long long rows, long long offset, long long vocab) {
    if (id < 0 || id >= vocab) return -2;
    const long long row = id - offset;
    return row >= 0 && row < rows ? row : -1;
}
"#;

/// `y[p, c] = table[ids[p] − offset, c]`, zero for ids outside the shard and NaN for ids outside
/// the vocabulary (the CPU refuses those; a kernel cannot, so the loss turns NaN):
/// `(const T* table, const long long* ids, T* y, long long positions, long long width,
/// long long rows, long long offset, long long vocab)`.
pub fn embedding_kernel(dtype: DType) -> Result<KernelSource> {
    floats("embedding", dtype)?;
    let body = r#"(const T* __restrict__ table, const long long* __restrict__ ids, T* __restrict__ y, long long positions, long long width, long long rows, long long offset, long long vocab) {
    GRID_LOOP(i, positions * width) {
        const long long position = i / width, column = i - position * width;
        const long long row = shard_row(ids[position], rows, offset, vocab);
        y[i] = row >= 0 ? table[row * width + column] : store(row == -1 ? (A)0 : nan_value());
    }
}"#;
    Ok(source("embedding", dtype, SHARD_ROW, body.into()))
}

/// The scatter-add of the embedding gradient: `sums[ids[p] − offset, c] += dy[p, c]` with
/// `atomicAdd` in the accumulation type into `sums` (zero-filled first; for bf16/f16 an f32
/// buffer cast afterwards). Ids outside the shard or the vocabulary add nothing:
/// `(const long long* ids, const T* dy, A* sums, long long positions, long long width,
/// long long rows, long long offset, long long vocab)`.
pub fn embedding_grad_kernel(dtype: DType) -> Result<KernelSource> {
    floats("embedding_grad", dtype)?;
    let body = r#"(const long long* __restrict__ ids, const T* __restrict__ dy, A* __restrict__ sums, long long positions, long long width, long long rows, long long offset, long long vocab) {
    GRID_LOOP(i, positions * width) {
        const long long position = i / width, column = i - position * width;
        const long long row = shard_row(ids[position], rows, offset, vocab);
        if (row >= 0) atomicAdd(&sums[row * width + column], load(dy[i]));
    }
}"#;
    Ok(source("embedding_grad", dtype, SHARD_ROW, body.into()))
}

/// The row statistics both cross-entropy kernels share: the row's maximum `m` (0 when not
/// finite, as the CPU kernel) and `Σ exp(x − m)`, reduced over the block.
const SOFTMAX_STATS: &str = r#"
__device__ void softmax_stats(const T* x, long long cols, A* peak, A* total) {
    A m = neg_inf();
    for (long long c = threadIdx.x; c < cols; c += blockDim.x) m = fmax(m, load(x[c]));
    m = block_max(m);
    if (!isfinite(m)) m = (A)0;
    A s = (A)0;
    for (long long c = threadIdx.x; c < cols; c += blockDim.x) s += exp(load(x[c]) - m);
    *peak = m;
    *total = block_sum(s);
}
"#;

/// Cross-entropy, first pass: `losses[r] = logsumexp(x_r) − x_r[t_r]` per row (NaN for a target
/// outside the classes): `(const T* logits, const long long* targets, A* losses, long long rows,
/// long long classes)`.
pub fn cross_entropy_rows_kernel(dtype: DType) -> Result<KernelSource> {
    floats("cross_entropy", dtype)?;
    let body = r#"(const T* __restrict__ logits, const long long* __restrict__ targets, A* __restrict__ losses, long long rows, long long classes) {
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* x = logits + row * classes;
        A m, s;
        softmax_stats(x, classes, &m, &s);
        if (threadIdx.x == 0) {
            const long long t = targets[row];
            losses[row] = t < 0 || t >= classes ? nan_value() : m + log(s) - load(x[t]);
        }
    }
}"#;
    Ok(source("cross_entropy_rows", dtype, SOFTMAX_STATS, body.into()))
}

/// A sum of `n` values of the accumulation type in one block, times `scale`, stored as the
/// scalar `y` (the second pass of cross-entropy; deterministic, no atomics):
/// `(const A* values, T* y, long long n, double scale)`.
pub fn block_total_kernel(dtype: DType) -> Result<KernelSource> {
    floats("cross_entropy", dtype)?;
    let body = r#"(const A* __restrict__ values, T* __restrict__ y, long long n, double scale) {
    A s = (A)0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) s += values[i];
    s = block_sum(s);
    if (threadIdx.x == 0) y[0] = store(s * (A)scale);
}"#;
    Ok(source("block_total", dtype, "", body.into()))
}

/// `dx_r = (softmax(x_r) − onehot(t_r)) · dloss · scale` per row (`dloss` read on the device;
/// NaN rows for a target outside the classes): `(const T* logits, const long long* targets,
/// const T* dloss, T* dx, long long rows, long long classes, double scale)`.
pub fn cross_entropy_grad_kernel(dtype: DType) -> Result<KernelSource> {
    floats("cross_entropy_grad", dtype)?;
    let body = r#"(const T* __restrict__ logits, const long long* __restrict__ targets, const T* __restrict__ dloss, T* __restrict__ dx0, long long rows, long long classes, double scale) {
    const A factor = load(dloss[0]) * (A)scale;
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* x = logits + row * classes;
        T* dx = dx0 + row * classes;
        A m, s;
        softmax_stats(x, classes, &m, &s);
        const long long t = targets[row];
        const A bad = t < 0 || t >= classes ? nan_value() : (A)0;
        const A weight = factor / s;
        for (long long c = threadIdx.x; c < classes; c += blockDim.x)
            dx[c] = store(exp(load(x[c]) - m) * weight - (c == t ? factor : (A)0) + bad);
    }
}"#;
    Ok(source("cross_entropy_grad", dtype, SOFTMAX_STATS, body.into()))
}

/// The norms' gradient, first pass (layer norm when `centred`, rms norm otherwise), one block
/// per row: `dx = rstd · (dy ⊙ w − mean(dy ⊙ w) − x̂ · mean(dy ⊙ w ⊙ x̂))` (the first mean only
/// when centred), and the row's `(mean, rstd)` into `stats` for [`norm_columns_kernel`]:
/// `(const T* x, const T* w, const T* dy, T* dx, A* stats, long long rows, long long cols,
/// double eps)`.
pub fn norm_grad_rows_kernel(dtype: DType, centred: bool) -> Result<KernelSource> {
    let (op, kind) = norm_names(centred);
    floats(op, dtype)?;
    let head = format!("\n#define CENTRED {}\n", u8::from(centred));
    let body = r#"(const T* __restrict__ x0, const T* __restrict__ w, const T* __restrict__ dy0, T* __restrict__ dx0, A* __restrict__ stats, long long rows, long long cols, double eps) {
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* x = x0 + row * cols;
        const T* dy = dy0 + row * cols;
        T* dx = dx0 + row * cols;
        A mean = (A)0;
        if (CENTRED) {
            A s = (A)0;
            for (long long c = threadIdx.x; c < cols; c += blockDim.x) s += load(x[c]);
            mean = block_sum(s) / (A)cols;
        }
        A q = (A)0;
        for (long long c = threadIdx.x; c < cols; c += blockDim.x) { const A d = load(x[c]) - mean; q += d * d; }
        const A rstd = (A)1 / sqrt(block_sum(q) / (A)cols + (A)eps);
        A g = (A)0, gx = (A)0;
        for (long long c = threadIdx.x; c < cols; c += blockDim.x) {
            const A gw = load(dy[c]) * load(w[c]);
            g += gw;
            gx += gw * ((load(x[c]) - mean) * rstd);
        }
        const A g_mean = CENTRED ? block_sum(g) / (A)cols : (A)0;
        const A gx_mean = block_sum(gx) / (A)cols;
        for (long long c = threadIdx.x; c < cols; c += blockDim.x) {
            const A xhat = (load(x[c]) - mean) * rstd;
            dx[c] = store(rstd * (load(dy[c]) * load(w[c]) - g_mean - xhat * gx_mean));
        }
        if (threadIdx.x == 0) { stats[2 * row] = mean; stats[2 * row + 1] = rstd; }
    }
}"#;
    Ok(source(&format!("{kind}_rows"), dtype, &head, body.into()))
}

/// The norms' gradient, second pass: per column, partial sums over one chunk of rows of
/// `dy ⊙ x̂` (the weight's gradient) and `dy` (the bias's), into `partial [chunks, 2, cols]`.
/// Block `b` covers columns `(b mod column_blocks) · 32 ..` and chunk `b / column_blocks`, with
/// `COLUMN_TILE × ROW_LANES` threads (coalesced rows of 32 columns):
/// `(const T* x, const T* dy, const A* stats, A* partial, long long rows, long long cols,
/// long long chunks)`.
pub fn norm_columns_kernel(dtype: DType) -> Result<KernelSource> {
    floats("layer_norm_grad", dtype)?;
    let head = format!("\n#define TILE {COLUMN_TILE}\n#define LANES {ROW_LANES}\n");
    let body = r#"(const T* __restrict__ x, const T* __restrict__ dy, const A* __restrict__ stats, A* __restrict__ partial, long long rows, long long cols, long long chunks) {
    __shared__ A weight_part[LANES][TILE + 1];
    __shared__ A bias_part[LANES][TILE + 1];
    const long long column_blocks = (cols + TILE - 1) / TILE;
    const long long chunk = blockIdx.x / column_blocks;
    const int lane = threadIdx.x % TILE, slot = threadIdx.x / TILE;
    const long long c = (blockIdx.x % column_blocks) * TILE + lane;
    const long long per_chunk = (rows + chunks - 1) / chunks;
    const long long start = chunk * per_chunk;
    const long long end = start + per_chunk < rows ? start + per_chunk : rows;
    A dw = (A)0, db = (A)0;
    if (c < cols) {
        for (long long r = start + slot; r < end; r += LANES) {
            const A d = load(dy[r * cols + c]);
            dw += d * ((load(x[r * cols + c]) - stats[2 * r]) * stats[2 * r + 1]);
            db += d;
        }
    }
    weight_part[slot][lane] = dw;
    bias_part[slot][lane] = db;
    __syncthreads();
    if (slot == 0 && c < cols) {
        for (int k = 1; k < LANES; ++k) { dw += weight_part[k][lane]; db += bias_part[k][lane]; }
        partial[chunk * 2 * cols + c] = dw;
        partial[chunk * 2 * cols + cols + c] = db;
    }
}"#;
    Ok(source("norm_columns", dtype, &head, body.into()))
}

/// The norms' gradient, last pass: `dw[c] = Σ_k partial[k, 0, c]` and (when `outputs` is
/// `2 · cols`) `db[c] = Σ_k partial[k, 1, c]`, one thread per output, chunks summed in order:
/// `(const A* partial, T* dw, T* db, long long cols, long long chunks, long long outputs)`.
pub fn norm_finish_kernel(dtype: DType) -> Result<KernelSource> {
    floats("layer_norm_grad", dtype)?;
    let body = r#"(const A* __restrict__ partial, T* __restrict__ dw, T* __restrict__ db, long long cols, long long chunks, long long outputs) {
    GRID_LOOP(j, outputs) {
        A s = (A)0;
        for (long long k = 0; k < chunks; ++k) s += partial[k * 2 * cols + j];
        if (j < cols) dw[j] = store(s); else db[j - cols] = store(s);
    }
}"#;
    Ok(source("norm_finish", dtype, "", body.into()))
}

/// The op name and kernel kind of the norm gradient.
fn norm_names(centred: bool) -> (&'static str, &'static str) {
    if centred {
        ("layer_norm_grad", "layer_norm_grad")
    } else {
        ("rms_norm_grad", "rms_norm_grad")
    }
}

/// The row kernels of causal attention over the scores `[N, T, T]` of `N` (batch, head) pairs
/// (rows `r = j·T + t` for pair `j`; causal: column `c` counts when `c ≤ t`); pair `j`'s
/// log-sum-exp row starts at `lse + j · lse_stride`, its `y` rows at `y + j · y_stride`, `y_row`
/// apart:
/// - `Probabilities`: from scaled scores `s` (accumulation type) to `p` (storage type, zero above
///   the diagonal) and the row's log-sum-exp into `lse`;
/// - `Recompute`: `p = exp(s − lse)` from the forward's `lse` (the backward);
/// - `ScoreGrad`: `p ← p ⊙ (dp − Σ_d dy ⊙ y)` in place, `dp` in the accumulation type, `y` and
///   `dy` rows of `head_dim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttentionRows {
    /// Softmax of the scores with the log-sum-exp saved.
    Probabilities,
    /// Probabilities from the saved log-sum-exp.
    Recompute,
    /// The scores' gradient from the probabilities' gradient.
    ScoreGrad,
}

impl AttentionRows {
    /// All three kernels.
    pub const ALL: [AttentionRows; 3] =
        [AttentionRows::Probabilities, AttentionRows::Recompute, AttentionRows::ScoreGrad];

    fn body(self) -> &'static str {
        match self {
            AttentionRows::Probabilities => {
                r#"
        A m = neg_inf();
        for (long long c = threadIdx.x; c <= t; c += blockDim.x) m = fmax(m, s[c]);
        m = block_max(m);
        A z = (A)0;
        for (long long c = threadIdx.x; c <= t; c += blockDim.x) z += exp(s[c] - m);
        z = block_sum(z);
        const A inverse = (A)1 / z;
        for (long long c = threadIdx.x; c < time; c += blockDim.x) p[c] = store(c <= t ? exp(s[c] - m) * inverse : (A)0);
        if (threadIdx.x == 0) lse[j * lse_stride + t] = m + log(z);"#
            }
            AttentionRows::Recompute => {
                r#"
        const A shift = lse[j * lse_stride + t];
        for (long long c = threadIdx.x; c < time; c += blockDim.x) p[c] = store(c <= t ? exp(s[c] - shift) : (A)0);"#
            }
            AttentionRows::ScoreGrad => {
                r#"
        const T* yr = y + j * y_stride + t * y_row;
        const T* dyr = dy + j * y_stride + t * y_row;
        A delta = (A)0;
        for (long long d = threadIdx.x; d < head_dim; d += blockDim.x) delta += load(yr[d]) * load(dyr[d]);
        delta = block_sum(delta);
        for (long long c = threadIdx.x; c < time; c += blockDim.x) p[c] = store(c <= t ? load(p[c]) * (s[c] - delta) : (A)0);"#
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            AttentionRows::Probabilities => "attention_probabilities",
            AttentionRows::Recompute => "attention_recompute",
            AttentionRows::ScoreGrad => "attention_score_grad",
        }
    }
}

/// One attention row kernel (see [`AttentionRows`]); every variant takes the same parameters,
/// unused ones may alias others: `(const A* scores, T* p, A* lse, const T* y, const T* dy,
/// long long rows, long long time, long long lse_stride, long long y_stride, long long y_row,
/// long long head_dim)`; `scores` is `s` (the scaled scores) or `dp`.
pub fn attention_rows_kernel(kind: AttentionRows, dtype: DType) -> Result<KernelSource> {
    floats("causal_attention", dtype)?;
    let body = format!(
        "(const A* __restrict__ scores, T* __restrict__ probabilities, A* __restrict__ lse, const T* __restrict__ y, const T* __restrict__ dy, long long rows, long long time, long long lse_stride, long long y_stride, long long y_row, long long head_dim) {{\n\
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {{\n\
        const long long j = row / time, t = row - j * time;\n\
        const A* s = scores + row * time;\n\
        T* p = probabilities + row * time;\n{}\n    }}\n}}",
        kind.body()
    );
    Ok(source(kind.name(), dtype, "", body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_source(dtype: DType) -> Result<Vec<KernelSource>> {
        let mut sources = vec![
            embedding_kernel(dtype)?,
            embedding_grad_kernel(dtype)?,
            cross_entropy_rows_kernel(dtype)?,
            block_total_kernel(dtype)?,
            cross_entropy_grad_kernel(dtype)?,
            norm_grad_rows_kernel(dtype, true)?,
            norm_grad_rows_kernel(dtype, false)?,
            norm_columns_kernel(dtype)?,
            norm_finish_kernel(dtype)?,
        ];
        for kind in AttentionRows::ALL {
            sources.push(attention_rows_kernel(kind, dtype)?);
        }
        Ok(sources)
    }

    #[test]
    fn sources_are_one_entry_each_with_distinct_names() {
        let mut entries = std::collections::BTreeSet::new();
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            for source in every_source(dtype).expect("float dtypes") {
                assert_eq!(source.code.matches("__global__").count(), 1, "{}", source.entry);
                assert!(source.code.contains(&format!("void {}(", source.entry)));
                assert_eq!(source.code.matches('{').count(), source.code.matches('}').count());
                assert!(entries.insert(source.entry.clone()), "{} twice", source.entry);
            }
        }
        assert!(every_source(DType::I64).is_err(), "integer dtypes are refused");
    }

    #[test]
    fn the_norm_gradient_is_centred_for_layer_norm_only() {
        let layer = norm_grad_rows_kernel(DType::BF16, true).expect("bf16");
        let rms = norm_grad_rows_kernel(DType::BF16, false).expect("bf16");
        assert!(layer.code.contains("#define CENTRED 1") && rms.code.contains("#define CENTRED 0"));
        assert_ne!(layer.entry, rms.entry);
        let columns = norm_columns_kernel(DType::F32).expect("f32");
        assert!(columns.code.contains(&format!("#define TILE {COLUMN_TILE}")));
    }
}
