//! The one error type of `meshflow-actor`.

use std::fmt;

use crate::{ActorId, ActorKind, EdgeId, RegisterId};

/// Everything that can go wrong when a plan is checked or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- malformed plans ---
    /// An edge names an actor the plan does not have.
    #[error("{edge} (produced by {producer}) names {actor}, which the plan does not have")]
    MissingActor {
        /// The edge.
        edge: EdgeId,
        /// The missing actor.
        actor: ActorId,
        /// The name of the edge's producer.
        producer: String,
    },
    /// An edge with no registers: its producer could never write.
    #[error("{edge} produced by {producer} has zero registers")]
    ZeroRegisters {
        /// The edge.
        edge: EdgeId,
        /// The name of its producer.
        producer: String,
    },
    /// An edge with no consumers, or one consumer listed twice.
    #[error("{edge} produced by {producer} has no consumers or a consumer listed twice")]
    Consumers {
        /// The edge.
        edge: EdgeId,
        /// The name of its producer.
        producer: String,
    },
    /// An actor whose inputs or outputs do not fit its kind.
    #[error(
        "actor {actor} ({kind:?}) has {inputs} inputs and {outputs} outputs; expected {expected}"
    )]
    Arity {
        /// The actor's name.
        actor: String,
        /// Its kind.
        kind: ActorKind,
        /// How many input edges it has.
        inputs: usize,
        /// How many output edges it has.
        outputs: usize,
        /// What its kind needs.
        expected: &'static str,
    },
    /// A cycle that does not pass through a variable's update: no register on it could ever be
    /// readable first. Names the actors on cycles (actors merely fed by one are left out).
    #[error("cycle without an initial register (no variable on it) through actors {actors:?}")]
    Cycle {
        /// The actors on cycles, in plan order.
        actors: Vec<String>,
    },
    /// The inputs of an actor carry different numbers of registers per step.
    #[error("actor {actor}: inputs carry different registers per step: {rates:?}")]
    RateMismatch {
        /// The actor's name.
        actor: String,
        /// Per input, its producer and the registers per step it writes.
        rates: Vec<(String, u64)>,
    },
    /// An accumulation whose group does not divide the registers per step of its input.
    #[error("actor {actor}: accumulates groups of {group} but its input carries {rate} per step")]
    Indivisible {
        /// The actor's name.
        actor: String,
        /// The registers per step of its input.
        rate: u64,
        /// Its group size.
        group: u32,
    },

    // --- protocol violations (a peer sent something the state machine cannot accept) ---
    /// A message that does not fit the receiving actor's state.
    #[error("actor {actor}: unexpected message: {reason}")]
    Protocol {
        /// The receiving actor.
        actor: ActorId,
        /// What was wrong.
        reason: String,
    },

    // --- running ---
    /// The executor failed an act; the step was ended on every thread.
    #[error("act of actor {actor} ({name}) on piece {sequence} failed: {source}")]
    Act {
        /// The actor.
        actor: ActorId,
        /// Its name.
        name: String,
        /// Which of its acts failed.
        sequence: u64,
        /// The executor's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No actor can act, no message is in flight, and work is left: the plan deadlocks.
    #[error("{0}")]
    Deadlock(DeadlockReport),
    /// The driver was stopped or aborted before, or one of its threads vanished.
    #[error("the driver is no longer running: {reason}")]
    Stopped {
        /// Why.
        reason: String,
    },
    /// A step did not finish within the configured time.
    #[error("step did not finish within {seconds} s; blocked: {blocked:?}")]
    StepTimeout {
        /// The limit, in seconds.
        seconds: f64,
        /// The actors that owed acts and could not act when the step was aborted.
        blocked: Vec<Blocked>,
    },
    /// An I/O error while writing a trace.
    #[error("writing trace: {0}")]
    Io(#[from] std::io::Error),
}

/// Which actors are blocked, and on what, when nothing can progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadlockReport {
    /// The virtual time at which progress stopped.
    pub time: u64,
    /// Every actor with work left in the step.
    pub blocked: Vec<Blocked>,
}

/// One actor that cannot act.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    /// The actor.
    pub actor: ActorId,
    /// Its name.
    pub name: String,
    /// Acts it still owes this step.
    pub acts_left: u64,
    /// What it waits for.
    pub waiting_for: Vec<Wait>,
}

/// One thing an actor waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wait {
    /// The register with this sequence number on an input edge is not readable yet.
    Readable {
        /// The input edge.
        edge: EdgeId,
        /// Its producer.
        producer: ActorId,
        /// The sequence number the actor needs next.
        sequence: u64,
    },
    /// The next register of an output edge is still held by consumers.
    Free {
        /// The output edge.
        edge: EdgeId,
        /// The register it would write next.
        register: RegisterId,
        /// The consumers that have not acknowledged it.
        holders: Vec<ActorId>,
    },
}

impl fmt::Display for DeadlockReport {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "deadlock at time {}:", self.time)?;
        for blocked in &self.blocked {
            write!(
                formatter,
                " [{} ({}), {} acts left, waits for",
                blocked.name, blocked.actor, blocked.acts_left
            )?;
            for wait in &blocked.waiting_for {
                match wait {
                    Wait::Readable { edge, producer, sequence } => {
                        write!(formatter, " readable #{sequence} on {edge} from {producer};")?
                    }
                    Wait::Free { edge, register, holders } => {
                        write!(formatter, " free {register} on {edge} held by {holders:?};")?
                    }
                }
            }
            write!(formatter, "]")?;
        }
        Ok(())
    }
}
