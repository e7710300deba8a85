//! Placements as text, mesh coordinates and groups, and local shapes under nd-SBPs.

use meshflow_placement::{
    balanced_range, local_region, nd_signatures, DeviceType, Error, NdSbp, Placement, Sbp,
    Signature,
};
use proptest::prelude::*;

#[test]
fn placement_text_round_trips() {
    let cases = [
        ("cpu:0-3", vec![4], vec![0, 1, 2, 3], "cpu:0-3"),
        ("cuda:[[0,1],[2,3]]", vec![2, 2], vec![0, 1, 2, 3], "cuda:[[0,1],[2,3]]"),
        ("cpu:[0,2,4]", vec![3], vec![0, 2, 4], "cpu:[0,2,4]"),
        ("cpu: [[0-2],[3-5]]", vec![2, 3], vec![0, 1, 2, 3, 4, 5], "cpu:[[0,1,2],[3,4,5]]"),
        ("cpu:7", vec![1], vec![7], "cpu:7"),
        ("cuda:[[[0,1]],[[2,3]]]", vec![2, 1, 2], vec![0, 1, 2, 3], "cuda:[[[0,1]],[[2,3]]]"),
    ];
    for (text, hierarchy, ranks, printed) in cases {
        let placement: Placement = text.parse().unwrap();
        assert_eq!(placement.hierarchy(), hierarchy.as_slice(), "{text}");
        assert_eq!(placement.ranks(), ranks.as_slice(), "{text}");
        assert_eq!(placement.to_string(), printed);
        assert_eq!(printed.parse::<Placement>().unwrap(), placement);
    }
}

#[test]
fn malformed_placement_text_is_an_error() {
    for text in [
        "",
        "cpu",
        "tpu:0-3",
        "cpu:",
        "cpu:3-1",
        "cpu:[0,1",
        "cpu:[[0,1],[2]]",
        "cpu:[0,0]",
        "cpu:[[0,1],2]",
        "cpu:0-3x",
        "cpu:[]",
    ] {
        let error = text.parse::<Placement>().unwrap_err();
        assert!(matches!(error, Error::PlacementSyntax { .. }), "{text}: {error}");
        assert!(error.to_string().contains(text), "{error}");
    }
}

#[test]
fn coordinates_and_groups_follow_the_mesh() {
    let placement: Placement = "cpu:[[4,5,6],[7,8,9]]".parse().unwrap();
    assert_eq!(placement.coordinates(8), Some(vec![1, 1]));
    assert_eq!(placement.coordinates(3), None);
    assert_eq!(placement.rank_at(&[0, 2]).unwrap(), 6);
    assert!(placement.rank_at(&[2, 0]).is_err());
    assert_eq!(placement.groups(0), vec![vec![4, 7], vec![5, 8], vec![6, 9]]);
    assert_eq!(placement.groups(1), vec![vec![4, 5, 6], vec![7, 8, 9]]);
    let line = Placement::line(DeviceType::Cpu, 4).unwrap();
    assert_eq!(line.groups(0), vec![vec![0, 1, 2, 3]]);
}

#[test]
fn nested_uneven_split_gives_balanced_exact_regions() {
    // (S(0), S(0)) on [2, 2]: 7 rows -> 4 + 3, then 4 -> 2 + 2 and 3 -> 2 + 1.
    let nd = NdSbp(vec![Sbp::Split(0), Sbp::Split(0)]);
    let expected = [(0, 2), (2, 2), (4, 2), (6, 1)];
    for (index, &(offset, len)) in expected.iter().enumerate() {
        let coordinates = [index / 2, index % 2];
        let region = local_region(&[7, 3], &nd, &[2, 2], &coordinates).unwrap();
        assert_eq!(region.offsets, vec![offset, 0]);
        assert_eq!(region.shape, vec![len, 3]);
    }
    assert_eq!(balanced_range(5, 4, 0), (0, 2));
    assert_eq!(balanced_range(5, 4, 3), (4, 1));
    assert_eq!(balanced_range(2, 4, 3), (2, 0));
}

#[test]
fn split_axis_out_of_range_is_an_error() {
    let nd = NdSbp(vec![Sbp::Split(2)]);
    let error = local_region(&[4, 4], &nd, &[2], &[0]).unwrap_err();
    assert!(matches!(error, Error::SplitAxisOutOfRange { axis: 2, .. }), "{error}");
    let signature = Signature::new([Sbp::Split(3)], [Sbp::Split(0)]);
    let error = signature.check("neg", &[2], &[2], std::slice::from_ref(&signature)).unwrap_err();
    assert!(error.to_string().contains("neg"), "{error}");
}

#[test]
fn nd_signatures_are_products_over_mesh_axes() {
    let one_d = [
        Signature::new([Sbp::Split(0), Sbp::Broadcast], [Sbp::Split(0)]),
        Signature::new([Sbp::Broadcast, Sbp::Split(1)], [Sbp::Split(1)]),
        Signature::broadcast(2, 1),
    ];
    let nd = nd_signatures(&one_d, 2);
    assert_eq!(nd.len(), 9);
    let mixed = nd.iter().find(|s| s.axis(0) == one_d[0] && s.axis(1) == one_d[1]).unwrap();
    assert_eq!(mixed.outputs[0], NdSbp(vec![Sbp::Split(0), Sbp::Split(1)]));
    assert_eq!(nd_signatures(&one_d, 1).len(), 3);
}

/// Meshes the suites run on.
fn meshes() -> Vec<Vec<usize>> {
    vec![vec![1], vec![2], vec![3], vec![4], vec![2, 2]]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every element is held by exactly (replicas) devices, each device's region is inside the
    /// tensor, and along every split the parts are balanced.
    #[test]
    fn regions_tile_the_tensor(
        mesh in prop::sample::select(meshes()),
        shape in prop::collection::vec(0usize..7, 1..4),
        seeds in prop::collection::vec(0usize..16, 2),
    ) {
        let rank = shape.len();
        let nd = NdSbp(mesh.iter().zip(&seeds).map(|(_, &s)| match s % (rank + 2) {
            0 => Sbp::Broadcast,
            1 => Sbp::PartialSum,
            a => Sbp::Split(a - 2),
        }).collect());
        let placement = Placement::grid(DeviceType::Cpu, &mesh).unwrap();
        let regions = placement.regions(&shape, &nd).unwrap();
        let replicas: usize = nd.axes().iter().zip(&mesh)
            .filter(|(sbp, _)| sbp.split_axis().is_none()).map(|(_, &p)| p).product();
        let numel: usize = shape.iter().product();
        let mut cover = vec![0usize; numel];
        for region in &regions {
            for (axis, (&offset, &len)) in region.offsets.iter().zip(&region.shape).enumerate() {
                prop_assert!(offset + len <= shape[axis]);
            }
            mark(&mut cover, &shape, region);
        }
        prop_assert!(cover.iter().all(|&c| c == replicas), "{cover:?} vs {replicas}");
        // Balanced: on a 1-D mesh with a split the sizes differ by at most one, largest first.
        if let (1, Some(axis)) = (mesh.len(), nd.axes()[0].split_axis()) {
            let sizes: Vec<usize> = regions.iter().map(|r| r.shape[axis]).collect();
            prop_assert!(sizes.windows(2).all(|w| w[0] >= w[1] && w[0] - w[1] <= 1));
        }
    }
}

fn mark(cover: &mut [usize], shape: &[usize], region: &meshflow_placement::Region) {
    let count: usize = region.shape.iter().product();
    let mut index = vec![0; shape.len()];
    for _ in 0..count {
        let flat = (0..shape.len())
            .fold(0, |flat, axis| flat * shape[axis] + region.offsets[axis] + index[axis]);
        cover[flat] += 1;
        for axis in (0..shape.len()).rev() {
            index[axis] += 1;
            if index[axis] < region.shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
}
