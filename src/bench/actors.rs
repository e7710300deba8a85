//! `meshflow bench actors`: the actor runtime and the session against references measured in the
//! same run.
//!
//! - acts/s of a 64-actor chain on one device thread ([`Driver`], default config) against the
//!   deterministic [`Simulator`] stepping the same plan (the state machines without threads);
//! - the latency of one hop between two device threads (a 33-actor chain alternating between
//!   them) against a bare crossbeam ping-pong between two threads (blocking receives);
//! - the overhead of an empty training step (one parameter of one element per device, AdamW) of a [`Session`] on
//!   1 and 4 CPU devices, against the same crossbeam round trip.

use crate::actor::workload::{chain, NoWork, PingPong};
use crate::actor::{Driver, DriverConfig, Plan, Simulator, UniformCost};
use crate::ops::ops::adamw::AdamW;
use crate::ops::{DType, Tensor as HostTensor};
use crate::placement::{DeviceType, NdSbp, Placement, Sbp};
use crate::schedule::Schedule;
use crate::session::{Optimizer, Session, SessionConfig, Training};
use crate::Graph;

use super::report::Figure;
use super::train::{time_steps, Timing};
use super::BenchError;

const CHAIN: usize = 64;
const PIECES: u64 = 256;
const HOPS: usize = 32;

fn actor_error(e: impl std::fmt::Display) -> BenchError {
    BenchError::Actor(e.to_string())
}

fn start(plan: &Plan<()>) -> Result<Driver<()>, BenchError> {
    Driver::start(plan.clone(), DriverConfig::default(), |_, _| NoWork).map_err(actor_error)
}

/// Acts per second of the driver and of the simulator on a 64-actor chain, 256 pieces a step.
pub fn acts_per_second(timing: Timing) -> Result<Figure, BenchError> {
    let plan = chain(CHAIN, 2, |_| 0);
    let acts = (CHAIN as u64 * PIECES) as f64;
    let mut driver = start(&plan)?;
    let threaded = time_steps(timing, || driver.run_step(PIECES).map_err(actor_error), || {})?;
    let cost = UniformCost { act: 1, latency: 0 };
    let mut simulator = Simulator::new(&plan, cost, 0).map_err(actor_error)?;
    let simulated = time_steps(
        timing,
        || simulator.run_step(PIECES, &mut NoWork).map(drop).map_err(actor_error),
        || {},
    )?;
    Ok(Figure {
        name: "chain of 64, one thread".into(),
        value: acts / threaded.median,
        unit: "acts/s".into(),
        higher_is_better: true,
        reference: "simulator".into(),
        reference_value: acts / simulated.median,
    })
}

/// Microseconds per hop between two device threads, and of a bare crossbeam ping-pong.
pub fn hop_latency(timing: Timing) -> Result<Figure, BenchError> {
    let plan = chain(HOPS + 1, 1, |index| (index % 2) as u32);
    let mut driver = start(&plan)?;
    let hops = time_steps(timing, || driver.run_step(1).map_err(actor_error), || {})?;
    Ok(Figure {
        name: "hop between two threads".into(),
        value: hops.median / HOPS as f64 * 1e6,
        unit: "µs".into(),
        higher_is_better: false,
        reference: "crossbeam ping-pong".into(),
        reference_value: ping_pong_seconds(timing)? / 2.0 * 1e6,
    })
}

/// Seconds of one round trip between two threads over crossbeam channels.
pub fn ping_pong_seconds(timing: Timing) -> Result<f64, BenchError> {
    const ROUNDS: u64 = 64;
    let ping_pong = PingPong::start();
    let peer_gone = || BenchError::Panic("ping-pong peer".into());
    let times = time_steps(
        timing,
        || if ping_pong.round_trips(ROUNDS) { Ok(()) } else { Err(peer_gone()) },
        || {},
    )?;
    Ok(times.median / ROUNDS as f64)
}

/// Microseconds of an empty training step on `devices` CPU devices (data parallel).
pub fn empty_step_seconds(devices: usize, timing: Timing) -> Result<f64, BenchError> {
    let placement = Placement::line(DeviceType::Cpu, devices)?;
    let graph = Graph::new();
    let split = Some(NdSbp(vec![Sbp::Split(0)]));
    let x = graph.input("x", [devices], DType::F32, &placement, split)?;
    let ones = HostTensor::from_vec(vec![1.0f32; devices], [devices])?;
    let w = graph.parameter("w", ones, &placement, Some(NdSbp(vec![Sbp::Broadcast])))?;
    let loss = x.mul(&w)?.sum(&[0], false)?;
    let optimizer = Optimizer::AdamW(AdamW::new(1e-3));
    let training = Training::new(&loss, optimizer, Schedule::Constant);
    let config = SessionConfig { devices, ..SessionConfig::default() };
    let mut session = Session::new(&graph, &[&loss], Some(training), config)?;
    let feed = HostTensor::from_vec(vec![1.0f32; devices], [devices])?;
    let times = time_steps(timing, || session.step(&[(&x, feed.clone())]).map(drop), || {})?;
    Ok(times.median)
}

/// The whole `actors` section; `tick` before each figure.
pub fn measure(timing: Timing, mut tick: impl FnMut(&str)) -> Result<Vec<Figure>, BenchError> {
    tick("acts/s");
    let mut figures = vec![acts_per_second(timing)?];
    tick("hop latency");
    figures.push(hop_latency(timing)?);
    let round_trip = ping_pong_seconds(timing)? * 1e6;
    for devices in [1, 4] {
        tick(&format!("empty step on {devices} devices"));
        figures.push(Figure {
            name: format!("empty training step, {devices} devices"),
            value: empty_step_seconds(devices, timing)? * 1e6,
            unit: "µs".into(),
            higher_is_better: false,
            reference: "crossbeam round trip".into(),
            reference_value: round_trip,
        });
    }
    Ok(figures)
}
