//! The collective conformance check shared by the in-process, threaded-QUIC and multi-process
//! tests: every collective on one member, compared with a reference computed locally.

#![allow(dead_code)]

use half::{bf16, f16};
use meshflow_comm::{chunk, Communicator, ReduceOp};
use meshflow_ops::{DType, Tensor};

/// The dtypes every collective must handle.
pub const DTYPES: [DType; 6] =
    [DType::F32, DType::F64, DType::BF16, DType::F16, DType::I64, DType::I32];

/// A small integer (exact in every dtype, and so are sums of five of them).
pub fn value(member: usize, index: usize, salt: usize) -> f64 {
    ((member * 7 + index * 3 + salt * 5) % 9) as f64 - 4.0
}

/// A tensor of `dtype` holding `values`.
pub fn tensor(dtype: DType, values: &[f64], dims: &[usize]) -> Tensor {
    let shape = dims.to_vec();
    let result = match dtype {
        DType::F32 => Tensor::from_vec(values.iter().map(|&v| v as f32).collect(), shape),
        DType::F64 => Tensor::from_vec(values.to_vec(), shape),
        DType::BF16 => Tensor::from_vec(values.iter().map(|&v| bf16::from_f64(v)).collect(), shape),
        DType::F16 => Tensor::from_vec(values.iter().map(|&v| f16::from_f64(v)).collect(), shape),
        DType::I64 => Tensor::from_vec(values.iter().map(|&v| v as i64).collect(), shape),
        DType::I32 => Tensor::from_vec(values.iter().map(|&v| v as i32).collect(), shape),
        other => panic!("no test values for {other}"),
    };
    result.expect("test tensor")
}

/// The elements of a tensor as f64.
pub fn values(tensor: &Tensor) -> Vec<f64> {
    let result: Vec<f64> = match tensor.dtype() {
        DType::F32 => tensor.as_slice::<f32>().expect("f32").iter().map(|&v| v as f64).collect(),
        DType::F64 => tensor.to_vec::<f64>().expect("f64"),
        DType::BF16 => {
            tensor.as_slice::<bf16>().expect("bf16").iter().map(|v| v.to_f64()).collect()
        }
        DType::F16 => tensor.as_slice::<f16>().expect("f16").iter().map(|v| v.to_f64()).collect(),
        DType::I64 => tensor.as_slice::<i64>().expect("i64").iter().map(|&v| v as f64).collect(),
        DType::I32 => tensor.as_slice::<i32>().expect("i32").iter().map(|&v| v as f64).collect(),
        other => panic!("no test values for {other}"),
    };
    result
}

fn input(member: usize, rows: usize, columns: usize, salt: usize) -> Vec<f64> {
    (0..rows * columns).map(|index| value(member, index, salt)).collect()
}

fn reduced(size: usize, count: usize, salt: usize, operation: ReduceOp) -> Vec<f64> {
    (0..count)
        .map(|index| {
            let all = (0..size).map(|member| value(member, index, salt));
            match operation {
                ReduceOp::Sum => all.sum(),
                ReduceOp::Max => all.fold(f64::MIN, f64::max),
            }
        })
        .collect()
}

/// Runs every collective once for `dtype` on this member and checks the result; `large` adds an
/// all-reduce big enough for the ring algorithm.
pub fn check_all_collectives<C: Communicator + ?Sized>(
    communicator: &mut C,
    dtype: DType,
    large: bool,
) {
    let (n, i) = (communicator.group_size(), communicator.group_index());
    let columns = 3;
    let rows = 2 * n + 1; // never divisible by n > 1: uneven chunks
    let context = format!("dtype {dtype}, member {i} of {n}");

    for (salt, operation) in [(0, ReduceOp::Sum), (1, ReduceOp::Max)] {
        let mine = tensor(dtype, &input(i, rows, columns, salt), &[rows, columns]);
        let result = communicator.all_reduce(&mine, operation).expect("all_reduce");
        assert_eq!(result.dims(), &[rows, columns], "{context}");
        assert_eq!(
            values(&result),
            reduced(n, rows * columns, salt, operation),
            "all_reduce {operation:?} {context}"
        );
    }

    if large {
        let count = 40_003;
        let mine = tensor(dtype, &input(i, count, 1, 2), &[count]);
        let result = communicator.all_reduce(&mine, ReduceOp::Sum).expect("large all_reduce");
        assert_eq!(
            values(&result),
            reduced(n, count, 2, ReduceOp::Sum),
            "large all_reduce {context}"
        );
    }

    let mine = tensor(dtype, &input(i, rows, columns, 3), &[rows, columns]);
    let result = communicator.reduce_scatter(&mine, ReduceOp::Sum).expect("reduce_scatter");
    let own = chunk(rows, n, i);
    let full = reduced(n, rows * columns, 3, ReduceOp::Sum);
    assert_eq!(result.dims(), &[own.len(), columns], "{context}");
    assert_eq!(
        values(&result),
        full[own.start * columns..own.end * columns].to_vec(),
        "reduce_scatter {context}"
    );

    // All-gather of uneven parts: member j holds j + 1 rows.
    let mine = tensor(dtype, &input(i, i + 1, columns, 4), &[i + 1, columns]);
    let result = communicator.all_gather(&mine).expect("all_gather");
    let expected: Vec<f64> =
        (0..n).flat_map(|member| input(member, member + 1, columns, 4)).collect();
    assert_eq!(result.dims(), &[n * (n + 1) / 2, columns], "{context}");
    assert_eq!(values(&result), expected, "all_gather {context}");

    let mine = tensor(dtype, &input(i, rows, columns, 5), &[rows, columns]);
    let result = communicator.all_to_all(&mine).expect("all_to_all");
    let own = chunk(rows, n, i);
    let expected: Vec<f64> = (0..n)
        .flat_map(|member| {
            input(member, rows, columns, 5)[own.start * columns..own.end * columns].to_vec()
        })
        .collect();
    assert_eq!(values(&result), expected, "all_to_all {context}");

    let root = n - 1;
    let mine = tensor(dtype, &input(root, 5, 1, 6), &[5]);
    let result = communicator.broadcast((i == root).then_some(&mine), root).expect("broadcast");
    assert_eq!(values(&result), input(root, 5, 1, 6), "broadcast {context}");

    let root = n / 2;
    let mine = tensor(dtype, &input(i, rows, 1, 7), &[rows]);
    let result = communicator.reduce(&mine, ReduceOp::Max, root).expect("reduce");
    match result {
        Some(result) => {
            assert_eq!(i, root, "{context}");
            assert_eq!(values(&result), reduced(n, rows, 7, ReduceOp::Max), "reduce {context}");
        }
        None => assert_ne!(i, root, "{context}"),
    }

    // Point to point around the ring.
    let mine = tensor(dtype, &input(i, 4, 1, 8), &[4]);
    communicator.send(&mine, (i + 1) % n).expect("send");
    let received = communicator.recv((i + n - 1) % n).expect("recv");
    assert_eq!(values(&received), input((i + n - 1) % n, 4, 1, 8), "send/recv {context}");
}
