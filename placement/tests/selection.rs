//! Signature selection: fixed SBPs, data- and tensor-parallel MLPs, greedy against search.

use meshflow_placement::select::{select, OpId, OpNode, SelectionGraph, Strategy, TensorSpec};
use meshflow_placement::{CostConfig, DeviceType, Error, NdSbp, Placement, Sbp, Signature};
use proptest::prelude::*;

use Sbp::{Broadcast as B, PartialSum as P, Split as S};

fn signature(inputs: &[Sbp], outputs: &[Sbp]) -> Signature {
    Signature::new(inputs.to_vec(), outputs.to_vec())
}

/// `y = a·b`: rows of `a`, columns of `b`, the contracted axis (partial), or everything.
fn matmul_signatures() -> Vec<Signature> {
    vec![
        signature(&[B, B], &[B]),
        signature(&[S(0), B], &[S(0)]),
        signature(&[B, S(1)], &[S(1)]),
        signature(&[S(1), S(0)], &[P]),
        signature(&[P, B], &[P]),
        signature(&[B, P], &[P]),
    ]
}

/// A non-linear element-wise op on a rank-2 tensor (no partial sums).
fn pointwise_signatures() -> Vec<Signature> {
    vec![signature(&[B], &[B]), signature(&[S(0)], &[S(0)]), signature(&[S(1)], &[S(1)])]
}

/// An identity (linear): partial sums pass through.
fn identity_signatures() -> Vec<Signature> {
    let mut all = pointwise_signatures();
    all.push(signature(&[P], &[P]));
    all
}

/// A parameter or input: any layout but partial.
fn source_signatures() -> Vec<Signature> {
    vec![signature(&[], &[B]), signature(&[], &[S(0)]), signature(&[], &[S(1)])]
}

struct Mlp {
    graph: SelectionGraph,
    x: OpId,
    w1: OpId,
    w2: OpId,
    first: OpId,
    act: OpId,
    second: OpId,
    out: OpId,
}

/// `out = identity(gelu(x·w1)·w2)` with x `[batch, hidden]` and a 4× inner width.
fn mlp(placement: &Placement, batch: usize, hidden: usize) -> Mlp {
    let spec = |rows, cols| TensorSpec::new([rows, cols], 4);
    let (x_spec, w1_spec) = (spec(batch, hidden), spec(hidden, 4 * hidden));
    let (h_spec, w2_spec) = (spec(batch, 4 * hidden), spec(4 * hidden, hidden));
    let node =
        |name: &str, inputs: Vec<TensorSpec>, output: &TensorSpec, sigs: Vec<Signature>, flops| {
            OpNode::new(name, placement.clone(), inputs, vec![output.clone()], &sigs, flops)
                .unwrap()
        };
    let mut graph = SelectionGraph::new();
    let x = graph.add_op(node("x", vec![], &x_spec, source_signatures(), 0));
    let w1 = graph.add_op(node("w1", vec![], &w1_spec, source_signatures(), 0));
    let w2 = graph.add_op(node("w2", vec![], &w2_spec, source_signatures(), 0));
    let flops = (2 * batch * hidden * 4 * hidden) as u64;
    let first = graph.add_op(node(
        "fc1",
        vec![x_spec.clone(), w1_spec],
        &h_spec,
        matmul_signatures(),
        flops,
    ));
    let act = graph.add_op(node("gelu", vec![h_spec.clone()], &h_spec, pointwise_signatures(), 0));
    let second =
        graph.add_op(node("fc2", vec![h_spec, w2_spec], &x_spec, matmul_signatures(), flops));
    let out = graph.add_op(node("out", vec![x_spec.clone()], &x_spec, identity_signatures(), 0));
    for (producer, consumer, input) in [
        (x, first, 0),
        (w1, first, 1),
        (first, act, 0),
        (act, second, 0),
        (w2, second, 1),
        (second, out, 0),
    ] {
        graph.connect(producer, 0, consumer, input).unwrap();
    }
    Mlp { graph, x, w1, w2, first, act, second, out }
}

/// Rebuilds `mlp` with the given ops' outputs fixed.
fn fixed(mlp: Mlp, fixes: &[(OpId, NdSbp)]) -> Mlp {
    let mut graph = SelectionGraph::new();
    for (index, op) in mlp.graph.ops().iter().enumerate() {
        let mut op = op.clone();
        if let Some((_, nd)) = fixes.iter().find(|(id, _)| id.0 == index) {
            op = op.fix_output(0, nd.clone());
        }
        graph.add_op(op);
    }
    for edge in mlp.graph.edges() {
        graph.connect(edge.producer, edge.output, edge.consumer, edge.input).unwrap();
    }
    Mlp { graph, ..mlp }
}

fn line(size: usize) -> Placement {
    Placement::line(DeviceType::Cpu, size).unwrap()
}

fn nd(sbps: &[Sbp]) -> NdSbp {
    NdSbp(sbps.to_vec())
}

#[test]
fn data_parallel_mlp_comes_out_data_parallel() {
    let model = mlp(&line(4), 4096, 64);
    let model = fixed(model, &[(OpId(0), nd(&[S(0)]))]);
    let report = select(&model.graph, &CostConfig::default(), Strategy::Search).unwrap();
    assert!(report.edges.is_empty(), "{report}");
    for weight in [model.w1, model.w2] {
        assert_eq!(report.ops[weight.0].signature.outputs[0], nd(&[B]), "{report}");
    }
    for op in [model.first, model.second] {
        assert_eq!(report.ops[op.0].signature.inputs, vec![nd(&[S(0)]), nd(&[B])], "{report}");
    }
    assert_eq!(report.ops[model.act.0].signature.outputs[0], nd(&[S(0)]));
    assert!(report.total_seconds <= report.greedy_seconds);
}

#[test]
fn megatron_mlp_has_exactly_one_all_reduce() {
    let model = mlp(&line(4), 8, 1024);
    let fixes = [
        (model.x, nd(&[B])),
        (model.w1, nd(&[S(1)])),
        (model.w2, nd(&[S(0)])),
        (model.out, nd(&[B])),
    ];
    let model = fixed(model, &fixes);
    for strategy in [Strategy::Greedy, Strategy::Search] {
        let report = select(&model.graph, &CostConfig::default(), strategy).unwrap();
        assert_eq!(report.ops[model.first.0].signature.outputs[0], nd(&[S(1)]), "{report}");
        assert_eq!(report.ops[model.second.0].signature.outputs[0], nd(&[P]), "{report}");
        assert_eq!(report.edges.len(), 1, "{report}");
        assert_eq!(report.count_steps("all-reduce"), 1, "{report}");
        let step = &report.edges[0].plan.steps[0];
        assert_eq!(step.bytes_per_rank, 2 * 3 * (8 * 1024 * 4) / 4);
        let text = report.to_string();
        assert!(text.contains("op fc2: (S(1)), (S(0)) -> (P)"), "{text}");
        assert!(text.contains("edge fc2 -> out") && text.contains("all-reduce (P) on"), "{text}");
    }
}

#[test]
fn hybrid_mlp_all_reduces_only_on_the_tensor_parallel_axis() {
    let mesh = Placement::grid(DeviceType::Cpu, &[2, 2]).unwrap();
    let model = mlp(&mesh, 64, 512);
    let fixes = [
        (model.x, nd(&[S(0), B])),
        (model.w1, nd(&[B, S(1)])),
        (model.w2, nd(&[B, S(0)])),
        (model.out, nd(&[S(0), B])),
    ];
    let model = fixed(model, &fixes);
    let report = select(&model.graph, &CostConfig::default(), Strategy::Search).unwrap();
    assert_eq!(report.count_steps("all-reduce"), 1, "{report}");
    assert_eq!(report.edges.len(), 1, "{report}");
    let step = &report.edges[0].plan.steps[0];
    assert_eq!(step.kind, meshflow_placement::StepKind::AllReduce { mesh_axis: 1 });
}

#[test]
fn fixed_sbps_are_honoured() {
    let model = mlp(&line(2), 256, 64);
    let fixes = [(model.x, nd(&[S(1)])), (model.w1, nd(&[S(0)])), (model.act, nd(&[S(0)]))];
    let model = fixed(model, &fixes);
    for strategy in [Strategy::Greedy, Strategy::Search] {
        let report = select(&model.graph, &CostConfig::default(), strategy).unwrap();
        for (op, wanted) in &fixes {
            assert_eq!(&report.ops[op.0].signature.outputs[0], wanted, "{report}");
        }
    }
}

/// `x -> f`: x may be split (less memory) or broadcast; `f` only runs on a whole tensor.
/// Greedy splits x (locally cheaper) and then pays an all-gather; search broadcasts x.
#[test]
fn search_beats_greedy_on_a_chain_with_a_late_constraint() {
    let placement = line(4);
    let spec = TensorSpec::new([1024, 1024], 4);
    let sources = [signature(&[], &[S(0)]), signature(&[], &[B])];
    let mut graph = SelectionGraph::new();
    let x = OpNode::new("x", placement.clone(), vec![], vec![spec.clone()], &sources, 0).unwrap();
    let x = graph.add_op(x);
    let whole = [signature(&[B], &[B])];
    let f = OpNode::new("f", placement, vec![spec.clone()], vec![spec], &whole, 0).unwrap();
    let f = graph.add_op(f);
    graph.connect(x, 0, f, 0).unwrap();
    let config = CostConfig::default();
    let greedy = select(&graph, &config, Strategy::Greedy).unwrap();
    let searched = select(&graph, &config, Strategy::Search).unwrap();
    assert_eq!(greedy.ops[0].signature.outputs[0], nd(&[S(0)]));
    assert_eq!(greedy.count_steps("all-gather"), 1, "{greedy}");
    assert_eq!(searched.ops[0].signature.outputs[0], nd(&[B]));
    assert!(searched.edges.is_empty(), "{searched}");
    assert!(searched.total_seconds < greedy.total_seconds * 0.5, "{searched}\n{greedy}");
    assert_eq!(searched.greedy_seconds, greedy.total_seconds);
}

#[test]
fn pipeline_edge_between_stages_is_a_send_recv() {
    let stage0 = Placement::new(DeviceType::Cpu, vec![2], vec![0, 1]).unwrap();
    let stage1 = Placement::new(DeviceType::Cpu, vec![2], vec![2, 3]).unwrap();
    let spec = TensorSpec::new([64, 32], 4);
    let mut graph = SelectionGraph::new();
    let sources = source_signatures();
    let x = OpNode::new("x", stage0.clone(), vec![], vec![spec.clone()], &sources, 0).unwrap();
    let x = graph.add_op(x.fix_output(0, S(0)));
    let sigs = pointwise_signatures();
    let a = OpNode::new("a", stage0, vec![spec.clone()], vec![spec.clone()], &sigs, 1 << 20);
    let a = graph.add_op(a.unwrap());
    let b = OpNode::new("b", stage1, vec![spec.clone()], vec![spec], &sigs, 1 << 20);
    let b = graph.add_op(b.unwrap());
    graph.connect(x, 0, a, 0).unwrap();
    graph.connect(a, 0, b, 0).unwrap();
    let report = select(&graph, &CostConfig::default(), Strategy::Search).unwrap();
    assert_eq!(report.edges.len(), 1, "{report}");
    assert_eq!(report.edges[0].plan.steps[0].kind.name(), "send-recv", "{report}");
    assert_eq!(report.edges[0].plan.bytes_per_rank(), 32 * 32 * 4);
}

#[test]
fn errors_name_the_op_its_sbps_and_candidates() {
    let placement = line(2);
    let spec = TensorSpec::new([4, 4], 4);
    let sigs = pointwise_signatures();
    let op =
        OpNode::new("gelu", placement.clone(), vec![spec.clone()], vec![spec.clone()], &sigs, 0)
            .unwrap()
            .fix_input(0, P);
    let mut graph = SelectionGraph::new();
    graph.add_op(op);
    let error = select(&graph, &CostConfig::default(), Strategy::Search).unwrap_err();
    assert!(matches!(error, Error::NoSignature { .. }), "{error}");
    let text = error.to_string();
    assert!(text.contains("gelu") && text.contains("(P)") && text.contains("(S(1))"), "{text}");

    let op =
        OpNode::new("neg", placement.clone(), vec![spec.clone()], vec![spec.clone()], &sigs, 0)
            .unwrap()
            .fix_output(0, nd(&[B, B]));
    let mut graph = SelectionGraph::new();
    graph.add_op(op);
    let error = select(&graph, &CostConfig::default(), Strategy::Search).unwrap_err();
    assert!(matches!(error, Error::PlacementMismatch { .. }), "{error}");

    let bad = [signature(&[S(2)], &[S(2)])];
    let error = OpNode::new("neg", placement, vec![spec.clone()], vec![spec], &bad, 0).unwrap_err();
    assert!(matches!(error, Error::InvalidSignature { .. }), "{error}");
    assert!(error.to_string().contains("split axis 2"), "{error}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// On random DAGs of matmuls, point-wise ops and identities, search is never worse.
    #[test]
    fn search_is_never_worse_than_greedy(
        picks in prop::collection::vec((0usize..3, 0usize..100, 0usize..100), 2..24),
        mesh in prop::sample::select(vec![vec![2], vec![4], vec![2, 2]]),
    ) {
        let placement = Placement::grid(DeviceType::Cpu, &mesh).unwrap();
        let spec = TensorSpec::new([64, 64], 4);
        let mut graph = SelectionGraph::new();
        let sources = source_signatures();
        graph.add_op(OpNode::new("in", placement.clone(), vec![], vec![spec.clone()], &sources, 0).unwrap());
        for (index, &(kind, a, b)) in picks.iter().enumerate() {
            let (sigs, arity) = match kind {
                0 => (matmul_signatures(), 2),
                1 => (pointwise_signatures(), 1),
                _ => (identity_signatures(), 1),
            };
            let op = OpNode::new(format!("op{index}"), placement.clone(), vec![spec.clone(); arity],
                vec![spec.clone()], &sigs, 1 << 24).unwrap();
            let id = graph.add_op(op);
            graph.connect(OpId(a % id.0), 0, id, 0).unwrap();
            if arity == 2 {
                graph.connect(OpId(b % id.0), 0, id, 1).unwrap();
            }
        }
        let config = CostConfig::default();
        let greedy = select(&graph, &config, Strategy::Greedy).unwrap();
        let searched = select(&graph, &config, Strategy::Search).unwrap();
        prop_assert!(searched.total_seconds <= greedy.total_seconds * (1.0 + 1e-12));
        prop_assert_eq!(searched.greedy_seconds, greedy.total_seconds);
    }
}

#[test]
fn synthetic_transformer_selects_every_op() {
    use meshflow_placement::select::synthetic;
    let mesh = Placement::grid(DeviceType::Cpu, &[2, 2]).unwrap();
    let graph = synthetic::transformer(&mesh, 3, 256, 128, true).unwrap();
    assert_eq!(graph.ops().len(), 1 + 3 * synthetic::OPS_PER_LAYER);
    let report = select(&graph, &CostConfig::default(), Strategy::Search).unwrap();
    assert_eq!(report.ops.len(), graph.ops().len());
    assert_eq!(report.ops[0].signature.outputs[0], nd(&[S(0), S(0)]));
    assert!(report.total_seconds <= report.greedy_seconds, "{report}");
}
