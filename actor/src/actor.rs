//! The sans-IO actor: registers, credits and the state machine of every [`ActorKind`].
//!
//! An [`Actor`] does no I/O and owns no thread, clock or channel. Its driver feeds it and drains
//! it, in this order:
//!
//! 1. [`Actor::handle_message`] for every [`Message`] addressed to it (from another actor, or a
//!    [`Command`] from the driver), and [`Actor::handle_completion`] when the act it last
//!    started has finished (at once for a synchronous executor; later, through the same door as
//!    messages, for asynchronous work such as a GPU stream).
//! 2. After each `handle_*` call, [`Actor::poll_action`] until it returns `None`. Each
//!    [`Action`] is one of: [`Action::Send`] — deliver the envelope to its receiver (a register
//!    readable, a register free, an end-of-stream); [`Action::Act`] — run the act over
//!    [`Actor::act_registers`] and then call `handle_completion`; [`Action::StepDone`] — the actor
//!    owes nothing more in that step.
//!
//! At most one act is in flight per actor. An actor acts when it has acts left in a step, every
//! input holds a readable register with the next sequence number and every output's next register
//! is free (all its consumers acknowledged it). Messages may arrive in any order; a readable
//! register for a later sequence waits in its slot until its turn.

use std::collections::VecDeque;

use crate::{
    ActStart, Action, ActorId, ActorKind, Blocked, Command, EdgeId, Envelope, Error, Message, Plan,
    RegisterId, Stage, Topology, Wait,
};

/// Register usage of one actor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegisterUsage {
    /// The actor.
    pub actor: ActorId,
    /// The most registers it held at once.
    pub high_water: u32,
    /// The registers of its edges: what it may hold.
    pub budget: u32,
}

/// One actor's state machine.
#[derive(Clone, Debug)]
pub struct Actor {
    id: ActorId,
    kind: ActorKind,
    inputs: Vec<Input>,
    outputs: Vec<Output>,
    /// Steps given and the acts each still owes, oldest first.
    quotas: VecDeque<(u64, u64)>,
    /// Acts completed since the start.
    sequence: u64,
    /// Position within an accumulate or repeat group, or 1 between a variable's read and update.
    group_index: u32,
    in_flight: Option<ActStart>,
    started: bool,
    stop_received: bool,
    actions: VecDeque<Action>,
    act_inputs: Vec<RegisterId>,
    act_outputs: Vec<RegisterId>,
    held: u32,
    high_water: u32,
}

#[derive(Clone, Debug)]
struct Input {
    edge: EdgeId,
    producer: ActorId,
    consumer_index: u32,
    base: u32,
    count: u32,
    /// Per slot, the sequence number + 1 of the readable register it holds, 0 when empty.
    arrived: Vec<u64>,
    next: u64,
    end_of_stream: Option<u64>,
}

#[derive(Clone, Debug)]
struct Output {
    edge: EdgeId,
    consumers: Vec<ActorId>,
    base: u32,
    count: u32,
    /// Per slot, how many consumers still hold it.
    pending: Vec<u32>,
    /// Per slot and consumer, whether that consumer holds it.
    holding: Vec<bool>,
    written: u64,
}

impl Input {
    fn slot(&self) -> usize {
        (self.next % u64::from(self.count)) as usize
    }

    fn ready(&self) -> bool {
        self.arrived[self.slot()] == self.next + 1
    }

    fn register(&self) -> RegisterId {
        RegisterId(self.base + self.slot() as u32)
    }
}

impl Output {
    fn slot(&self) -> usize {
        (self.written % u64::from(self.count)) as usize
    }

    fn free(&self) -> bool {
        self.pending[self.slot()] == 0
    }

    fn register(&self) -> RegisterId {
        RegisterId(self.base + self.slot() as u32)
    }
}

impl Actor {
    /// The state machine of actor `id` of a checked plan.
    pub fn new<P>(id: ActorId, plan: &Plan<P>, topology: &Topology) -> Self {
        let inputs = topology.inputs[id.index()]
            .iter()
            .map(|&edge| {
                let spec = &plan.edges[edge.index()];
                let consumer_index = spec.consumers.iter().position(|&consumer| consumer == id);
                Input {
                    edge,
                    producer: spec.producer,
                    consumer_index: consumer_index.expect("an input edge lists its consumer")
                        as u32,
                    base: topology.registers(edge).start,
                    count: spec.registers,
                    arrived: vec![0; spec.registers as usize],
                    next: 0,
                    end_of_stream: None,
                }
            })
            .collect();
        let outputs = topology.outputs[id.index()]
            .iter()
            .map(|&edge| {
                let spec = &plan.edges[edge.index()];
                Output {
                    edge,
                    consumers: spec.consumers.clone(),
                    base: topology.registers(edge).start,
                    count: spec.registers,
                    pending: vec![0; spec.registers as usize],
                    holding: vec![false; spec.registers as usize * spec.consumers.len()],
                    written: 0,
                }
            })
            .collect();
        Self {
            id,
            kind: plan.actors[id.index()].kind,
            inputs,
            outputs,
            quotas: VecDeque::new(),
            sequence: 0,
            group_index: 0,
            in_flight: None,
            started: false,
            stop_received: false,
            actions: VecDeque::new(),
            act_inputs: Vec::new(),
            act_outputs: Vec::new(),
            held: 0,
            high_water: 0,
        }
    }

    /// This actor's id.
    pub fn id(&self) -> ActorId {
        self.id
    }

    /// Takes in one message addressed to this actor. An error means the sender broke the protocol
    /// (a register that is not the edge's, a register readable twice, a free that was not held).
    pub fn handle_message(&mut self, message: Message) -> Result<(), Error> {
        match message {
            Message::Readable { edge, register, sequence } => {
                self.on_readable(edge, register, sequence)
            }
            Message::Free { edge, register, consumer } => self.on_free(edge, register, consumer),
            Message::EndOfStream { edge, sequences } => {
                self.input_mut(edge)?.end_of_stream = Some(sequences);
                Ok(())
            }
            Message::Command(command) => self.on_command(command),
        }
    }

    /// The act last handed out by [`Actor::poll_action`] has finished: consume inputs, publish
    /// outputs, advance. An error means no act was in flight.
    pub fn handle_completion(&mut self) -> Result<(), Error> {
        let Some(start) = self.in_flight.take() else {
            return Err(self.protocol("completion without an act in flight".into()));
        };
        let (consume, publish) = self.completion_effects(start.stage);
        if consume {
            self.consume_inputs();
        }
        if publish {
            self.publish_outputs();
        }
        self.sequence += 1;
        let quota = self.quotas.front_mut().expect("an act in flight belongs to a step");
        quota.1 -= 1;
        if quota.1 == 0 {
            let step = quota.0;
            self.quotas.pop_front();
            self.actions.push_back(Action::StepDone { step });
        }
        Ok(())
    }

    /// The next thing the driver must do for this actor, or `None` until the next `handle_*`.
    pub fn poll_action(&mut self) -> Option<Action> {
        if let Some(action) = self.actions.pop_front() {
            return Some(action);
        }
        self.try_start().map(Action::Act)
    }

    /// The input and output registers of the act in flight (or of the last act).
    pub fn act_registers(&self) -> (&[RegisterId], &[RegisterId]) {
        (&self.act_inputs, &self.act_outputs)
    }

    /// Acts completed since the start.
    pub fn completed(&self) -> u64 {
        self.sequence
    }

    /// Acts still owed over all steps given so far.
    pub fn acts_left(&self) -> u64 {
        self.quotas.iter().map(|(_, acts)| acts).sum()
    }

    /// Whether an act is running.
    pub fn is_acting(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Whether the actor was told to stop and every input has ended.
    pub fn is_stopped(&self) -> bool {
        self.stop_received && self.inputs.iter().all(|input| input.end_of_stream.is_some())
    }

    /// Registers this actor holds now: readable inputs not yet consumed, and outputs written (or
    /// being accumulated into) that some consumer has not yet freed.
    pub fn registers_held(&self) -> u32 {
        self.held
    }

    /// The most registers this actor ever held at once.
    pub fn registers_high_water(&self) -> u32 {
        self.high_water
    }

    /// The most registers this actor may hold: the registers of all its input and output edges.
    pub fn register_budget(&self) -> u32 {
        let inputs: u32 = self.inputs.iter().map(|input| input.count).sum();
        inputs + self.outputs.iter().map(|output| output.count).sum::<u32>()
    }

    /// [`Actor::registers_high_water`] against [`Actor::register_budget`].
    pub fn usage(&self) -> RegisterUsage {
        RegisterUsage {
            actor: self.id,
            high_water: self.high_water,
            budget: self.register_budget(),
        }
    }

    /// What this actor waits for, if it owes acts and has none in flight; names use `plan`.
    pub fn blocked<P>(&self, plan: &Plan<P>) -> Option<Blocked> {
        if self.in_flight.is_some() || self.quotas.is_empty() {
            return None;
        }
        let (need_inputs, need_outputs) = self.needs();
        let mut waiting_for = Vec::new();
        for input in self.inputs.iter().filter(|input| need_inputs && !input.ready()) {
            waiting_for.push(Wait::Readable {
                edge: input.edge,
                producer: input.producer,
                sequence: input.next,
            });
        }
        for output in self.outputs.iter().filter(|output| need_outputs && !output.free()) {
            let slot = output.slot();
            let consumers = output.consumers.len();
            let holders = (0..consumers)
                .filter(|&consumer| output.holding[slot * consumers + consumer])
                .map(|consumer| output.consumers[consumer])
                .collect();
            waiting_for.push(Wait::Free {
                edge: output.edge,
                register: output.register(),
                holders,
            });
        }
        let name = plan.name(self.id);
        Some(Blocked { actor: self.id, name, acts_left: self.acts_left(), waiting_for })
    }

    fn on_command(&mut self, command: Command) -> Result<(), Error> {
        match command {
            Command::Start => self.started = true,
            Command::RunStep { .. } if !self.started => {
                return Err(self.protocol("step before start".into()));
            }
            Command::RunStep { step, acts: 0 } => self.actions.push_back(Action::StepDone { step }),
            Command::RunStep { step, acts } => self.quotas.push_back((step, acts)),
            Command::Stop => self.on_stop(),
        }
        Ok(())
    }

    fn on_stop(&mut self) {
        self.stop_received = true;
        for output in &self.outputs {
            for &consumer in &output.consumers {
                let message = Message::EndOfStream { edge: output.edge, sequences: output.written };
                self.actions.push_back(Action::Send(Envelope {
                    from: self.id,
                    to: consumer,
                    message,
                }));
            }
        }
    }

    fn on_readable(
        &mut self,
        edge: EdgeId,
        register: RegisterId,
        sequence: u64,
    ) -> Result<(), Error> {
        let input = self.input_mut(edge)?;
        let slot = (sequence % u64::from(input.count)) as usize;
        let fits = register.0 == input.base + slot as u32 && sequence >= input.next;
        if !fits || input.arrived[slot] != 0 {
            let reason =
                format!("{register} readable as #{sequence} on {edge} does not fit its slot");
            return Err(self.protocol(reason));
        }
        input.arrived[slot] = sequence + 1;
        self.hold();
        Ok(())
    }

    fn on_free(&mut self, edge: EdgeId, register: RegisterId, consumer: u32) -> Result<(), Error> {
        let Some(output) = self.outputs.iter_mut().find(|output| output.edge == edge) else {
            return Err(self.protocol(format!("free on {edge}, which it does not produce")));
        };
        let slot = register.0.wrapping_sub(output.base) as usize;
        let index = slot * output.consumers.len() + consumer as usize;
        if slot >= output.count as usize || !output.holding.get(index).copied().unwrap_or(false) {
            let reason = format!(
                "{register} on {edge} freed by consumer {consumer}, which does not hold it"
            );
            return Err(self.protocol(reason));
        }
        output.holding[index] = false;
        output.pending[slot] -= 1;
        if output.pending[slot] == 0 {
            self.held -= 1;
        }
        Ok(())
    }

    fn input_mut(&mut self, edge: EdgeId) -> Result<&mut Input, Error> {
        match self.inputs.iter().position(|input| input.edge == edge) {
            Some(index) => Ok(&mut self.inputs[index]),
            None => Err(self.protocol(format!("message on {edge}, which it does not consume"))),
        }
    }

    fn protocol(&self, reason: String) -> Error {
        Error::Protocol { actor: self.id, reason }
    }

    fn hold(&mut self) {
        self.held += 1;
        self.high_water = self.high_water.max(self.held);
    }

    /// The stage of the next act, and whether it needs readable inputs and free outputs.
    fn next_stage(&self) -> (Stage, bool, bool) {
        let index = self.group_index;
        match self.kind {
            ActorKind::Accumulate { pieces } => {
                (Stage::Accumulate { index, of: pieces }, true, index == 0)
            }
            ActorKind::Repeat { pieces } => (Stage::Repeat { index, of: pieces }, true, true),
            ActorKind::Variable if index == 0 => (Stage::VariableRead, false, true),
            ActorKind::Variable => (Stage::VariableUpdate, true, false),
            _ => (Stage::Whole, true, true),
        }
    }

    fn needs(&self) -> (bool, bool) {
        let (_, inputs, outputs) = self.next_stage();
        (inputs, outputs)
    }

    fn try_start(&mut self) -> Option<ActStart> {
        if self.in_flight.is_some() || !self.started {
            return None;
        }
        let &(step, _) = self.quotas.front()?;
        let (stage, need_inputs, need_outputs) = self.next_stage();
        let inputs_ready = !need_inputs || self.inputs.iter().all(Input::ready);
        if !inputs_ready || (need_outputs && !self.outputs.iter().all(Output::free)) {
            return None;
        }
        self.act_inputs.clear();
        if need_inputs {
            self.act_inputs.extend(self.inputs.iter().map(Input::register));
        }
        self.act_outputs.clear();
        if stage != Stage::VariableUpdate {
            self.act_outputs.extend(self.outputs.iter().map(Output::register));
        }
        if need_outputs && matches!(stage, Stage::Accumulate { .. }) {
            self.hold_outputs();
        }
        let start = ActStart { step, sequence: self.sequence, stage };
        self.in_flight = Some(start);
        Some(start)
    }

    /// Whether completing an act of `stage` consumes the inputs and publishes the outputs; moves
    /// the group position on.
    fn completion_effects(&mut self, stage: Stage) -> (bool, bool) {
        match stage {
            Stage::Whole => (true, true),
            Stage::Accumulate { index, of } | Stage::Repeat { index, of } => {
                let last = index + 1 == of;
                self.group_index = if last { 0 } else { index + 1 };
                let accumulate = matches!(stage, Stage::Accumulate { .. });
                (accumulate || last, !accumulate || last)
            }
            Stage::VariableRead => {
                self.group_index = u32::from(!self.inputs.is_empty());
                (false, true)
            }
            Stage::VariableUpdate => {
                self.group_index = 0;
                (true, false)
            }
        }
    }

    fn hold_outputs(&mut self) {
        for _ in 0..self.outputs.len() {
            self.hold();
        }
    }

    fn consume_inputs(&mut self) {
        for input in &mut self.inputs {
            let slot = input.slot();
            input.arrived[slot] = 0;
            let register = input.register();
            input.next += 1;
            let message =
                Message::Free { edge: input.edge, register, consumer: input.consumer_index };
            self.actions.push_back(Action::Send(Envelope {
                from: self.id,
                to: input.producer,
                message,
            }));
            self.held -= 1;
        }
    }

    fn publish_outputs(&mut self) {
        let accumulated = matches!(self.kind, ActorKind::Accumulate { .. });
        for output in &mut self.outputs {
            let slot = output.slot();
            let register = output.register();
            let consumers = output.consumers.len();
            output.pending[slot] = consumers as u32;
            output.holding[slot * consumers..(slot + 1) * consumers].fill(true);
            for &consumer in &output.consumers {
                let message =
                    Message::Readable { edge: output.edge, register, sequence: output.written };
                self.actions.push_back(Action::Send(Envelope {
                    from: self.id,
                    to: consumer,
                    message,
                }));
            }
            output.written += 1;
        }
        if !accumulated {
            self.hold_outputs();
        }
    }
}
