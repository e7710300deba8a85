//! The planner's simulated timings on small programs whose answer is known in closed form: a
//! pipeline of k stages over n micro-batches, one all-reduce's α–β time, and a data-parallel
//! step = its kernels + its gradient all-reduce.

use meshflow::compile::actors::{lower_to_actors, ActorConfig, Streams, Work};
use meshflow::compile::{compile, CompileConfig, Program, Request, Step};
use meshflow::ops::DType;
use meshflow::placement::{DeviceType, Layout, NdSbp, Placement, Sbp};
use meshflow::plan::{simulate, ActCosts, Cluster, Link};
use meshflow::Graph;

/// A chain of `stages` element-wise ops, stage `s` on rank `s` (the logical graph that
/// `to_placement` between stages gives).
fn pipeline(stages: usize) -> Program {
    let stage = |s: usize| Placement::new(DeviceType::Cpu, vec![1], vec![s]).unwrap();
    let graph = Graph::new();
    let x = graph.input("x", [4, 4], DType::F32, &stage(0), None).unwrap();
    let mut y = x.clone();
    for _ in 0..stages {
        y = y.mul_scalar(2.0).unwrap();
    }
    let mut data = graph.snapshot();
    for (index, node) in data.nodes.iter_mut().enumerate() {
        node.placement = stage(index);
    }
    for value in 1..data.values.len() {
        data.values[value].placement = stage(value - 1);
    }
    let requests = [Request { value: y.value(), layout: None }];
    compile(&data, &requests, &CompileConfig::default()).unwrap()
}

/// Durations: every kernel `kernel` ns, everything else 0.
fn kernels_take(
    program: &Program,
    lowered: &meshflow::compile::actors::ActorProgram,
    kernel: u64,
) -> ActCosts {
    let durations = lowered
        .plan
        .actors
        .iter()
        .map(|spec| match spec.payload.work {
            Work::Step { step } if matches!(program.steps[step], Step::Kernel { .. }) => kernel,
            _ => 0,
        })
        .collect();
    ActCosts { durations }
}

#[test]
fn pipeline_of_k_stages_over_n_pieces_takes_n_plus_k_minus_1_stage_times() {
    for (stages, pieces) in [(1, 1), (2, 1), (3, 4), (4, 8)] {
        let program = pipeline(stages);
        assert_eq!(program.ranks, (0..stages).collect::<Vec<_>>());
        let config = ActorConfig { pieces, ..ActorConfig::default() };
        let lowered = lower_to_actors(&program, &config).unwrap();
        let costs = kernels_take(&program, &lowered, 1000);
        let prediction = simulate(&program, &lowered, costs, false).unwrap();
        let expected = (pieces as usize + stages - 1) as f64 * 1e-6;
        assert!(
            (prediction.step_seconds - expected).abs() < 1e-12,
            "{stages} stages, {pieces} pieces: {} s, expected {expected} s",
            prediction.step_seconds
        );
    }
}

/// A cluster of `devices` CPU devices on one node with known figures and no kernel overhead.
fn cluster(devices: usize, latency: f64, bandwidth: f64) -> Cluster {
    let mut cluster: Cluster = format!("1x{devices}:cpu").parse().unwrap();
    cluster.device.kernel_overhead = 0.0;
    cluster.intra = Link { bandwidth, latency };
    cluster
}

#[test]
fn one_all_reduce_takes_its_ring_alpha_beta_time() {
    for p in [2usize, 4] {
        let placement = Placement::line(DeviceType::Cpu, p).unwrap();
        let graph = Graph::new();
        let rows = NdSbp(vec![Sbp::Split(0)]);
        let x = graph.input("x", [p, 1024], DType::F32, &placement, Some(rows)).unwrap();
        let partial = x.sum(&[0], false).unwrap();
        let broadcast = Layout::new(placement.clone(), NdSbp(vec![Sbp::Broadcast]));
        let requests = [Request { value: partial.value(), layout: Some(broadcast) }];
        let program = compile(&graph.snapshot(), &requests, &CompileConfig::default()).unwrap();
        assert_eq!(program.count_boxing("all-reduce"), 1);
        let (alpha, beta) = (5e-6, 1e9);
        let mut cluster = cluster(p, alpha, beta);
        // The sum kernel takes no time: only the all-reduce counts.
        cluster.device.vector_flops = 1e30;
        cluster.device.memory_bandwidth = 1e30;
        let lowered = lower_to_actors(&program, &ActorConfig::default()).unwrap();
        let joins =
            lowered.plan.actors.iter().filter(|a| matches!(a.payload.work, Work::Join { .. }));
        assert_eq!(joins.count(), 1, "one group, one join");
        let costs = ActCosts::new(&program, &lowered, &cluster);
        let prediction = simulate(&program, &lowered, costs, false).unwrap();
        let bytes = 4096.0 * 2.0 * (p as f64 - 1.0) / p as f64;
        let expected = 2.0 * (p as f64 - 1.0) * alpha + bytes / beta;
        assert!(
            (prediction.step_seconds - expected).abs() < 2e-9,
            "p={p}: {} s, expected {expected} s",
            prediction.step_seconds
        );
    }
}

/// `devices`-way data parallelism of a product, gelu and sum, with the weight's gradient
/// all-reduced.
fn data_parallel(devices: usize) -> Program {
    let placement = Placement::line(DeviceType::Cpu, devices).unwrap();
    let graph = Graph::new();
    let split = NdSbp(vec![Sbp::Split(0)]);
    let x = graph.input("x", [64, 32], DType::F32, &placement, Some(split)).unwrap();
    let w = meshflow::ops::Tensor::zeros([32, 32], DType::F32);
    let broadcast = NdSbp(vec![Sbp::Broadcast]);
    let w = graph.parameter("w", w, &placement, Some(broadcast.clone())).unwrap();
    let loss = x.matmul(&w).unwrap().gelu(false).unwrap().sum(&[0, 1], true).unwrap();
    let gradient = graph.gradients(&loss, &[&w]).unwrap()[0].clone().unwrap();
    let layout = Layout::new(placement.clone(), broadcast);
    let requests = [Request { value: gradient.value(), layout: Some(layout) }];
    compile(&graph.snapshot(), &requests, &CompileConfig::default()).unwrap()
}

#[test]
fn data_parallel_step_is_its_kernels_then_the_gradient_all_reduce() {
    let program = data_parallel(2);
    assert_eq!(program.count_boxing("all-reduce"), 1, "{program}");
    let (alpha, beta) = (10e-6, 2e9);
    let cluster = cluster(2, alpha, beta);
    let config = ActorConfig { streams: Streams::Single, ..ActorConfig::default() };
    let lowered = lower_to_actors(&program, &config).unwrap();
    let costs = ActCosts::new(&program, &lowered, &cluster);
    let rank0: u64 = lowered
        .plan
        .actors
        .iter()
        .zip(&costs.durations)
        .filter(|(spec, _)| spec.payload.rank == 0 && matches!(spec.payload.work, Work::Step { .. }))
        .filter(|(spec, _)| {
            let Work::Step { step } = spec.payload.work else { return false };
            !matches!(&program.steps[step], Step::Boxing { plan, .. } if plan.steps.iter().any(|s| !s.kind.is_local()))
        })
        .map(|(_, &ns)| ns)
        .sum();
    let all_reduce = 2.0 * alpha + (32.0 * 32.0 * 4.0) / beta;
    let prediction = simulate(&program, &lowered, costs, false).unwrap();
    let expected = rank0 as f64 / 1e9 + all_reduce;
    assert!(rank0 > 0, "the kernels take time");
    assert!(
        (prediction.step_seconds - expected).abs() < 3e-9,
        "{} s, expected {expected} s (kernels {rank0} ns + all-reduce {all_reduce} s)",
        prediction.step_seconds
    );
}

/// Simulating the first rank of each placement predicts the same step as simulating every rank,
/// on the symmetric strategies the planner compares (the full plan is the reference).
#[test]
fn one_representative_rank_per_placement_predicts_the_full_step() {
    use meshflow::plan::model::{build, ModelSpec, Strategy, Workload};
    use meshflow::plan::{streams_for, symmetry};

    let cluster: Cluster = "2x4:h100".parse().unwrap();
    let strategies = [
        (Strategy::Mesh { dp: 8, tp: 1, pp: 1 }, 1),
        (Strategy::Mesh { dp: 2, tp: 4, pp: 1 }, 1),
        (Strategy::Mesh { dp: 2, tp: 1, pp: 4 }, 4),
        (Strategy::Mesh { dp: 4, tp: 2, pp: 1 }, 2),
    ];
    for (strategy, pieces) in strategies {
        let workload = Workload {
            model: ModelSpec::CHAR,
            strategy,
            batch: 16,
            pieces,
            device: DeviceType::Cuda,
        };
        let built = build(&workload, &CompileConfig::default()).unwrap();
        let config = ActorConfig { streams: streams_for(&cluster), ..built.actors.clone() };
        let full = lower_to_actors(&built.program, &config).unwrap();
        let kept = symmetry::representatives(&built.program);
        let Strategy::Mesh { dp, tp, pp } = strategy else { unreachable!() };
        let first_of_stages: Vec<usize> = (0..pp).map(|s| s * dp * tp).collect();
        assert_eq!(kept.iter().copied().collect::<Vec<_>>(), first_of_stages, "{strategy}");
        let pruned = symmetry::prune(&full, &kept);
        assert!(pruned.plan.actors.len() < full.plan.actors.len(), "{strategy}");
        let expected =
            simulate(&built.program, &full, ActCosts::new(&built.program, &full, &cluster), false)
                .unwrap();
        let predicted = meshflow::plan::predict(&built.program, &config, &cluster, false).unwrap();
        assert!(
            (predicted.step_seconds - expected.step_seconds).abs() <= 1e-9 * expected.step_seconds,
            "{strategy}: pruned {} s, full {} s",
            predicted.step_seconds,
            expected.step_seconds
        );
        assert!(expected.step_seconds > 0.0);
    }
}

/// With a kernel profile, each kernel takes its measured time (times the slowdown): a chain of
/// `stages` identical kernels over one piece takes `stages` cold calls (the fed input, then
/// what each stage received from the previous stage's device).
#[test]
fn profiled_kernels_take_their_measured_time() {
    use meshflow::plan::profile::KernelProfile;
    use std::time::Duration;

    let stages = 3;
    let program = pipeline(stages);
    let profile = KernelProfile::measure(&program, 1, Duration::from_millis(5)).unwrap();
    assert_eq!((profile.len(), profile.failed), (1, 0), "one distinct kernel: mul_scalar [4, 4]");
    let Step::Kernel { inputs, ops, .. } =
        program.steps.iter().find(|s| matches!(s, Step::Kernel { .. })).unwrap()
    else {
        unreachable!()
    };
    let metas: Vec<_> = inputs
        .iter()
        .map(|s| meshflow::compile::actors::local_meta(&program, *s, 0).unwrap())
        .collect();
    let times = profile.times(&ops[0], &metas).unwrap();
    let measured = times.cold;
    assert!(measured > 0.0 && measured < 0.01, "a 16-element kernel: {measured} s");
    let cluster = cluster(stages, 0.0, 1e30);
    let slowdown = 2.0;
    let prediction = meshflow::plan::predict_measured(
        &program,
        &ActorConfig::default(),
        &cluster,
        Some((&profile, slowdown)),
        false,
    )
    .unwrap();
    // The first stage reads the fed input; each later one the shard its stream just received,
    // which the previous stage's core wrote: all cold.
    let expected = stages as f64 * times.cold * slowdown;
    assert!(
        (prediction.step_seconds - expected).abs() < 2e-9 * stages as f64,
        "{} s, expected {expected} s",
        prediction.step_seconds
    );
}

/// A pipeline with a backward: `stages` forward ops (op `s` on rank `s`), the last one's value
/// the loss, then `stages` backward ops back from rank `stages − 1` to rank 0. Returns the
/// program and the loss value (the end of the forward).
fn pipeline_with_backward(stages: usize) -> (Program, meshflow::ops::Value) {
    let stage = |s: usize| Placement::new(DeviceType::Cpu, vec![1], vec![s]).unwrap();
    let graph = Graph::new();
    let x = graph.input("x", [4, 4], DType::F32, &stage(0), None).unwrap();
    let mut y = x.clone();
    let mut loss = None;
    for op in 0..2 * stages {
        y = y.mul_scalar(2.0).unwrap();
        if op == stages - 1 {
            loss = Some(y.value());
        }
    }
    let rank_of_op = |op: usize| if op < stages { op } else { 2 * stages - 1 - op };
    let mut data = graph.snapshot();
    for (op, node) in data.nodes.iter_mut().enumerate() {
        node.placement = stage(rank_of_op(op));
    }
    for value in 1..data.values.len() {
        data.values[value].placement = stage(rank_of_op(value - 1));
    }
    let requests = [Request { value: y.value(), layout: None }];
    let program = compile(&data, &requests, &CompileConfig::default()).unwrap();
    (program, loss.unwrap())
}

/// 1F1B (the order the session runs, the loss naming the end of the forward) over `k` stages
/// and `n` micro-batches, every forward and backward kernel taking `t`: the step is
/// `(n + k − 1) · 2t` (each stage's `2n` kernels plus the `k − 1` forward and `k − 1` backward
/// slots of the fill and the drain).
#[test]
fn one_forward_one_backward_over_k_stages_and_n_pieces_takes_n_plus_k_minus_1_rounds() {
    use meshflow::compile::actors::PieceOrder;

    for (stages, pieces) in [(1, 1), (2, 1), (2, 2), (2, 4), (3, 4), (4, 8)] {
        let (program, loss) = pipeline_with_backward(stages);
        let config = ActorConfig {
            pieces,
            order: PieceOrder::OneForwardOneBackward,
            forward: Some(loss),
            ..ActorConfig::default()
        };
        let lowered = lower_to_actors(&program, &config).unwrap();
        assert_eq!(lowered.order, PieceOrder::OneForwardOneBackward, "{stages} stages");
        let costs = kernels_take(&program, &lowered, 1000);
        let prediction = simulate(&program, &lowered, costs.clone(), false).unwrap();
        let expected = (pieces as usize + stages - 1) as f64 * 2.0 * 1e-6;
        assert!(
            (prediction.step_seconds - expected).abs() < 1e-12,
            "{stages} stages, {pieces} pieces: {} s, expected {expected} s",
            prediction.step_seconds
        );
        // A core per stage: the same step; one core: every kernel in turn.
        let cores = meshflow::plan::cores::step_on_cores;
        let (step, busy) = cores(&program, &lowered, &costs, stages);
        assert!((step - expected).abs() < 1e-12, "{stages} stages on as many cores: {step} s");
        let kernels = (2 * pieces as usize * stages) as f64 * 1e-6;
        assert!((busy - kernels).abs() < 1e-12, "busy {busy} s, kernels {kernels} s");
        assert!((cores(&program, &lowered, &costs, 1).0 - kernels).abs() < 1e-12);
    }
}

/// The calibration runs one strategy of every kind that runs on this machine: one device, DP,
/// TP, DP×TP, PP with micro-batches, ZeRO, gradient accumulation, DP×PP and DP across
/// processes; each kind once, and the default configuration runs them all.
#[test]
fn calibration_covers_every_strategy_that_runs_here() {
    use meshflow::plan::calibrate::{CalibrationConfig, SessionStrategy, StrategyKind};
    use std::collections::BTreeSet;

    let every = SessionStrategy::every();
    let kinds: Vec<StrategyKind> = every.iter().map(SessionStrategy::kind).collect();
    let distinct: BTreeSet<StrategyKind> = kinds.iter().copied().collect();
    assert_eq!(distinct.len(), kinds.len(), "each kind once: {kinds:?}");
    assert_eq!(distinct, StrategyKind::ALL.into_iter().collect::<BTreeSet<_>>());
    assert_eq!(CalibrationConfig::default().strategies, every);
    let pipelines = every.iter().filter(|s| s.pp > 1);
    assert!(pipelines.clone().count() == 2 && pipelines.clone().all(|s| s.micro_batches > 1));
    let processes = every.iter().find(|s| s.kind() == StrategyKind::Processes).unwrap();
    assert_eq!((processes.processes, processes.devices()), (2, 2));
    let names: Vec<String> = every.iter().map(ToString::to_string).collect();
    assert_eq!(names[4], "dp1 × tp1 × pp2, 4 micro-batches");
    assert_eq!(names[5], "dp2 × tp1, ZeRO");
    assert_eq!(names[8], "dp2 × tp1, 2 processes (QUIC)");
}

/// Device threads sharing cores: two ranks computing at once on one core take turns (the step
/// is both kernels, ×2 the step with a core each); two pipeline stages that take turns anyway
/// are not slowed at all.
#[test]
fn device_threads_sharing_cores_are_slowed_by_the_mean_number_busy() {
    use meshflow::plan::calibrate::predict_sharing_cores;
    use meshflow::plan::cores::BarrierWait;
    use meshflow::plan::profile::KernelProfile;
    use std::time::Duration;

    let wait = BarrierWait { spin: 50e-6, wake: 30e-6 };

    let parallel = {
        let placement = Placement::line(DeviceType::Cpu, 2).unwrap();
        let graph = Graph::new();
        let rows = NdSbp(vec![Sbp::Split(0)]);
        let x = graph.input("x", [4, 4], DType::F32, &placement, Some(rows)).unwrap();
        let y = x.mul_scalar(2.0).unwrap();
        let requests = [Request { value: y.value(), layout: None }];
        compile(&graph.snapshot(), &requests, &CompileConfig::default()).unwrap()
    };
    assert_eq!(parallel.count_boxing("all-reduce"), 0);
    // Per case: the slowdown, and the kernels of the step as (cold, warm) calls: both
    // data-parallel ranks read the fed input (cold); the second stage reads what it received,
    // which the first stage's core wrote (cold too).
    for (program, expected_slowdown, calls) in
        [(parallel, 2.0, (2.0, 0.0)), (pipeline(2), 1.0, (2.0, 0.0))]
    {
        let profile = KernelProfile::measure(&program, 1, Duration::from_millis(5)).unwrap();
        assert_eq!(profile.len(), 1, "one distinct kernel");
        let times = program
            .steps
            .iter()
            .find_map(|step| match step {
                Step::Kernel { inputs, ops, .. } => {
                    let metas: Vec<_> = inputs
                        .iter()
                        .map(|s| meshflow::compile::actors::local_meta(&program, *s, 0).unwrap())
                        .collect();
                    profile.times(&ops[0], &metas)
                }
                _ => None,
            })
            .unwrap();
        let cluster = cluster(2, 0.0, 1e30);
        let (prediction, slowdown) =
            predict_sharing_cores(&program, &ActorConfig::default(), &cluster, &profile, (1, wait))
                .unwrap();
        assert!((slowdown - expected_slowdown).abs() < 1e-3, "slowdown {slowdown}");
        let expected = calls.0 * times.cold + calls.1 * times.warm;
        assert!(
            (prediction.step_seconds - expected).abs() < 1e-3 * expected + 4e-9,
            "{} s, expected {expected} s",
            prediction.step_seconds
        );
    }
}

/// Device threads outnumbering cores take turns: with a core per thread the step is the
/// simulator's; with one core every act runs in turn (the step is the sum of the acts); with 2
/// cores for 4 data-parallel ranks, half of it (the ranks are symmetric).
#[test]
fn acts_on_fewer_cores_than_device_threads_take_turns() {
    use meshflow::plan::cores::step_on_cores;

    let program = data_parallel(4);
    let config = ActorConfig::default();
    let lowered = lower_to_actors(&program, &config).unwrap();
    let costs = ActCosts::new(&program, &lowered, &cluster(4, 10e-6, 2e9));
    let simulated = simulate(&program, &lowered, costs.clone(), false).unwrap().step_seconds;
    let (step, busy) = step_on_cores(&program, &lowered, &costs, 4);
    assert!((step - simulated).abs() < 3e-9, "{step} s on 4 cores, simulated {simulated} s");
    assert!(busy > step, "4 ranks' acts add up to more than the step");
    let (serial, same_busy) = step_on_cores(&program, &lowered, &costs, 1);
    assert!((serial - busy).abs() < 3e-9 && same_busy == busy, "{serial} s on 1 core");
    let (shared, _) = step_on_cores(&program, &lowered, &costs, 2);
    assert!((shared - busy / 2.0).abs() < 1e-3 * busy, "{shared} s on 2 cores, busy {busy} s");
}

/// A collective's members meet at a barrier: on one core, 4 data-parallel ranks reach their
/// gradient all-reduce together (its join), the first three each poll the core away for the
/// barrier's spin and sleep, the fourth runs; the sleepers then run once woken. With a wake-up
/// shorter than the all-reduce the core never idles: the step is the acts plus three spins;
/// with a longer one it idles for the difference once. With a core per rank nobody polls.
#[test]
fn collective_members_poll_then_sleep_at_the_barrier() {
    use meshflow::plan::cores::{step_on_cores, step_on_cores_waiting, BarrierWait};

    let program = data_parallel(4);
    let lowered = lower_to_actors(&program, &ActorConfig::default()).unwrap();
    let costs = ActCosts::new(&program, &lowered, &cluster(4, 10e-6, 2e9));
    let all_reduce = lowered
        .plan
        .actors
        .iter()
        .zip(&costs.durations)
        .find(|(spec, _)| {
            let Work::Step { step } = spec.payload.work else { return false };
            matches!(&program.steps[step], Step::Boxing { plan, .. } if plan.steps.iter().any(|s| !s.kind.is_local()))
        })
        .map(|(_, &ns)| ns as f64 / 1e9)
        .unwrap();
    let (_, busy) = step_on_cores(&program, &lowered, &costs, 1);
    let spin = 50e-6;
    for wake in [0.5 * all_reduce, 3.0 * all_reduce] {
        let barrier = BarrierWait { spin, wake };
        let (step, same_busy) = step_on_cores_waiting(&program, &lowered, &costs, 1, barrier);
        let expected = busy + 3.0 * spin + (wake - all_reduce).max(0.0);
        assert!((step - expected).abs() < 3e-9, "wake {wake} s: {step} s, expected {expected} s");
        assert_eq!(same_busy, busy, "polling is not work");
        let (spread, _) = step_on_cores_waiting(&program, &lowered, &costs, 4, barrier);
        let (unshared, _) = step_on_cores(&program, &lowered, &costs, 4);
        assert!((spread - unshared).abs() < 3e-9, "a core each: {spread} s against {unshared} s");
    }
}

/// Gradient accumulation is priced as the runtime pays it: each later piece's shard is added
/// to the sum as its kernel writes it, in cache, so with measured kernels a summed slot costs
/// `pieces − 1` warm additions of its shard's shape (the profile's), not a pass over memory.
#[test]
fn accumulated_gradients_cost_warm_additions_per_later_piece() {
    use meshflow::compile::actors::local_meta;
    use meshflow::plan::profile::KernelProfile;
    use meshflow::plan::strategies::{actor_config, char_gpt, SessionStrategy, StrategySession};
    use std::time::Duration;

    let strategy = SessionStrategy { micro_batches: 2, ..SessionStrategy::mesh(2, 1) };
    let build = |graph: &Graph, stages: &[meshflow::nn::Layouts]| char_gpt(graph, stages, 4);
    let run =
        StrategySession::new(&strategy, build, &CompileConfig::default(), None, false).unwrap();
    let program = run.session.program();
    let lowered = lower_to_actors(program, &actor_config(&run.session)).unwrap();
    let mut profile = KernelProfile::default();
    let accumulated = &run.session.actors().accumulated;
    profile.measure_sums(program, accumulated, 1, Duration::from_millis(1));
    let cluster = cluster(2, 1e-6, 1e10);
    let costs = ActCosts::with_kernels(program, &lowered, &cluster, Some((&profile, 1.0)));
    let mut sums = 0;
    for (spec, &ns) in lowered.plan.actors.iter().zip(&costs.durations) {
        let Work::Accumulate { slot } = spec.payload.work else { continue };
        let meta = local_meta(program, slot, spec.payload.rank).unwrap();
        let warm = profile.sum_times(&meta).unwrap().warm;
        assert_eq!(ns, (warm * 1e9).round() as u64, "one addition of {meta:?}");
        sums += 1;
    }
    assert!(sums >= 2 * 50, "every parameter's gradient on both ranks: {sums}");
}

/// On the session's own DP2×PP2 program over 4 micro-batches (1F1B), the simulation of one
/// representative rank per placement, the full simulation and the step with a core per device
/// thread agree.
#[test]
fn session_data_pipeline_step_is_the_same_pruned_full_and_on_cores() {
    use meshflow::compile::CompileConfig;
    use meshflow::plan::cores::step_on_cores;
    use meshflow::plan::strategies::{actor_config, char_gpt, SessionStrategy, StrategySession};
    use meshflow::plan::{predict, symmetry};

    let strategy = SessionStrategy::pipeline(2, 2, 4);
    let build = |graph: &Graph, stages: &[meshflow::nn::Layouts]| char_gpt(graph, stages, 8);
    let run =
        StrategySession::new(&strategy, build, &CompileConfig::default(), None, false).unwrap();
    let program = run.session.program();
    let config = actor_config(&run.session);
    let cluster = cluster(4, 1e-6, 1e10);
    let full = lower_to_actors(program, &config).unwrap();
    let costs = ActCosts::new(program, &full, &cluster);
    let whole = simulate(program, &full, costs.clone(), false).unwrap().step_seconds;
    let pruned = predict(program, &config, &cluster, false).unwrap().step_seconds;
    let (on_cores, _) = step_on_cores(program, &full, &costs, 4);
    let kept = symmetry::representatives(program).len();
    assert!(
        (whole - pruned).abs() < 1e-9 && (whole - on_cores).abs() < 1e-9,
        "full {whole} s, pruned to {kept} ranks {pruned} s, on 4 cores {on_cores} s"
    );
}

/// The roofline on one device: a product's FLOPs at the matrix roof, an element-wise op's at
/// the vector roof (or its bytes at the memory roof), and a reshape, a view of its input's
/// buffer, at the per-kernel overhead alone.
#[test]
fn roofline_prices_products_element_wise_ops_and_views_apart() {
    let one = Placement::line(DeviceType::Cpu, 1).unwrap();
    let graph = Graph::new();
    let x = graph.input("x", [64, 32], DType::F32, &one, None).unwrap();
    let w = graph.input("w", [32, 16], DType::F32, &one, None).unwrap();
    let y = x.reshape([32, 64]).unwrap().reshape([64, 32]).unwrap().matmul(&w).unwrap();
    let z = y.mul_scalar(2.0).unwrap();
    let requests = [Request { value: z.value(), layout: None }];
    let program = compile(&graph.snapshot(), &requests, &CompileConfig::default()).unwrap();
    let lowered = lower_to_actors(&program, &ActorConfig::default()).unwrap();
    let mut cluster = cluster(1, 0.0, 1e30);
    cluster.device.kernel_overhead = 1e-6;
    (cluster.device.peak_flops, cluster.device.matmul_efficiency) = (1e9, 0.5);
    (cluster.device.vector_flops, cluster.device.memory_bandwidth) = (1e6, 1e12);
    let costs = ActCosts::new(&program, &lowered, &cluster);
    let mut priced: Vec<(&str, u64)> = Vec::new();
    for (spec, &ns) in lowered.plan.actors.iter().zip(&costs.durations) {
        if let Work::Step { step } = spec.payload.work {
            if let Step::Kernel { ops, .. } = &program.steps[step] {
                priced.push((ops[0].name(), ns));
            }
        }
    }
    let product = 2 * 64 * 32 * 16; // FLOPs, at 0.5 GFLOP/s
    let scale = 64 * 16; // one FLOP per element, at 1 MFLOP/s
    let expected = vec![
        ("reshape", 1_000),
        ("reshape", 1_000),
        ("matmul", 1_000 + product * 2),
        ("mul_scalar", 1_000 + scale * 1_000),
    ];
    assert_eq!(priced, expected);
}

/// Device threads bound to cores round-robin (thread `d` on core `d mod cores`, as a session
/// binds them): when only ranks 0 and 2 of 4 data-parallel ranks compute, on 2 cores they share
/// core 0 and take turns, twice as long as on any free core, where they run side by side.
#[test]
fn bound_threads_wait_for_their_own_core() {
    use meshflow::plan::cores::{step_on_cores, step_on_cores_waiting, BarrierWait, Cores};

    let program = data_parallel(4);
    let lowered = lower_to_actors(&program, &ActorConfig::default()).unwrap();
    let mut kernels = 0;
    let durations = lowered
        .plan
        .actors
        .iter()
        .map(|spec| match spec.payload.work {
            Work::Step { step } if matches!(program.steps[step], Step::Kernel { .. }) => {
                let computes = spec.payload.rank % 2 == 0;
                kernels += usize::from(spec.payload.rank == 0);
                if computes {
                    1_000
                } else {
                    0
                }
            }
            _ => 0,
        })
        .collect();
    let costs = ActCosts { durations };
    assert!(kernels > 0);
    let one_rank = kernels as f64 * 1e-6;
    let (shared, _) = step_on_cores(&program, &lowered, &costs, 2);
    let barrier = BarrierWait::default();
    let (bound, busy) = step_on_cores_waiting(&program, &lowered, &costs, Cores::bound(2), barrier);
    assert!((shared - one_rank).abs() < 1e-12, "side by side: {shared} s, one rank {one_rank} s");
    assert!((bound - 2.0 * one_rank).abs() < 1e-12, "in turn on core 0: {bound} s");
    assert!((busy - 2.0 * one_rank).abs() < 1e-12, "the same work either way: {busy} s");
    // With a core per thread, binding changes nothing.
    let (own, _) = step_on_cores_waiting(&program, &lowered, &costs, Cores::bound(4), barrier);
    assert!((own - one_rank).abs() < 1e-12, "{own} s on 4 bound cores");
}
