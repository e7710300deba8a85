//! DOT pictures of a compiled program: every op and step drawn, SBPs on the edges, boxed edges
//! marked, one cluster per placement.

use meshflow::compile::{Step, View};
use meshflow::ops::{DType, Tensor as HostTensor};
use meshflow::placement::{DeviceType, NdSbp, Placement, Sbp};
use meshflow::session::{Session, SessionConfig};
use meshflow::Graph;

#[test]
fn logical_and_physical_pictures_show_layouts_boxing_and_stages() {
    let g = Graph::new();
    let first = Placement::line(DeviceType::Cpu, 2).unwrap();
    let second = Placement::new(DeviceType::Cpu, vec![2], vec![2, 3]).unwrap();
    let split = |axis| Some(NdSbp(vec![Sbp::Split(axis)]));
    let x = g.input("x", [4, 6], DType::F32, &first, split(0)).unwrap();
    let w = HostTensor::ones([6, 8], DType::F32);
    let w = g.parameter("w", w, &first, split(1)).unwrap();
    let h = x.matmul(&w).unwrap().relu().unwrap();
    let moved = h.to_placement(&second, Some(NdSbp(vec![Sbp::Broadcast]))).unwrap();
    let y = moved.sum(&[0, 1], false).unwrap();
    let config = SessionConfig { devices: 4, ..SessionConfig::default() };
    let session = Session::new(&g, &[&y], None, config).unwrap();
    let program = session.program();

    let logical = program.to_dot(View::Logical);
    assert!(logical.starts_with("digraph meshflow {") && logical.ends_with("}\n"), "{logical}");
    for op in ["matmul", "relu", "to_placement", "sum", "label=\"x\"", "label=\"w\""] {
        assert!(logical.contains(op), "logical picture lacks {op}:\n{logical}");
    }
    assert!(logical.contains("label=\"cpu:0-1\"") && logical.contains("label=\"cpu:2-3\""));
    assert!(logical.contains("[4, 6] (S(0))"), "x's edge carries its shape and SBP:\n{logical}");
    assert!(logical.contains("color=red"), "the stage crossing is a boxed edge:\n{logical}");

    let physical = program.to_dot(View::Physical);
    let boxing = program.steps.iter().filter(|s| matches!(s, Step::Boxing { .. })).count();
    assert!(boxing >= 1);
    assert_eq!(physical.matches("shape=diamond").count(), boxing, "{physical}");
    let kernels = program.steps.iter().filter(|s| matches!(s, Step::Kernel { .. })).count();
    assert_eq!(physical.matches("shape=box").count(), kernels, "{physical}");
    let edges = physical.matches(" -> ").count();
    assert!(edges >= program.steps.len() - 2, "{edges} edges:\n{physical}");
}
