//! Training-step time of the two reference models on one CPU device with 2 kernel threads
//! (issue 7's benchmark): the GPT (vocab 512, ctx 128, 4 layers, 4 heads, d 256, batch 8) and the
//! MLP 784-1024-1024-10 (batch 256), AdamW. The runners are the ones `meshflow bench train`
//! times, so both report the same step. Throughput is in model FLOPs (PaLM count, see
//! `meshflow::bench::arithmetic`), so criterion's `elem/s` reads as FLOP/s.
//!
//! The PyTorch reference of the same run: `meshflow bench train --strategies 1` (it runs
//! `scripts/torch_train.py`), or `python3 scripts/torch_train.py` beside this bench.
//!
//! Run: `cargo bench --bench train` (add `-- gpt` or `-- mlp` to run one).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meshflow::bench::train::{Model, TrainRunner};
use meshflow::plan::strategies::SessionStrategy;

fn train_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_step_1dev_2thr");
    group.sample_size(10).warm_up_time(Duration::from_secs(1));
    for model in Model::ALL {
        let mut runner = TrainRunner::new(model, SessionStrategy::single(2), None)
            .expect("the reference models compile");
        group.throughput(Throughput::Elements(model.step_flops() as u64));
        group.measurement_time(Duration::from_secs(match model {
            Model::Gpt => 8,
            Model::Mlp => 3,
        }));
        group.bench_function(model.name(), |b| b.iter(|| runner.step().expect("a step runs")));
    }
    group.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
