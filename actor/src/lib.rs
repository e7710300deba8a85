//! The actor runtime of meshflow: registers, back-pressure, and the machinery that runs a physical
//! plan, knowing nothing of tensors, ops or networks.
//!
//! - [`Plan`] (actors with an [`ActorKind`], a [`DeviceId`] and an opaque payload; edges with a
//!   producer, consumers and a register count) is what the compiler fills; [`Plan::check`] rejects
//!   malformed plans with an [`Error`] naming the actors.
//! - [`Actor`] is the sans-IO state machine of one actor: messages and completions in
//!   (`handle_*`), actions out (`poll_action`). Its module doc states the contract.
//! - [`Executor`] is the user's side of an act: it owns the buffers behind [`RegisterId`]s and runs
//!   kernels. It may finish an act later ([`Completion::Pending`], [`CompletionHandle`]).
//! - [`Driver`] runs a plan on one OS thread per device (all of them, or this process's share, with
//!   a [`Transport`] to the others and an [`Inbound`] from them); [`Simulator`] runs it on a virtual clock
//!   with a seed (each device one act at a time, if asked), reports piece finishing times, busy
//!   time per device and deadlocks ([`DeadlockReport`]); its module doc says how a planner uses it.
//! - [`Trace`] records acts and exports Chrome-trace JSON (Perfetto), one lane per device.
//!
//! ```
//! use meshflow_actor::{Act, ActorKind, Completion, DeviceId, Executor, Plan, Simulator, UniformCost};
//!
//! struct Nothing;
//! impl Executor<()> for Nothing {
//!     type Error = std::convert::Infallible;
//!     fn act(&mut self, _act: &Act<'_, ()>) -> Result<Completion, Self::Error> {
//!         Ok(Completion::Done)
//!     }
//! }
//!
//! let mut plan = Plan::new();
//! let source = plan.add_actor("source", ActorKind::Source, DeviceId(0), ());
//! let sink = plan.add_actor("sink", ActorKind::Sink, DeviceId(0), ());
//! plan.add_edge(source, &[sink], 2);
//! let mut simulator = Simulator::new(&plan, UniformCost { act: 10, latency: 0 }, 7)?;
//! let report = simulator.run_step(4, &mut Nothing)?;
//! assert_eq!(report.finished_at, (4 + 2 - 1) * 10);
//! # Ok::<(), meshflow_actor::Error>(())
//! ```

mod actor;
pub mod affinity;
mod driver;
mod error;
mod executor;
mod ids;
mod message;
mod plan;
mod simulator;
mod trace;
pub mod workload;

pub use actor::{Actor, RegisterUsage};
pub use driver::{
    panic_message, CompletionHandle, Driver, DriverConfig, Inbound, RunReport, Transport,
};
pub use error::{Blocked, DeadlockReport, Error, Wait};
pub use executor::{Act, Completion, Enclosure, Executor};
pub use ids::{ActorId, DeviceId, EdgeId, RegisterId};
pub use message::{ActStart, Action, Command, Envelope, Message, Stage};
pub use plan::{ActorKind, ActorSpec, EdgeSpec, Plan, Topology};
pub use simulator::{CostModel, PieceDone, Simulator, StepReport, UniformCost};
pub use trace::{Trace, TraceEvent};
