//! What actors tell each other, what the driver tells them, and what they ask the driver to do.

use crate::{ActorId, EdgeId, RegisterId};

/// A message to one actor. Plain data (`Copy`), so any transport can carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    /// Producer → consumer: `register` of `edge` now holds the edge's `sequence`-th value.
    Readable {
        /// The edge.
        edge: EdgeId,
        /// The register written.
        register: RegisterId,
        /// How many registers the producer wrote on this edge before this one.
        sequence: u64,
    },
    /// Consumer → producer: the consumer is done with `register`.
    Free {
        /// The edge.
        edge: EdgeId,
        /// The register released.
        register: RegisterId,
        /// The consumer's position in the edge's consumer list.
        consumer: u32,
    },
    /// Producer → consumer: the producer stopped after writing `sequences` registers on `edge`.
    EndOfStream {
        /// The edge.
        edge: EdgeId,
        /// How many registers the producer wrote on it in all.
        sequences: u64,
    },
    /// Driver → actor.
    Command(Command),
}

/// What the driver asks of an actor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Begin: the actor may act once it has a step to run.
    Start,
    /// Run `acts` more acts (see [`Plan::acts_per_step`](crate::Plan::acts_per_step)) as step
    /// number `step`. Steps queue up in order: a second step may be given before the first is done.
    RunStep {
        /// The step's number.
        step: u64,
        /// How many acts this actor owes in it.
        acts: u64,
    },
    /// End: tell consumers, by end-of-stream, that nothing more comes.
    Stop,
}

/// A message with its sender and receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The sender (the receiver itself for commands from the driver).
    pub from: ActorId,
    /// The receiver.
    pub to: ActorId,
    /// The message.
    pub message: Message,
}

/// Which part of its kind's cycle an act is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// A compute, source, sink, send or receive act: one register of each input and output.
    Whole,
    /// Input number `index` (from 0) of a group of `of` accumulated into one output register.
    Accumulate {
        /// Which input of the group.
        index: u32,
        /// The group size.
        of: u32,
    },
    /// Output number `index` (from 0) of `of` written from the one input register.
    Repeat {
        /// Which output of the group.
        index: u32,
        /// The group size.
        of: u32,
    },
    /// A variable writes its value to its outputs.
    VariableRead,
    /// A variable reads its update register and changes its state.
    VariableUpdate,
}

/// The start of an act: what [`Actor::poll_action`](crate::Actor::poll_action) asks the driver to run.
/// The registers are in [`Actor::act_registers`](crate::Actor::act_registers) until completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActStart {
    /// The step this act belongs to.
    pub step: u64,
    /// How many acts the actor completed before this one.
    pub sequence: u64,
    /// Which part of its kind's cycle this act is.
    pub stage: Stage,
}

/// What an actor asks its driver to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Deliver this message.
    Send(Envelope),
    /// Run this act, then call [`Actor::handle_completion`](crate::Actor::handle_completion).
    Act(ActStart),
    /// The actor finished all acts of this step.
    StepDone {
        /// The step.
        step: u64,
    },
}
