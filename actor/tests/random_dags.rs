//! Random plans under the simulator (many seeds) and the threaded driver: every piece completes,
//! results agree everywhere, and no actor exceeds its register budget.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use meshflow_actor::{ActorId, ActorKind, Driver, DriverConfig, Plan, Simulator};
use proptest::prelude::*;

use common::{HashExecutor, JitterCost, Memory};

const STEPS: u64 = 2;

type Outcome = (BTreeMap<(ActorId, u64), u64>, Vec<u64>);

fn simulate(plan: &Plan<()>, pieces: u64, seed: u64) -> Outcome {
    let topology = plan.check().expect("random plans are well formed");
    let memory = Memory::new(topology.register_total(), plan.actors.len());
    let mut executor = HashExecutor { memory: memory.clone() };
    let mut simulator = Simulator::new(plan, JitterCost::new(seed), seed).expect("plan checks");
    for _ in 0..STEPS {
        simulator.run_step(pieces, &mut executor).expect("random plans do not deadlock");
    }
    assert_eq!(simulator.ledger_violations(), 0, "a register was rewritten while held");
    for usage in simulator.register_usage() {
        assert!(usage.high_water <= usage.budget, "{usage:?} over budget");
    }
    assert!(simulator.stop().expect("stop drains"), "every actor stopped");
    (memory.results(), memory.variable_states())
}

fn run_threaded(plan: &Plan<()>, pieces: u64, config: DriverConfig) -> Outcome {
    let topology = plan.check().expect("random plans are well formed");
    let memory = Memory::new(topology.register_total(), plan.actors.len());
    let shared = memory.clone();
    let mut driver =
        Driver::start(plan.clone(), config, move |_, _| HashExecutor { memory: shared.clone() })
            .expect("driver starts");
    for _ in 0..STEPS {
        driver.run_step(pieces).expect("step runs");
    }
    let report = driver.stop().expect("driver stops");
    assert_eq!(report.usage.len(), plan.actors.len());
    for usage in &report.usage {
        assert!(usage.high_water <= usage.budget, "{usage:?} over budget");
    }
    (memory.results(), memory.variable_states())
}

fn expected_pieces(plan: &Plan<()>, pieces: u64) -> usize {
    let sinks = plan.actors.iter().filter(|spec| spec.kind == ActorKind::Sink).count();
    sinks * (pieces * STEPS) as usize
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_dags_agree_across_seeds_and_drivers(plan_seed in any::<u64>(), computes in 1usize..14, devices in 1u32..4) {
        let (plan, pieces) = common::random_plan(plan_seed, computes, devices);
        let reference = simulate(&plan, pieces, 0);
        prop_assert_eq!(reference.0.len(), expected_pieces(&plan, pieces));
        for seed in 1..6 {
            let outcome = simulate(&plan, pieces, seed);
            prop_assert_eq!(&outcome, &reference, "seed {}", seed);
        }
        // Spinning and batched, or parking at once and sending every message on its own.
        let config = match plan_seed % 2 {
            0 => DriverConfig { spin: Duration::from_micros(100), ..DriverConfig::default() },
            _ => DriverConfig { spin: Duration::ZERO, batch: false, ..DriverConfig::default() },
        };
        let threaded = run_threaded(&plan, pieces, config);
        prop_assert_eq!(&threaded, &reference);
    }
}

#[test]
fn variables_change_between_steps() {
    let plan_seed = (0..200u64)
        .find(|&seed| {
            let (plan, _) = common::random_plan(seed, 6, 2);
            plan.actors.iter().any(|spec| spec.kind == ActorKind::Variable)
        })
        .expect("some seed makes a variable");
    let (plan, pieces) = common::random_plan(plan_seed, 6, 2);
    let (results, states) = simulate(&plan, pieces, 3);
    let initial: Vec<u64> = (0..plan.actors.len() as u64).collect();
    let variables: Vec<usize> = (0..plan.actors.len())
        .filter(|&index| plan.actors[index].kind == ActorKind::Variable)
        .collect();
    for &index in &variables {
        assert_ne!(states[index], initial[index], "variable {index} was updated");
    }
    assert_eq!(results.len(), expected_pieces(&plan, pieces));
    let config = DriverConfig { spin: Duration::ZERO, ..DriverConfig::default() };
    assert_eq!(run_threaded(&plan, pieces, config), (results, states));
}
