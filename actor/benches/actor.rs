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

use std::convert::Infallible;
use std::time::Duration;

use criterion::{BenchmarkGroup, Criterion, Throughput};
use meshflow_actor::{
    Act, ActorId, ActorKind, Completion, DeviceId, Driver, DriverConfig, Executor, Plan, Simulator,
    UniformCost,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Nothing;

impl Executor<()> for Nothing {
    type Error = Infallible;

    fn act(&mut self, act: &Act<'_, ()>) -> Result<Completion, Infallible> {
        std::hint::black_box(act.outputs);
        Ok(Completion::Done)
    }
}

/// A chain of `actors`, the device of actor `i` being `device(i)`.
fn chain(actors: usize, registers: u32, device: impl Fn(usize) -> u32) -> Plan<()> {
    let mut plan = Plan::new();
    let mut previous = plan.add_actor("stage0", ActorKind::Source, DeviceId(device(0)), ());
    for index in 1..actors {
        let kind = if index + 1 == actors { ActorKind::Sink } else { ActorKind::Compute };
        let next = plan.add_actor(format!("stage{index}"), kind, DeviceId(device(index)), ());
        plan.add_edge(previous, &[next], registers);
        previous = next;
    }
    plan
}

/// `actors` actors over `devices` devices: a few sources, computes reading 1 to 3 of the 40
/// actors before them, a sink on every loose end.
fn random_plan(actors: usize, devices: u32, seed: u64) -> Plan<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut plan = Plan::new();
    let mut consumers: Vec<Vec<ActorId>> = Vec::new();
    for index in 0..actors {
        let device = DeviceId(rng.random_range(0..devices));
        let kind = if index < 4 { ActorKind::Source } else { ActorKind::Compute };
        let actor = plan.add_actor(format!("actor{index}"), kind, device, ());
        consumers.push(Vec::new());
        if kind == ActorKind::Compute {
            let mut chosen: Vec<usize> = (0..rng.random_range(1..=3))
                .map(|_| rng.random_range(index.saturating_sub(40)..index))
                .collect();
            chosen.sort();
            chosen.dedup();
            for producer in chosen {
                consumers[producer].push(actor);
            }
        }
    }
    for index in 0..actors {
        if consumers[index].is_empty() {
            let sink = plan.add_actor(
                format!("sink{index}"),
                ActorKind::Sink,
                plan.actors[index].device,
                (),
            );
            consumers.push(Vec::new());
            consumers[index].push(sink);
        }
    }
    for (index, list) in consumers.iter().enumerate().filter(|(_, list)| !list.is_empty()) {
        plan.add_edge(ActorId(index as u32), list, 2);
    }
    plan
}

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
    Driver::start(plan.clone(), config, |_, _| Nothing).expect("bench plans are well formed")
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
        bench.iter(|| simulator.run_step(PIECES, &mut Nothing).expect("runs"))
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
        let (to_peer, peer_inbox) = crossbeam::channel::unbounded::<u64>();
        let (to_main, main_inbox) = crossbeam::channel::unbounded::<u64>();
        let peer = std::thread::spawn(move || {
            for token in peer_inbox {
                if to_main.send(token + 1).is_err() {
                    return;
                }
            }
        });
        bench.iter(|| {
            for hop in 0..HOPS as u64 / 2 {
                to_peer.send(hop).expect("peer alive");
                main_inbox.recv().expect("peer alive");
            }
        });
        drop(to_peer);
        peer.join().expect("peer ends");
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
        bench.iter(|| simulator.run_step(4, &mut Nothing).expect("runs"))
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
