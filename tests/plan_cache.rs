//! Cache-aware kernel pricing on a tiny program whose answer is known: a kernel right after the
//! producer of its small input is priced warm, one reading that input after more than a cache
//! of other work is priced cold, and one reading a variable is cold.

use meshflow::compile::actors::{local_meta, lower_to_actors, ActorConfig, ActorProgram, Work};
use meshflow::compile::{compile, CompileConfig, Program, Request, Step};
use meshflow::ops::{DType, Value};
use meshflow::placement::{DeviceType, Placement};
use meshflow::plan::cost::cold_fractions;
use meshflow::plan::machine::parse_cache_size;
use meshflow::plan::profile::{KernelProfile, KernelTimes};
use meshflow::plan::{ActCosts, Cluster};
use meshflow::Graph;

/// The program and its values: `small` ([16, 16]) is `x · 2`; `right_after` reads it next;
/// then a chain of 4 kernels on a [512, 512] input (1 MiB each); then `long_after` reads
/// `small` again.
struct Tiny {
    program: Program,
    small: Value,
    right_after: Value,
    long_after: Value,
}

fn tiny() -> Tiny {
    let one = Placement::new(DeviceType::Cpu, vec![1], vec![0]).unwrap();
    let graph = Graph::new();
    let x = graph.input("x", [16, 16], DType::F32, &one, None).unwrap();
    let small = x.mul_scalar(2.0).unwrap();
    let right_after = small.mul_scalar(3.0).unwrap();
    let z = graph.input("z", [512, 512], DType::F32, &one, None).unwrap();
    let mut big = z.mul_scalar(2.0).unwrap();
    for _ in 0..3 {
        big = big.mul_scalar(2.0).unwrap();
    }
    let long_after = small.mul_scalar(5.0).unwrap();
    let requests: Vec<_> = [&right_after, &big, &long_after]
        .iter()
        .map(|v| Request { value: v.value(), layout: None })
        .collect();
    let program = compile(&graph.snapshot(), &requests, &CompileConfig::default()).unwrap();
    Tiny {
        program,
        small: small.value(),
        right_after: right_after.value(),
        long_after: long_after.value(),
    }
}

/// The actor of the kernel that writes `value`.
fn writer(program: &Program, actors: &ActorProgram, value: Value) -> usize {
    actors
        .plan
        .actors
        .iter()
        .position(|spec| match spec.payload.work {
            Work::Step { step } => match &program.steps[step] {
                Step::Kernel { outputs, .. } => {
                    outputs.iter().any(|s| program.slot(*s).value == value)
                }
                _ => false,
            },
            _ => false,
        })
        .unwrap()
}

#[test]
fn reuse_distance_against_the_cache_gives_the_cold_fraction() {
    let tiny = tiny();
    let actors = lower_to_actors(&tiny.program, &ActorConfig::default()).unwrap();
    let mib = 1024.0 * 1024.0;
    let cold = cold_fractions(&tiny.program, &actors, mib);
    let of = |value| cold[writer(&tiny.program, &actors, value)];
    assert_eq!(of(tiny.small), 1.0, "reads the variable x: cold");
    let kib = 1024.0;
    assert_eq!(of(tiny.right_after), kib / mib, "reads small (1 KiB) right after its producer");
    assert_eq!(of(tiny.long_after), 1.0, "reads small after 4 × 2 MiB of other work: cold");
    let huge = cold_fractions(&tiny.program, &actors, 1e12);
    let long_after = huge[writer(&tiny.program, &actors, tiny.long_after)];
    assert!(long_after > 0.0 && long_after < 1e-4, "in a 1 TB cache: {long_after}");
    assert_eq!(huge[writer(&tiny.program, &actors, tiny.small)], 1.0, "variables stay cold");
}

#[test]
fn measured_kernels_are_priced_between_warm_and_cold() {
    let tiny = tiny();
    let program = &tiny.program;
    let actors = lower_to_actors(program, &ActorConfig::default()).unwrap();
    let mut profile = KernelProfile::default();
    for step in &program.steps {
        let Step::Kernel { inputs, ops, .. } = step else { continue };
        let metas: Vec<_> = inputs.iter().map(|s| local_meta(program, *s, 0).unwrap()).collect();
        profile.insert(&ops[0], &metas, KernelTimes { warm: 1e-6, cold: 3e-6 });
    }
    let mut cluster: Cluster = "1x1:cpu".parse().unwrap();
    cluster.device.kernel_overhead = 0.0;
    cluster.device.cache_bytes = 1024.0 * 1024.0;
    let costs = ActCosts::with_kernels(program, &actors, &cluster, Some((&profile, 2.0)));
    let ns = |value| costs.durations[writer(program, &actors, value)];
    // 1 KiB of 1 MiB out of cache: 1 µs + 2 µs / 1024, slowed ×2.
    assert_eq!(ns(tiny.right_after), 2004, "warm 1 µs, slowed ×2");
    assert_eq!(ns(tiny.long_after), 6000, "cold 3 µs, slowed ×2");
    assert_eq!(ns(tiny.small), 6000, "reads a variable: cold");
}

#[test]
fn sysfs_cache_sizes_parse() {
    assert_eq!(parse_cache_size("48K"), Some(48.0 * 1024.0));
    assert_eq!(parse_cache_size("32M"), Some(32.0 * 1024.0 * 1024.0));
    assert_eq!(parse_cache_size("512"), Some(512.0));
    assert_eq!(parse_cache_size("2X"), None);
}

/// A kernel right after a collective reads an output the other members wrote part of: a
/// reduce-scatter's part is reduced by its own member (warm right after), a 2-member
/// all-reduce's output is half the partner's, a transfer's all the sender's, however large the
/// cache.
#[test]
fn a_collective_output_written_by_other_members_is_cold_to_this_core() {
    use meshflow::placement::{NdSbp, Sbp};
    use meshflow::plan::cost::written_elsewhere;

    let line = Placement::line(DeviceType::Cpu, 2).unwrap();
    let graph = Graph::new();
    let columns = NdSbp(vec![Sbp::Split(1)]);
    let x = graph.input("x", [8, 16], DType::F32, &line, Some(columns)).unwrap();
    let w = meshflow::ops::Tensor::zeros([16, 16], DType::F32);
    let rows = NdSbp(vec![Sbp::Split(0)]);
    let w = graph.parameter("w", w, &line, Some(rows)).unwrap();
    let y = x.matmul(&w).unwrap().gelu(false).unwrap();
    let requests = [Request { value: y.value(), layout: None }];
    let program = compile(&graph.snapshot(), &requests, &CompileConfig::default()).unwrap();
    assert_eq!(program.count_boxing("reduce-scatter"), 1, "{program}");
    let actors = lower_to_actors(&program, &ActorConfig::default()).unwrap();
    let cold = cold_fractions(&program, &actors, 1e12);
    let gelu = writer(&program, &actors, y.value());
    assert!(cold[gelu] < 1e-9, "its own part of the reduction, just written: {}", cold[gelu]);
    let plan = program
        .steps
        .iter()
        .find_map(|step| match step {
            Step::Boxing { plan, .. } => Some(plan.clone()),
            _ => None,
        })
        .unwrap();
    let mut all_reduce = plan.clone();
    all_reduce.steps[0].kind = meshflow::placement::StepKind::AllReduce { mesh_axis: 0 };
    assert_eq!(written_elsewhere(&all_reduce), 0.5, "half reduced by the partner");
    let mut transfer = plan;
    transfer.steps[0].kind = meshflow::placement::StepKind::SendRecv;
    assert_eq!(written_elsewhere(&transfer), 1.0, "all written by the sender");
}
