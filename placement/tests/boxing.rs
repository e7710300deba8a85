//! Every boxing plan, executed by the reference executor, reproduces the logical tensor.

use meshflow_placement::reference::{DenseTensor, Sharded};
use meshflow_placement::{plan_boxing, DeviceType, Layout, NdSbp, Placement, Sbp, StepKind};
use proptest::prelude::*;

fn meshes() -> Vec<Vec<usize>> {
    vec![vec![1], vec![2], vec![3], vec![4], vec![2, 2], vec![2, 1], vec![1, 2]]
}

/// A small deterministic generator (splitmix64) for partial-sum addends.
fn random_source(seed: u64) -> impl FnMut() -> f64 {
    let mut state = seed;
    move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % 2001) as f64 / 100.0 - 10.0
    }
}

fn nd_from_codes(codes: &[usize], axes: usize, rank: usize) -> NdSbp {
    NdSbp(
        codes[..axes]
            .iter()
            .map(|&code| match code % (rank + 2) {
                0 => Sbp::Broadcast,
                1 => Sbp::PartialSum,
                a => Sbp::Split(a - 2),
            })
            .collect(),
    )
}

fn counting(shape: &[usize]) -> DenseTensor {
    let numel = shape.iter().product::<usize>();
    DenseTensor::new(shape.to_vec(), (0..numel).map(|i| i as f64 + 1.0).collect())
}

/// Plans `source -> target`, runs it and checks every device.
fn check_plan(shape: &[usize], source: &Layout, target: &Layout, seed: u64) -> Result<(), String> {
    let logical = counting(shape);
    let plan = plan_boxing(shape, 4, source, target).map_err(|e| e.to_string())?;
    let mut random = random_source(seed);
    let start = Sharded::shard(&logical, source, &mut random).map_err(|e| e.to_string())?;
    if let Some(problem) = start.mismatch(&logical, 1e-9) {
        return Err(format!("sharding {source}: {problem}"));
    }
    let end = start.apply_plan(&plan).map_err(|e| e.to_string())?;
    if !end.layout.equivalent(target) {
        return Err(format!("plan ends at {} not {target}", end.layout));
    }
    match end.mismatch(&logical, 1e-6) {
        Some(problem) => Err(format!("{source} -> {target} via [{plan}]: {problem}")),
        None => Ok(()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Same placement, every pair of nd-SBPs among S(i), B, P.
    #[test]
    fn same_placement_plans_are_exact(
        mesh in prop::sample::select(meshes()),
        shape in prop::collection::vec(1usize..7, 1..4),
        codes in prop::collection::vec(0usize..32, 4),
        seed in any::<u64>(),
    ) {
        let placement = Placement::grid(DeviceType::Cpu, &mesh).unwrap();
        let axes = mesh.len();
        let source = Layout::new(placement.clone(), nd_from_codes(&codes, axes, shape.len()));
        let target = Layout::new(placement, nd_from_codes(&codes[2..], axes, shape.len()));
        prop_assert_eq!(check_plan(&shape, &source, &target, seed), Ok(()));
    }

    /// Different placements: disjoint or overlapping ranks, other mesh shapes.
    #[test]
    fn cross_placement_plans_are_exact(
        source_mesh in prop::sample::select(meshes()),
        target_mesh in prop::sample::select(meshes()),
        target_first in 0usize..5,
        shape in prop::collection::vec(1usize..7, 1..4),
        codes in prop::collection::vec(0usize..32, 4),
        seed in any::<u64>(),
    ) {
        let source_placement = Placement::grid(DeviceType::Cpu, &source_mesh).unwrap();
        let size = target_mesh.iter().product::<usize>();
        let ranks = (target_first..target_first + size).collect();
        let target_placement = Placement::new(DeviceType::Cpu, target_mesh.clone(), ranks).unwrap();
        let rank = shape.len();
        let source = Layout::new(source_placement, nd_from_codes(&codes, source_mesh.len(), rank));
        let target =
            Layout::new(target_placement, nd_from_codes(&codes[2..], target_mesh.len(), rank));
        prop_assert_eq!(check_plan(&shape, &source, &target, seed), Ok(()));
    }
}

fn line(size: usize) -> Placement {
    Placement::line(DeviceType::Cpu, size).unwrap()
}

fn one_step(source: Sbp, target: Sbp) -> (StepKind, u64) {
    let plan =
        plan_boxing(&[8, 6], 4, &Layout::new(line(4), source), &Layout::new(line(4), target))
            .unwrap();
    assert_eq!(plan.steps.len(), 1, "{source} -> {target}: {plan}");
    (plan.steps[0].kind, plan.steps[0].bytes_per_rank)
}

#[test]
fn one_axis_conversions_use_the_expected_collective_and_bytes() {
    use Sbp::{Broadcast as B, PartialSum as P, Split as S};
    let tensor = 8 * 6 * 4; // 192 bytes
    let expected = [
        (P, B, "all-reduce", 2 * 3 * tensor / 4),
        (P, S(1), "reduce-scatter", 3 * tensor / 4),
        (S(0), B, "all-gather", 3 * tensor / 4),
        (S(0), S(1), "all-to-all", 3 * tensor / 16),
        (B, S(0), "local-slice", 0),
        (B, P, "zero-fill", 0),
        (S(1), P, "zero-fill", 0),
    ];
    for (source, target, name, bytes) in expected {
        let (kind, moved) = one_step(source, target);
        assert_eq!((kind.name(), moved), (name, bytes as u64), "{source} -> {target}");
    }
    let same = plan_boxing(&[8], 4, &Layout::new(line(4), P), &Layout::new(line(4), P)).unwrap();
    assert!(same.is_identity());
}

#[test]
fn nested_split_takes_a_middle_hop() {
    let placement = Placement::grid(DeviceType::Cpu, &[2, 2]).unwrap();
    let source = Layout::new(placement.clone(), NdSbp(vec![Sbp::Split(0), Sbp::Split(0)]));
    let target = Layout::new(placement, NdSbp(vec![Sbp::Split(1), Sbp::Split(1)]));
    let plan = plan_boxing(&[4, 4], 4, &source, &target).unwrap();
    assert!(plan.steps.len() >= 3, "{plan}");
    assert_eq!(check_plan(&[4, 4], &source, &target, 7), Ok(()));
}

#[test]
fn pipeline_hand_off_is_one_send_recv() {
    let stage0 = Placement::new(DeviceType::Cpu, vec![2], vec![0, 1]).unwrap();
    let stage1 = Placement::new(DeviceType::Cpu, vec![2], vec![2, 3]).unwrap();
    let source = Layout::new(stage0, Sbp::Split(0));
    let target = Layout::new(stage1, Sbp::Split(0));
    let plan = plan_boxing(&[6, 5], 2, &source, &target).unwrap();
    assert_eq!(plan.steps.len(), 1);
    assert_eq!(plan.steps[0].kind, StepKind::SendRecv);
    assert_eq!(plan.steps[0].bytes_per_rank, 3 * 5 * 2);
}

#[test]
fn partial_source_reduces_before_crossing_placements() {
    let source = Layout::new(line(4), Sbp::PartialSum);
    let far = Placement::new(DeviceType::Cuda, vec![2], vec![8, 9]).unwrap();
    let target = Layout::new(far, Sbp::Broadcast);
    let plan = plan_boxing(&[8, 8], 4, &source, &target).unwrap();
    assert_eq!(plan.steps[0].kind.name(), "reduce-scatter", "{plan}");
    assert_eq!(plan.steps[1].kind, StepKind::SliceCopy);
    assert_eq!(check_plan(&[8, 8], &source, &target, 3), Ok(()));
}

#[test]
fn partial_sums_cross_stages_without_reduction() {
    let stage0: Placement = "cpu:[[0,1],[2,3]]".parse().unwrap();
    let stage1: Placement = "cuda:[[4,5],[6,7]]".parse().unwrap();
    let nd = NdSbp(vec![Sbp::PartialSum, Sbp::Split(1)]);
    let source = Layout::new(stage0, nd.clone());
    let target = Layout::new(stage1, nd);
    let plan = plan_boxing(&[4, 6], 4, &source, &target).unwrap();
    assert_eq!(plan.steps.len(), 1, "{plan}");
    assert_eq!(plan.steps[0].kind, StepKind::SendRecv);
    assert_eq!(plan.bytes_per_rank(), 4 * 3 * 4);
    assert_eq!(check_plan(&[4, 6], &source, &target, 11), Ok(()));
}

#[test]
fn layouts_that_differ_only_on_mesh_axes_of_size_one_need_no_boxing() {
    let grid = |hierarchy: &[usize]| Placement::grid(DeviceType::Cpu, hierarchy).unwrap();
    let plan = |placement: &Placement, from: Vec<Sbp>, to: Vec<Sbp>| {
        let source = Layout::new(placement.clone(), NdSbp(from));
        let target = Layout::new(placement.clone(), NdSbp(to));
        plan_boxing(&[4, 6], 4, &source, &target).unwrap()
    };
    let one = grid(&[1, 1]);
    assert!(plan(&one, vec![Sbp::PartialSum, Sbp::Split(0)], vec![Sbp::Broadcast; 2]).is_identity());
    let data = grid(&[2, 1]);
    let same =
        plan(&data, vec![Sbp::Split(0), Sbp::PartialSum], vec![Sbp::Split(0), Sbp::Split(1)]);
    assert!(same.is_identity(), "{same}");
    // The axis of size 2 still moves data: one all-reduce of the partial sums.
    let reduce = plan(&data, vec![Sbp::PartialSum, Sbp::Split(1)], vec![Sbp::Broadcast; 2]);
    assert_eq!(reduce.steps.len(), 1, "{reduce}");
    assert_eq!(reduce.steps[0].kind, StepKind::AllReduce { mesh_axis: 0 }, "{reduce}");
}
