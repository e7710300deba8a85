//! The session on the actor runtime: a program lowered to actors ([`Compiled`]) and the
//! executor that runs a rank's acts on its [`Worker`] ([`RankExecutor`]).
//!
//! Every edge of the session's plan stays on one rank (no join actors: a collective or a
//! receive is itself the meeting point of the ranks), so each rank's thread runs its chain of
//! acts in the order the lowering chose, which issues collectives in one order on every rank of
//! a group, and a job's processes exchange tensors only, never actor messages.
//!
//! On a GPU rank an act returns once its kernels are enqueued on the device's stream: its
//! consumers on the same stream are told at once, and an act whose consumer sits on another
//! device thread completes only when the event recorded after its kernels has completed
//! ([`super::gpu_events`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use meshflow_actor::{Act, ActorId, Completion, CompletionHandle, Enclosure, Executor};

use super::gpu_events::{crossing_actors, EventWatcher};
use super::worker::{RunRequest, Worker};
use crate::compile::actors::{layout_ranks, ActorProgram, ActorWork, Phase, Work};
use crate::compile::{Program, Slot, Step};
use crate::graph::Source;
use crate::{Error, Result};

/// Where a shard of the step in flight lives: its slot and piece.
pub type Key = (Slot, u32);

/// The piece number of a sum over the pieces.
pub const SUM: u32 = u32::MAX;

/// A program, its actor plan, and what each act reads and frees.
pub struct Compiled {
    /// The program.
    pub program: Arc<Program>,
    /// Its actors.
    pub lowered: ActorProgram,
    /// Slots whose shards come back after a step.
    pub fetch: Vec<Slot>,
    /// Variables (by name) that take the shard of a slot after a step.
    pub assign: Vec<(String, Slot)>,
    /// Per slot, the phase of its writer.
    slot_phase: Vec<Phase>,
    /// Per rank, the keys something reads there (acts, or the end of the step).
    read: HashMap<usize, HashSet<Key>>,
    /// Per rank, the keys acts read there.
    acts_read: HashMap<usize, HashSet<Key>>,
    /// Per actor, the keys it reads last on its rank.
    frees: Vec<Vec<Key>>,
    /// Per actor, true when a consumer of its outputs runs on another device thread.
    crossing: Vec<bool>,
    /// Variables a step may take out of a worker's keeping (see [`Compiled::moves`]): by
    /// name, the slot of its leaf and the slot it is assigned from.
    movable: HashMap<String, (Slot, Slot)>,
}

impl Compiled {
    /// Indexes `lowered` (a lowering of `program` with one stream per rank).
    pub fn new(
        program: Arc<Program>,
        lowered: ActorProgram,
        fetch: Vec<Slot>,
        assign: Vec<(String, Slot)>,
    ) -> Self {
        let mut slot_phase = vec![Phase::Before; program.slots.len()];
        for (step, phase) in program.steps.iter().zip(&lowered.phases) {
            for slot in crate::compile::actors::step_slots(step).1 {
                slot_phase[slot.0 as usize] = *phase;
            }
        }
        let crossing = crossing_actors(&lowered.plan);
        let movable = movable_variables(&program, &assign);
        let mut compiled = Compiled {
            movable,
            crossing,
            program,
            lowered,
            fetch,
            assign,
            slot_phase,
            read: HashMap::new(),
            acts_read: HashMap::new(),
            frees: Vec::new(),
        };
        compiled.index_reads();
        compiled
    }

    /// The key under which an act of `phase` for `piece` finds `slot`.
    pub fn key(&self, slot: Slot, reader: Phase, piece: u32) -> Key {
        match self.slot_phase[slot.0 as usize] {
            Phase::Piece if reader != Phase::Piece && self.lowered.accumulated[slot.0 as usize] => {
                (slot, SUM)
            }
            Phase::Piece => (slot, piece),
            _ => (slot, 0),
        }
    }

    /// The key of `slot` at the end of a step (fetches, assignments).
    pub fn final_key(&self, slot: Slot) -> Key {
        self.key(slot, Phase::After, 0)
    }

    /// True when `slot` is written once per piece and not summed: it has no value at the end
    /// of a step of several pieces.
    pub fn per_piece(&self, slot: Slot) -> bool {
        self.lowered.pieces > 1
            && self.slot_phase[slot.0 as usize] == Phase::Piece
            && !self.lowered.accumulated[slot.0 as usize]
    }

    /// True when something reads `key` on `rank` after it is written.
    pub fn is_read(&self, rank: usize, key: Key) -> bool {
        self.read.get(&rank).is_some_and(|keys| keys.contains(&key))
    }

    /// True when an act reads `key` on `rank` (not only the end of the step).
    pub fn is_read_by_acts(&self, rank: usize, key: Key) -> bool {
        self.acts_read.get(&rank).is_some_and(|keys| keys.contains(&key))
    }

    /// True when a consumer of `actor`'s outputs runs on another device thread (stream).
    pub fn crosses_streams(&self, actor: ActorId) -> bool {
        self.crossing.get(actor.index()).copied().unwrap_or(false)
    }

    /// True when some actor has a consumer on another device thread.
    pub fn any_crossing(&self) -> bool {
        self.crossing.contains(&true)
    }

    /// The keys `actor` reads last on its rank.
    pub fn frees(&self, actor: ActorId) -> &[Key] {
        self.frees.get(actor.index()).map_or(&[], Vec::as_slice)
    }

    /// Whether the step may take `rank`'s shard of variable `name` out of the worker's keeping
    /// for its leaf (so that its last reader, the update, holds the only reference and writes it
    /// in place): the variable has one leaf and `rank` gets its new shard at the end of the
    /// step. Then the key of the leaf's shard (where a step that failed before the update left
    /// it intact), else `None`.
    pub fn moves(&self, name: &str, rank: usize) -> Option<Key> {
        let (leaf, assigned) = self.movable.get(name)?;
        let gets_new = layout_ranks(&self.program.slot(*assigned).layout).contains(&rank);
        gets_new.then(|| self.key(*leaf, Phase::Before, 0))
    }

    /// The keys the act of `work` reads.
    fn reads(&self, work: &ActorWork) -> Vec<Key> {
        let Work::Step { step } = work.work else { return Vec::new() };
        let (phase, piece, rank) = (self.lowered.phases[step], work.piece, work.rank);
        match &self.program.steps[step] {
            Step::Leaf { .. } => Vec::new(),
            Step::Boxing { from, .. } => {
                let holds = layout_ranks(&self.program.slot(*from).layout).contains(&rank);
                holds.then(|| self.key(*from, phase, piece)).into_iter().collect()
            }
            Step::Kernel { node, inputs, .. } => {
                let placement = &self.program.graph.node(*node).placement;
                if placement.coordinates(rank).is_none() {
                    return Vec::new();
                }
                inputs.iter().map(|slot| self.key(*slot, phase, piece)).collect()
            }
        }
    }

    fn index_reads(&mut self) {
        let kept: Vec<Key> = self
            .fetch
            .iter()
            .chain(self.assign.iter().map(|(_, slot)| slot))
            .map(|slot| self.final_key(*slot))
            .collect();
        let mut frees = vec![Vec::new(); self.lowered.plan.actors.len()];
        let mut read: HashMap<usize, HashSet<Key>> = HashMap::new();
        let mut acts_read: HashMap<usize, HashSet<Key>> = HashMap::new();
        for ((rank, _), chain) in &self.lowered.chains {
            let mut last: HashMap<Key, ActorId> = HashMap::new();
            for &actor in chain {
                for key in self.reads(&self.lowered.plan.actors[actor.index()].payload) {
                    last.insert(key, actor);
                }
            }
            acts_read.entry(*rank).or_default().extend(last.keys().copied());
            let keys = read.entry(*rank).or_default();
            keys.extend(kept.iter().copied());
            for (key, actor) in last {
                keys.insert(key);
                if !kept.contains(&key) {
                    frees[actor.index()].push(key);
                }
            }
        }
        self.read = read;
        self.acts_read = acts_read;
        self.frees = frees;
    }
}

/// Per variable with exactly one leaf step that the step assigns, the slots of its leaf and of
/// its new value.
fn movable_variables(
    program: &Program,
    assign: &[(String, Slot)],
) -> HashMap<String, (Slot, Slot)> {
    let mut leaves: HashMap<String, Vec<Slot>> = HashMap::new();
    for step in &program.steps {
        let Step::Leaf { value, slot } = step else { continue };
        let info = program.graph.value(*value);
        if matches!(info.source, Source::Parameter { .. }) {
            let name = info.name.clone().unwrap_or_else(|| program.graph.label(*value));
            leaves.entry(name).or_default().push(*slot);
        }
    }
    assign
        .iter()
        .filter_map(|(name, assigned)| match leaves.get(name).map(Vec::as_slice) {
            Some(&[leaf]) => Some((name.clone(), (leaf, *assigned))),
            _ => None,
        })
        .collect()
}

/// The request of the step in flight, set by the session before it runs the step.
pub type Current = Arc<Mutex<Option<Arc<RunRequest>>>>;

/// Runs one rank's acts on its [`Worker`].
pub struct RankExecutor {
    /// The rank's state.
    pub worker: Arc<Mutex<Worker>>,
    /// The program.
    pub compiled: Arc<Compiled>,
    /// The step in flight.
    pub current: Current,
    /// The request of the driver step last seen.
    pub cached: Option<(u64, Arc<RunRequest>)>,
    /// Reports acts left pending to the driver.
    pub completion: CompletionHandle,
    /// Completes GPU acts whose consumers are on other streams once their events complete
    /// (present when the plan has such acts).
    pub events: Option<Arc<EventWatcher>>,
}

impl RankExecutor {
    fn request(&mut self, step: u64) -> Result<Arc<RunRequest>> {
        if let Some((seen, request)) = &self.cached {
            if *seen == step {
                return Ok(Arc::clone(request));
            }
        }
        let current = lock(&self.current).clone();
        let request =
            current.ok_or_else(|| Error::Runtime("a step ran without a request".into()))?;
        self.cached = Some((step, Arc::clone(&request)));
        Ok(request)
    }
}

impl Executor<ActorWork> for RankExecutor {
    type Error = Error;

    fn enclosure(&self) -> Option<Enclosure> {
        lock(&self.worker).enclosure()
    }

    fn act(&mut self, act: &Act<'_, ActorWork>) -> Result<Completion> {
        let Work::Step { step } = act.payload.work else {
            return Ok(Completion::Done);
        };
        let request = self.request(act.step)?;
        let mut worker = lock(&self.worker);
        worker.act(&self.compiled, &request, act.actor, step, act.payload.piece)?;
        let gpu = worker.backend_mut().gpu().cloned();
        drop(worker);
        match (gpu, &self.events) {
            (Some(device), Some(events)) if self.compiled.crosses_streams(act.actor) => {
                let event = device.record()?;
                let (handle, actor) = (self.completion.clone(), act.actor);
                // A failed report means the driver stopped: the step is over already.
                let notify = Box::new(move || drop(handle.complete(actor)));
                events.watch(Box::new(event), notify)?;
                Ok(Completion::Pending)
            }
            // Consumers on this stream (or a CPU rank): stream order suffices, tell them now.
            _ => Ok(Completion::Done),
        }
    }
}

/// Locks a mutex, taking the value of a poisoned one (a panicking act already failed its step).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}
