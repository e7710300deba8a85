//! Bad programs are refused when they are built or compiled, with errors that name the op, the
//! shapes and the layouts; nothing panics at run time.

use meshflow::ops::{DType, Tensor as HostTensor};
use meshflow::placement::{DeviceType, NdSbp, Placement, Sbp};
use meshflow::session::{Session, SessionConfig};
use meshflow::Graph;

fn mesh(n: usize) -> Placement {
    Placement::line(DeviceType::Cpu, n).unwrap()
}

#[test]
fn shape_mismatch_names_the_op_and_shapes() {
    let g = Graph::new();
    let a = g.input("a", [4, 3], DType::F32, &mesh(1), None).unwrap();
    let b = g.input("b", [5, 2], DType::F32, &mesh(1), None).unwrap();
    let error = a.matmul(&b).unwrap_err().to_string();
    assert!(
        error.contains("matmul") && error.contains("[4, 3]") && error.contains("[5, 2]"),
        "{error}"
    );
}

#[test]
fn inputs_on_two_placements_are_refused() {
    let g = Graph::new();
    let a = g.input("a", [4], DType::F32, &mesh(2), None).unwrap();
    let other = Placement::new(DeviceType::Cpu, vec![2], vec![2, 3]).unwrap();
    let b = g.input("b", [4], DType::F32, &other, None).unwrap();
    let error = a.add(&b).unwrap_err().to_string();
    assert!(error.contains("add") && error.contains("different placements"), "{error}");
    assert!(
        error.contains("cpu:0-1") || error.contains("[0,1]") || error.contains("0-1"),
        "{error}"
    );
}

#[test]
fn split_axis_beyond_the_shape_and_wrong_mesh_axes_are_refused() {
    let g = Graph::new();
    let error = g
        .input("x", [4, 3], DType::F32, &mesh(2), Some(NdSbp(vec![Sbp::Split(2)])))
        .unwrap_err()
        .to_string();
    assert!(error.contains("x") && error.contains("S(2)") && error.contains("[4, 3]"), "{error}");
    let error = g
        .input("y", [4], DType::F32, &mesh(2), Some(NdSbp(vec![Sbp::Broadcast, Sbp::Broadcast])))
        .unwrap_err()
        .to_string();
    assert!(error.contains("y") && error.contains("2 axes"), "{error}");
}

#[test]
fn duplicate_names_and_unfed_inputs_are_errors() {
    let g = Graph::new();
    let w = HostTensor::zeros([2], DType::F32);
    g.parameter("w", w.clone(), &mesh(1), None).unwrap();
    assert!(g.parameter("w", w, &mesh(1), None).unwrap_err().to_string().contains("\"w\""));
    let x = g.input("x", [2], DType::F32, &mesh(1), None).unwrap();
    let y = x.relu().unwrap();
    let mut session = Session::new(&g, &[&y], None, SessionConfig::default()).unwrap();
    let error = session.step(&[]).unwrap_err().to_string();
    assert!(error.contains("input x was not fed"), "{error}");
    let wrong = HostTensor::zeros([3], DType::F32);
    let error = session.step(&[(&x, wrong)]).unwrap_err().to_string();
    assert!(error.contains("feed for x") && error.contains("[3]"), "{error}");
}

/// The error `Session::new` gives for a relu of an input placed on `devices` devices.
fn refused_session(devices: usize, config: SessionConfig) -> String {
    let g = Graph::new();
    let x = g.input("x", [4], DType::F32, &mesh(devices), None).unwrap();
    let y = x.relu().unwrap();
    Session::new(&g, &[&y], None, config).err().expect("refused").to_string()
}

#[test]
fn a_session_without_kernel_threads_or_micro_batches_is_refused() {
    let config = SessionConfig { threads_per_device: 0, ..SessionConfig::default() };
    let error = refused_session(1, config);
    assert!(error.contains("threads_per_device 0") && error.contains("at least 1"), "{error}");
    let config = SessionConfig { micro_batches: 0, ..SessionConfig::default() };
    let error = refused_session(1, config);
    assert!(error.contains("micro_batches 0") && error.contains("at least 1"), "{error}");
}

#[test]
fn a_graph_larger_than_the_session_is_refused() {
    let error = refused_session(4, SessionConfig { devices: 2, ..SessionConfig::default() });
    assert!(error.contains("rank 2") && error.contains("2 devices"), "{error}");
}

#[test]
fn a_kernel_failing_on_one_rank_is_the_error_reported_not_the_peers_timeout() {
    use std::time::Duration;
    let g = Graph::new();
    let split = Some(NdSbp(vec![Sbp::Split(0)]));
    let ids = g.input("ids", [4], DType::I64, &mesh(2), split).unwrap();
    let table = HostTensor::ones([3, 2], DType::F32);
    let table = g.parameter("table", table, &mesh(2), Some(NdSbp(vec![Sbp::Broadcast]))).unwrap();
    // The sum over the split rows needs a collective, which rank 0 reaches and rank 1 never does.
    let total = table.embedding(&ids).unwrap().sum(&[0, 1], false).unwrap();
    let config =
        SessionConfig { devices: 2, timeout: Duration::from_secs(60), ..Default::default() };
    let mut session = Session::new(&g, &[&total], None, config).unwrap();
    // Rank 1 holds ids 2..4, one of which is outside the table's 3 rows.
    let feed = HostTensor::from_vec(vec![0i64, 1, 2, 7], [4]).unwrap();
    let started = std::time::Instant::now();
    let error = session.step(&[(&ids, feed)]).unwrap_err().to_string();
    assert!(error.contains("rank 1") && error.contains("embedding"), "{error}");
    assert!(!error.contains("timed out"), "{error}");
    // Rank 0 left its collective when rank 1 failed, not at the 60 s timeout.
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    // The session is dead after an aborted step and says so instead of hanging.
    let feed = HostTensor::from_vec(vec![0i64, 1, 2, 0], [4]).unwrap();
    let again = session.step(&[(&ids, feed)]).unwrap_err().to_string();
    assert!(again.contains("aborted") || again.contains("no longer running"), "{again}");
}

#[test]
fn micro_batches_that_do_not_divide_the_batch_are_refused_naming_the_input() {
    use meshflow::ops::ops::sgd::Sgd;
    use meshflow::schedule::Schedule;
    use meshflow::session::{Optimizer, Training};
    let g = Graph::new();
    let x = g.input("x", [6, 2], DType::F32, &mesh(1), None).unwrap();
    let w = g.parameter("w", HostTensor::ones([2, 2], DType::F32), &mesh(1), None).unwrap();
    let loss = x.matmul(&w).unwrap().sum(&[0, 1], false).unwrap();
    let training = Training::new(&loss, Optimizer::Sgd(Sgd::new(0.1)), Schedule::Constant);
    let config = SessionConfig { micro_batches: 4, ..SessionConfig::default() };
    let error = Session::new(&g, &[&loss], Some(training), config).err().expect("refused");
    let error = error.to_string();
    assert!(
        error.contains("input x") && error.contains("6 rows") && error.contains('4'),
        "{error}"
    );
}

#[test]
fn a_value_moved_to_another_placement_computes_there_and_fed_non_inputs_are_refused() {
    let g = Graph::new();
    let x = g.input("x", [4], DType::F32, &mesh(2), Some(NdSbp(vec![Sbp::Split(0)]))).unwrap();
    let other = Placement::new(DeviceType::Cpu, vec![2], vec![2, 3]).unwrap();
    let moved = x.to_placement(&other, Some(NdSbp(vec![Sbp::Broadcast]))).unwrap();
    assert_eq!(moved.placement(), other);
    let y = moved.mul_scalar(2.0).unwrap();
    let config = SessionConfig { devices: 4, ..SessionConfig::default() };
    let mut session = Session::new(&g, &[&y], None, config).unwrap();
    let feed = HostTensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], [4]).unwrap();
    let out = session.step(&[(&x, feed.clone())]).unwrap();
    assert_eq!(out[0].to_vec::<f32>().unwrap(), [2.0, 4.0, 6.0, 8.0]);
    let error = session.step(&[(&x, feed.clone()), (&y, feed)]).unwrap_err().to_string();
    assert!(error.contains("is not an input"), "{error}");
}

#[test]
fn a_split_the_devices_do_not_divide_is_never_chosen_for_a_reshape() {
    // x [6, 4] split by rows on 4 devices holds rows 2, 2, 1, 1; its reshape [3, 8] split by rows
    // would hold rows 1, 1, 1, 0, which are other elements: selection must not pick S(0) -> S(0)
    // for the reshape (lowering refused it before), and the values come out right.
    let g = Graph::new();
    let x = g.input("x", [6, 4], DType::F32, &mesh(4), Some(NdSbp(vec![Sbp::Split(0)]))).unwrap();
    let y = x.reshape([3, 8]).unwrap().mul_scalar(2.0).unwrap();
    let config = SessionConfig { devices: 4, ..SessionConfig::default() };
    let mut session = Session::new(&g, &[&y], None, config).unwrap();
    let chosen = &session.program().selection.ops;
    let reshape = chosen.iter().find(|op| op.name.starts_with("reshape#")).unwrap();
    assert_ne!(reshape.signature.inputs[0], NdSbp(vec![Sbp::Split(0)]), "{reshape:?}");
    let values: Vec<f32> = (0..24).map(|v| v as f32).collect();
    let feed = HostTensor::from_vec(values.clone(), [6, 4]).unwrap();
    let out = session.step(&[(&x, feed)]).unwrap();
    assert_eq!(out[0].dims(), [3, 8]);
    assert_eq!(out[0].to_vec::<f32>().unwrap(), values.iter().map(|v| 2.0 * v).collect::<Vec<_>>());
}

#[test]
fn a_second_order_gradient_through_a_fused_gradient_op_is_an_error_naming_it() {
    // The gradient of layer_norm is one fused op (layer_norm_grad), whose own gradient is not
    // implemented: asking for it must be a build error naming that op, not a panic or zeros.
    let g = Graph::new();
    let placement = mesh(1);
    let x = g.input("x", [2, 4], DType::F32, &placement, None).unwrap();
    let weight = g.input("w", [4], DType::F32, &placement, None).unwrap();
    let bias = g.input("b", [4], DType::F32, &placement, None).unwrap();
    let loss = x.layer_norm(&weight, &bias, 1e-5).unwrap().tanh().unwrap().sum(&[], false).unwrap();
    let grads = g.gradients(&loss, &[&x]).unwrap();
    let dx = grads[0].clone().expect("the loss depends on x");
    let second = dx.mul(&dx).unwrap().sum(&[], false).unwrap();
    let error = g.gradients(&second, &[&x]).unwrap_err().to_string();
    for part in ["layer_norm_grad", "second-order"] {
        assert!(error.contains(part), "{part:?} missing from: {error}");
    }
}

#[test]
fn a_step_failing_on_bad_data_keeps_the_weights_it_did_not_update() {
    use meshflow::ops::ops::adamw::AdamW;
    use meshflow::schedule::Schedule;
    use meshflow::session::{Optimizer, Training};
    // Parameters are updated in place when the step owns them; a step that fails before its
    // update (an id outside the table) must leave them readable and unchanged, so the user can
    // still save what the previous steps trained.
    let g = Graph::new();
    let ids = g.input("ids", [4], DType::I64, &mesh(1), None).unwrap();
    let table = HostTensor::from_vec((0..6).map(|v| v as f32).collect::<Vec<_>>(), [3, 2]).unwrap();
    let table = g.parameter("table", table, &mesh(1), None).unwrap();
    let rows = table.embedding(&ids).unwrap();
    let loss = rows.mul(&rows).unwrap().mean(&[], false).unwrap();
    let training = Training::new(&loss, Optimizer::AdamW(AdamW::new(0.1)), Schedule::Constant);
    let mut session = Session::new(&g, &[&loss], Some(training), SessionConfig::default()).unwrap();
    let good = HostTensor::from_vec(vec![0i64, 1, 2, 1], [4]).unwrap();
    session.step(&[(&ids, good)]).unwrap();
    let trained = session.variables().unwrap();
    let table_of = |variables: &[(String, HostTensor)]| {
        let (_, value) = variables.iter().find(|(name, _)| name == "table").expect("table");
        value.to_vec::<f32>().unwrap()
    };
    assert_ne!(table_of(&trained), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], "the first step trained");
    let bad = HostTensor::from_vec(vec![0i64, 1, 9, 1], [4]).unwrap();
    let error = session.step(&[(&ids, bad)]).unwrap_err().to_string();
    assert!(error.contains("embedding"), "{error}");
    let after = session.variables().expect("weights the failed step never updated stay readable");
    assert_eq!(table_of(&after), table_of(&trained));
}
