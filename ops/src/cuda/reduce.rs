//! Reductions on the GPU (`sum`, `mean`, `max`) as block reductions in a fixed order: the plan
//! (pure arithmetic, tested on the host by emulating the kernels) and the CUDA C of its two
//! kernels.
//!
//! The input's axes are first merged: neighbouring axes that are both kept or both reduced
//! become one (the input is contiguous), and axes of size one vanish, so a bias gradient
//! `sum([B, T, C], axes [0, 1])` is `C` outputs over `B·T` rows at stride `C`. Then:
//!
//! - the innermost axis is reduced ([`Pass::Rows`]): one block per (output, chunk of the reduced
//!   elements); the block's threads stride over the chunk and meet in a block reduction;
//! - the innermost axis is kept ([`Pass::Columns`]): one block of `COLUMN_TILE × ROW_LANES`
//!   threads per (tile of 32 neighbouring outputs, chunk): each warp reads 32 neighbouring
//!   elements (coalesced), the `ROW_LANES` lanes of an output stride over the chunk, and lane 0
//!   adds the lanes' sums in lane order.
//!
//! Too few outputs to fill the GPU split the reduced elements into chunks: the first launch
//! writes one partial result per (output, chunk) in the accumulation type, a second launch of
//! the same kernel family reduces the chunks of each output ([`Stage::Combine`]). Every sum is
//! taken in an order fixed by the shapes and the device's multiprocessor count, so a run
//! repeats bit for bit.

use super::launch::{Launch, BLOCKS_PER_MULTIPROCESSOR};
use super::source::{prelude, KernelSource, Layout};
use super::source_nn::{COLUMN_TILE, ROW_LANES};
use crate::{DType, Error, Result};

/// Which kernel family serves a reduction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    /// The innermost axis is reduced: a block per output (and chunk).
    Rows,
    /// The innermost axis is kept: a block per tile of 32 outputs (and chunk).
    Columns,
}

/// What one launch reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Reads the input, writes the result (one chunk per output).
    Whole,
    /// Reads the input, writes one partial result per (output, chunk) in the accumulation type.
    Partial,
    /// Reads the partial results, writes the result.
    Combine,
}

impl Stage {
    /// Every stage.
    pub const ALL: [Stage; 3] = [Stage::Whole, Stage::Partial, Stage::Combine];

    fn name(self) -> &'static str {
        match self {
            Stage::Whole => "whole",
            Stage::Partial => "partial",
            Stage::Combine => "combine",
        }
    }
}

/// One kernel launch of a reduction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReduceLaunch {
    /// The kernel family.
    pub pass: Pass,
    /// What it reads and writes.
    pub stage: Stage,
    /// Number of outputs.
    pub outputs: usize,
    /// The outputs' first elements in the input (`first` strides, row-major over the outputs).
    pub kept: Layout,
    /// An output's elements relative to its first (`first` strides).
    pub reduced: Layout,
    /// Elements per output.
    pub count: usize,
    /// Chunks the elements of one output are split into (partial results per output).
    pub chunks: usize,
    /// What a mean divides by: the elements per output of the whole reduction.
    pub divisor: usize,
    /// Grid and block.
    pub launch: Launch,
}

impl ReduceLaunch {
    /// The elements of chunk `chunk` of one output: `start..end` of its `count`.
    pub fn chunk_range(&self, chunk: usize) -> std::ops::Range<usize> {
        let per = self.count.div_ceil(self.chunks.max(1));
        (chunk * per).min(self.count)..((chunk + 1) * per).min(self.count)
    }

    /// The partial results' buffer length (elements of the accumulation type).
    pub fn partial_len(&self) -> usize {
        self.outputs * self.chunks
    }
}

/// Most threads of a [`Pass::Rows`] block.
pub const ROWS_BLOCK: usize = 512;
/// Elements each thread should at least read before a chunk is split off.
const PER_THREAD: usize = 4;
/// Most chunks per output.
const MAX_CHUNKS: usize = 1024;

/// Merged `(size, stride)` axes of a contiguous input of `dims`: `(kept, reduced)`, outer first.
type Axes = Vec<(usize, usize)>;

fn merged_axes(dims: &[usize], reduced: &[usize]) -> (Axes, Axes) {
    let strides = super::source::contiguous_strides(dims);
    let (mut kept, mut over): (Axes, Axes) = (Vec::new(), Vec::new());
    let mut last: Option<bool> = None;
    for (axis, (&size, &stride)) in dims.iter().zip(&strides).enumerate() {
        if size == 1 {
            continue;
        }
        let is_reduced = reduced.contains(&axis);
        let list = if is_reduced { &mut over } else { &mut kept };
        match list.last_mut() {
            Some(previous) if last == Some(is_reduced) => *previous = (previous.0 * size, stride),
            _ => list.push((size, stride)),
        }
        last = Some(is_reduced);
    }
    (kept, over)
}

fn layout(op: &'static str, axes: &[(usize, usize)]) -> Result<Layout> {
    let sizes: Vec<usize> = axes.iter().map(|a| a.0).collect();
    let strides: Vec<usize> = axes.iter().map(|a| a.1).collect();
    Layout::new(op, &sizes, &strides, &vec![0; axes.len()])
}

/// The launches of `op` reducing `reduced` (normalised axes) of a contiguous input of `dims` on
/// a device of `multiprocessors`: one, or two when the elements of an output are split into
/// chunks ([`Stage::Partial`] then [`Stage::Combine`]).
pub fn plan(
    op: &'static str,
    dims: &[usize],
    reduced: &[usize],
    multiprocessors: usize,
) -> Result<Vec<ReduceLaunch>> {
    let (kept, over) = merged_axes(dims, reduced);
    let outputs: usize = kept.iter().map(|a| a.0).product();
    let count: usize = over.iter().map(|a| a.0).product();
    let inner_kept = matches!(kept.last(), Some(&(_, 1)));
    let pass = if inner_kept { Pass::Columns } else { Pass::Rows };
    let target = multiprocessors.max(1) * BLOCKS_PER_MULTIPROCESSOR;
    let first = single(op, pass, outputs, (layout(op, &kept)?, layout(op, &over)?), count, count)?;
    let (groups, lanes) = match pass {
        Pass::Rows => (outputs, first.launch.block as usize),
        Pass::Columns => (outputs.div_ceil(COLUMN_TILE), ROW_LANES),
    };
    let wanted = target.div_ceil(groups.max(1)).min(count.div_ceil(lanes * PER_THREAD));
    let chunks = wanted.clamp(1, MAX_CHUNKS);
    let chunks = count.div_ceil(count.div_ceil(chunks).max(1)).max(1);
    if chunks == 1 {
        return Ok(vec![first]);
    }
    let partial = ReduceLaunch {
        stage: Stage::Partial,
        chunks,
        launch: grid(pass, outputs, chunks, first.launch.block),
        ..first
    };
    // The partial results: `[outputs, chunks]` after rows, `[chunks, outputs]` after columns.
    let axes = match pass {
        Pass::Rows => ([(outputs, chunks)], [(chunks, 1)]),
        Pass::Columns => ([(outputs, 1)], [(chunks, outputs)]),
    };
    let layouts = (layout(op, &axes.0)?, layout(op, &axes.1)?);
    let combine = single(op, pass, outputs, layouts, chunks, count)?;
    Ok(vec![partial, ReduceLaunch { stage: Stage::Combine, ..combine }])
}

/// A one-chunk launch of `count` elements per output.
fn single(
    op: &'static str,
    pass: Pass,
    outputs: usize,
    (kept, reduced): (Layout, Layout),
    count: usize,
    divisor: usize,
) -> Result<ReduceLaunch> {
    if !matches!(op, "sum" | "mean" | "max") {
        return Err(Error::argument(op, "not a reduction the GPU backend knows"));
    }
    let block = match pass {
        Pass::Rows => count.next_power_of_two().clamp(32, ROWS_BLOCK) as u32,
        Pass::Columns => (COLUMN_TILE * ROW_LANES) as u32,
    };
    let launch = grid(pass, outputs, 1, block);
    let stage = Stage::Whole;
    Ok(ReduceLaunch { pass, stage, outputs, kept, reduced, count, chunks: 1, divisor, launch })
}

fn grid(pass: Pass, outputs: usize, chunks: usize, block: u32) -> Launch {
    let groups = match pass {
        Pass::Rows => outputs,
        Pass::Columns => outputs.div_ceil(COLUMN_TILE),
    };
    let grid = (groups * chunks).clamp(1, i32::MAX as usize) as u32;
    Launch { grid, block, shared_bytes: 0 }
}

/// The combine step, identity, block reduction and finish of each reduction op.
fn arithmetic(
    op: &'static str,
) -> Result<(&'static str, &'static str, &'static str, &'static str)> {
    Ok(match op {
        "sum" => ("add_op", "(A)0", "block_sum", "v"),
        "mean" => ("add_op", "(A)0", "block_sum", "v / (A)(divisor > 0 ? divisor : 1)"),
        "max" => ("max_op", "neg_inf()", "block_max", "v"),
        _ => return Err(Error::argument(op, "no GPU reduction kernel for this op")),
    })
}

/// The kernel of one (op, dtype, pass, stage): `(const IN* x, OUT* y, long long outputs,
/// Layout kept, Layout reduced, long long count, long long chunks, long long divisor)`; `IN` is
/// the storage type `T` or (combining) the accumulation type `A`, `OUT` is `T` or (partial) `A`.
/// Output `o`'s chunk `c` goes to `y[o·chunks + c]` from [`Pass::Rows`] and to
/// `y[c·outputs + o]` from [`Pass::Columns`].
pub fn reduce_kernel(
    op: &'static str,
    dtype: DType,
    pass: Pass,
    stage: Stage,
) -> Result<KernelSource> {
    if !dtype.is_float() {
        return Err(Error::dtype(op, &[dtype], "GPU kernels of this op take float dtypes"));
    }
    let (combine, identity, block_reduce, finish) = arithmetic(op)?;
    let (input, read) = match stage {
        Stage::Combine => ("A", "v"),
        _ => ("T", "load(v)"),
    };
    let (output, write) = match stage {
        Stage::Partial => ("A", "v".to_string()),
        _ => ("T", format!("store({finish})")),
    };
    let (kind, body) = match pass {
        Pass::Rows => ("rows", ROWS_BODY.replace("BLOCK_REDUCE", block_reduce)),
        Pass::Columns => ("columns", COLUMNS_BODY.to_string()),
    };
    let entry = format!("meshflow_reduce_{kind}_{}_{op}_{}", stage.name(), dtype.name());
    let code = format!(
        "{}{POSITION}\n#define COMBINE(a, b) {combine}(a, b)\n#define IDENTITY {identity}\n\
         #define COLUMN_TILE {COLUMN_TILE}\n#define ROW_LANES {ROW_LANES}\n\
         __device__ __forceinline__ A read_in({input} v) {{ return {read}; }}\n\
         __device__ __forceinline__ {output} write_out(A v, long long divisor) {{ return {write}; }}\n\
         extern \"C\" __global__ void {entry}(const {input}* __restrict__ x, {output}* __restrict__ y, long long outputs, Layout kept, Layout reduced, long long count, long long chunks, long long divisor) {{\n\
         const long long per = (count + chunks - 1) / chunks;\n{body}}}\n",
        prelude(dtype)
    );
    Ok(KernelSource { entry, code })
}

/// The offset of element `i` of a layout in its first tensor (one multiply for one axis).
const POSITION: &str = r#"
__device__ __forceinline__ long long position(const Layout& l, long long i) {
    if (l.rank == 1) return i * l.first[0];
    long long at = 0;
    for (int d = (int)l.rank - 1; d >= 0; --d) {
        const long long idx = i % l.dims[d];
        i /= l.dims[d];
        at += idx * l.first[d];
    }
    return at;
}
"#;

const ROWS_BODY: &str = r#"
    for (long long pair = blockIdx.x; pair < outputs * chunks; pair += gridDim.x) {
        const long long o = pair / chunks, c = pair - o * chunks;
        const long long base = position(kept, o);
        const long long end = (c + 1) * per < count ? (c + 1) * per : count;
        A acc = IDENTITY;
        for (long long j = c * per + threadIdx.x; j < end; j += blockDim.x) acc = COMBINE(acc, read_in(x[base + position(reduced, j)]));
        acc = BLOCK_REDUCE(acc);
        if (threadIdx.x == 0) y[pair] = write_out(acc, divisor);
    }
"#;

const COLUMNS_BODY: &str = r#"
    __shared__ A lanes[ROW_LANES][COLUMN_TILE + 1];
    const int column = threadIdx.x % COLUMN_TILE, lane = threadIdx.x / COLUMN_TILE;
    const long long tiles = (outputs + COLUMN_TILE - 1) / COLUMN_TILE;
    for (long long pair = blockIdx.x; pair < tiles * chunks; pair += gridDim.x) {
        const long long tile = pair / chunks, c = pair - tile * chunks;
        const long long o = tile * COLUMN_TILE + column;
        A acc = IDENTITY;
        if (o < outputs) {
            const long long base = position(kept, o);
            const long long end = (c + 1) * per < count ? (c + 1) * per : count;
            for (long long j = c * per + lane; j < end; j += ROW_LANES) acc = COMBINE(acc, read_in(x[base + position(reduced, j)]));
        }
        lanes[lane][column] = acc;
        __syncthreads();
        if (lane == 0 && o < outputs) {
            A total = lanes[0][column];
            for (int l = 1; l < ROW_LANES; ++l) total = COMBINE(total, lanes[l][column]);
            y[c * outputs + o] = write_out(total, divisor);
        }
        __syncthreads();
    }
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Context, Op, Tensor};

    /// Offset of element `i` of `layout`'s first tensor (the kernels' `position`).
    fn position(layout: &Layout, mut i: usize) -> usize {
        let mut at = 0;
        for d in (0..layout.rank as usize).rev() {
            let size = layout.dims[d] as usize;
            at += (i % size) * layout.first[d] as usize;
            i /= size;
        }
        at
    }

    /// One launch on the host, in the kernel's order: each (output, chunk) is split among the
    /// block's threads (rows) or lanes (columns) as on the GPU, and their results are combined
    /// in thread order.
    fn emulate(run: &ReduceLaunch, op: &str, x: &[f64], y: &mut [f64]) {
        let combine = |a: f64, b: f64| if op == "max" { a.max(b) } else { a + b };
        let identity = if op == "max" { f64::NEG_INFINITY } else { 0.0 };
        let threads = match run.pass {
            Pass::Rows => run.launch.block as usize,
            Pass::Columns => ROW_LANES,
        };
        for o in 0..run.outputs {
            let base = position(&run.kept, o);
            for c in 0..run.chunks {
                let range = run.chunk_range(c);
                let mut total = identity;
                for thread in 0..threads {
                    let mut acc = identity;
                    for j in range.clone().skip(thread).step_by(threads) {
                        acc = combine(acc, x[base + position(&run.reduced, j)]);
                    }
                    total = combine(total, acc);
                }
                let at = match run.pass {
                    Pass::Rows => o * run.chunks + c,
                    Pass::Columns => c * run.outputs + o,
                };
                let finished = op == "mean" && run.stage != Stage::Partial;
                y[at] = if finished { total / run.divisor.max(1) as f64 } else { total };
            }
        }
    }

    /// The plan of `op` over `axes` of `dims`, run on the host, against the CPU op in f64.
    fn check(
        op: &'static str,
        dims: &[usize],
        axes: &[usize],
        multiprocessors: usize,
    ) -> Vec<ReduceLaunch> {
        let count: usize = dims.iter().product();
        let values: Vec<f64> =
            (0..count).map(|i| ((i * 7919 % 1013) as f64 - 506.0) / 97.0).collect();
        let x = Tensor::from_vec(values.clone(), dims.to_vec()).expect("input");
        let signed: Vec<isize> = axes.iter().map(|&a| a as isize).collect();
        let cpu_op: Box<dyn Op> = match op {
            "sum" => Box::new(crate::ops::sum::Sum { axes: signed, keepdim: false }),
            "mean" => Box::new(crate::ops::mean::Mean { axes: signed, keepdim: false }),
            _ => Box::new(crate::ops::max::Max { axes: signed, keepdim: false }),
        };
        let expected = cpu_op.forward(&Context::default(), &[x]).expect("cpu").remove(0);
        let expected = expected.to_vec::<f64>().expect("f64");
        let reduced: Vec<usize> =
            if axes.is_empty() { (0..dims.len()).collect() } else { axes.to_vec() };
        let launches = plan(op, dims, &reduced, multiprocessors).expect("a plan");
        let mut input = values;
        for run in &launches {
            let mut out = vec![f64::NAN; run.partial_len()];
            emulate(run, op, &input, &mut out);
            input = out;
        }
        assert_eq!(input.len(), expected.len(), "{op} {dims:?} {axes:?}");
        for (got, want) in input.iter().zip(&expected) {
            assert!(
                (got - want).abs() <= 1e-12 * (1.0 + want.abs()),
                "{op} {dims:?} {axes:?}: {got} vs {want}"
            );
        }
        launches
    }

    #[test]
    fn bias_gradients_are_column_passes_split_into_chunks() {
        // GPT bias gradient: [B 8, T 128, C 768] summed over batch and time.
        let runs = check("sum", &[8, 128, 768], &[0, 1], 132);
        assert_eq!(runs.len(), 2);
        let (partial, combine) = (&runs[0], &runs[1]);
        assert_eq!(
            (partial.pass, partial.stage, partial.outputs),
            (Pass::Columns, Stage::Partial, 768)
        );
        assert_eq!((partial.count, partial.reduced.rank, partial.reduced.first[0]), (1024, 1, 768));
        assert_eq!(partial.chunks, 32, "1024 rows in chunks of 8 lanes × 4");
        assert_eq!(partial.launch.grid, 24 * 32, "24 tiles of 32 columns, 32 chunks each");
        assert_eq!((combine.stage, combine.count, combine.divisor), (Stage::Combine, 32, 1024));
        // Many outputs fill the GPU without chunks.
        let runs = check("mean", &[4096, 1024], &[0], 4);
        assert_eq!((runs.len(), runs[0].stage), (1, Stage::Whole));
    }

    #[test]
    fn inner_reductions_are_row_passes() {
        let runs = check("max", &[300, 48], &[1], 132);
        assert_eq!((runs.len(), runs[0].pass, runs[0].launch.block), (1, Pass::Rows, 64));
        assert_eq!(runs[0].launch.grid, 300);
        // A whole long vector: many chunks, then one block combines them.
        let runs = check("sum", &[3, 20000], &[], 132);
        assert_eq!((runs[0].pass, runs[0].outputs, runs[0].chunks), (Pass::Rows, 1, 30));
        assert_eq!((runs[1].count, runs[1].launch.block, runs[1].launch.grid), (30, 32, 1));
        let runs = check("mean", &[2, 3, 50000], &[2], 132);
        assert_eq!((runs.len(), runs[0].chunks), (2, 25));
    }

    #[test]
    fn scattered_and_degenerate_axes_merge_or_vanish() {
        // Axes 0 and 2 of [6, 50, 7] are reduced, the innermost is not: columns over 50 outputs
        // of 42 elements in two reduced axes.
        let runs = check("mean", &[6, 50, 7], &[0, 2], 132);
        assert_eq!((runs[0].pass, runs[0].outputs, runs[0].count), (Pass::Rows, 50, 42));
        let runs = check("sum", &[6, 50, 7], &[0, 1], 132);
        assert_eq!((runs[0].pass, runs[0].outputs, runs[0].reduced.rank), (Pass::Columns, 7, 1));
        // The middle axis of three: outputs in two kept axes, 32 columns per tile across them.
        let runs = check("max", &[2, 70, 48], &[1], 132);
        assert_eq!((runs[0].pass, runs[0].kept.rank, runs[0].outputs), (Pass::Columns, 2, 96));
        let runs = check("max", &[1, 5, 1, 4], &[0, 3], 8);
        assert_eq!((runs[0].outputs, runs[0].count, runs[0].kept.rank), (5, 4, 1));
        // Size-one reduced axes: each output is one element.
        let runs = check("sum", &[5, 1], &[1], 8);
        assert_eq!((runs[0].outputs, runs[0].count, runs[0].pass), (5, 1, Pass::Columns));
        check("max", &[4, 9], &[0, 1], 1);
        assert_eq!(merged_axes(&[2, 3, 4, 5], &[1, 2]), (vec![(2, 60), (5, 1)], vec![(12, 5)]));
    }

    #[test]
    fn every_stage_has_a_kernel_with_its_types() {
        for pass in [Pass::Rows, Pass::Columns] {
            for stage in Stage::ALL {
                let source = reduce_kernel("mean", DType::BF16, pass, stage).expect("bf16");
                assert_eq!(source.code.matches("__global__").count(), 1, "{}", source.entry);
                assert!(source.code.contains(&format!("void {}(", source.entry)));
                let input = if stage == Stage::Combine { "const A*" } else { "const T*" };
                assert!(
                    source.code.contains(&format!("({input} __restrict__ x")),
                    "{}",
                    source.entry
                );
            }
        }
        assert!(reduce_kernel("sum", DType::I64, Pass::Rows, Stage::Whole).is_err());
        assert!(reduce_kernel("prod", DType::F32, Pass::Rows, Stage::Whole).is_err());
        assert!(plan("prod", &[3], &[0], 8).is_err());
    }
}
