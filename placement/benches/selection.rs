//! Signature selection on a synthetic transformer of 10 001 ops (500 layers of 20 ops), on a
//! 1-D mesh of 4 and a `[2, 2]` mesh; greedy is the reference the search is compared with.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use meshflow_placement::select::{select, synthetic, Strategy};
use meshflow_placement::{CostConfig, DeviceType, Placement};

fn selection(c: &mut Criterion) {
    let mut group = c.benchmark_group("selection_10k_ops");
    group.sample_size(10);
    for hierarchy in [vec![4], vec![2, 2]] {
        let placement = Placement::grid(DeviceType::Cpu, &hierarchy).expect("a valid mesh");
        let graph =
            synthetic::transformer(&placement, 500, 2048, 1024, true).expect("a valid graph");
        let config = CostConfig::default();
        let report = select(&graph, &config, Strategy::Search).expect("selection");
        eprintln!(
            "{hierarchy:?}: {} ops, search {:.4e} s vs greedy {:.4e} s of modelled step time",
            graph.ops().len(),
            report.total_seconds,
            report.greedy_seconds
        );
        for strategy in [Strategy::Greedy, Strategy::Search] {
            let name = format!("{strategy:?}/{hierarchy:?}");
            group.bench_function(name, |b| {
                b.iter(|| select(black_box(&graph), &config, strategy).expect("selection"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, selection);
criterion_main!(benches);
