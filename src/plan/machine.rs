//! This machine's figures for the calibration's `cpu` clusters: what one device thread computes
//! and copies, what a kernel and an empty session step cost, and the α–β figures of the links
//! the calibrated strategies use (shared memory between device threads, QUIC between launched
//! processes on loopback), and its cache sizes (read from
//! `/sys/devices/system/cpu/cpu0/cache`, [`DEFAULT_CACHE_BYTES`] where unreadable).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use meshflow_comm::{Communicator, Rank, ReduceOp, SharedGroup};
use meshflow_ops::ops::add::Add;
use meshflow_ops::ops::gelu::Gelu;
use meshflow_ops::ops::matmul::MatMul;
use meshflow_ops::ops::softmax::Softmax;
use meshflow_ops::ops::unary::Unary;
use meshflow_ops::{Context, DType, Op, Tensor as HostTensor};
use meshflow_placement::{DeviceType, Placement};

use super::cluster::{Cluster, DeviceSpec, Link};
use crate::session::{Session, SessionConfig};
use crate::{Error, Graph, Result};

/// This machine's figures.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    /// Matrix-product FLOP/s of one thread.
    pub gemm_flops: f64,
    /// Element-wise FLOP/s of one thread.
    pub vector_flops: f64,
    /// Bytes per second read plus written by a copy.
    pub memory_bandwidth: f64,
    /// Seconds one kernel costs beyond its roofline: the largest of a tiny op's call, a
    /// session's per-kernel cost (a chain of 200 tiny kernels less a chain of 1, per kernel)
    /// and the runtime's time between two acts of a chain whose kernels evict its data from
    /// the core's cache, as a step's kernels do ([`act_gap`]).
    pub kernel_overhead: f64,
    /// Seconds per hop of the in-process all-reduce.
    pub hop_latency: f64,
    /// Bytes per second one member receives in the in-process all-reduce.
    pub link_bandwidth: f64,
    /// Cores available.
    pub cores: usize,
    /// Bytes of the largest cache private to a core (L2).
    #[serde(default)]
    pub private_cache: f64,
    /// Bytes of the cache its cores share (L3; 0 if none).
    #[serde(default)]
    pub shared_cache: f64,
    /// Seconds a member of an in-process collective that slept at its barrier (it arrived more
    /// than the barrier's spin before the last member) takes to go on: the last member's
    /// all-reduce of one element then, less the same all-reduce with both members polling.
    #[serde(default)]
    pub wake_latency: f64,
}

/// The cache one device is priced with where the machine's cannot be read: a 1 MiB L2 and
/// 1 MiB of a shared L3.
pub const DEFAULT_CACHE_BYTES: f64 = 2.0 * 1024.0 * 1024.0;

/// This machine's private (largest level-2 data or unified) and shared (level-3) cache bytes from
/// `/sys/devices/system/cpu/cpu0/cache/index*/{level,size,type}`; `None` if unreadable.
pub fn cache_sizes() -> Option<(f64, f64)> {
    let root = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    let mut sizes = (0.0f64, 0.0f64);
    for entry in std::fs::read_dir(root).ok()?.flatten() {
        let read = |name: &str| std::fs::read_to_string(entry.path().join(name)).ok();
        let (Some(level), Some(size), Some(kind)) = (read("level"), read("size"), read("type"))
        else {
            continue;
        };
        let Some(bytes) = parse_cache_size(size.trim()) else { continue };
        match (level.trim(), kind.trim()) {
            (_, "Instruction") => {}
            ("2", _) => sizes.0 = sizes.0.max(bytes),
            ("3", _) => sizes.1 = sizes.1.max(bytes),
            _ => {}
        }
    }
    (sizes.0 > 0.0).then_some(sizes)
}

/// The environment variable that replaces the cache a device thread uses (`2048K`, `8M`): for
/// machines whose sysfs sizes are not what a thread gets (a virtual machine reports its host's
/// whole L3, shared with other tenants).
pub const CACHE_VARIABLE: &str = "MESHFLOW_CACHE_BYTES";

/// The cache bytes [`CACHE_VARIABLE`] names, if set and valid.
pub fn cache_override() -> Option<f64> {
    parse_cache_size(std::env::var(CACHE_VARIABLE).ok()?.trim())
}

/// Bytes of a sysfs cache size such as `2048K` or `32M`.
pub fn parse_cache_size(text: &str) -> Option<f64> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let scale = match unit {
        "" => 1.0,
        "K" => 1024.0,
        "M" => 1024.0 * 1024.0,
        "G" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(digits.parse::<f64>().ok()? * scale)
}

impl Measured {
    /// The `cpu` cluster of `devices` devices in one process on this machine.
    pub fn cluster(&self, devices: usize) -> Cluster {
        let share = self.share(devices);
        let link = Link { bandwidth: self.link_bandwidth * share, latency: self.hop_latency };
        self.cluster_with_link(devices, link)
    }

    /// The `cpu` cluster of `devices` devices whose links are all `link` (as measured, not
    /// shared out: the QUIC link between processes is measured with the processes running).
    pub fn cluster_with_link(&self, devices: usize, link: Link) -> Cluster {
        let share = self.share(devices);
        let device = DeviceSpec {
            kind: "cpu".into(),
            peak_flops: self.gemm_flops * share,
            matmul_efficiency: 1.0,
            vector_flops: self.vector_flops * share,
            memory: 16e9,
            memory_bandwidth: self.memory_bandwidth * share,
            kernel_overhead: self.kernel_overhead,
            element_bytes: 4.0,
            cache_bytes: self.cache_bytes(devices),
        };
        Cluster { nodes: 1, per_node: devices, device, intra: link, inter: link }
    }

    /// The cache one device thread on this machine can count on: its core's private cache
    /// ([`DEFAULT_CACHE_BYTES`] if unread). Not a share of the shared level: on a virtual
    /// machine sysfs reports the host's whole L3, shared with other tenants (480 MiB here),
    /// and pricing with a share of it priced the kernels of the calibration's sessions 10–28 %
    /// under what the sessions' traces measured them at, against 4–9 % with the private cache
    /// alone (docs/plan.md, session 5). [`CACHE_VARIABLE`] replaces it. When `devices` threads
    /// outnumber the cores, the threads that take turns on a core share its cache: each gets
    /// `cores / devices` of it (each turn evicts what the other thread left there).
    pub fn cache_bytes(&self, devices: usize) -> f64 {
        let private =
            if self.private_cache > 0.0 { self.private_cache } else { DEFAULT_CACHE_BYTES };
        private * self.share(devices)
    }

    /// The fraction of a core each of `devices` busy device threads gets.
    pub fn share(&self, devices: usize) -> f64 {
        (self.cores as f64 / devices as f64).min(1.0)
    }
}

/// Measures the machine's figures (see the module doc).
pub fn measure() -> Result<Measured> {
    let ctx = Context::single_thread();
    let shapes = [(1024, 128, 384), (1024, 128, 512), (1024, 512, 128), (512, 128, 128)];
    let mut flops = 0u64;
    let mut seconds = 0.0;
    for (m, k, n) in shapes {
        let a = HostTensor::randn([m, k], 0.0, 1.0, DType::F32, 1)?;
        let b = HostTensor::randn([k, n], 0.0, 1.0, DType::F32, 2)?;
        let op = MatMul { transpose_a: false, transpose_b: false };
        let (f, s) = op_rate(&op, &ctx, &[a, b])?;
        flops += f;
        seconds += s;
    }
    let gemm_flops = flops as f64 / seconds;
    let scores = HostTensor::randn([64, 64, 64], 0.0, 1.0, DType::F32, 3)?;
    let hidden = HostTensor::randn([1024, 512], 0.0, 1.0, DType::F32, 4)?;
    let x = HostTensor::randn([1024, 128], 0.0, 1.0, DType::F32, 5)?;
    let (f1, s1) = op_rate(&Softmax, &ctx, &[scores])?;
    let (f2, s2) = op_rate(&Unary(Gelu { tanh: false }), &ctx, &[hidden])?;
    let (f3, s3) = op_rate(&Add, &ctx, &[x.clone(), x])?;
    let vector_flops = (f1 + f2 + f3) as f64 / (s1 + s2 + s3);
    let one = HostTensor::randn([1], 0.0, 1.0, DType::F32, 6)?;
    let (_, kernel_overhead) = op_rate(&Add, &ctx, &[one.clone(), one])?;
    let (private_cache, shared_cache) = cache_override()
        .map(|bytes| (bytes, 0.0))
        .or_else(cache_sizes)
        .unwrap_or((DEFAULT_CACHE_BYTES / 2.0, DEFAULT_CACHE_BYTES / 2.0));
    let evict = (2.0 * private_cache) as usize;
    let link = in_process_link(evict)?;
    let wake_latency = in_process_wake()?;
    let chain = 200;
    let session_kernel = (empty_step(1, chain)? - empty_step(1, 1)?) / (chain - 1) as f64;
    let gap = act_gap(50, evict)?;
    Ok(Measured {
        gemm_flops,
        vector_flops,
        memory_bandwidth: copy_bandwidth(),
        kernel_overhead: kernel_overhead.max(session_kernel).max(gap),
        hop_latency: link.latency,
        link_bandwidth: link.bandwidth,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        private_cache,
        shared_cache,
        wake_latency,
    })
}

/// FLOPs of one call and its fastest seconds over ~0.1 s of calls (the least disturbed by
/// other processes: the machine is shared).
fn op_rate(op: &dyn Op, ctx: &Context, inputs: &[HostTensor]) -> Result<(u64, f64)> {
    let metas: Vec<_> = inputs.iter().map(|t| t.meta().clone()).collect();
    op.forward(ctx, inputs)?;
    let started = Instant::now();
    let mut fastest = f64::INFINITY;
    let mut calls = 0u32;
    while started.elapsed() < Duration::from_millis(100) || calls < 3 {
        let call = Instant::now();
        std::hint::black_box(op.forward(ctx, inputs)?);
        fastest = fastest.min(call.elapsed().as_secs_f64());
        calls += 1;
    }
    Ok((op.flops(&metas), fastest))
}

/// Bytes read plus written per second by a 64 MB copy (the fastest of 8).
fn copy_bandwidth() -> f64 {
    let source = vec![1u8; 64 << 20];
    let mut target = vec![0u8; 64 << 20];
    let mut fastest = f64::INFINITY;
    for _ in 0..8 {
        let started = Instant::now();
        target.copy_from_slice(std::hint::black_box(&source));
        std::hint::black_box(&target);
        fastest = fastest.min(started.elapsed().as_secs_f64());
    }
    (2 * source.len()) as f64 / fastest
}

/// Elements of the large all-reduce that gives a link's bandwidth (4 MB of f32).
const LARGE_ALL_REDUCE: usize = 1 << 20;

/// The α–β figures of a 2-member all-reduce from its seconds for one element (`small`, two
/// hops) and for `LARGE_ALL_REDUCE` elements (`large`): per-hop latency, and the bytes per
/// second one member receives (the large tensor's bytes less the latency).
pub fn link_from_all_reduces(small: f64, large: f64) -> Link {
    let bytes = (LARGE_ALL_REDUCE * 4) as f64;
    Link { latency: small / 2.0, bandwidth: bytes / (large - small).max(1e-9) }
}

/// The in-process all-reduce's figures over 2 device threads (shared memory), as a step meets
/// them: before each all-reduce every member writes `evict` bytes of other data (a kernel's
/// worth, out of its core's cache) and then its tensor (a gradient just computed), and the
/// times are the mean over the rounds (a step pays their sum). Back to back, with the
/// members' caches holding the group's state, a 1-element all-reduce took 2.6–3.3 µs; after
/// 4 MiB of writes, 5.4 µs on average, a 64 K-element one 15 → 25 µs (docs/plan.md, session 7).
/// Each figure is the least of [`LINK_BATCHES`] such means, as [`op_rate`] takes the fastest
/// call: the least disturbed by the shared host.
fn in_process_link(evict: usize) -> Result<Link> {
    let least_mean = |elements: usize, rounds: u32| -> Result<f64> {
        let batches =
            (0..LINK_BATCHES).map(|_| in_process_mean_all_reduce(elements, rounds, evict));
        let means = batches.collect::<Result<Vec<f64>>>()?;
        Ok(means.into_iter().fold(f64::INFINITY, f64::min))
    };
    let small = least_mean(1, 200)?;
    let large = least_mean(LARGE_ALL_REDUCE, 10)?;
    Ok(link_from_all_reduces(small, large))
}

/// Batches of all-reduces whose least mean [`in_process_link`] takes. One batch's mean carries
/// any preemption of a member during it, and on the shared 2-core host that was many batches:
/// of five batches of 200 one-element all-reduces in each of six runs, 13 of the 30 means were
/// above 10 µs (4.8–170.5 µs within one run), and one batch per run (as before) measured 2.6 to
/// 52.6 µs per hop in six calibrations in a row; the runs at 39.8 and 52.6 µs priced DP2×TP2's
/// collectives into a +26.6% and a +44.3% error (session 9). The least of five was 4.3–6.7 µs
/// in those six runs.
const LINK_BATCHES: usize = 5;

fn in_process_all_reduce(elements: usize, rounds: u32) -> Result<f64> {
    Ok(in_process_all_reduces(elements, rounds, Duration::ZERO)?.0)
}

/// The mean seconds of `rounds` all-reduces of `elements` over 2 device threads, each member
/// writing `evict` bytes and then its tensor before each (the slower member's mean).
fn in_process_mean_all_reduce(elements: usize, rounds: u32, evict: usize) -> Result<f64> {
    let times =
        on_two_members(|_, member| mean_evicted_all_reduce(member, elements, rounds, evict))?;
    Ok(times.iter().copied().fold(0.0, f64::max))
}

/// Runs `measure(index, member)` on each of 2 in-process group members, each on its own
/// thread, and returns their figures in member order.
fn on_two_members(
    measure: impl Fn(usize, &mut dyn Communicator) -> Result<f64> + Sync,
) -> Result<Vec<f64>> {
    let members = SharedGroup::members(vec![Rank(0), Rank(1)], Duration::from_secs(30));
    let measure = &measure;
    let results: Vec<Result<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = members
            .into_iter()
            .enumerate()
            .map(|(index, mut member)| scope.spawn(move || measure(index, &mut member)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Runtime("all-reduce thread panicked".into())))
            })
            .collect()
    });
    results.into_iter().collect()
}

/// The wake-up of a member that slept at the barrier ([`Measured::wake_latency`]): the second
/// member arrives 4 barrier spins after the first at each of 100 one-element all-reduces; its
/// median all-reduce less the median one of two members that arrive together.
fn in_process_wake() -> Result<f64> {
    let late = Duration::from_secs_f64(4.0 * super::cores::BARRIER_SPIN);
    let after_sleep = in_process_all_reduces(1, 100, late)?.1;
    let together = in_process_all_reduce(1, 100)?;
    Ok((after_sleep - together).max(0.0))
}

/// The median seconds of `rounds` all-reduces of `elements` over 2 device threads, the slower
/// member's and the second member's, that member arriving `late` after the first each time.
fn in_process_all_reduces(elements: usize, rounds: u32, late: Duration) -> Result<(f64, f64)> {
    let times = on_two_members(|index, member| {
        let delay = if index == 1 { late } else { Duration::ZERO };
        delayed_all_reduce_seconds(member, elements, rounds, delay)
    })?;
    Ok((times.iter().copied().fold(0.0, f64::max), times[1]))
}

/// Like [`all_reduce_seconds`], each all-reduce called after polling for `delay`.
fn delayed_all_reduce_seconds(
    member: &mut dyn Communicator,
    elements: usize,
    rounds: u32,
    delay: Duration,
) -> Result<f64> {
    if delay.is_zero() {
        return all_reduce_seconds(member, elements, rounds);
    }
    let tensor = HostTensor::zeros([elements], DType::F32);
    member.all_reduce(&tensor, ReduceOp::Sum)?;
    let mut times = Vec::new();
    for _ in 0..rounds.max(1) {
        let arrive = Instant::now() + delay;
        while Instant::now() < arrive {
            std::hint::spin_loop();
        }
        let started = Instant::now();
        member.all_reduce(&tensor, ReduceOp::Sum)?;
        times.push(started.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// The seconds of `rounds` all-reduces of `elements` f32 by `member` (after one unmeasured
/// call), each after writing `evict` bytes of other data and then the tensor (a collective as
/// a step meets it, after a kernel that evicted the member's cache wrote its input): their
/// mean without the slowest tenth. A step pays the sum of its collectives, so the mean, not the
/// median; but one all-reduce delayed by another process (a 4 MB one read 0.7 GB/s in one run
/// under a compile) is not the link.
fn mean_evicted_all_reduce(
    member: &mut dyn Communicator,
    elements: usize,
    rounds: u32,
    evict: usize,
) -> Result<f64> {
    let mut tensor = HostTensor::zeros([elements], DType::F32);
    let mut other = vec![0u8; evict];
    member.all_reduce(&tensor, ReduceOp::Sum)?;
    let mut times = Vec::new();
    for round in 0..rounds.max(1) {
        other.iter_mut().for_each(|byte| *byte = byte.wrapping_add(1));
        std::hint::black_box(&other);
        tensor.as_mut_slice::<f32>()?.fill(round as f32);
        let started = Instant::now();
        member.all_reduce(&tensor, ReduceOp::Sum)?;
        times.push(started.elapsed().as_secs_f64());
    }
    Ok(trimmed_mean(times, 0.1))
}

/// The mean of `values` without the largest `fraction` of them (at least one value kept).
pub fn trimmed_mean(mut values: Vec<f64>, fraction: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let dropped = (values.len() as f64 * fraction.clamp(0.0, 1.0)).floor() as usize;
    let kept = &values[..values.len().saturating_sub(dropped).max(1.min(values.len()))];
    kept.iter().sum::<f64>() / kept.len().max(1) as f64
}

/// The QUIC link between the processes of a job: the all-reduce figures of `communicator`
/// (every process of the job calls this with its member of the same group). The large
/// all-reduce runs first and the small one is timed after it, by its mean: a step's
/// collectives meet a connection that has carried its bulk transfers, and the step pays the
/// sum of them. On a fresh connection the 1-element all-reduce's median read 31 µs; after one
/// 4 MB all-reduce the same connection's read 100–108 µs, with a tail of 2–4 ms at the 99th
/// percentile (docs/plan.md, session 5).
///
/// Since session 7 both are timed as a step meets them (`mean_evicted_all_reduce`: each
/// member first writes `evict` bytes of other data, then its tensor), by their means, as the
/// in-process link is.
pub fn transport_link(communicator: &mut dyn Communicator, evict: usize) -> Result<Link> {
    let large = mean_evicted_all_reduce(communicator, LARGE_ALL_REDUCE, 10, evict)?;
    let small = mean_evicted_all_reduce(communicator, 1, 300, evict)?;
    Ok(link_from_all_reduces(small, large))
}

/// The median seconds of `rounds` all-reduces of `elements` f32 after one unmeasured call (the
/// median: a step's all-reduces meet the link as it usually is, not at its best).
fn all_reduce_seconds(member: &mut dyn Communicator, elements: usize, rounds: u32) -> Result<f64> {
    let times = all_reduce_times(member, elements, rounds)?;
    Ok(times[times.len() / 2])
}

/// The sorted seconds of `rounds` (at least 1) all-reduces of `elements` f32 after one
/// unmeasured call.
fn all_reduce_times(
    member: &mut dyn Communicator,
    elements: usize,
    rounds: u32,
) -> Result<Vec<f64>> {
    let tensor = HostTensor::zeros([elements], DType::F32);
    member.all_reduce(&tensor, ReduceOp::Sum)?;
    let mut times = Vec::new();
    for _ in 0..rounds.max(1) {
        let started = Instant::now();
        member.all_reduce(&tensor, ReduceOp::Sum)?;
        times.push(started.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// The runtime's seconds between two acts of a one-device session's chain of `kernels`
/// kernels, each reading and writing `bytes` (out of the core's cache when `bytes` is twice
/// it): the step's span less its acts, per gap, from the session's trace (median of 8 steps
/// after a warm-up). A chain of tiny kernels keeps the runtime's own data in cache; a step's
/// kernels evict it.
pub fn act_gap(kernels: usize, bytes: usize) -> Result<f64> {
    let placement = Placement::line(DeviceType::Cpu, 1)?;
    let graph = Graph::new();
    let elements = (bytes / 4).max(1);
    let x = graph.input("x", [elements], DType::F32, &placement, None)?;
    let mut y = x.mul_scalar(2.0)?;
    for _ in 1..kernels.max(2) {
        y = y.mul_scalar(1.0)?;
    }
    let config = SessionConfig { devices: 1, trace: true, ..SessionConfig::default() };
    let mut session = Session::new(&graph, &[&y], None, config)?;
    let feed = HostTensor::zeros([elements], DType::F32);
    let steps = 9;
    for _ in 0..steps {
        session.step(&[(&x, feed.clone())])?;
    }
    let trace = session.stop()?.trace;
    let mut per_actor: std::collections::HashMap<usize, Vec<(u64, u64, u64)>> =
        std::collections::HashMap::new();
    for event in &trace.events {
        per_actor.entry(event.actor.index()).or_default().push((
            event.sequence,
            event.start,
            event.end,
        ));
    }
    let mut per_step: Vec<Vec<(u64, u64)>> = vec![Vec::new(); steps];
    for mut acts in per_actor.into_values() {
        acts.sort_unstable();
        let per = (acts.len() / steps).max(1);
        for (index, (_, start, end)) in acts.into_iter().enumerate() {
            if let Some(step) = per_step.get_mut(index / per) {
                step.push((start, end));
            }
        }
    }
    let mut gaps: Vec<f64> = per_step
        .into_iter()
        .skip(1)
        .filter(|acts| acts.len() > 1)
        .map(|mut acts| {
            acts.sort_unstable();
            let idle: u64 = acts.windows(2).map(|w| w[1].0.saturating_sub(w[0].1)).sum();
            idle as f64 / 1e9 / (acts.len() - 1) as f64
        })
        .collect();
    gaps.sort_by(f64::total_cmp);
    Ok(gaps.get(gaps.len() / 2).copied().unwrap_or(0.0))
}

/// The fastest session step of a chain of `kernels` tiny kernels on `devices` devices.
pub fn empty_step(devices: usize, kernels: usize) -> Result<f64> {
    let placement = Placement::line(DeviceType::Cpu, devices)?;
    let graph = Graph::new();
    let x = graph.input("x", [devices], DType::F32, &placement, None)?;
    let mut y = x.mul_scalar(2.0)?;
    for _ in 1..kernels {
        y = y.mul_scalar(1.0)?;
    }
    let config = SessionConfig { devices, ..SessionConfig::default() };
    let mut session = Session::new(&graph, &[&y], None, config)?;
    let feed = HostTensor::zeros([devices], DType::F32);
    session.step(&[(&x, feed.clone())])?;
    let mut fastest = f64::INFINITY;
    for _ in 0..30 {
        let started = Instant::now();
        session.step(&[(&x, feed.clone())])?;
        fastest = fastest.min(started.elapsed().as_secs_f64());
    }
    Ok(fastest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(cores: usize, private_cache: f64) -> Measured {
        Measured {
            gemm_flops: 1e11,
            vector_flops: 1e9,
            memory_bandwidth: 1e10,
            kernel_overhead: 1e-6,
            hop_latency: 1e-6,
            link_bandwidth: 1e10,
            cores,
            private_cache,
            shared_cache: 0.0,
            wake_latency: 0.0,
        }
    }

    #[test]
    fn trimmed_mean_drops_the_slowest_tenth() {
        let mut times: Vec<f64> = (1..=9).map(f64::from).collect();
        times.push(1000.0);
        assert_eq!(trimmed_mean(times, 0.1), 5.0, "mean of 1..=9");
        assert_eq!(trimmed_mean(vec![3.0, 5.0], 0.1), 4.0, "nothing to drop");
        assert_eq!(trimmed_mean(vec![7.0], 0.9), 7.0, "one value kept");
        assert_eq!(trimmed_mean(Vec::new(), 0.1), 0.0);
    }

    #[test]
    fn device_threads_taking_turns_on_a_core_share_its_cache() {
        let mib = 1024.0 * 1024.0;
        let two_cores = machine(2, 2.0 * mib);
        assert_eq!(two_cores.cache_bytes(1), 2.0 * mib, "a core to itself");
        assert_eq!(two_cores.cache_bytes(2), 2.0 * mib, "a core each");
        assert_eq!(two_cores.cache_bytes(4), mib, "two threads per core");
        assert_eq!(two_cores.cluster(8).device.cache_bytes, 0.5 * mib, "four per core");
        assert_eq!(machine(2, 0.0).cache_bytes(4), DEFAULT_CACHE_BYTES / 2.0, "unread: default");
    }
}
