//! Launch shapes of the generated kernels: pure arithmetic, tested without a GPU.

/// Threads per block of element-wise kernels.
pub const ELEMENTWISE_BLOCK: u32 = 256;
/// Resident blocks per multiprocessor that an element-wise grid aims for (its loop strides over
/// the rest).
pub const BLOCKS_PER_MULTIPROCESSOR: usize = 8;
/// The most threads of one block.
pub const MAX_BLOCK: u32 = 1024;

/// A grid, a block and the dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Blocks.
    pub grid: u32,
    /// Threads per block.
    pub block: u32,
    /// Dynamic shared memory, bytes.
    pub shared_bytes: u32,
}

/// An element-wise kernel over `n` elements with a grid-stride loop: enough blocks to cover `n`,
/// at most [`BLOCKS_PER_MULTIPROCESSOR`] per multiprocessor, at least one.
pub fn elementwise(n: usize, multiprocessors: usize) -> Launch {
    let needed = n.div_ceil(ELEMENTWISE_BLOCK as usize);
    let cap = (multiprocessors.max(1) * BLOCKS_PER_MULTIPROCESSOR).min(u32::MAX as usize);
    Launch { grid: needed.clamp(1, cap) as u32, block: ELEMENTWISE_BLOCK, shared_bytes: 0 }
}

/// A row kernel: one block per row (a grid-stride loop over rows beyond the grid limit), threads
/// a power of two from 32 to [`MAX_BLOCK`] that covers `cols` when it can.
pub fn rows(rows: usize, cols: usize) -> Launch {
    let block = cols.next_power_of_two().clamp(32, MAX_BLOCK as usize) as u32;
    let grid = rows.clamp(1, i32::MAX as usize) as u32;
    Launch { grid, block, shared_bytes: 0 }
}

/// The cuBLAS call of one (batched) row-major product, in cuBLAS's column-major terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmShape {
    /// cuBLAS `m` (our `n`).
    pub m: i32,
    /// cuBLAS `n` (our `m`).
    pub n: i32,
    /// The contracted size.
    pub k: i32,
    /// Transpose cuBLAS's first operand (our `b`).
    pub transpose_first: bool,
    /// Transpose cuBLAS's second operand (our `a`).
    pub transpose_second: bool,
    /// Leading dimensions of the first operand, the second and the result.
    pub leading: (i32, i32, i32),
    /// Batch strides in elements of the first operand, the second and the result (0: shared).
    pub strides: (i64, i64, i64),
    /// Number of batches.
    pub batches: i32,
}

/// The cuBLAS shape of `y = op(a) · op(b)` for row-major `a` and `b` of these dims.
pub fn gemm_shape(a: &[usize], b: &[usize], transpose: (bool, bool)) -> crate::Result<GemmShape> {
    let (ra, rb) = (a.len(), b.len());
    if ra < 2 || rb < 2 {
        return Err(crate::Error::argument("matmul", "operands need at least 2 axes"));
    }
    let (m, k) = if transpose.0 { (a[ra - 1], a[ra - 2]) } else { (a[ra - 2], a[ra - 1]) };
    let n = if transpose.1 { b[rb - 2] } else { b[rb - 1] };
    let a_batches: usize = a[..ra - 2].iter().product();
    let b_batches: usize = b[..rb - 2].iter().product();
    if ra > 2 && rb == 2 && !transpose.0 {
        // A batched `a` against a shared `b`: the batches' rows are one `[batches·m, k]` matrix,
        // so the product is one matrix product (a linear layer over every token at once).
        return gemm_shape(&[a_batches * m, k], b, transpose);
    }
    let batches = if ra > 2 { a_batches } else { b_batches };
    let product = RowMajorProduct {
        sizes: (m, n, k),
        transpose,
        a: Operand { row: if transpose.0 { m } else { k }, batch: if ra > 2 { m * k } else { 0 } },
        b: Operand { row: if transpose.1 { k } else { n }, batch: if rb > 2 { k * n } else { 0 } },
        y: Operand { row: n, batch: m * n },
        batches: batches.max(1),
    };
    product.shape("matmul")
}

/// Where a row-major operand's rows and batches lie: element `(batch, i, j)` of the stored
/// matrix at `batch · batch_stride + i · row + j` (elements).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operand {
    /// The row stride (at least the stored row's length).
    pub row: usize,
    /// The batch stride (0: one matrix shared by every batch).
    pub batch: usize,
}

/// A batched row-major product `y = op(a) · op(b)` of strided operands: `y [m, n]`, the
/// contracted size `k`, `op` a transpose when the flag is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowMajorProduct {
    /// `(m, n, k)`.
    pub sizes: (usize, usize, usize),
    /// Transpose `a`, transpose `b`.
    pub transpose: (bool, bool),
    /// The stored `a`.
    pub a: Operand,
    /// The stored `b`.
    pub b: Operand,
    /// The result.
    pub y: Operand,
    /// Number of batches.
    pub batches: usize,
}

impl RowMajorProduct {
    /// The column-major cuBLAS call: `yᵀ = op(b)ᵀ · op(a)ᵀ` (the first operand is `b`); `op`
    /// names the op in the error when a size exceeds cuBLAS's `int`.
    pub fn shape(&self, op: &'static str) -> crate::Result<GemmShape> {
        let narrow = |value: usize| {
            i32::try_from(value).map_err(|_| {
                crate::Error::argument(op, format!("{value} exceeds cuBLAS's int range"))
            })
        };
        let (m, n, k) = self.sizes;
        Ok(GemmShape {
            m: narrow(n)?,
            n: narrow(m)?,
            k: narrow(k)?,
            transpose_first: self.transpose.1,
            transpose_second: self.transpose.0,
            leading: (narrow(self.b.row)?, narrow(self.a.row)?, narrow(self.y.row)?),
            strides: (self.b.batch as i64, self.a.batch as i64, self.y.batch as i64),
            batches: narrow(self.batches)?,
        })
    }
}

/// `Σ_b a_bᵀ · b_b` over contiguous batches of equal count is one product contracting over
/// `batches · k`: the weight gradient of a batched linear layer, `xᵀ · dy` over every token,
/// as one product instead of one per batch.
pub fn folded_sum_batch(
    a: &[usize],
    b: &[usize],
    transpose: (bool, bool),
    sum_batch: bool,
) -> Option<RowMajorProduct> {
    let (ra, rb) = (a.len(), b.len());
    if !sum_batch || transpose != (true, false) || ra < 3 || a[..ra - 2] != b[..rb.max(2) - 2] {
        return None;
    }
    let batches: usize = a[..ra - 2].iter().product();
    let (k, m, n) = (a[ra - 2], a[ra - 1], b[rb - 1]);
    Some(RowMajorProduct {
        sizes: (m, n, batches * k),
        transpose,
        a: Operand { row: m, batch: 0 },
        b: Operand { row: n, batch: 0 },
        y: Operand { row: n, batch: 0 },
        batches: 1,
    })
}

/// The column pass of the norms' gradient over `rows × cols`: blocks of
/// `COLUMN_TILE × ROW_LANES` threads, one per (column tile, chunk of rows), enough chunks for
/// about [`BLOCKS_PER_MULTIPROCESSOR`] blocks per multiprocessor, each chunk at least
/// `ROW_LANES` rows and at most 1024 chunks. Returns the launch and the number of chunks.
pub fn norm_columns(rows: usize, cols: usize, multiprocessors: usize) -> (Launch, usize) {
    use super::source_nn::{COLUMN_TILE, ROW_LANES};
    let tiles = cols.div_ceil(COLUMN_TILE).max(1);
    let wanted = (multiprocessors.max(1) * BLOCKS_PER_MULTIPROCESSOR).div_ceil(tiles);
    let chunks = wanted.min(rows.div_ceil(ROW_LANES)).clamp(1, 1024);
    let grid = (tiles * chunks).min(u32::MAX as usize) as u32;
    (Launch { grid, block: (COLUMN_TILE * ROW_LANES) as u32, shared_bytes: 0 }, chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elementwise_grids_cover_small_inputs_and_cap_large_ones() {
        assert_eq!(elementwise(0, 132).grid, 1);
        assert_eq!(elementwise(1, 132).grid, 1);
        assert_eq!(elementwise(256, 132).grid, 1);
        assert_eq!(elementwise(257, 132).grid, 2);
        assert_eq!(elementwise(1 << 30, 132).grid, 132 * 8, "capped: the loop strides");
        assert_eq!(elementwise(1 << 30, 0).grid, 8, "a zero count still launches");
    }

    #[test]
    fn row_major_products_map_to_column_major_cublas_calls() {
        // y[2,5] = a[2,3] · b[3,5]: cuBLAS computes yᵀ[5,2] = bᵀ[5,3] · aᵀ[3,2].
        let shape = gemm_shape(&[2, 3], &[3, 5], (false, false)).expect("valid");
        assert_eq!((shape.m, shape.n, shape.k), (5, 2, 3));
        assert_eq!((shape.transpose_first, shape.transpose_second), (false, false));
        assert_eq!(shape.leading, (5, 3, 5));
        assert_eq!((shape.strides, shape.batches), ((0, 0, 10), 1));
        // Batched a[4,2,3] against a shared bᵀ stored [5,3]: one product of a[8,3].
        let shape = gemm_shape(&[4, 2, 3], &[5, 3], (false, true)).expect("valid");
        assert_eq!((shape.m, shape.n, shape.k), (5, 8, 3));
        assert!(shape.transpose_first && !shape.transpose_second);
        assert_eq!(shape.leading, (3, 3, 5));
        assert_eq!((shape.strides, shape.batches), ((0, 0, 40), 1));
        // A shared a[2,3] against a batched b[4,3,5] stays batched.
        let shape = gemm_shape(&[2, 3], &[4, 3, 5], (false, false)).expect("valid");
        assert_eq!((shape.m, shape.n, shape.k, shape.batches), (5, 2, 3, 4));
        assert_eq!(shape.strides, (15, 0, 10));
        // aᵀ stored [3,2], both batched.
        let shape = gemm_shape(&[4, 3, 2], &[4, 3, 5], (true, false)).expect("valid");
        assert_eq!(shape.leading, (5, 2, 5));
        assert_eq!(shape.strides, (15, 6, 10));
        assert!(gemm_shape(&[3], &[3, 5], (false, false)).is_err());
    }

    #[test]
    fn strided_products_keep_their_row_and_batch_strides() {
        // Attention's S = q · kᵀ per head: q and k rows of width 3·H·D = 48, heads D = 4 apart.
        let scores = RowMajorProduct {
            sizes: (10, 10, 4),
            transpose: (false, true),
            a: Operand { row: 48, batch: 4 },
            b: Operand { row: 48, batch: 4 },
            y: Operand { row: 10, batch: 100 },
            batches: 4,
        };
        let shape = scores.shape("causal_attention").expect("fits");
        assert_eq!((shape.m, shape.n, shape.k), (10, 10, 4));
        assert!(shape.transpose_first && !shape.transpose_second);
        assert_eq!(shape.leading, (48, 48, 10));
        assert_eq!((shape.strides, shape.batches), ((4, 4, 100), 4));
        let huge = RowMajorProduct { sizes: (1 << 31, 1, 1), ..scores };
        assert!(huge.shape("causal_attention").is_err());
    }

    /// `y = op(a) · op(b)` of a row-major product on the host (one batch).
    fn host_product(product: &RowMajorProduct, a: &[f64], b: &[f64]) -> Vec<f64> {
        let (m, n, k) = product.sizes;
        let at = |i: usize, l: usize| match product.transpose.0 {
            true => a[l * product.a.row + i],
            false => a[i * product.a.row + l],
        };
        let bt = |l: usize, j: usize| match product.transpose.1 {
            true => b[j * product.b.row + l],
            false => b[l * product.b.row + j],
        };
        (0..m * n).map(|ij| (0..k).map(|l| at(ij / n, l) * bt(l, ij % n)).sum()).collect()
    }

    #[test]
    fn a_weight_gradient_over_batches_is_one_product() {
        // dW = Σ_b x_bᵀ · dy_b, x [3, 4, 5], dy [3, 4, 2]: one product of [5, 12] · [12, 2].
        let x: Vec<f64> = (0..60).map(|i| (i * 7 % 11) as f64 - 5.0).collect();
        let dy: Vec<f64> = (0..24).map(|i| (i * 5 % 7) as f64 - 3.0).collect();
        let folded = folded_sum_batch(&[3, 4, 5], &[3, 4, 2], (true, false), true).expect("folds");
        assert_eq!((folded.sizes, folded.batches), ((5, 2, 12), 1));
        let one = RowMajorProduct { sizes: (5, 2, 4), ..folded };
        let mut expected = vec![0.0; 10];
        for batch in 0..3 {
            let part = host_product(&one, &x[batch * 20..], &dy[batch * 8..]);
            expected.iter_mut().zip(part).for_each(|(e, p)| *e += p);
        }
        assert_eq!(host_product(&folded, &x, &dy), expected);
        let shape = folded.shape("matmul_sum_batch").expect("fits");
        assert_eq!((shape.m, shape.n, shape.k, shape.leading), (2, 5, 12, (2, 5, 2)));
        assert!(folded_sum_batch(&[3, 4, 5], &[3, 4, 2], (false, false), true).is_none());
        assert!(folded_sum_batch(&[3, 4, 5], &[2, 4, 2], (true, false), true).is_none());
        assert!(folded_sum_batch(&[3, 4, 5], &[3, 4, 2], (true, false), false).is_none());
    }

    #[test]
    fn norm_column_passes_cover_every_column_and_row() {
        let (shape, chunks) = norm_columns(8192, 768, 132);
        assert_eq!(shape.block, 256);
        assert_eq!(shape.grid as usize, 24 * chunks, "24 tiles of 32 columns");
        assert_eq!(chunks, (132 * 8usize).div_ceil(24));
        let (small, chunks) = norm_columns(3, 5, 132);
        assert_eq!((small.grid, chunks), (1, 1), "3 rows: one chunk of one tile");
        let (_, chunks) = norm_columns(1 << 20, 1, 132);
        assert_eq!(chunks, 1024, "capped");
        let (empty, chunks) = norm_columns(0, 0, 0);
        assert_eq!((empty.grid, chunks), (1, 1));
    }

    #[test]
    fn row_blocks_are_warp_multiples_up_to_1024() {
        assert_eq!(rows(4, 1).block, 32);
        assert_eq!(rows(4, 33).block, 64);
        assert_eq!(rows(4, 768).block, 1024);
        assert_eq!(rows(4, 50257).block, 1024);
        assert_eq!(rows(0, 8).grid, 1);
        assert_eq!(rows(10, 8).grid, 10);
    }
}
