//! The threaded driver: back-pressure, orderly failure, asynchronous completions, traces.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crossbeam::channel;
use meshflow_actor::{
    Act, ActorId, ActorKind, Completion, CompletionHandle, DeviceId, Driver, DriverConfig,
    Envelope, Error, Executor, Inbound, Plan, Transport,
};

use common::{HashExecutor, Memory, Never};

fn guarded() -> DriverConfig {
    DriverConfig { step_timeout: Some(Duration::from_secs(20)), ..DriverConfig::default() }
}

/// A fast producer and a consumer that sleeps; counts registers written but not yet consumed.
#[derive(Clone, Default)]
struct Counted {
    produced: Arc<AtomicU64>,
    consumed: Arc<AtomicU64>,
    most_in_flight: Arc<AtomicU64>,
}

impl Executor<()> for Counted {
    type Error = Never;

    fn act(&mut self, act: &Act<'_, ()>) -> Result<Completion, Never> {
        if act.kind == ActorKind::Source {
            let produced = self.produced.fetch_add(1, Ordering::SeqCst) + 1;
            let in_flight = produced - self.consumed.load(Ordering::SeqCst);
            self.most_in_flight.fetch_max(in_flight, Ordering::SeqCst);
        } else {
            std::thread::sleep(Duration::from_micros(50));
            self.consumed.fetch_add(1, Ordering::SeqCst);
        }
        Ok(Completion::Done)
    }
}

fn most_in_flight(pieces: u64, registers: u32) -> (u64, u32) {
    let mut plan = Plan::new();
    let source = plan.add_actor("fast", ActorKind::Source, DeviceId(0), ());
    let sink = plan.add_actor("slow", ActorKind::Sink, DeviceId(1), ());
    plan.add_edge(source, &[sink], registers);
    let counted = Counted::default();
    let shared = counted.clone();
    let mut driver = Driver::start(plan, guarded(), move |_, _| shared.clone()).expect("starts");
    driver.run_step(pieces).expect("step runs");
    let report = driver.stop().expect("stops");
    assert_eq!(counted.consumed.load(Ordering::SeqCst), pieces);
    (counted.most_in_flight.load(Ordering::SeqCst), report.usage[source.index()].high_water)
}

#[test]
fn slow_consumer_holds_fast_producer_to_its_budget() {
    for registers in [1, 3] {
        let few = most_in_flight(40, registers);
        let many = most_in_flight(400, registers);
        assert_eq!(few, (u64::from(registers), registers), "40 pieces, {registers} registers");
        assert_eq!(many, few, "in flight stays flat as pieces grow 10x");
    }
}

/// Fails the act of one actor at one piece; passes everything else to the hash executor.
struct Failing {
    inner: HashExecutor,
    actor: ActorId,
    sequence: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("kernel exploded")]
struct Exploded;

impl Executor<()> for Failing {
    type Error = Exploded;

    fn act(&mut self, act: &Act<'_, ()>) -> Result<Completion, Exploded> {
        if (act.actor, act.sequence) == (self.actor, self.sequence) {
            return Err(Exploded);
        }
        Ok(self.inner.act(act).unwrap_or(Completion::Done))
    }
}

#[test]
fn act_error_ends_the_step_on_every_thread() {
    let (plan, pieces) = common::random_plan(11, 12, 3);
    let topology = plan.check().expect("well formed");
    let memory = Memory::new(topology.register_total(), plan.actors.len());
    let victim =
        plan.actors.iter().position(|spec| spec.kind == ActorKind::Compute).expect("a compute");
    let victim = ActorId(victim as u32);
    let victim_name = plan.name(victim);
    let mut driver = Driver::start(plan, guarded(), move |_, _| Failing {
        inner: HashExecutor { memory: memory.clone() },
        actor: victim,
        sequence: 1,
    })
    .expect("starts");
    let result = (0..3).try_for_each(|_| driver.run_step(pieces));
    let Err(Error::Act { actor, name, sequence, source }) = result else {
        panic!("expected the act error, got {result:?}");
    };
    assert_eq!(
        (actor, name, sequence, source.to_string()),
        (victim, victim_name, 1, "kernel exploded".into())
    );
    assert!(matches!(driver.run_step(pieces), Err(Error::Stopped { .. })));
    assert!(matches!(driver.stop(), Err(Error::Stopped { .. })));
}

/// Computes at once but completes later, from another thread, as a GPU stream would.
struct Deferred {
    inner: HashExecutor,
    later: channel::Sender<ActorId>,
}

impl Deferred {
    fn new(inner: HashExecutor, handle: CompletionHandle) -> Self {
        let (later, pending) = channel::unbounded::<ActorId>();
        std::thread::spawn(move || {
            for actor in pending {
                std::thread::yield_now();
                if handle.complete(actor).is_err() {
                    return;
                }
            }
        });
        Self { inner, later }
    }
}

impl Executor<()> for Deferred {
    type Error = Never;

    fn act(&mut self, act: &Act<'_, ()>) -> Result<Completion, Never> {
        self.inner.act(act)?;
        let _ = self.later.send(act.actor);
        Ok(Completion::Pending)
    }
}

#[test]
fn asynchronous_completions_give_the_simulated_results() {
    let (plan, pieces) = common::random_plan(23, 10, 3);
    let topology = plan.check().expect("well formed");
    let memory = common::simulated_two_steps(&plan, pieces, 4);

    let threaded = Memory::new(topology.register_total(), plan.actors.len());
    let shared = threaded.clone();
    let mut driver = Driver::start(plan, guarded(), move |_, handle| {
        Deferred::new(HashExecutor { memory: shared.clone() }, handle)
    })
    .expect("starts");
    driver.run_step(pieces).expect("step one");
    driver.run_step(pieces).expect("step two");
    driver.stop().expect("stops");
    assert!(!memory.results().is_empty());
    assert_eq!(threaded.results(), memory.results());
    assert_eq!(threaded.variable_states(), memory.variable_states());
}

#[test]
fn driver_trace_has_every_act_in_its_device_lane() {
    let (plan, pieces) = common::random_plan(5, 8, 2);
    let topology = plan.check().expect("well formed");
    let acts: u64 = plan.acts_per_step(&topology, pieces).expect("rates").iter().sum();
    let memory = Memory::new(topology.register_total(), plan.actors.len());
    let config = DriverConfig { trace: true, ..guarded() };
    let mut driver =
        Driver::start(plan.clone(), config, move |_, _| HashExecutor { memory: memory.clone() })
            .expect("starts");
    driver.run_step(pieces).expect("runs");
    let report = driver.stop().expect("stops");
    assert_eq!(report.trace.events.len() as u64, acts);
    for event in &report.trace.events {
        assert_eq!(event.device, plan.actors[event.actor.index()].device);
        assert!(event.start <= event.end);
    }
    let json = report.trace.chrome_json(&plan);
    let devices: std::collections::BTreeSet<u32> =
        plan.actors.iter().map(|spec| spec.device.0).collect();
    let lanes = json["traceEvents"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|event| event["ph"] == "M")
        .count();
    assert_eq!(lanes, devices.len());
}

#[test]
fn under_provisioned_plan_times_out_naming_the_blocked_actors() {
    let mut plan = Plan::new();
    let source = plan.add_actor("source", ActorKind::Source, DeviceId(0), ());
    let accumulate =
        plan.add_actor("accumulate", ActorKind::Accumulate { pieces: 3 }, DeviceId(1), ());
    let repeat = plan.add_actor("repeat", ActorKind::Repeat { pieces: 3 }, DeviceId(1), ());
    let join = plan.add_actor("join", ActorKind::Sink, DeviceId(0), ());
    plan.add_edge(source, &[accumulate, join], 1);
    plan.add_edge(accumulate, &[repeat], 1);
    plan.add_edge(repeat, &[join], 1);
    let config =
        DriverConfig { step_timeout: Some(Duration::from_millis(300)), ..DriverConfig::default() };
    let mut driver = Driver::start(plan, config, |_, _| Counted::default()).expect("starts");
    let Err(Error::StepTimeout { blocked, .. }) = driver.run_step(3) else {
        panic!("expected a timeout");
    };
    let names: Vec<&str> = blocked.iter().map(|entry| entry.name.as_str()).collect();
    assert_eq!(names, ["source", "accumulate", "repeat", "join"]);
}

struct Panicking;

impl Executor<()> for Panicking {
    type Error = Never;

    fn act(&mut self, act: &Act<'_, ()>) -> Result<Completion, Never> {
        assert!(act.device != DeviceId(1), "device one is broken");
        Ok(Completion::Done)
    }
}

#[test]
fn executor_panic_is_an_error_not_a_hang() {
    let (plan, pieces) = common::random_plan(3, 10, 2);
    assert!(plan.actors.iter().any(|spec| spec.device == DeviceId(1)));
    let mut driver =
        Driver::start(plan, DriverConfig::default(), |_, _| Panicking).expect("starts");
    let Err(Error::Stopped { reason }) = driver.run_step(pieces) else {
        panic!("expected an error")
    };
    assert!(reason.contains("device1 panicked: device one is broken"), "{reason}");
}

/// Stands in for the network between two processes: hands batches to the peer's inbound.
#[derive(Default)]
struct Loopback {
    peer: OnceLock<Inbound>,
}

impl Transport for Loopback {
    fn send(&self, _device: DeviceId, envelopes: Vec<Envelope>) -> Result<(), Error> {
        let peer = self.peer.get().ok_or(Error::Stopped { reason: "peer not connected".into() })?;
        peer.deliver(envelopes)
    }
}

#[test]
fn two_processes_linked_by_a_transport_give_the_simulated_results() {
    let (plan, pieces) = common::random_plan(41, 12, 4);
    let topology = plan.check().expect("well formed");
    let reference = common::simulated_two_steps(&plan, pieces, 8);

    let memory = Memory::new(topology.register_total(), plan.actors.len());
    let (to_second, to_first) = (Arc::new(Loopback::default()), Arc::new(Loopback::default()));
    let start = |devices: &[DeviceId], transport: Arc<Loopback>| {
        let shared = memory.clone();
        let executor = move |_, _| HashExecutor { memory: shared.clone() };
        Driver::start_partial(plan.clone(), guarded(), devices, Some(transport), executor)
            .expect("starts")
    };
    let mut first = start(&[DeviceId(0), DeviceId(1)], to_second.clone());
    let mut second = start(&[DeviceId(2), DeviceId(3)], to_first.clone());
    to_first.peer.set(first.inbound()).expect("set once");
    to_second.peer.set(second.inbound()).expect("set once");
    let other = std::thread::spawn(move || {
        second.run_step(pieces)?;
        second.run_step(pieces)?;
        second.stop()
    });
    first.run_step(pieces).expect("step one");
    first.run_step(pieces).expect("step two");
    let (near, far) =
        (first.stop().expect("stops"), other.join().expect("no panic").expect("stops"));
    assert!(!near.usage.is_empty() && !far.usage.is_empty(), "both processes run actors");
    assert_eq!(near.usage.len() + far.usage.len(), plan.actors.len());
    assert_eq!(memory.results(), reference.results());
    assert_eq!(memory.variable_states(), reference.variable_states());
}
