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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    let batches = if ra > 2 { a_batches } else { b_batches };
    let narrow = |value: usize| {
        i32::try_from(value).map_err(|_| {
            crate::Error::argument("matmul", format!("{value} exceeds cuBLAS's int range"))
        })
    };
    Ok(GemmShape {
        m: narrow(n)?,
        n: narrow(m)?,
        k: narrow(k)?,
        transpose_first: transpose.1,
        transpose_second: transpose.0,
        leading: (
            narrow(if transpose.1 { k } else { n })?,
            narrow(if transpose.0 { m } else { k })?,
            narrow(n)?,
        ),
        strides: (
            if rb > 2 { (k * n) as i64 } else { 0 },
            if ra > 2 { (m * k) as i64 } else { 0 },
            (m * n) as i64,
        ),
        batches: narrow(batches.max(1))?,
    })
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
        // Batched a[4,2,3] against a shared bᵀ stored [5,3].
        let shape = gemm_shape(&[4, 2, 3], &[5, 3], (false, true)).expect("valid");
        assert_eq!((shape.m, shape.n, shape.k), (5, 2, 3));
        assert!(shape.transpose_first && !shape.transpose_second);
        assert_eq!(shape.leading, (3, 3, 5));
        assert_eq!((shape.strides, shape.batches), ((0, 6, 10), 4));
        // aᵀ stored [3,2], both batched.
        let shape = gemm_shape(&[4, 3, 2], &[4, 3, 5], (true, false)).expect("valid");
        assert_eq!(shape.leading, (5, 2, 5));
        assert_eq!(shape.strides, (15, 6, 10));
        assert!(gemm_shape(&[3], &[3, 5], (false, false)).is_err());
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
