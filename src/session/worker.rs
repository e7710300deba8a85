//! One device of a session: its communicators, its thread budget, the shards of the variables
//! placed on it, and the tensors of the step in flight. The actor runtime runs the acts of the
//! rank on the device's thread ([`super::executor`]); each act runs one step of the program for
//! one piece here ([`Worker::act`]).

use std::collections::{BTreeSet, HashMap, HashSet};

use meshflow_actor::{ActorId, Enclosure};
use meshflow_ops::ops::add::Add;
use meshflow_ops::{Context, Device, OpRef, Tensor, TensorMeta, Value, DEFAULT_KEEP_WARM};
use meshflow_placement::{local_region, Layout, Region};

use super::executor::{Compiled, Key, SUM};
use super::flight::{Flight, Shard};
use super::gpu::Backend;
use crate::compile::actors::Phase;
use crate::compile::{Slot, Step};
use crate::exec::boxing::Comms;
use crate::exec::layout::take_box;
use crate::graph::{Init, NodeId, Source};
use crate::{Error, Result};

/// What one step of a session needs besides the program, shared by every device.
pub struct RunRequest {
    /// Per input and piece, its logical value (the piece's rows of the fed batch).
    pub feeds: HashMap<(Value, u32), Tensor>,
    /// Ops that replace a node's op for this run (hyper-parameters that change per step).
    pub overrides: HashMap<NodeId, OpRef>,
}

/// A device's state across runs.
pub struct Worker {
    rank: usize,
    ctx: Context,
    comms: Comms,
    /// Where this rank keeps its tensors and runs its kernels (host or a GPU).
    backend: Backend,
    variables: HashMap<String, Tensor>,
    /// Variables whose shard the step in flight took out of `variables` (on a CPU rank, so
    /// that their update writes them in place: [`Compiled::moves`]); they come back at the
    /// end of the step with their new shards.
    lent: HashSet<String>,
    /// Variables whose values a failed step lost while updating them in place: this rank then
    /// answers no variable until they are set again ([`Worker::set_variable`]).
    lost: BTreeSet<String>,
    /// The shards of the step in flight, by slot and piece ([`SUM`] for sums over pieces).
    store: HashMap<Key, Shard>,
    /// Where the kernels run when they run as a task graph ([`super::flight`]): a CPU rank with
    /// several kernel threads, unless the session turned it off. `None`: each act runs its
    /// kernel to the end.
    flight: Option<std::sync::Arc<Flight>>,
}

impl Worker {
    /// A device with its communicators, thread budget and backend. A CPU device with several
    /// threads keeps its pool warm between the kernels of a step
    /// ([`Context::with_keep_warm`], [`DEFAULT_KEEP_WARM`]): its kernels run on pool threads
    /// (submitted in flight, [`Worker::set_inter_op`], or its acts served inside the pool,
    /// [`Worker::enclosure`]), and a parked pool thread woke late for each parallel kernel.
    pub fn new(rank: usize, ctx: Context, comms: Comms, backend: Backend) -> Self {
        let ctx = if backend.device() == Device::Cpu && ctx.threads() > 1 {
            ctx.with_keep_warm(DEFAULT_KEEP_WARM)
        } else {
            ctx
        };
        Worker {
            flight: None,
            rank,
            ctx,
            comms,
            backend,
            variables: HashMap::new(),
            lent: HashSet::new(),
            lost: BTreeSet::new(),
            store: HashMap::new(),
        }
    }

    /// Where this rank keeps its tensors and runs its kernels.
    pub fn backend_mut(&mut self) -> &mut Backend {
        &mut self.backend
    }

    /// Where the device thread serves its acts: inside this device's thread pool on a CPU rank
    /// with several threads whose kernels are not in flight (entered once, not once per
    /// kernel), nothing else.
    pub fn enclosure(&self) -> Option<Enclosure> {
        // Kernels in flight run on the pool's threads, all of them: the device thread only
        // submits them and stays outside.
        if self.backend.device() != Device::Cpu || self.ctx.threads() < 2 || self.flight.is_some() {
            return None;
        }
        let ctx = self.ctx.clone();
        Some(std::sync::Arc::new(move |serve: &mut (dyn FnMut() + Send)| ctx.install(serve)))
    }

    /// Runs this rank's kernels as a task graph on its pool
    /// ([`super::SessionConfig::inter_op`]) when `on`, the rank is a CPU rank and it has
    /// several kernel threads; otherwise each act runs its kernel to the end (the only way on a
    /// GPU rank, whose stream orders its kernels).
    pub fn set_inter_op(&mut self, on: bool) {
        let able = self.backend.device() == Device::Cpu && self.ctx.threads() > 1;
        self.flight = (on && able).then(|| Flight::new(self.rank, self.ctx.clone()));
    }

    /// This device's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Adds the communicator of a group this rank belongs to.
    pub fn add_group(
        &mut self,
        ranks: Vec<usize>,
        communicator: Box<dyn meshflow_comm::Communicator>,
    ) {
        self.comms.groups.insert(ranks, communicator);
    }

    /// A host copy of this rank's shard of variable `name`, if it holds one. An error when a
    /// failed step lost variables of this rank (the others may be half updated).
    pub fn variable(&self, name: &str) -> Result<Option<Tensor>> {
        self.check_intact()?;
        self.variables.get(name).map(|shard| self.backend.download(shard)).transpose()
    }

    /// Replaces this rank's shard of variable `name`.
    pub fn set_variable(&mut self, name: &str, shard: Tensor) {
        self.lost.remove(name);
        self.variables.insert(name.to_string(), shard);
    }

    /// An error naming the variables a failed step lost on this rank, if any.
    fn check_intact(&self) -> Result<()> {
        if self.lost.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = self.lost.iter().map(String::as_str).collect();
        Err(Error::Runtime(format!(
            "rank {}: a failed step lost the values of {} while updating them in place (the \
             other variables may hold this step's values or the last one's); load a checkpoint \
             into a new session",
            self.rank,
            names.join(", ")
        )))
    }

    /// True when kernels may take their inputs' storage (host tensors, CPU kernels): a GPU
    /// rank keeps every shard until its act ends, as the stream's kernels expect.
    fn in_place(&self) -> bool {
        matches!(self.backend, Backend::Cpu)
    }

    /// Runs `op` on `args`; on a CPU rank the kernel owns them ([`meshflow_ops::Op::forward_owned`])
    /// and may write its outputs into inputs nothing else references.
    fn run_kernel(&self, op: &dyn meshflow_ops::Op, args: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if self.in_place() {
            let ctx = &self.ctx;
            return Ok(ctx.install(|| op.forward_owned(ctx, args))?);
        }
        self.backend.forward(&self.ctx, op, &args)
    }

    /// Runs `op` on `args` (or, in flight, submits it, `last` as [`Flight::submit`] says): its
    /// first `outputs` outputs.
    fn kernel(
        &self,
        op: &OpRef,
        args: Vec<Shard>,
        outputs: usize,
        last: bool,
    ) -> Result<Vec<Shard>> {
        if let Some(flight) = &self.flight {
            return Ok(flight.submit(op.clone(), args, outputs, last));
        }
        let args = args.into_iter().map(Shard::into_tensor).collect::<Result<Vec<_>>>()?;
        let results = self
            .run_kernel(&**op, args)
            .map_err(|e| Error::Runtime(format!("rank {}: {}: {e}", self.rank, op.name())))?;
        Ok(results.into_iter().map(Shard::Ready).collect())
    }

    /// Runs `program.steps[step]` for `piece` as the act of `actor`, then drops the shards whose
    /// last reader it was.
    pub(super) fn act(
        &mut self,
        compiled: &Compiled,
        request: &RunRequest,
        actor: ActorId,
        step: usize,
        piece: u32,
    ) -> Result<()> {
        let program = &compiled.program;
        let phase = compiled.lowered.phases[step];
        match &program.steps[step] {
            Step::Leaf { value, slot } => {
                let layout = &program.slot(*slot).layout;
                if layout.placement.coordinates(self.rank).is_some() {
                    let shard = self.leaf(compiled, request, *value, layout, piece)?;
                    self.write(compiled, *slot, phase, piece, Shard::Ready(shard))?;
                }
            }
            Step::Boxing { from, to, plan } => {
                let dtype = program.graph.value(program.slot(*from).value).meta.dtype;
                let key = compiled.key(*from, phase, piece);
                let shard = if self.in_place() && compiled.frees(actor).contains(&key) {
                    self.store.remove(&key)
                } else {
                    self.store.get(&key).cloned()
                };
                let shard = shard.map(Shard::into_tensor).transpose()?;
                if let Some(out) = self.backend.apply_plan(plan, dtype, shard, &mut self.comms)? {
                    self.write(compiled, *to, phase, piece, Shard::Ready(out))?;
                }
            }
            Step::Kernel { node, inputs, outputs, ops } => {
                let placement = &program.graph.node(*node).placement;
                if let Some(coordinates) = placement.coordinates(self.rank) {
                    let index = placement.index_of_coordinates(&coordinates);
                    let op = request.overrides.get(node).unwrap_or(&ops[index]);
                    let pieces = compiled.lowered.pieces;
                    let op = &crate::graph::for_piece(op, &program.graph, *node, piece, pieces)?;
                    let args =
                        self.arguments(compiled, actor, inputs, (phase, piece), op.name())?;
                    let key = |slot: &Slot| (*slot, if phase == Phase::Piece { piece } else { 0 });
                    // No act reads its outputs (nor sums them over pieces): an update, the loss.
                    let last = outputs.iter().all(|slot| {
                        !compiled.lowered.accumulated[slot.0 as usize]
                            && !compiled.is_read_by_acts(self.rank, key(slot))
                    });
                    let results = self.kernel(op, args, outputs.len(), last)?;
                    for (slot, shard) in outputs.iter().zip(results) {
                        self.write(compiled, *slot, phase, piece, shard)?;
                    }
                }
            }
        }
        for key in compiled.frees(actor) {
            self.store.remove(key);
        }
        Ok(())
    }

    /// Ends a step: the variables take their new shards, and this rank's shards of the fetched
    /// slots come back (`None` where it holds none); everything else of the step is dropped.
    /// A variable the step took and did not update (it failed) gets its shard back from the
    /// step's leaf when no kernel wrote it in place yet, else is lost ([`Worker::variable`]).
    /// With kernels in flight every act of the step has run by then, so a failed kernel loses
    /// every variable whose update had taken its leaf, whether it ran or not. Waits for the
    /// kernels in flight first; the first of them that failed is the step's error.
    pub(super) fn finish_step(&mut self, compiled: &Compiled) -> Result<Vec<Option<Tensor>>> {
        let failure = self.flight.as_ref().and_then(|flight| flight.settle());
        for (name, slot) in &compiled.assign {
            let shard = self.store.get(&compiled.final_key(*slot)).map(Shard::get);
            if let Some(Ok(shard)) = shard {
                self.variables.insert(name.clone(), shard);
                self.lent.remove(name);
            }
        }
        for name in std::mem::take(&mut self.lent) {
            let leaf = compiled.moves(&name, self.rank).and_then(|key| self.store.remove(&key));
            match leaf.map(Shard::into_tensor) {
                Some(Ok(shard)) => {
                    self.variables.insert(name, shard);
                }
                _ => {
                    self.lost.insert(name);
                }
            }
        }
        let fetched = compiled.fetch.iter().map(|slot| {
            let shard = self.store.get(&compiled.final_key(*slot)).map(Shard::get).transpose()?;
            shard.map(|shard| self.backend.download(&shard)).transpose()
        });
        let fetched = fetched.collect();
        self.store.clear();
        match failure {
            Some(failure) => Err(Error::Runtime(failure)),
            None => fetched,
        }
    }

    /// The arguments of a kernel act: its inputs' shards, those it reads last on a CPU rank
    /// taken out of the store (so the kernel may hold their only reference), the others shared.
    fn arguments(
        &mut self,
        compiled: &Compiled,
        actor: ActorId,
        inputs: &[Slot],
        (phase, piece): (Phase, u32),
        op: &str,
    ) -> Result<Vec<Shard>> {
        let keys: Vec<Key> = inputs.iter().map(|slot| compiled.key(*slot, phase, piece)).collect();
        let frees = compiled.frees(actor);
        let mut args = Vec::with_capacity(inputs.len());
        for (index, (slot, key)) in inputs.iter().zip(&keys).enumerate() {
            // An input read twice by the act is taken at its last position only.
            let last = frees.contains(key) && !keys[index + 1..].contains(key);
            let shard = match self.in_place() && last {
                true => self.store.remove(key),
                false => self.store.get(key).cloned(),
            };
            args.push(shard.ok_or_else(|| self.missing(compiled, *slot, piece, op))?);
        }
        Ok(args)
    }

    /// The error of an act that finds no shard of `slot`.
    fn missing(&self, compiled: &Compiled, slot: Slot, piece: u32, op: &str) -> Error {
        let program = &compiled.program;
        Error::Runtime(format!(
            "rank {}: {op} (piece {piece}) has no shard of {}",
            self.rank,
            program.graph.label(program.slot(slot).value)
        ))
    }

    /// Keeps a shard the step wrote where a later act (or the end of the step) reads it; a
    /// per-piece shard of a value summed over pieces is added to its sum at once.
    fn write(
        &mut self,
        compiled: &Compiled,
        slot: Slot,
        phase: Phase,
        piece: u32,
        shard: Shard,
    ) -> Result<()> {
        if phase == Phase::Piece && compiled.lowered.accumulated[slot.0 as usize] {
            let sum = match self.store.remove(&(slot, SUM)) {
                None => shard.clone(),
                Some(sum) => {
                    let add: OpRef = std::sync::Arc::new(Add);
                    let added = self.kernel(&add, vec![sum, shard.clone()], 1, false)?;
                    added
                        .into_iter()
                        .next()
                        .ok_or_else(|| Error::Runtime("add returned nothing".into()))?
                }
            };
            self.store.insert((slot, SUM), sum);
        }
        let key = (slot, if phase == Phase::Piece { piece } else { 0 });
        if compiled.is_read(self.rank, key) {
            self.store.insert(key, shard);
        }
        Ok(())
    }

    /// This rank's shard of a leaf.
    fn leaf(
        &mut self,
        compiled: &Compiled,
        request: &RunRequest,
        value: Value,
        layout: &Layout,
        piece: u32,
    ) -> Result<Tensor> {
        let graph = &compiled.program.graph;
        let info = graph.value(value);
        let logical = match &info.source {
            Source::Input => request.feeds.get(&(value, piece)).ok_or_else(|| {
                Error::Runtime(format!("input {} (piece {piece}) was not fed", graph.label(value)))
            })?,
            Source::Parameter { init } => {
                self.check_intact()?;
                let name = info.name.clone().unwrap_or_else(|| graph.label(value));
                let taken = self.in_place() && compiled.moves(&name, self.rank).is_some();
                let kept = match taken {
                    true => self.variables.remove(&name),
                    false => self.variables.get(&name).cloned(),
                };
                let shard = match kept {
                    Some(shard) => shard,
                    None => init_shard(init, &info.meta, layout, self.rank)?,
                };
                let shard = self.backend.upload(shard)?;
                if taken {
                    self.lent.insert(name);
                } else {
                    self.variables.insert(name, shard.clone());
                }
                return Ok(shard);
            }
            Source::Constant { value } => value,
            Source::Node { .. } => unreachable!("leaf steps are made for leaves only"),
        };
        self.backend.upload(shard_of(logical, layout, self.rank)?)
    }
}

/// The shard of logical tensor `t` that `rank` holds under `layout` (no partial sums: a leaf is
/// split or broadcast).
pub fn shard_of(t: &Tensor, layout: &Layout, rank: usize) -> Result<Tensor> {
    let region = region_of(t.dims(), layout, rank)?;
    take_box(t, &region.offsets, &region.shape)
}

/// The shard `rank` holds under `layout` of a parameter initialised by `init`.
pub fn init_shard(init: &Init, meta: &TensorMeta, layout: &Layout, rank: usize) -> Result<Tensor> {
    init.region(meta, &region_of(meta.shape.dims(), layout, rank)?)
}

/// The region of a logical tensor of `dims` that `rank` holds under `layout`.
fn region_of(dims: &[usize], layout: &Layout, rank: usize) -> Result<Region> {
    let placement = &layout.placement;
    let coordinates = placement
        .coordinates(rank)
        .ok_or_else(|| Error::Runtime(format!("rank {rank} is not in {placement}")))?;
    Ok(local_region(dims, &layout.nd_sbp, placement.hierarchy(), &coordinates)?)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use meshflow_ops::ops::adamw::AdamW;
    use meshflow_ops::{DType, OpRef, Tensor as HostTensor};
    use meshflow_placement::{DeviceType, Placement};

    use super::RunRequest;
    use crate::schedule::Schedule;
    use crate::session::{Optimizer, Session, SessionConfig, Training};
    use crate::Graph;

    const FEATURES: usize = 6;

    /// A one-device linear regression trained with AdamW, and its input `x`: one kernel thread,
    /// or two with the kernels in flight ([`super::super::flight`]).
    fn session_with(threads: usize) -> (Session, crate::Tensor) {
        let placement = Placement::grid(DeviceType::Cpu, &[1]).expect("placement");
        let g = Graph::new();
        let x = g.input("x", [4, FEATURES], DType::F32, &placement, None).expect("x");
        let init = HostTensor::randn(vec![FEATURES, 3], 0.0, 0.5, DType::F32, 1).expect("randn");
        let w = g.parameter("w", init, &placement, None).expect("w");
        let y = x.matmul(&w).expect("matmul");
        let loss = y.mul(&y).and_then(|y| y.mean(&[0, 1], false)).expect("loss");
        let training = Training::new(&loss, Optimizer::AdamW(AdamW::new(0.1)), Schedule::Constant);
        let config =
            SessionConfig { devices: 1, threads_per_device: threads, ..Default::default() };
        let session = Session::new(&g, &[&loss], Some(training), config).expect("session");
        let in_flight = session.devices.each(|w| w.flight.is_some()).expect("devices");
        assert_eq!(in_flight, [threads > 1], "kernels in flight with several threads");
        (session, x)
    }

    /// The settings the tests run under: one thread; two, kernels in flight.
    const THREADS: [usize; 2] = [1, 2];

    fn batch() -> HostTensor {
        HostTensor::randn(vec![4, FEATURES], 0.0, 1.0, DType::F32, 9).expect("batch")
    }

    /// Where rank 0 keeps its shard of `name`.
    fn address(session: &Session, name: &'static str) -> Option<usize> {
        let held = session.devices.each(move |w| {
            w.variables.get(name).map(|t| t.bytes().expect("host").as_ptr() as usize)
        });
        held.expect("devices")[0]
    }

    /// The value of variable `name` in `variables`.
    fn value(variables: &[(String, HostTensor)], name: &str) -> Vec<f32> {
        let found = variables.iter().find(|(n, _)| n == name).expect("variable");
        found.1.to_vec().expect("f32")
    }

    #[test]
    fn a_step_updates_variables_in_place_and_spares_tensors_held_elsewhere() {
        for threads in THREADS {
            updates_in_place(threads);
        }
    }

    fn updates_in_place(threads: usize) {
        let (mut session, x) = session_with(threads);
        session.step(&[(&x, batch())]).expect("step 1");
        let first = address(&session, "w").expect("w is held after a step");
        session.step(&[(&x, batch())]).expect("step 2");
        assert_eq!(address(&session, "w"), Some(first), "the update wrote w in place");
        // A value taken out of the session shares the storage: the next update copies instead.
        let held = session.variables().expect("variables");
        let copies: Vec<Vec<f32>> = held.iter().map(|(_, t)| t.to_vec().expect("f32")).collect();
        session.step(&[(&x, batch())]).expect("step 3");
        for ((name, t), copy) in held.iter().zip(&copies) {
            assert_eq!(&t.to_vec::<f32>().expect("f32"), copy, "{name} kept its value");
        }
        let now = session.variables().expect("variables");
        assert_ne!(value(&now, "w"), value(&held, "w"), "w moved on");
    }

    #[test]
    fn a_step_that_fails_in_the_update_refuses_variables_and_checkpoints() {
        for threads in THREADS {
            fails_in_the_update(threads);
        }
    }

    fn fails_in_the_update(threads: usize) {
        let (mut session, x) = session_with(threads);
        session.step(&[(&x, batch())]).expect("step 1");
        let good = session.variables().expect("variables");
        // Step 2 whose updates fail (step 0 is refused by the kernel after it took its inputs).
        let fed = [(x.value(), batch())].into_iter().collect();
        let feeds = session.slice_feeds(fed).expect("feeds");
        let updates = &session.training.as_ref().expect("training").1;
        let failing: OpRef = Arc::new(AdamW { step: 0, ..AdamW::new(0.1) });
        let overrides = updates.iter().map(|&node| (node, failing.clone())).collect();
        let error = session.devices.run(RunRequest { feeds, overrides }).expect_err("fails");
        assert!(error.to_string().contains("adamw"), "{error}");
        let error = session.variables().expect_err("w was lost");
        assert!(error.to_string().contains("lost the values of w"), "{error}");
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("checkpoint");
        let error = crate::checkpoint::save(&session, &target).expect_err("no checkpoint");
        assert!(error.to_string().contains("lost the values"), "{error}");
        assert!(!target.exists(), "nothing was published");
        // Setting the lost variables again makes the rank answer.
        session.load_variables(&good).expect("load");
        let again = session.variables().expect("variables");
        assert_eq!(value(&again, "w"), value(&good, "w"));
    }
}
