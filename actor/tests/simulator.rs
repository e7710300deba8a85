//! The simulator: pipelining arithmetic, deadlock reports, plan errors, traces.

mod common;

use std::collections::BTreeMap;

use meshflow_actor::{
    ActorId, ActorKind, CostModel, DeviceId, Error, Plan, Simulator, UniformCost, Wait,
};

use common::{mix, HashExecutor, JitterCost, Memory};

const ACT: u64 = 10;

fn chain(actors: usize, registers: u32) -> Plan<()> {
    let mut plan = Plan::new();
    let mut previous = plan.add_actor("stage0", ActorKind::Source, DeviceId(0), ());
    for index in 1..actors {
        let kind = if index + 1 == actors { ActorKind::Sink } else { ActorKind::Compute };
        let next = plan.add_actor(format!("stage{index}"), kind, DeviceId(index as u32), ());
        plan.add_edge(previous, &[next], registers);
        previous = next;
    }
    plan
}

fn executor_for(plan: &Plan<()>) -> HashExecutor {
    let topology = plan.check().expect("test plans are well formed");
    HashExecutor { memory: Memory::new(topology.register_total(), plan.actors.len()) }
}

fn chain_finish(actors: usize, pieces: u64, registers: u32, seed: u64) -> u64 {
    let plan = chain(actors, registers);
    let mut executor = executor_for(&plan);
    let mut simulator =
        Simulator::new(&plan, UniformCost { act: ACT, latency: 0 }, seed).expect("plan checks");
    let report = simulator.run_step(pieces, &mut executor).expect("a chain does not deadlock");
    assert_eq!(report.pieces.len() as u64, pieces);
    report.finished_at
}

#[test]
fn two_registers_pipeline_a_chain_exactly() {
    for (actors, pieces) in [(2, 1), (3, 8), (5, 20), (8, 3)] {
        for seed in 0..4 {
            let finish = chain_finish(actors, pieces, 2, seed);
            assert_eq!(
                finish,
                (pieces + actors as u64 - 1) * ACT,
                "k={actors} n={pieces} seed={seed}"
            );
        }
    }
}

#[test]
fn one_register_halves_the_throughput_of_a_chain() {
    for (actors, pieces) in [(3, 8), (5, 20)] {
        let pipelined = chain_finish(actors, pieces, 2, 0);
        let single = chain_finish(actors, pieces, 1, 0);
        // A producer waits for its consumer's whole act before it writes the next piece.
        assert_eq!(single, (2 * pieces + actors as u64 - 2) * ACT, "k={actors} n={pieces}");
        assert!(single > pipelined);
    }
}

/// Each actor of a chain its own act time, messages instant.
struct StageCost(Vec<u64>);

impl CostModel for StageCost {
    fn act_duration(&self, actor: ActorId, _sequence: u64) -> u64 {
        self.0[actor.index()]
    }

    fn latency(&self, _from: ActorId, _to: ActorId) -> u64 {
        0
    }
}

#[test]
fn unequal_stages_finish_after_their_sum_and_one_bottleneck_act_per_further_piece() {
    let stage_times =
        [vec![3, 7, 2, 11, 5], vec![11, 3, 7, 2, 5], vec![3, 7, 2, 5, 11], vec![4, 4, 9, 9, 1]];
    for times in stage_times {
        let plan = chain(times.len(), 2);
        let (sum, bottleneck) = (times.iter().sum::<u64>(), *times.iter().max().expect("stages"));
        for pieces in [1, 6, 13] {
            for seed in 0..3 {
                let mut executor = executor_for(&plan);
                let mut simulator =
                    Simulator::new(&plan, StageCost(times.clone()), seed).expect("checks");
                let report = simulator.run_step(pieces, &mut executor).expect("no deadlock");
                let expected = sum + (pieces - 1) * bottleneck;
                assert_eq!(report.finished_at, expected, "{times:?} n={pieces} seed={seed}");
            }
        }
    }
}

#[test]
fn one_device_runs_a_chain_one_act_at_a_time() {
    let mut plan = chain(4, 2);
    for spec in &mut plan.actors {
        spec.device = DeviceId(0);
    }
    let cost = UniformCost { act: ACT, latency: 0 };
    let mut concurrent = Simulator::new(&plan, cost, 3).expect("checks");
    let report = concurrent.run_step(5, &mut executor_for(&plan)).expect("no deadlock");
    assert_eq!(report.finished_at, (5 + 4 - 1) * ACT);
    let mut serial = Simulator::new(&plan, cost, 3).expect("checks");
    serial.one_act_per_device();
    let report = serial.run_step(5, &mut executor_for(&plan)).expect("no deadlock");
    assert_eq!(report.finished_at, 5 * 4 * ACT);
    assert_eq!(serial.device_busy(), vec![(DeviceId(0), 5 * 4 * ACT)]);
    assert_eq!(concurrent.device_busy(), serial.device_busy());
}

#[test]
fn acts_of_one_device_never_overlap_and_results_stay_the_same() {
    for plan_seed in 0..6 {
        let (plan, pieces) = common::random_plan(plan_seed, 10, 3);
        let reference = executor_for(&plan);
        let mut concurrent = Simulator::new(&plan, JitterCost::new(plan_seed), 1).expect("checks");
        concurrent.run_step(pieces, &mut reference.clone()).expect("no deadlock");
        let serial_executor = executor_for(&plan);
        let mut serial = Simulator::new(&plan, JitterCost::new(plan_seed), 1).expect("checks");
        serial.one_act_per_device();
        serial.enable_trace();
        serial.run_step(pieces, &mut serial_executor.clone()).expect("no deadlock");
        assert_eq!(serial_executor.memory.results(), reference.memory.results());
        let mut lanes: BTreeMap<DeviceId, Vec<(u64, u64)>> = BTreeMap::new();
        for event in &serial.trace().expect("tracing is on").events {
            lanes.entry(event.device).or_default().push((event.start, event.end));
        }
        for (device, mut acts) in lanes.clone() {
            acts.sort();
            for pair in acts.windows(2) {
                assert!(pair[0].1 <= pair[1].0, "{device}: {pair:?} overlap (plan {plan_seed})");
            }
        }
        let traced: Vec<(DeviceId, u64)> = lanes
            .iter()
            .map(|(&device, acts)| (device, acts.iter().map(|(start, end)| end - start).sum()))
            .collect();
        assert_eq!(serial.device_busy(), traced);
        assert!(serial.now() >= traced.iter().map(|lane| lane.1).max().unwrap_or(0));
    }
}

#[test]
fn piece_times_step_by_one_act_when_pipelined() {
    // With latency L a register cycles in write, hop, read, hop back: T + L + T + L = 26 here, so
    // two registers (13 per piece) would throttle the chain and three (8.7 per piece) do not.
    let plan = chain(4, 3);
    let mut executor = executor_for(&plan);
    let mut simulator =
        Simulator::new(&plan, UniformCost { act: ACT, latency: 3 }, 9).expect("plan checks");
    let report = simulator.run_step(5, &mut executor).expect("no deadlock");
    let times: Vec<(u64, u64)> = report.pieces.iter().map(|done| (done.piece, done.time)).collect();
    // Four acts and three hops for the first piece, then one act per piece.
    let expected: Vec<(u64, u64)> =
        (0..5).map(|piece| (piece, 4 * ACT + 3 * 3 + piece * ACT)).collect();
    assert_eq!(times, expected);
}

/// source → accumulate(k) → repeat(k) → join, and source → join directly: the direct edge must
/// hold k pieces while the accumulation fills.
fn under_provisioned(direct_registers: u32) -> (Plan<()>, [ActorId; 5]) {
    let mut plan = Plan::new();
    let device = DeviceId(0);
    let source = plan.add_actor("source", ActorKind::Source, device, ());
    let accumulate = plan.add_actor("accumulate", ActorKind::Accumulate { pieces: 3 }, device, ());
    let repeat = plan.add_actor("repeat", ActorKind::Repeat { pieces: 3 }, device, ());
    let join = plan.add_actor("join", ActorKind::Compute, device, ());
    let sink = plan.add_actor("sink", ActorKind::Sink, device, ());
    plan.add_edge(source, &[accumulate, join], direct_registers);
    plan.add_edge(accumulate, &[repeat], 1);
    plan.add_edge(repeat, &[join], 1);
    plan.add_edge(join, &[sink], 1);
    (plan, [source, accumulate, repeat, join, sink])
}

#[test]
fn under_provisioned_plan_reports_the_deadlock() {
    let (plan, [source, accumulate, repeat, join, _]) = under_provisioned(1);
    let mut executor = executor_for(&plan);
    let mut simulator =
        Simulator::new(&plan, UniformCost { act: ACT, latency: 1 }, 5).expect("plan checks");
    let Err(Error::Deadlock(report)) = simulator.run_step(3, &mut executor) else {
        panic!("expected a deadlock");
    };
    let names: Vec<&str> = report.blocked.iter().map(|blocked| blocked.name.as_str()).collect();
    assert_eq!(names, ["source", "accumulate", "repeat", "join", "sink"]);
    let source_waits = &report.blocked[0].waiting_for;
    assert!(
        matches!(source_waits.as_slice(), [Wait::Free { holders, .. }] if holders == &vec![join])
    );
    assert_eq!(
        report.blocked[1].waiting_for,
        vec![Wait::Readable { edge: meshflow_actor::EdgeId(0), producer: source, sequence: 1 }]
    );
    let join_waits = &report.blocked[3].waiting_for;
    assert!(
        matches!(join_waits.as_slice(), [Wait::Readable { producer, sequence: 0, .. }] if *producer == repeat)
    );
    assert_eq!(report.blocked[0].acts_left, 2);
    let text = Error::Deadlock(report).to_string();
    assert!(text.contains("source") && text.contains("held by"), "{text}");
    let _ = accumulate;
}

#[test]
fn enough_registers_resolve_the_same_plan() {
    let (plan, [source, .., sink]) = under_provisioned(3);
    let mut executor = executor_for(&plan);
    let mut simulator =
        Simulator::new(&plan, UniformCost { act: ACT, latency: 1 }, 5).expect("plan checks");
    simulator.run_step(3, &mut executor).expect("three registers suffice");
    let results = executor.memory.results();
    assert_eq!(results.len(), 3);
    // join = mix(mix(join, source piece), repeat of the accumulated sum); check piece 0.
    let pieces: Vec<u64> = (0..3).map(|piece| mix(u64::from(source.0), piece)).collect();
    let sum = pieces.iter().fold(0u64, |sum, value| sum.wrapping_add(*value));
    let join = mix(mix(mix(3, 0), pieces[0]), mix(sum, 0));
    assert_eq!(results[&(sink, 0)], mix(mix(u64::from(sink.0), 0), join));
}

#[test]
fn cycle_without_variable_is_a_plan_error() {
    let mut plan: Plan<()> = Plan::new();
    let device = DeviceId(0);
    let source = plan.add_actor("source", ActorKind::Source, device, ());
    let left = plan.add_actor("left", ActorKind::Compute, device, ());
    let right = plan.add_actor("right", ActorKind::Compute, device, ());
    let after = plan.add_actor("after", ActorKind::Sink, device, ());
    plan.add_edge(source, &[left], 1);
    plan.add_edge(left, &[right, after], 2);
    plan.add_edge(right, &[left], 2);
    let Err(Error::Cycle { actors }) = plan.check() else { panic!("expected a cycle error") };
    assert_eq!(actors, ["left", "right"]);
}

#[test]
fn cycle_through_a_variable_runs() {
    let mut plan: Plan<()> = Plan::new();
    let device = DeviceId(0);
    let variable = plan.add_actor("weight", ActorKind::Variable, device, ());
    let gradient = plan.add_actor("gradient", ActorKind::Compute, device, ());
    plan.add_edge(variable, &[gradient], 1);
    plan.add_edge(gradient, &[variable], 1);
    let mut executor = executor_for(&plan);
    let mut simulator =
        Simulator::new(&plan, UniformCost { act: ACT, latency: 0 }, 1).expect("plan checks");
    let mut expected = u64::from(variable.0);
    for _ in 0..3 {
        let report = simulator.run_step(1, &mut executor).expect("no deadlock");
        assert_eq!(report.acts, 3);
        expected = mix(expected, mix(mix(u64::from(gradient.0), 0), expected));
    }
    assert_eq!(executor.memory.variable_states()[variable.index()], expected);
}

#[test]
fn malformed_plans_name_the_actors() {
    let mut plan: Plan<()> = Plan::new();
    let source = plan.add_actor("feed", ActorKind::Source, DeviceId(0), ());
    let sink = plan.add_actor("out", ActorKind::Sink, DeviceId(0), ());
    plan.add_edge(source, &[ActorId(7)], 1);
    assert!(
        matches!(plan.check(), Err(Error::MissingActor { actor: ActorId(7), ref producer, .. }) if producer == "feed")
    );
    plan.edges[0].consumers = vec![sink];
    plan.edges[0].registers = 0;
    assert!(
        matches!(plan.check(), Err(Error::ZeroRegisters { ref producer, .. }) if producer == "feed")
    );
    plan.edges[0].registers = 1;
    plan.actors[1].kind = ActorKind::Source;
    assert!(matches!(plan.check(), Err(Error::Arity { ref actor, .. }) if actor == "out"));
    plan.actors[1].kind = ActorKind::Sink;
    let topology = plan.check().expect("now well formed");
    assert_eq!(plan.acts_per_step(&topology, 4).expect("rates agree"), vec![4, 4]);
}

#[test]
fn mismatched_rates_are_an_error() {
    let mut plan: Plan<()> = Plan::new();
    let device = DeviceId(0);
    let source = plan.add_actor("tokens", ActorKind::Source, device, ());
    let variable = plan.add_actor("weight", ActorKind::Variable, device, ());
    let join = plan.add_actor("matmul", ActorKind::Sink, device, ());
    plan.add_edge(source, &[join], 1);
    plan.add_edge(variable, &[join], 1);
    let topology = plan.check().expect("structurally fine");
    let Err(Error::RateMismatch { actor, rates }) = plan.acts_per_step(&topology, 2) else {
        panic!("expected a rate mismatch");
    };
    assert_eq!(actor, "matmul");
    assert_eq!(rates, vec![("tokens".to_string(), 2), ("weight".to_string(), 1)]);
}

#[test]
fn trace_exports_one_lane_per_device() {
    let plan = chain(3, 2);
    let mut executor = executor_for(&plan);
    let mut simulator =
        Simulator::new(&plan, UniformCost { act: 1000, latency: 0 }, 2).expect("plan checks");
    simulator.enable_trace();
    simulator.run_step(4, &mut executor).expect("no deadlock");
    let trace = simulator.trace().expect("tracing is on");
    assert_eq!(trace.events.len(), 12);
    let mut text = Vec::new();
    trace.write_chrome(&plan, &mut text).expect("writes to memory");
    let json: serde_json::Value = serde_json::from_slice(&text).expect("valid JSON");
    let events = json["traceEvents"].as_array().expect("an event list");
    let lanes = events.iter().filter(|event| event["ph"] == "M").count();
    let acts: Vec<&serde_json::Value> = events.iter().filter(|event| event["ph"] == "X").collect();
    assert_eq!((lanes, acts.len()), (3, 12));
    let last = acts
        .iter()
        .find(|event| event["name"] == "stage2" && event["args"]["piece"] == 3)
        .expect("the last act");
    assert_eq!(
        (last["ts"].as_f64(), last["dur"].as_f64(), last["tid"].as_u64()),
        (Some(5.0), Some(1.0), Some(2))
    );
}

/// Records the stages of one variable's acts and the value each read wrote.
struct Logging {
    inner: HashExecutor,
    variable: ActorId,
    log: Vec<(meshflow_actor::Stage, u64, u64)>,
}

impl meshflow_actor::Executor<()> for Logging {
    type Error = common::Never;

    fn act(
        &mut self,
        act: &meshflow_actor::Act<'_, ()>,
    ) -> Result<meshflow_actor::Completion, common::Never> {
        let completion = self.inner.act(act)?;
        if act.actor == self.variable {
            let state = self.inner.memory.variable_states()[act.actor.index()];
            self.log.push((act.stage, act.step, state));
        }
        Ok(completion)
    }
}

#[test]
fn next_step_reads_a_variable_only_after_this_step_updated_it() {
    use meshflow_actor::Stage::{VariableRead, VariableUpdate};
    let mut plan: Plan<()> = Plan::new();
    let device = DeviceId(0);
    let variable = plan.add_actor("weight", ActorKind::Variable, device, ());
    let repeat = plan.add_actor("broadcast", ActorKind::Repeat { pieces: 4 }, device, ());
    let source = plan.add_actor("batch", ActorKind::Source, DeviceId(1), ());
    let forward = plan.add_actor("forward", ActorKind::Compute, DeviceId(1), ());
    let accumulate =
        plan.add_actor("gradient", ActorKind::Accumulate { pieces: 4 }, DeviceId(2), ());
    plan.add_edge(variable, &[repeat], 1);
    plan.add_edge(repeat, &[forward], 2);
    plan.add_edge(source, &[forward], 2);
    plan.add_edge(forward, &[accumulate], 2);
    plan.add_edge(accumulate, &[variable], 1);
    let mut executor = Logging { inner: executor_for(&plan), variable, log: Vec::new() };
    let mut simulator =
        Simulator::new(&plan, UniformCost { act: ACT, latency: 2 }, 6).expect("checks");
    for _ in 0..3 {
        simulator.run_step(4, &mut executor).expect("no deadlock");
    }
    let stages: Vec<(meshflow_actor::Stage, u64)> =
        executor.log.iter().map(|entry| (entry.0, entry.1)).collect();
    let expected: Vec<(meshflow_actor::Stage, u64)> =
        (1..=3).flat_map(|step| [(VariableRead, step), (VariableUpdate, step)]).collect();
    assert_eq!(stages, expected);
    // Each read sees the state the previous update left.
    assert_eq!(executor.log[2].2, executor.log[1].2);
    assert_eq!(executor.log[4].2, executor.log[3].2);
    assert_ne!(executor.log[1].2, executor.log[0].2);
}
