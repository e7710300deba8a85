//! Tensor creation, casts and safetensors files.

mod common;

use std::collections::BTreeMap;

use meshflow_ops::io::{self, Named};
use meshflow_ops::random::uniform_at;
use meshflow_ops::{DType, Tensor};

use common::{expect_error, values};

#[test]
fn filled_tensors_hold_their_value_in_every_dtype() {
    for dtype in DType::ALL {
        let t = Tensor::full([2, 3], 3.0, dtype);
        let expected = if dtype == DType::Bool { 1.0 } else { 3.0 };
        assert_eq!(values(&t), vec![expected; 6], "{dtype}");
        assert_eq!(values(&Tensor::ones([4], dtype)), vec![1.0; 4], "{dtype}");
        assert_eq!(values(&Tensor::zeros([4], dtype)), vec![0.0; 4], "{dtype}");
    }
    assert_eq!(values(&Tensor::scalar(2.5, DType::F32)), vec![2.5]);
    assert_eq!(Tensor::scalar(2.5, DType::F32).dims(), &[] as &[usize]);
}

#[test]
fn arange_matches_torch_semantics() {
    let t = Tensor::arange(0.0, 5.0, 1.0, DType::I64).unwrap();
    assert_eq!(t.to_vec::<i64>().unwrap(), vec![0, 1, 2, 3, 4]);
    let t = Tensor::arange(1.0, 2.0, 0.25, DType::F32).unwrap();
    assert_eq!(t.to_vec::<f32>().unwrap(), vec![1.0, 1.25, 1.5, 1.75]);
    let t = Tensor::arange(3.0, 0.0, -1.5, DType::F64).unwrap();
    assert_eq!(t.to_vec::<f64>().unwrap(), vec![3.0, 1.5]);
    expect_error(Tensor::arange(0.0, 1.0, 0.0, DType::F32), &["arange", "step 0"]);
    expect_error(Tensor::arange(0.0, 1.0, -1.0, DType::F32), &["arange"]);
}

#[test]
fn random_tensors_are_reproducible_and_distributed() {
    let a = Tensor::randn([100, 100], 1.0, 2.0, DType::F32, 7).unwrap();
    let b = Tensor::randn([100, 100], 1.0, 2.0, DType::F32, 7).unwrap();
    let c = Tensor::randn([100, 100], 1.0, 2.0, DType::F32, 8).unwrap();
    assert_eq!(values(&a), values(&b));
    assert_ne!(values(&a), values(&c));
    let v = values(&a);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
    assert!((mean - 1.0).abs() < 0.1, "mean {mean}");
    assert!((var.sqrt() - 2.0).abs() < 0.1, "std {}", var.sqrt());
    let u = values(&Tensor::rand_uniform([10_000], -1.0, 3.0, DType::BF16, 1).unwrap());
    assert!(u.iter().all(|&x| (-1.0..=3.0).contains(&x)));
    let mean = u.iter().sum::<f64>() / u.len() as f64;
    assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
    expect_error(Tensor::randn([2], 0.0, 1.0, DType::I64, 0), &["randn", "i64"]);
    expect_error(Tensor::randn([2], 0.0, -1.0, DType::F32, 0), &["randn", "std -1"]);
}

#[test]
fn counter_based_uniforms_depend_only_on_seed_and_index() {
    let first: Vec<f32> = (0..1000).map(|i| uniform_at(5, i)).collect();
    assert_eq!(first[500], uniform_at(5, 500));
    assert_ne!(uniform_at(5, 500), uniform_at(6, 500));
    assert!(first.iter().all(|&u| (0.0..1.0).contains(&u)));
    let mean = first.iter().sum::<f32>() / 1000.0;
    assert!((mean - 0.5).abs() < 0.05, "mean {mean}");
}

#[test]
fn casts_between_all_dtypes_round_trip_small_integers() {
    let source = Tensor::from_vec(vec![0.0f64, 1.0, 2.0, 7.0, 100.0], [5]).unwrap();
    for from in DType::ALL {
        for to in DType::ALL {
            let there = source.to_dtype(from).unwrap().to_dtype(to).unwrap();
            assert_eq!(there.dtype(), to);
            let expected: Vec<f64> = if from == DType::Bool || to == DType::Bool {
                vec![0.0, 1.0, 1.0, 1.0, 1.0]
            } else {
                vec![0.0, 1.0, 2.0, 7.0, 100.0]
            };
            assert_eq!(values(&there), expected, "{from} -> {to}");
        }
    }
    let t = Tensor::from_vec(vec![-1.7f32, 2.9, 1e10], [3]).unwrap();
    assert_eq!(t.to_dtype(DType::I32).unwrap().to_vec::<i32>().unwrap(), vec![-1, 2, i32::MAX]);
    assert_eq!(t.to_dtype(DType::U8).unwrap().to_vec::<u8>().unwrap(), vec![0, 2, 255]);
}

#[test]
fn safetensors_round_trip_every_dtype_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    let mut named = Named::default();
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        let t = Tensor::arange(0.0, 6.0, 1.0, DType::F64).unwrap().to_dtype(dtype).unwrap();
        named.tensors.insert(format!("t{i}.{dtype}"), t.reshaped([2, 3]).unwrap());
    }
    named.metadata = BTreeMap::from([("config".to_string(), r#"{"n_layer": 2}"#.to_string())]);
    io::save(&path, &named).unwrap();
    let back = io::load(&path).unwrap();
    assert_eq!(back.metadata, named.metadata);
    assert_eq!(back.tensors.len(), DType::ALL.len());
    for (name, tensor) in &named.tensors {
        let read = back.tensor(name, "weights").unwrap();
        assert_eq!(read.meta(), tensor.meta(), "{name}");
        assert_eq!(read.bytes().unwrap(), tensor.bytes().unwrap(), "{name}");
    }
    expect_error(
        back.tensor("missing", "weights.safetensors"),
        &["weights.safetensors", "missing"],
    );
}

#[test]
fn bad_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing.safetensors");
    expect_error(io::load(&missing), &["nothing.safetensors"]);
    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(&corrupt, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ").unwrap();
    expect_error(io::load(&corrupt), &["corrupt.safetensors"]);
    let truncated = dir.path().join("short.safetensors");
    std::fs::write(&truncated, b"\x01").unwrap();
    expect_error(io::load(&truncated), &["short.safetensors"]);
}
