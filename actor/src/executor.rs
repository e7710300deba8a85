//! The user's side of an act: the runtime moves register ids, the executor owns the buffers behind
//! them and runs the kernels.

use crate::{ActStart, Actor, ActorId, ActorKind, DeviceId, Error, Plan, RegisterId, Stage};

/// Everything an executor needs to run one act.
#[derive(Debug)]
pub struct Act<'a, P> {
    /// The acting actor.
    pub actor: ActorId,
    /// Its name.
    pub name: &'a str,
    /// Its kind.
    pub kind: ActorKind,
    /// Its device.
    pub device: DeviceId,
    /// What the plan says it does.
    pub payload: &'a P,
    /// The step this act belongs to.
    pub step: u64,
    /// How many acts the actor completed before this one. For a per-piece actor this is the piece
    /// number counted over all steps.
    pub sequence: u64,
    /// Which part of its kind's cycle this act is.
    pub stage: Stage,
    /// One readable register per input edge (none for a source or a variable's read).
    pub inputs: &'a [RegisterId],
    /// One register to write per output edge (none for a sink or a variable's update).
    pub outputs: &'a [RegisterId],
}

impl<P> Clone for Act<'_, P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P> Copy for Act<'_, P> {}

/// Whether an act finished inside [`Executor::act`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The act is complete; its outputs are written.
    Done,
    /// The act continues asynchronously (a GPU stream); the executor reports its end through
    /// the [`CompletionHandle`](crate::CompletionHandle) it was given. The simulator treats this
    /// as `Done` after the act's simulated duration.
    Pending,
}

/// Runs acts. The threaded driver makes one executor per device, on that device's thread; the
/// simulator uses one for all.
pub trait Executor<P> {
    /// The executor's error; it ends the step on every thread and is returned as
    /// [`Error::Act`](crate::Error::Act).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Runs one act: reads `act.inputs`, writes `act.outputs`.
    fn act(&mut self, act: &Act<'_, P>) -> Result<Completion, Self::Error>;

    /// What the threaded driver runs its device thread's whole serving loop inside (see
    /// [`Enclosure`]). Default: nothing.
    fn enclosure(&self) -> Option<Enclosure> {
        None
    }
}

/// Runs a device thread's serving loop inside what every act of the thread needs around it: an
/// executor whose kernels use a thread pool enters the pool once for the thread's life, so its
/// acts run on a pool thread and no act hands its work to the pool (and waits for a parked pool
/// thread to wake) on its own.
pub type Enclosure = std::sync::Arc<dyn Fn(&mut (dyn FnMut() + Send)) + Send + Sync>;

/// Hands `executor` the act `start` of `actor` (a state machine of `plan`); an executor error
/// becomes [`Error::Act`] naming the actor. Both drivers start acts here.
pub(crate) fn run_act<P, E: Executor<P>>(
    executor: &mut E,
    plan: &Plan<P>,
    actor: &Actor,
    start: ActStart,
) -> Result<Completion, Error> {
    let id = actor.id();
    let spec = &plan.actors[id.index()];
    let (inputs, outputs) = actor.act_registers();
    let act = Act {
        actor: id,
        name: &spec.name,
        kind: spec.kind,
        device: spec.device,
        payload: &spec.payload,
        step: start.step,
        sequence: start.sequence,
        stage: start.stage,
        inputs,
        outputs,
    };
    executor.act(&act).map_err(|source| Error::Act {
        actor: id,
        name: spec.name.clone(),
        sequence: start.sequence,
        source: Box::new(source),
    })
}
