//! Criterion benches of the actor runtime: acts per second on one thread, the latency of a hop
//! between two threads (spinning against parking, batched against one mail per message; timed
//! inside the acts of a chain, so step overheads are left out; criterion gives the mean, which a
//! busy machine's preemptions inflate), and one step of a 1000-actor random plan. Each group carries its reference in the same run: the simulator on the
//! same plan, or a bare crossbeam ping-pong between two threads (blocking receives) for the hop.
//!
//! Before criterion runs, the bench prints a table of hop latencies (median and 90th percentile of
//! many round trips / 2, timed inside the acts) and of 1000-actor step times, with the load
//! average beside each row: `cargo bench -p meshflow-actor --bench actor -- hop` prints the table
//! and runs the hop group (`-- hop_table` prints the table alone).

mod table;

use std::time::Duration;

use criterion::{BenchmarkGroup, Criterion, Throughput};
use meshflow_actor::workload::{chain, random_plan, NoWork, PingPong};
use meshflow_actor::{Driver, DriverConfig, Plan, Simulator, UniformCost};

fn configure(group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
}

/// The driver settings the benches compare, by name.
fn settings() -> [(&'static str, DriverConfig); 4] {
    let spin = DriverConfig::default();
    let park = DriverConfig { spin: Duration::ZERO, ..spin.clone() };
    [
        ("spin_batched", spin.clone()),
        ("spin_unbatched", DriverConfig { batch: false, ..spin }),
        ("park_batched", park.clone()),
        ("park_unbatched", DriverConfig { batch: false, ..park }),
    ]
}

fn driver(plan: &Plan<()>, config: DriverConfig) -> Driver<()> {
    Driver::start(plan.clone(), config, |_, _| NoWork).expect("bench plans are well formed")
}

fn acts_per_second(criterion: &mut Criterion) {
    const ACTORS: usize = 64;
    const PIECES: u64 = 256;
    let plan = chain(ACTORS, 2, |_| 0);
    let mut group = criterion.benchmark_group("chain_one_thread");
    configure(&mut group);
    group.throughput(Throughput::Elements(ACTORS as u64 * PIECES));
    let mut threaded = driver(&plan, DriverConfig::default());
    group.bench_function("driver", |bench| bench.iter(|| threaded.run_step(PIECES).expect("runs")));
    let cost = UniformCost { act: 1, latency: 0 };
    let mut simulator = Simulator::new(&plan, cost, 0).expect("checks");
    group.bench_function("simulator_reference", |bench| {
        bench.iter(|| simulator.run_step(PIECES, &mut NoWork).expect("runs"))
    });
    group.finish();
}

/// Criterion's view of the hop: the time from the third to the last act of one piece down a
/// chain alternating between two threads, over its hops. The first round trip is left out, as
/// it holds the step's start (a parked thread woken by the driver).
fn hop_latency(criterion: &mut Criterion) {
    const HOPS: usize = 32;
    let mut group = criterion.benchmark_group("hop_two_threads");
    configure(&mut group);
    group.throughput(Throughput::Elements(HOPS as u64));
    for (name, config) in settings() {
        let (mut threaded, stamps) = table::stamped_chain(HOPS + 3, config);
        group.bench_function(name, |bench| {
            bench.iter_custom(|iterations| {
                let nanoseconds: u64 = (0..iterations)
                    .map(|_| {
                        threaded.run_step(1).expect("runs");
                        let times = stamps.times();
                        times[HOPS + 2] - times[2]
                    })
                    .sum();
                Duration::from_nanos(nanoseconds)
            })
        });
    }
    group.bench_function("crossbeam_ping_pong_reference", |bench| {
        let ping_pong = PingPong::start();
        bench.iter(|| assert!(ping_pong.round_trips(HOPS as u64 / 2), "peer alive"));
    });
    group.finish();
}

fn random_step(criterion: &mut Criterion) {
    let plan = random_plan(1000, 2, 7);
    let topology = plan.check().expect("checks");
    let acts: u64 = plan.acts_per_step(&topology, 4).expect("rates agree").iter().sum();
    let mut group = criterion.benchmark_group("random_dag_1000");
    configure(&mut group);
    group.throughput(Throughput::Elements(acts));
    for (name, config) in settings() {
        let mut threaded = driver(&plan, config);
        group.bench_function(name, |bench| bench.iter(|| threaded.run_step(4).expect("runs")));
    }
    let cost = UniformCost { act: 1, latency: 0 };
    let mut simulator = Simulator::new(&plan, cost, 0).expect("checks");
    group.bench_function("simulator_reference", |bench| {
        bench.iter(|| simulator.run_step(4, &mut NoWork).expect("runs"))
    });
    group.finish();
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    if table_wanted() {
        table::print();
    }
    acts_per_second(&mut criterion);
    hop_latency(&mut criterion);
    random_step(&mut criterion);
    criterion.final_summary();
}

/// Whether to print the table: not when cargo only tests or lists the benches, nor when the
/// filter names a group other than the hop (`-- hop_table` prints the table alone).
fn table_wanted() -> bool {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let listing = arguments.iter().any(|argument| argument == "--test" || argument == "--list");
    let filter = arguments.iter().find(|argument| !argument.starts_with('-'));
    let hop =
        |filter: &String| filter.contains("hop") || "hop_two_threads".contains(filter.as_str());
    !listing && filter.is_none_or(hop)
}
