//! Test helpers shared by the op test files (`ops/tests/*.rs` declare `mod common;`).
//!
//! Golden files (see `scripts/golden/golden.py` for the convention) are read with
//! [`Golden::load`]`(group)`; each [`Case`] holds its op name, attributes, inputs, outputs,
//! cotangents and gradients. A test maps the op name and attributes to an [`OpRef`] and calls:
//!
//! - [`check_group`]`(group, make)`: every case of `ops/tests/golden/<group>.safetensors` is run
//!   eagerly by [`run_case`] (forward vs golden outputs, gradients of `Σ out·cot` vs golden
//!   gradients, tolerances from [`tolerance`]); then, for f32/f64 cases, [`finite_differences`] in
//!   f64. It panics listing every failing case, and when `make` maps no op for a case.
//! - [`run_case`]`(&case, op)` and [`finite_differences`]`(op, &inputs, max_elements)` one by one.
//! - [`assert_close`]`(actual, expected, tol, what)` / [`close`] compare any two float tensors.
//! - [`values`]`(&tensor)` gives the elements as `Vec<f64>`; [`tensor`]`(data, shape, dtype)`
//!   builds one from f64 values.
//! - [`expect_error`]`(result, &["mul", "[2, 3]"])` asserts an `Err` whose message holds each word.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use meshflow_ops::eager::Tape;
use meshflow_ops::io::{self, Named};
use meshflow_ops::{Context, DType, Emit, OpRef, Tensor, Value};

/// Absolute and relative tolerance: `|a − e| ≤ atol + rtol·|e|`.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    /// Absolute part.
    pub atol: f64,
    /// Relative part.
    pub rtol: f64,
}

/// Forward tolerance per dtype; gradients get [`grad_tolerance`].
pub fn tolerance(dtype: DType) -> Tolerance {
    match dtype {
        DType::F64 => Tolerance { atol: 1e-10, rtol: 1e-8 },
        DType::F32 => Tolerance { atol: 1e-5, rtol: 1e-4 },
        DType::F16 => Tolerance { atol: 2e-3, rtol: 4e-3 },
        DType::BF16 => Tolerance { atol: 1e-2, rtol: 2e-2 },
        _ => Tolerance { atol: 0.0, rtol: 0.0 },
    }
}

/// Gradient tolerance per dtype (backward ops round more often than the forward).
pub fn grad_tolerance(dtype: DType) -> Tolerance {
    let Tolerance { atol, rtol } = tolerance(dtype);
    Tolerance { atol: atol * 10.0, rtol: rtol * 5.0 }
}

/// The elements of any tensor as f64.
pub fn values(tensor: &Tensor) -> Vec<f64> {
    tensor.to_dtype(DType::F64).and_then(|t| t.to_vec::<f64>()).expect("cast to f64")
}

/// A tensor of `dtype` from f64 values.
pub fn tensor(data: Vec<f64>, shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_vec(data, shape.to_vec()).and_then(|t| t.to_dtype(dtype)).expect("tensor")
}

/// `Ok` when shapes agree and every element is within `tol`; else a message naming `what`.
pub fn close(actual: &Tensor, expected: &Tensor, tol: Tolerance, what: &str) -> Result<(), String> {
    if actual.shape() != expected.shape() {
        return Err(format!("{what}: shape {} vs expected {}", actual.shape(), expected.shape()));
    }
    let (a, e) = (values(actual), values(expected));
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&x, &y)) in a.iter().zip(&e).enumerate() {
        let same = x == y || (x.is_nan() && y.is_nan());
        let excess = (x - y).abs() - (tol.atol + tol.rtol * y.abs());
        let outside = excess > 0.0 || excess.is_nan();
        if !same && outside && worst.is_none_or(|(_, w)| excess > w) {
            worst = Some((i, excess));
        }
    }
    match worst {
        None => Ok(()),
        Some((i, _)) => Err(format!(
            "{what}: element {i} is {} but expected {} (tolerance {tol:?}, shape {})",
            a[i],
            e[i],
            actual.shape()
        )),
    }
}

/// Panics unless [`close`].
pub fn assert_close(actual: &Tensor, expected: &Tensor, tol: Tolerance, what: &str) {
    if let Err(message) = close(actual, expected, tol, what) {
        panic!("{message}");
    }
}

/// Asserts `result` is an error whose message contains each of `words`; returns the message.
pub fn expect_error<T: std::fmt::Debug>(result: meshflow_ops::Result<T>, words: &[&str]) -> String {
    let message = match result {
        Ok(value) => panic!("expected an error mentioning {words:?}, got Ok({value:?})"),
        Err(error) => error.to_string(),
    };
    for word in words {
        assert!(message.contains(word), "error {message:?} does not mention {word:?}");
    }
    message
}

/// One golden case.
#[derive(Clone, Debug)]
pub struct Case {
    /// Case name.
    pub name: String,
    /// Op name (the `op` attribute).
    pub op: String,
    /// The other attributes.
    pub attrs: serde_json::Map<String, serde_json::Value>,
    /// Inputs in order.
    pub inputs: Vec<Tensor>,
    /// Golden outputs.
    pub outputs: Vec<Tensor>,
    /// Cotangents, per output (`None` for outputs without one).
    pub cotangents: Vec<Option<Tensor>>,
    /// Golden gradients, per input (`None` for non-float inputs).
    pub grads: Vec<Option<Tensor>>,
}

impl Case {
    fn attr(&self, key: &str) -> &serde_json::Value {
        self.attrs.get(key).unwrap_or_else(|| panic!("case {}: no attribute {key}", self.name))
    }

    /// True when the attribute exists.
    pub fn has(&self, key: &str) -> bool {
        self.attrs.contains_key(key)
    }

    /// An integer attribute.
    pub fn int(&self, key: &str) -> i64 {
        self.attr(key).as_i64().unwrap_or_else(|| panic!("case {}: {key} not an int", self.name))
    }

    /// A float attribute.
    pub fn float(&self, key: &str) -> f64 {
        self.attr(key).as_f64().unwrap_or_else(|| panic!("case {}: {key} not a float", self.name))
    }

    /// A boolean attribute.
    pub fn flag(&self, key: &str) -> bool {
        self.attr(key).as_bool().unwrap_or_else(|| panic!("case {}: {key} not a bool", self.name))
    }

    /// A string attribute.
    pub fn text(&self, key: &str) -> String {
        let value = self.attr(key).as_str();
        value.unwrap_or_else(|| panic!("case {}: {key} not a string", self.name)).to_string()
    }

    /// A list-of-integers attribute (axes, shapes, sizes).
    pub fn ints(&self, key: &str) -> Vec<i64> {
        let list = self.attr(key).as_array();
        let list = list.unwrap_or_else(|| panic!("case {}: {key} not a list", self.name));
        list.iter().map(|v| v.as_i64().expect("int in list")).collect()
    }

    /// Axes as `isize`.
    pub fn axes(&self, key: &str) -> Vec<isize> {
        self.ints(key).into_iter().map(|v| v as isize).collect()
    }

    /// Sizes as `usize`.
    pub fn sizes(&self, key: &str) -> Vec<usize> {
        self.ints(key).into_iter().map(|v| v as usize).collect()
    }

    /// The dtype of the first float input (the case's compute dtype).
    pub fn dtype(&self) -> DType {
        let float = self.inputs.iter().find(|t| t.dtype().is_float());
        float.map_or(DType::F64, |t| t.dtype())
    }
}

/// A golden file.
pub struct Golden {
    /// Group name (`ops/tests/golden/<group>.safetensors`).
    pub group: String,
    named: Named,
    cases: BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
}

impl Golden {
    /// Reads `ops/tests/golden/<group>.safetensors`.
    pub fn load(group: &str) -> Golden {
        let path = format!("{}/tests/golden/{group}.safetensors", env!("CARGO_MANIFEST_DIR"));
        let named = io::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let json = named.metadata.get("cases").unwrap_or_else(|| panic!("{path}: no cases key"));
        let cases = serde_json::from_str(json).unwrap_or_else(|e| panic!("{path}: cases: {e}"));
        Golden { group: group.to_string(), named, cases }
    }

    fn indexed(&self, case: &str, kind: &str) -> Vec<Option<Tensor>> {
        let prefix = format!("{case}.{kind}.");
        let mut found: BTreeMap<usize, Tensor> = BTreeMap::new();
        for (name, tensor) in &self.named.tensors {
            if let Some(index) = name.strip_prefix(&prefix).and_then(|i| i.parse().ok()) {
                found.insert(index, tensor.clone());
            }
        }
        let count = found.keys().next_back().map_or(0, |&i| i + 1);
        (0..count).map(|i| found.get(&i).cloned()).collect()
    }

    /// Every case, in name order.
    pub fn cases(&self) -> Vec<Case> {
        self.cases.iter().map(|(name, attrs)| self.case_from(name, attrs)).collect()
    }

    fn case_from(&self, name: &str, attrs: &serde_json::Map<String, serde_json::Value>) -> Case {
        let mut attrs = attrs.clone();
        let op = attrs.remove("op").and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        let inputs: Vec<Tensor> = self.indexed(name, "in").into_iter().flatten().collect();
        let outputs: Vec<Tensor> = self.indexed(name, "out").into_iter().flatten().collect();
        let mut cotangents = self.indexed(name, "cot");
        cotangents.resize(outputs.len(), None);
        let mut grads = self.indexed(name, "grad");
        grads.resize(inputs.len(), None);
        Case { name: name.to_string(), op, attrs, inputs, outputs, cotangents, grads }
    }
}

/// Runs `op` on the case's inputs on an eager tape; compares outputs and gradients to golden.
pub fn run_case(case: &Case, op: OpRef) -> Result<(), String> {
    let mut tape = Tape::new(Context::single_thread());
    let inputs: Vec<Value> = case.inputs.iter().map(|t| tape.leaf(t.clone())).collect();
    let outputs = tape.emit(op, &inputs).map_err(|e| format!("{}: forward: {e}", case.name))?;
    if outputs.len() != case.outputs.len() {
        return Err(format!(
            "{}: {} outputs, golden has {}",
            case.name,
            outputs.len(),
            case.outputs.len()
        ));
    }
    for (j, (&out, golden)) in outputs.iter().zip(&case.outputs).enumerate() {
        let tol = tolerance(golden.dtype());
        close(tape.tensor(out), golden, tol, &format!("{} out.{j}", case.name))?;
    }
    let (with_cot, cots): (Vec<Value>, Vec<Value>) = outputs
        .iter()
        .zip(&case.cotangents)
        .filter_map(|(&out, cot)| cot.as_ref().map(|c| (out, c.clone())))
        .map(|(out, cot)| (out, tape.leaf(cot)))
        .unzip();
    let wrt: Vec<usize> = (0..inputs.len()).filter(|&i| case.grads[i].is_some()).collect();
    if with_cot.is_empty() || wrt.is_empty() {
        return Ok(());
    }
    let wrt_values: Vec<Value> = wrt.iter().map(|&i| inputs[i]).collect();
    let grads = tape
        .gradients(&with_cot, &cots, &wrt_values)
        .map_err(|e| format!("{}: backward: {e}", case.name))?;
    for (&i, grad) in wrt.iter().zip(grads) {
        let golden = case.grads[i].as_ref().expect("filtered on Some");
        let actual = match grad {
            Some(g) => tape.tensor(g).clone(),
            None => Tensor::zeros(golden.shape().clone(), golden.dtype()),
        };
        close(&actual, golden, grad_tolerance(golden.dtype()), &format!("{} grad.{i}", case.name))?;
    }
    Ok(())
}

/// A deterministic pseudo-random value in [-1, 1) (a small xorshift, no dependency).
fn noise(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

/// The outputs of `op` on `inputs`, as f64 values.
fn outputs_f64(op: &OpRef, inputs: &[Tensor]) -> Result<Vec<Vec<f64>>, String> {
    let outputs = op.forward(&Context::single_thread(), inputs).map_err(|e| e.to_string())?;
    Ok(outputs.iter().map(values).collect())
}

/// `Σ_j sum((a_j − b_j) · cot_j)`: the loss difference, summed term by term so that large
/// constant outputs (masked −1e9) cancel exactly.
fn loss_difference(a: &[Vec<f64>], b: &[Vec<f64>], cots: &[Vec<f64>]) -> f64 {
    let terms = a.iter().zip(b).zip(cots);
    terms
        .map(|((a, b), c)| a.iter().zip(b).zip(c).map(|((x, y), w)| (x - y) * w).sum::<f64>())
        .sum()
}

/// Checks the gradients of `op` at `inputs` (float inputs cast to f64) against central finite
/// differences of `Σ out·cot` (random `cot`), at up to `max_elements` positions per input.
/// Skipped (Ok) when an output is a float narrower than f64 even with f64 inputs (casts).
pub fn finite_differences(op: OpRef, inputs: &[Tensor], max_elements: usize) -> Result<(), String> {
    let inputs: Vec<Tensor> =
        inputs
            .iter()
            .map(|t| {
                if t.dtype().is_float() {
                    t.to_dtype(DType::F64).expect("cast")
                } else {
                    t.clone()
                }
            })
            .collect();
    let mut tape = Tape::new(Context::single_thread());
    let leaves: Vec<Value> = inputs.iter().map(|t| tape.leaf(t.clone())).collect();
    let outputs = tape.emit(op.clone(), &leaves).map_err(|e| format!("{}: {e}", op.name()))?;
    if outputs.iter().any(|&v| tape.meta(v).dtype.is_float() && tape.meta(v).dtype != DType::F64) {
        return Ok(()); // an output in a narrower float (a cast): differences would be noise
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let float_outputs: Vec<Value> =
        outputs.iter().copied().filter(|&v| tape.meta(v).dtype.is_float()).collect();
    let cots: Vec<Vec<f64>> = outputs
        .iter()
        .map(|&v| (0..tape.meta(v).shape.numel()).map(|_| noise(&mut state)).collect())
        .collect();
    let mut cot_values = Vec::new();
    for (&v, c) in outputs.iter().zip(&cots) {
        let meta = tape.meta(v);
        if meta.dtype.is_float() {
            cot_values.push(tape.leaf(tensor(c.clone(), meta.shape.dims(), DType::F64)));
        }
    }
    let wrt: Vec<usize> = (0..inputs.len()).filter(|&i| inputs[i].dtype().is_float()).collect();
    let wrt_values: Vec<Value> = wrt.iter().map(|&i| leaves[i]).collect();
    let grads = tape
        .gradients(&float_outputs, &cot_values, &wrt_values)
        .map_err(|e| format!("{}: backward: {e}", op.name()))?;
    for (&i, grad) in wrt.iter().zip(grads) {
        let analytic =
            grad.map_or_else(|| vec![0.0; inputs[i].numel()], |g| values(tape.tensor(g)));
        check_input(&op, &inputs, i, &analytic, &cots, max_elements)?;
    }
    Ok(())
}

fn check_input(
    op: &OpRef,
    inputs: &[Tensor],
    i: usize,
    analytic: &[f64],
    cots: &[Vec<f64>],
    max_elements: usize,
) -> Result<(), String> {
    let base = values(&inputs[i]);
    let step = base.len().div_ceil(max_elements.max(1)).max(1);
    let eps = 1e-6;
    for k in (0..base.len()).step_by(step) {
        let mut shifted = inputs.to_vec();
        let mut probe = |delta: f64| -> Result<Vec<Vec<f64>>, String> {
            let mut data = base.clone();
            data[k] += delta;
            shifted[i] = tensor(data, inputs[i].dims(), DType::F64);
            outputs_f64(op, &shifted)
        };
        let (up, down) = (probe(eps)?, probe(-eps)?);
        let numeric = loss_difference(&up, &down, cots) / (2.0 * eps);
        let tol = 1e-5 + 1e-4 * numeric.abs();
        if (numeric - analytic[k]).abs() > tol {
            return Err(format!(
                "{}: d/d input {i}[{k}]: analytic {} vs finite difference {numeric}",
                op.name(),
                analytic[k]
            ));
        }
    }
    Ok(())
}

/// Runs every case of a golden group with the op `make` maps it to (see the module doc).
/// Returns the number of cases checked.
pub fn check_group(group: &str, make: impl Fn(&Case) -> Option<OpRef>) -> usize {
    let golden = Golden::load(group);
    let cases = golden.cases();
    assert!(!cases.is_empty(), "{group}: no cases");
    let mut failures = Vec::new();
    for case in &cases {
        let Some(op) = make(case) else {
            failures.push(format!("{}: no op for {:?}", case.name, case.op));
            continue;
        };
        if let Err(message) = run_case(case, op.clone()) {
            failures.push(message);
            continue;
        }
        let exact = matches!(case.dtype(), DType::F32 | DType::F64);
        if exact && !case.grads.iter().all(Option::is_none) {
            if let Err(message) = finite_differences(op, &case.inputs, 24) {
                failures.push(format!("{}: {message}", case.name));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{group}: {} failing cases:\n{}",
        failures.len(),
        failures.join("\n")
    );
    cases.len()
}

/// An [`OpRef`] from an op value.
pub fn op(op: impl meshflow_ops::Op) -> OpRef {
    Arc::new(op)
}
