//! A CPU rank's kernels in flight: with two or more kernel threads, a rank's acts hand their
//! kernels to the rank's thread pool as a graph of tasks ([`Flight`]) instead of running each to
//! its end before the next act starts, so kernels that do not depend on each other run at once.
//!
//! The act order of a rank is one chain (collectives meet in one order on every rank), but the
//! data between its kernels is a graph: in a backward, the weight gradient `gᵀ·x` of a layer and
//! the input gradient `g·W` read the same `g` and nothing of each other, and the optimizer's
//! update of a layer needs that layer's gradients only. Run one after the other, each kernel
//! splits itself over the pool's threads, and a product split by rows packs its shared operand
//! once per part; run as tasks, the two products take a thread each, whole
//! ([`meshflow_ops::Context::enter_product`]), and a kernel running alone still splits (the pool
//! steals its parts as before). Which ready kernel starts when: [`Flight`], [`FILL_ABOVE`].
//!
//! A kernel's act submits a task and writes [`Shard::Pending`] outputs; the task runs once every
//! kernel it reads from has run (a count of unsettled inputs, as a GPU stream's event waits, but
//! over a graph instead of a queue). Whatever needs a value on the device thread (a boxing step,
//! the end of the step) waits for its [`Cell`]. A failing or panicking kernel settles its
//! outputs with its error, every task that reads them fails with the same error without running,
//! and the end of the step ([`Flight::settle`]) reports the first one: no task is ever left
//! waiting on an input that never comes, because every cell has a task that settles it.

use std::collections::BinaryHeap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use meshflow_ops::{Context, OpRef, Tensor};

use super::executor::lock;
use crate::{Error, Result};

/// A shard of the step in flight: a tensor, or an output of a kernel that may not have run yet.
#[derive(Clone)]
pub enum Shard {
    /// The tensor.
    Ready(Tensor),
    /// An output of a submitted kernel.
    Pending(Arc<Cell>),
}

impl Shard {
    /// The tensor, once its kernel has run (waits until then), or the kernel's error. Moves the
    /// tensor out when this was the last reference to its cell, so a kernel given it may own it.
    pub fn into_tensor(self) -> Result<Tensor> {
        match self {
            Shard::Ready(tensor) => Ok(tensor),
            Shard::Pending(cell) => {
                cell.wait();
                match Arc::try_unwrap(cell) {
                    Ok(cell) => match cell.state.into_inner().unwrap_or_else(|p| p.into_inner()) {
                        State::Settled(result) => result.map_err(Error::Runtime),
                        State::Waiting(_) => Err(unsettled()),
                    },
                    Err(shared) => shared.value(),
                }
            }
        }
    }

    /// The tensor (a shared reference), once its kernel has run, or the kernel's error.
    pub fn get(&self) -> Result<Tensor> {
        match self {
            Shard::Ready(tensor) => Ok(tensor.clone()),
            Shard::Pending(cell) => {
                cell.wait();
                cell.value()
            }
        }
    }
}

fn unsettled() -> Error {
    Error::Runtime("a kernel's output was read before the kernel ran".into())
}

/// One output of a submitted kernel: the tasks waiting for it, then its value or error.
pub struct Cell {
    state: Mutex<State>,
    settled: Condvar,
    /// Written by a last kernel ([`Flight::submit`]).
    last: bool,
}

enum State {
    Waiting(Vec<Arc<Task>>),
    Settled(std::result::Result<Tensor, String>),
}

impl Cell {
    fn new(last: bool) -> Arc<Self> {
        let state = Mutex::new(State::Waiting(Vec::new()));
        Arc::new(Cell { state, settled: Condvar::new(), last })
    }

    fn wait(&self) {
        let mut state = lock(&self.state);
        while matches!(*state, State::Waiting(_)) {
            state = self.settled.wait(state).unwrap_or_else(|poison| poison.into_inner());
        }
    }

    /// The settled value, shared.
    fn value(&self) -> Result<Tensor> {
        match &*lock(&self.state) {
            State::Settled(result) => result.clone().map_err(Error::Runtime),
            State::Waiting(_) => Err(unsettled()),
        }
    }

    /// Makes `task` wait for this cell; false when the cell has settled already.
    fn subscribe(&self, task: &Arc<Task>) -> bool {
        match &mut *lock(&self.state) {
            State::Waiting(tasks) => {
                tasks.push(Arc::clone(task));
                true
            }
            State::Settled(_) => false,
        }
    }

    /// Settles the cell; the tasks that waited for it.
    fn settle(&self, result: std::result::Result<Tensor, String>) -> Vec<Arc<Task>> {
        let previous = std::mem::replace(&mut *lock(&self.state), State::Settled(result));
        self.settled.notify_all();
        match previous {
            State::Waiting(tasks) => tasks,
            State::Settled(_) => Vec::new(),
        }
    }
}

/// A submitted kernel: its place in the submission order, how many of its inputs have not
/// settled (plus one while it is being submitted), and what it runs.
struct Task {
    /// Starts late ([`Flight::submit`]).
    last: bool,
    order: u64,
    unsettled: AtomicUsize,
    job: Mutex<Option<Job>>,
}

/// A task whose inputs have all settled, first in the queue when submitted first.
struct Ready(Arc<Task>);

impl PartialEq for Ready {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Ready {}

impl PartialOrd for Ready {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ready {
    /// The earlier submission is the greater, a last kernel the lesser of any other:
    /// [`BinaryHeap`] pops the greatest first.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.0.last, other.0.order).cmp(&(self.0.last, self.0.order))
    }
}

struct Job {
    op: OpRef,
    inputs: Vec<Shard>,
    outputs: Vec<Arc<Cell>>,
}

/// A last kernel ([`Flight::submit`]) may start while more than this many other kernels have
/// not finished. Started whenever no other kernel was ready, the MLP's updates took a thread
/// just before its last weight gradient became ready, which then ran next to them instead of
/// split over both threads (2.5 ms against 1.4, a timeline of the kernels), and its step was 3-8 %
/// slower than one kernel at a time; held until every other kernel had finished, the GPT's
/// updates no longer filled the backward's gaps (step 1.5 % slower than with them). With 16,
/// alternating runs of one binary: GPT 86.6-91.5 ms against 86.9-92.3 started whenever ready
/// and 91.7-97.8 one kernel at a time; MLP 9.9-11.0 against 11.1-11.6 and 10.6-11.2.
const FILL_ABOVE: usize = 16;

thread_local! {
    /// Set while this thread runs a kernel of a [`Flight`]. A kernel that splits itself waits
    /// for its parts inside the pool, and rayon runs other queued jobs on a waiting thread, a
    /// driver among them: a kernel started there runs above the waiting one's frame, which
    /// cannot return before it, so a long kernel held up a short one and everything that read
    /// it. The GPT on two micro-batches started 27 % of its kernels that way (2,166 of 7,880):
    /// its step took 133-141 ms, against 100-102 one kernel at a time (three alternations of
    /// one binary). Such a driver ends at once instead, and the driver running the kernel
    /// below it takes the ready kernels when that kernel ends: 89-91 ms in the same runs. (One
    /// micro-batch never started a kernel so.)
    static RUNNING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A rank's submitted kernels: its pool, the kernels ready to run, how many have not finished,
/// the first failure.
///
/// Ready kernels run in the order they were submitted (the rank's act order, a topological
/// order of the program), by at most one driver per thread of the pool: a driver takes the
/// earliest ready kernel it may start ([`FILL_ABOVE`]), runs it, and ends when there is none,
/// leaving its thread to the pool, where it helps split the kernels still running. No driver
/// starts a kernel on a thread that is inside one already ([`RUNNING`]).
pub struct Flight {
    /// The rank, named in errors.
    rank: usize,
    ctx: Context,
    tally: Mutex<Tally>,
    idle: Condvar,
}

#[derive(Default)]
struct Tally {
    /// Submitted kernels that have not finished.
    unfinished: usize,
    failure: Option<String>,
    ready: BinaryHeap<Ready>,
    /// Drivers running (at most the pool's threads).
    drivers: usize,
    /// Submitted kernels, not last ones, that have not finished.
    others: usize,
    /// The order of the next submission.
    submitted: u64,
}

impl Flight {
    /// The kernels of `rank`, run on `ctx`'s pool.
    pub fn new(rank: usize, ctx: Context) -> Arc<Self> {
        let (tally, idle) = (Mutex::new(Tally::default()), Condvar::new());
        Arc::new(Flight { rank, ctx, tally, idle })
    }

    /// Submits `op` on `inputs`; its `outputs` outputs, pending. The kernel owns its inputs when it runs, and a tensor only
    /// it references it may overwrite ([`meshflow_ops::Op::forward_owned`]). A `last` kernel,
    /// one whose outputs no other kernel of the step reads (an optimizer's update, the loss),
    /// starts only when no other kernel is ready, and then only while more than
    /// [`FILL_ABOVE`] other kernels have not finished, or once all of them have: far from the
    /// step's end it fills a thread that would wait; near it, it would take a thread from the
    /// last gradients, which then cannot split over both. A kernel that reads a last kernel's
    /// output is a last one, too.
    pub fn submit(
        self: &Arc<Self>,
        op: OpRef,
        inputs: Vec<Shard>,
        outputs: usize,
        last: bool,
    ) -> Vec<Shard> {
        // A reader of a last kernel's output cannot start before it: it is a last one, too (a
        // kernel that waited for it to start would wait for ever).
        let last = last || inputs.iter().any(|i| matches!(i, Shard::Pending(c) if c.last));
        let cells: Vec<Arc<Cell>> = (0..outputs).map(|_| Cell::new(last)).collect();
        let pending: Vec<Shard> = cells.iter().cloned().map(Shard::Pending).collect();
        let waits: Vec<Arc<Cell>> = inputs
            .iter()
            .filter_map(|input| match input {
                Shard::Pending(cell) => Some(Arc::clone(cell)),
                Shard::Ready(_) => None,
            })
            .collect();
        let job = Job { op, inputs, outputs: cells };
        let order = {
            let mut tally = lock(&self.tally);
            tally.unfinished += 1;
            tally.others += usize::from(!last);
            tally.submitted += 1;
            tally.submitted
        };
        let unsettled = AtomicUsize::new(1);
        let task = Arc::new(Task { last, order, unsettled, job: Mutex::new(Some(job)) });
        for cell in waits {
            task.unsettled.fetch_add(1, Ordering::AcqRel);
            if !cell.subscribe(&task) {
                task.unsettled.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.release(task);
        pending
    }

    /// One input of `task` settled (or its submission ended): when none is left, queues it
    /// and starts a driver if a thread has none.
    fn release(self: &Arc<Self>, task: Arc<Task>) {
        if task.unsettled.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let mut tally = lock(&self.tally);
        tally.ready.push(Ready(task));
        self.start_drivers(tally, 1);
    }

    /// Starts up to `count` drivers, as far as the pool has threads without one.
    fn start_drivers(self: &Arc<Self>, mut tally: MutexGuard<'_, Tally>, count: usize) {
        let start = count.min(self.ctx.threads().saturating_sub(tally.drivers));
        tally.drivers += start;
        drop(tally);
        for _ in 0..start {
            let flight = Arc::clone(self);
            self.ctx.spawn(move || flight.drive());
        }
    }

    /// Runs the earliest ready kernel it may start until there is none. A driver that finds its
    /// thread inside a kernel already ([`RUNNING`]) ends at once: see there.
    fn drive(self: &Arc<Self>) {
        if RUNNING.with(std::cell::Cell::get) {
            // The driver below this frame takes the ready kernels once its kernel ends.
            lock(&self.tally).drivers -= 1;
            return;
        }
        loop {
            let mut tally = lock(&self.tally);
            let others = tally.others;
            let may_start = |ready: &Ready| !ready.0.last || others == 0 || others > FILL_ABOVE;
            let Some(task) = tally.ready.peek().filter(|ready| may_start(ready)) else {
                tally.drivers -= 1;
                return;
            };
            let task = Arc::clone(&task.0);
            tally.ready.pop();
            drop(tally);
            self.run(&task);
        }
    }

    fn run(self: &Arc<Self>, task: &Task) {
        let Some(Job { op, inputs, outputs }) = lock(&task.job).take() else {
            return;
        };
        let label = || format!("rank {}: {}", self.rank, op.name());
        let last = task.last;
        let computed = inputs
            .into_iter()
            .map(Shard::into_tensor)
            .collect::<Result<Vec<Tensor>>>()
            .map_err(|input| match input {
                Error::Runtime(message) => message,
                other => other.to_string(),
            })
            .and_then(|args| {
                let ctx = &self.ctx;
                let below = RUNNING.with(|running| running.replace(true));
                let ran = catch_unwind(AssertUnwindSafe(|| op.forward_owned(ctx, args)));
                RUNNING.with(|running| running.set(below));
                match ran {
                    Ok(Ok(results)) if results.len() >= outputs.len() => Ok(results),
                    Ok(Ok(results)) => Err(format!(
                        "{}: returned {} tensors for {} outputs",
                        label(),
                        results.len(),
                        outputs.len()
                    )),
                    Ok(Err(error)) => Err(format!("{}: {error}", label())),
                    Err(panic) => Err(format!(
                        "{}: the kernel panicked: {}",
                        label(),
                        meshflow_actor::panic_message(&*panic)
                    )),
                }
            });
        drop(op);
        let settled: Vec<std::result::Result<Tensor, String>> = match computed {
            Ok(results) => results.into_iter().take(outputs.len()).map(Ok).collect(),
            Err(failure) => {
                let mut tally = lock(&self.tally);
                tally.failure.get_or_insert_with(|| failure.clone());
                drop(tally);
                vec![Err(failure); outputs.len()]
            }
        };
        for (cell, result) in outputs.into_iter().zip(settled) {
            for waiting in cell.settle(result) {
                self.release(waiting);
            }
        }
        let mut tally = lock(&self.tally);
        tally.unfinished -= 1;
        if tally.unfinished == 0 {
            self.idle.notify_all();
        }
        tally.others -= usize::from(!last);
        if !last && tally.others == 0 {
            // The last kernels may start now, on every thread.
            let waiting = tally.ready.len();
            self.start_drivers(tally, waiting);
        }
    }

    /// Waits until every submitted kernel has run; the first failure since the last call.
    pub fn settle(&self) -> Option<String> {
        let mut tally = lock(&self.tally);
        while tally.unfinished > 0 {
            tally = self.idle.wait(tally).unwrap_or_else(|poison| poison.into_inner());
        }
        tally.failure.take()
    }
}

#[cfg(test)]
mod tests {
    use meshflow_ops::ops::add::Add;
    use meshflow_ops::ops::mul::Mul;
    use meshflow_ops::{Emit, Op, TensorMeta, Value};
    use meshflow_placement::Signature;

    use super::*;

    fn vector(values: &[f32]) -> Tensor {
        Tensor::from_vec(values.to_vec(), [values.len()]).expect("tensor")
    }

    fn values(shard: &Shard) -> Vec<f32> {
        shard.get().expect("settled").to_vec().expect("f32")
    }

    fn address(t: &Tensor) -> usize {
        t.bytes().expect("host").as_ptr() as usize
    }

    /// A graph of 200 kernels, each reading two earlier values picked by a fixed pseudo-random
    /// rule, submitted in order on 2 threads, equals the same kernels run one after another.
    #[test]
    fn kernels_run_after_their_inputs_and_equal_a_sequential_run() {
        let ctx = Context::with_threads(2);
        let flight = Flight::new(3, ctx.clone());
        let ops: [OpRef; 2] = [Arc::new(Add), Arc::new(Mul)];
        let first = vec![vector(&[1.0, 0.5, -0.25]), vector(&[0.5, 1.0, 2.0])];
        let mut sequential = first.clone();
        let mut pending: Vec<Shard> = first.into_iter().map(Shard::Ready).collect();
        let mut state = 7u64;
        for index in 2..202 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let (a, b) = ((state >> 33) as usize % index, (state >> 13) as usize % index);
            let op = &ops[index % 2];
            let args = vec![sequential[a].clone(), sequential[b].clone()];
            let want = op.forward(&Context::single_thread(), &args).expect("kernel").remove(0);
            // Keep the values bounded: a product of products grows without limit.
            let want = Tensor::from_vec(
                want.to_vec::<f32>().expect("f32").iter().map(|v| v.clamp(-4.0, 4.0)).collect(),
                [3],
            )
            .expect("tensor");
            sequential.push(want);
            let inputs = vec![pending[a].clone(), pending[b].clone()];
            let out = flight.submit(op.clone(), inputs, 1, false).remove(0);
            let clamp = ClampOp;
            let out = flight.submit(Arc::new(clamp), vec![out], 1, index % 3 == 0);
            pending.push(out.into_iter().next().expect("one output"));
        }
        assert_eq!(flight.settle(), None, "nothing failed");
        for (index, (shard, want)) in pending.iter().zip(&sequential).enumerate() {
            assert_eq!(values(shard), want.to_vec::<f32>().expect("f32"), "value {index}");
        }
    }

    /// `x.clamp(-4, 4)`, element-wise (a test kernel).
    #[derive(Debug)]
    struct ClampOp;

    /// Fails every run, or panics (a test kernel).
    #[derive(Debug)]
    struct Broken {
        panic: bool,
    }

    macro_rules! test_op {
        ($name:literal) => {
            fn name(&self) -> &'static str {
                $name
            }
            fn infer(&self, inputs: &[TensorMeta]) -> meshflow_ops::Result<Vec<TensorMeta>> {
                Ok(inputs[..1].to_vec())
            }
            fn signatures(&self, _: &[TensorMeta]) -> Vec<Signature> {
                Vec::new()
            }
            fn backward(
                &self,
                _: &mut dyn Emit,
                _: &[Value],
                _: &[Value],
                _: &[Option<Value>],
            ) -> meshflow_ops::Result<Vec<Option<Value>>> {
                Ok(vec![None])
            }
        };
    }

    impl Op for ClampOp {
        test_op!("clamp");
        fn forward(&self, _: &Context, inputs: &[Tensor]) -> meshflow_ops::Result<Vec<Tensor>> {
            let clamped = inputs[0].to_vec::<f32>()?.iter().map(|v| v.clamp(-4.0, 4.0)).collect();
            Ok(vec![Tensor::from_vec::<f32>(clamped, inputs[0].dims().to_vec())?])
        }
    }

    /// Logs its start and end around a sleep; returns its input (a test kernel).
    #[derive(Debug)]
    struct Timed {
        name: &'static str,
        sleep: std::time::Duration,
        log: Arc<Mutex<Vec<(&'static str, bool)>>>,
    }

    impl Op for Timed {
        test_op!("timed");
        fn forward(&self, _: &Context, inputs: &[Tensor]) -> meshflow_ops::Result<Vec<Tensor>> {
            lock(&self.log).push((self.name, true));
            std::thread::sleep(self.sleep);
            lock(&self.log).push((self.name, false));
            Ok(vec![inputs[0].clone()])
        }
    }

    /// Near the end of a step (few other kernels left) a last kernel waits for all of them;
    /// far from it, it starts while they run.
    #[test]
    fn a_last_kernel_waits_near_the_end_and_fills_gaps_far_from_it() {
        for chained in [0, FILL_ABOVE + 4] {
            let flight = Flight::new(3, Context::with_threads(2));
            let log = Arc::new(Mutex::new(Vec::new()));
            let timed = |name, milliseconds| -> OpRef {
                let sleep = std::time::Duration::from_millis(milliseconds);
                Arc::new(Timed { name, sleep, log: Arc::clone(&log) })
            };
            let x = Shard::Ready(vector(&[1.0]));
            let mut slow = flight.submit(timed("slow", 200), vec![x.clone()], 1, false);
            for _ in 0..chained {
                slow = flight.submit(timed("next", 0), slow, 1, false);
            }
            flight.submit(timed("last", 0), vec![x], 1, true);
            assert_eq!(flight.settle(), None);
            let log = lock(&log).clone();
            let at = |event| log.iter().position(|e| *e == event).expect("logged");
            let (slow_ends, last_starts) = (at(("slow", false)), at(("last", true)));
            if chained == 0 {
                assert!(last_starts > slow_ends, "the last kernel waited: {log:?}");
            } else {
                assert!(last_starts < slow_ends, "the last kernel filled a thread: {log:?}");
            }
        }
    }

    /// Splits itself in two halves joined on the pool (the first `first`, the second
    /// `second` long), logging its thread, start and end (a test kernel).
    #[derive(Debug)]
    struct Split {
        halves: (std::time::Duration, std::time::Duration),
        log: Arc<Mutex<Vec<Span>>>,
    }

    /// A kernel's thread, start and end.
    type Span = (std::thread::ThreadId, std::time::Instant, std::time::Instant);

    impl Op for Split {
        test_op!("split");
        fn forward(&self, ctx: &Context, inputs: &[Tensor]) -> meshflow_ops::Result<Vec<Tensor>> {
            let start = std::time::Instant::now();
            let (first, second) = self.halves;
            ctx.install(|| {
                rayon::join(|| std::thread::sleep(first), || std::thread::sleep(second))
            });
            lock(&self.log).push((std::thread::current().id(), start, std::time::Instant::now()));
            Ok(vec![inputs[0].clone()])
        }
    }

    /// A kernel that waits inside the pool for its other half never has another kernel
    /// started on its thread meanwhile (which it could not return before): every thread's
    /// kernels run one after another. Each round is a kernel whose own half is short and whose
    /// other half is long, next to independent kernels that are ready while it waits.
    #[test]
    fn no_kernel_starts_on_a_thread_whose_kernel_waits_for_its_parts() {
        let flight = Flight::new(3, Context::with_threads(2));
        let log = Arc::new(Mutex::new(Vec::new()));
        let millis = std::time::Duration::from_millis;
        let x = Shard::Ready(vector(&[1.0]));
        for _ in 0..12 {
            let split = Split { halves: (millis(1), millis(6)), log: Arc::clone(&log) };
            flight.submit(Arc::new(split), vec![x.clone()], 1, false);
            for _ in 0..3 {
                let short = Split { halves: (millis(2), millis(0)), log: Arc::clone(&log) };
                flight.submit(Arc::new(short), vec![x.clone()], 1, false);
            }
        }
        assert_eq!(flight.settle(), None);
        let spans = lock(&log).clone();
        assert_eq!(spans.len(), 48, "every kernel ran once");
        for (index, (thread, start, end)) in spans.iter().enumerate() {
            let inside = spans
                .iter()
                .enumerate()
                .find(|(other, (t, s, e))| *other != index && t == thread && s > start && e < end);
            assert!(inside.is_none(), "kernel {index} had {inside:?} run inside it");
        }
    }

    impl Op for Broken {
        test_op!("broken");
        fn forward(&self, _: &Context, _: &[Tensor]) -> meshflow_ops::Result<Vec<Tensor>> {
            if self.panic {
                panic!("the broken kernel's panic");
            }
            Err(meshflow_ops::Error::argument("broken", "the broken kernel's error".to_string()))
        }
    }

    /// A failing kernel (an error, or a panic) settles its outputs with its error, every
    /// kernel that reads them fails with that error without running, independent kernels
    /// still run, and the end of the step reports the first failure once.
    #[test]
    fn a_failing_kernel_fails_its_readers_and_the_step_but_not_the_others() {
        for panic in [false, true] {
            let flight = Flight::new(3, Context::with_threads(2));
            let x = Shard::Ready(vector(&[1.0, 2.0]));
            let broken: OpRef = Arc::new(Broken { panic });
            let bad = flight.submit(broken, vec![x.clone()], 1, false).remove(0);
            let add: OpRef = Arc::new(Add);
            let reader = flight.submit(add.clone(), vec![bad.clone(), x.clone()], 1, true);
            let fine = flight.submit(add, vec![x.clone(), x], 1, false).remove(0);
            let failure = flight.settle().expect("the step failed");
            let cause =
                if panic { "panicked: the broken kernel's panic" } else { "kernel's error" };
            assert!(failure.starts_with("rank 3: broken: "), "{failure}");
            assert!(failure.contains(cause), "{failure}");
            for shard in [&bad, &reader[0]] {
                let error = shard.get().expect_err("failed").to_string();
                assert!(error.contains(&failure), "{error}");
            }
            assert_eq!(values(&fine), [2.0, 4.0], "an independent kernel ran");
            assert_eq!(flight.settle(), None, "a failure is reported once");
        }
    }

    /// A kernel given the only reference to a tensor (a ready one it was handed, or the output
    /// of a kernel no one else reads any more) may write its output there.
    #[test]
    fn the_last_reader_of_a_value_owns_it() {
        let flight = Flight::new(3, Context::with_threads(2));
        let x = vector(&[1.0, 2.0, 3.0]);
        let storage = address(&x);
        let add: OpRef = Arc::new(Add);
        let once = flight.submit(
            add.clone(),
            vec![Shard::Ready(x), Shard::Ready(vector(&[1.0; 3]))],
            1,
            false,
        );
        let once = once.into_iter().next().expect("output");
        let twice = flight.submit(add, vec![once, Shard::Ready(vector(&[1.0; 3]))], 1, true);
        assert_eq!(flight.settle(), None);
        let twice = twice.into_iter().next().expect("output").into_tensor().expect("value");
        assert_eq!(twice.to_vec::<f32>().expect("f32"), [3.0, 4.0, 5.0]);
        assert_eq!(address(&twice), storage, "both adds wrote into x's storage");
    }
}
