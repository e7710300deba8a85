//! Workloads for measuring the runtime: the plans, the do-nothing executor and the bare-channel
//! reference that the criterion benches (`actor/benches/actor.rs`), `meshflow bench actors` and
//! the planner's simulations share, so each figure is measured one way.

use std::convert::Infallible;
use std::thread::JoinHandle;

use crossbeam::channel::{unbounded, Receiver, Sender};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Act, ActorId, ActorKind, Completion, DeviceId, Executor, Plan};

/// An executor whose acts do nothing (they only touch their output registers' ids).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoWork;

impl<P> Executor<P> for NoWork {
    type Error = Infallible;

    fn act(&mut self, act: &Act<'_, P>) -> Result<Completion, Infallible> {
        std::hint::black_box(act.outputs);
        Ok(Completion::Done)
    }
}

/// A chain of `actors` (a source, computes, a sink) with `registers` per edge, actor `i` on
/// device `device(i)`.
pub fn chain(actors: usize, registers: u32, device: impl Fn(usize) -> u32) -> Plan<()> {
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

/// `actors` actors over `devices` devices: four sources, computes reading 1 to 3 of the 40
/// actors before them, a sink on every loose end; two registers per edge.
pub fn random_plan(actors: usize, devices: u32, seed: u64) -> Plan<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut plan = Plan::new();
    let mut consumers: Vec<Vec<ActorId>> = Vec::new();
    for index in 0..actors {
        let device = DeviceId(rng.random_range(0..devices.max(1)));
        let kind = if index < 4 { ActorKind::Source } else { ActorKind::Compute };
        let actor = plan.add_actor(format!("actor{index}"), kind, device, ());
        consumers.push(Vec::new());
        if kind == ActorKind::Compute {
            let mut chosen: Vec<usize> = (0..rng.random_range(1..=3))
                .map(|_| rng.random_range(index.saturating_sub(40)..index))
                .collect();
            chosen.sort_unstable();
            chosen.dedup();
            for producer in chosen {
                consumers[producer].push(actor);
            }
        }
    }
    for index in 0..actors {
        if consumers[index].is_empty() {
            let device = plan.actors[index].device;
            let sink = plan.add_actor(format!("sink{index}"), ActorKind::Sink, device, ());
            consumers.push(Vec::new());
            consumers[index].push(sink);
        }
    }
    for (index, list) in consumers.iter().enumerate().filter(|(_, list)| !list.is_empty()) {
        plan.add_edge(ActorId(index as u32), list, 2);
    }
    plan
}

/// The reference for a hop: a bare crossbeam ping-pong between this thread and a peer thread
/// (blocking receives).
pub struct PingPong {
    to_peer: Option<Sender<u64>>,
    from_peer: Receiver<u64>,
    peer: Option<JoinHandle<()>>,
}

impl PingPong {
    /// Starts the peer thread.
    pub fn start() -> Self {
        let (to_peer, peer_inbox) = unbounded::<u64>();
        let (to_main, from_peer) = unbounded::<u64>();
        let peer = std::thread::spawn(move || {
            for token in peer_inbox {
                if to_main.send(token + 1).is_err() {
                    return;
                }
            }
        });
        PingPong { to_peer: Some(to_peer), from_peer, peer: Some(peer) }
    }

    /// `rounds` round trips; `false` if the peer is gone.
    pub fn round_trips(&self, rounds: u64) -> bool {
        let Some(to_peer) = &self.to_peer else { return false };
        (0..rounds).all(|round| to_peer.send(round).is_ok() && self.from_peer.recv().is_ok())
    }
}

impl Drop for PingPong {
    fn drop(&mut self) {
        self.to_peer.take();
        if let Some(peer) = self.peer.take() {
            let _ = peer.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Simulator, UniformCost};

    #[test]
    fn workloads_are_valid_plans_and_the_reference_answers() {
        let chained = chain(5, 2, |index| (index % 2) as u32);
        assert_eq!(chained.actors.len(), 5);
        assert_eq!(chained.edges.len(), 4);
        let random = random_plan(200, 3, 7);
        let topology = random.check().unwrap();
        assert!(random.acts_per_step(&topology, 4).unwrap().iter().all(|&acts| acts == 4));
        let cost = UniformCost { act: 10, latency: 0 };
        let report = Simulator::new(&chained, cost, 0).unwrap().run_step(1, &mut NoWork).unwrap();
        assert_eq!(report.finished_at, 50, "five acts of 10 ns one after another");
        assert!(PingPong::start().round_trips(8));
    }
}
