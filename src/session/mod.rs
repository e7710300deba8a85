//! Sessions: compile a graph once and run it step after step on devices.
//!
//! [`Session::new`] takes the graph, the tensors to fetch and, for training, the loss and an
//! [`Optimizer`]: it appends the backward (autodiff) and one fused update per parameter, compiles
//! everything into one program, and starts one thread per device. [`Session::step`] feeds the
//! inputs, runs the program on every device (collectives in one order everywhere), writes the
//! updated parameters and optimizer state back into the devices' variables, and returns the
//! fetched tensors as logical host tensors.

mod assemble;
mod devices;
mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use meshflow_ops::ops::adamw::{adamw, AdamW};
use meshflow_ops::ops::sgd::{sgd, Sgd};
use meshflow_ops::{OpRef, Tensor as HostTensor, Value};
use meshflow_placement::{Layout, NdSbp};

use crate::compile::{compile, CompileConfig, Program, Request};
use crate::graph::{Graph, NodeId, Source, Tensor};
use crate::schedule::Schedule;
use crate::{Error, Result};

pub use assemble::assemble;
pub use devices::Devices;
pub use worker::{shard_of, RunRequest, Worker};

/// The optimizer a training session appends.
#[derive(Clone, Debug, PartialEq)]
pub enum Optimizer {
    /// `torch.optim.AdamW` (its `lr` is the base rate of the schedule; `step` is ignored).
    AdamW(AdamW),
    /// `torch.optim.SGD` with momentum (its `lr` is the base rate; `step` is ignored).
    Sgd(Sgd),
}

/// What a training session optimises.
#[derive(Clone, Debug)]
pub struct Training {
    /// The scalar loss.
    pub loss: Tensor,
    /// The update rule.
    pub optimizer: Optimizer,
    /// The learning-rate schedule over steps.
    pub schedule: Schedule,
}

/// How a session runs.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// CPU devices in this process (ranks `0..devices`); every placement must fit.
    pub devices: usize,
    /// Kernel threads per device. Default 1.
    pub threads_per_device: usize,
    /// How long a collective waits for its peers. Default 60 s.
    pub timeout: Duration,
    /// Compilation settings.
    pub compile: CompileConfig,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            devices: 1,
            threads_per_device: 1,
            timeout: Duration::from_secs(60),
            compile: CompileConfig::default(),
        }
    }
}

/// A variable (by name) that takes a new value in the layout it lives in.
type Assignment = (String, Value, Layout);

/// One parameter's update: the optimizer node and the variables it writes.
#[derive(Clone, Debug)]
struct Update {
    node: NodeId,
}

/// A compiled program on running devices.
pub struct Session {
    graph: Graph,
    program: Arc<Program>,
    devices: Devices,
    fetches: usize,
    assign: Vec<(String, crate::compile::Slot)>,
    training: Option<(Training, Vec<Update>)>,
    steps_done: u64,
}

impl Session {
    /// Compiles `graph` for `fetches` (and, when `training` is given, its backward and update)
    /// and starts the devices.
    pub fn new(
        graph: &Graph,
        fetches: &[&Tensor],
        training: Option<Training>,
        config: SessionConfig,
    ) -> Result<Self> {
        let mut requests: Vec<Request> =
            fetches.iter().map(|t| Request { value: t.value(), layout: None }).collect();
        let mut assign_values = Vec::new();
        let training = match training {
            None => None,
            Some(training) => {
                let (updates, assigns) = append_updates(graph, &training)?;
                for (name, value, layout) in assigns {
                    requests.push(Request { value, layout: Some(layout) });
                    assign_values.push(name);
                }
                Some((training, updates))
            }
        };
        let program = compile(&graph.snapshot(), &requests, &config.compile)?;
        if let Some(&rank) = program.ranks.iter().find(|&&r| r >= config.devices) {
            return Err(Error::Graph(format!(
                "the graph places work on rank {rank} but the session has {} devices",
                config.devices
            )));
        }
        let assign = assign_values
            .into_iter()
            .zip(program.requested[fetches.len()..].iter().copied())
            .collect();
        let devices = Devices::cpu(config.devices, config.threads_per_device, config.timeout)?;
        Ok(Session {
            graph: graph.clone(),
            program: Arc::new(program),
            devices,
            fetches: fetches.len(),
            assign,
            training,
            steps_done: 0,
        })
    }

    /// The compiled program (for reports and tests).
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Steps run so far.
    pub fn steps_done(&self) -> u64 {
        self.steps_done
    }

    /// Runs one step with the given input values; returns the fetched tensors (logical).
    pub fn step(&mut self, feeds: &[(&Tensor, HostTensor)]) -> Result<Vec<HostTensor>> {
        let mut fed = HashMap::new();
        for (input, value) in feeds {
            let meta = input.meta();
            if value.meta() != &meta {
                return Err(Error::Graph(format!(
                    "feed for {}: expected {} {}, got {} {}",
                    self.graph.data().label(input.value()),
                    meta.shape,
                    meta.dtype,
                    value.shape(),
                    value.dtype()
                )));
            }
            fed.insert(input.value(), value.clone());
        }
        let program = &self.program;
        for (index, info) in program.graph.values.iter().enumerate() {
            if matches!(info.source, Source::Input) && !fed.contains_key(&Value(index as u32)) {
                return Err(Error::Graph(format!(
                    "input {} was not fed",
                    program.graph.label(Value(index as u32))
                )));
            }
        }
        let overrides = self.overrides();
        let fetch: Vec<_> = program.requested[..self.fetches].to_vec();
        let request = RunRequest {
            program: Arc::clone(program),
            feeds: fed,
            overrides,
            fetch: fetch.clone(),
            assign: self.assign.clone(),
        };
        let shards = self.devices.run(request)?;
        self.steps_done += 1;
        fetch
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let info = program.slot(*slot);
                let meta = &program.graph.value(info.value).meta;
                let per_rank: Vec<Option<HostTensor>> =
                    shards.iter().map(|s| s[i].clone()).collect();
                assemble(meta, &info.layout, &per_rank)
            })
            .collect()
    }

    /// The current logical value of every parameter and optimizer state, by name.
    pub fn variables(&self) -> Result<Vec<(String, HostTensor)>> {
        let program = &self.program;
        let mut out = Vec::new();
        for (index, info) in program.graph.values.iter().enumerate() {
            let Source::Parameter { init } = &info.source else { continue };
            let name =
                info.name.clone().unwrap_or_else(|| program.graph.label(Value(index as u32)));
            let layout = program.slot(program.produced[index]).layout.clone();
            let key = name.clone();
            let shards = self.devices.each(move |w| w.variable(&key).cloned())?;
            let value = if shards.iter().all(Option::is_none) {
                init.clone()
            } else {
                assemble(init.meta(), &layout, &shards)?
            };
            out.push((name, value));
        }
        Ok(out)
    }

    /// Sets variables (parameters, optimizer state) from logical values by name; each device
    /// takes its shard. Unknown names are an error naming them.
    pub fn load_variables(&mut self, values: &[(String, HostTensor)]) -> Result<()> {
        let program = &self.program;
        for (name, value) in values {
            let index = program
                .graph
                .values
                .iter()
                .position(|v| {
                    v.name.as_deref() == Some(name.as_str())
                        && matches!(v.source, Source::Parameter { .. })
                })
                .ok_or_else(|| Error::Graph(format!("no variable named {name:?}")))?;
            let meta = &program.graph.values[index].meta;
            if value.meta() != meta {
                return Err(Error::Graph(format!(
                    "variable {name}: expected {} {}, got {} {}",
                    meta.shape,
                    meta.dtype,
                    value.shape(),
                    value.dtype()
                )));
            }
            let layout = program.slot(program.produced[index]).layout.clone();
            let (name, value) = (name.clone(), value.clone());
            let results = self.devices.each(move |w| -> Result<()> {
                if layout.placement.coordinates(w.rank()).is_some() {
                    let shard = shard_of(&value, &layout, w.rank())?;
                    w.set_variable(&name, shard);
                }
                Ok(())
            })?;
            results.into_iter().collect::<Result<Vec<()>>>()?;
        }
        Ok(())
    }

    fn overrides(&self) -> HashMap<NodeId, OpRef> {
        let Some((training, updates)) = &self.training else {
            return HashMap::new();
        };
        let step = self.steps_done + 1;
        let (base, op): (f64, Box<dyn Fn(f64) -> OpRef>) = match &training.optimizer {
            Optimizer::AdamW(a) => {
                let a = a.clone();
                (a.lr, Box::new(move |lr| Arc::new(AdamW { lr, step, ..a.clone() }) as OpRef))
            }
            Optimizer::Sgd(s) => {
                let s = s.clone();
                (s.lr, Box::new(move |lr| Arc::new(Sgd { lr, step, ..s.clone() }) as OpRef))
            }
        };
        let lr = training.schedule.rate(base, self.steps_done as usize);
        updates.iter().map(|u| (u.node, op(lr))).collect()
    }
}

/// The parameters of `graph` that `loss` depends on get an update node; returns the updates and
/// the assignments (variable name, new value, the variable's layout).
fn append_updates(graph: &Graph, training: &Training) -> Result<(Vec<Update>, Vec<Assignment>)> {
    let params: Vec<Tensor> = {
        let data = graph.data();
        data.values
            .iter()
            .enumerate()
            .filter(|(_, v)| matches!(v.source, Source::Parameter { .. }))
            .map(|(i, _)| Tensor::from_value(graph, Value(i as u32)))
            .collect()
    };
    let refs: Vec<&Tensor> = params.iter().collect();
    let grads = graph.gradients(&training.loss, &refs)?;
    let mut updates = Vec::new();
    let mut assigns = Vec::new();
    for (param, grad) in params.iter().zip(grads) {
        let Some(grad) = grad else { continue };
        let name = graph.data().label(param.value());
        let placement = param.placement();
        let sbp = param.sbp().unwrap_or_else(|| NdSbp::broadcast(placement.mesh_axes()));
        let layout = Layout::new(placement.clone(), sbp.clone());
        let zeros = || HostTensor::zeros(param.shape(), param.dtype());
        let state = |suffix: &str| {
            graph.parameter(&format!("{name}.{suffix}"), zeros(), &placement, Some(sbp.clone()))
        };
        let (outputs, states) = match &training.optimizer {
            Optimizer::AdamW(config) => {
                let (m, v) = (state("exp_avg")?, state("exp_avg_sq")?);
                let values = [param.value(), grad.value(), m.value(), v.value()];
                let outputs = graph.with_emit(|e| adamw(e, config.clone(), values))?;
                (outputs, vec![m, v])
            }
            Optimizer::Sgd(config) => {
                let buffer = state("momentum_buffer")?;
                let values = [param.value(), grad.value(), buffer.value()];
                let outputs = graph.with_emit(|e| sgd(e, config.clone(), values))?;
                (outputs, vec![buffer])
            }
        };
        let node = graph
            .data()
            .producer(outputs[0])
            .ok_or_else(|| Error::Graph("update has no node".into()))?;
        updates.push(Update { node });
        assigns.push((name, outputs[0], layout.clone()));
        for (state, value) in states.iter().zip(&outputs[1..]) {
            assigns.push((graph.data().label(state.value()), *value, layout.clone()));
        }
    }
    Ok((updates, assigns))
}
