//! The table the `actor` bench prints first: hop latency between two threads, timed inside the
//! acts, and the step time of a 1000-actor plan, for each driver setting, beside a bare crossbeam
//! ping-pong and the load average at the time of each row.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam::channel::{self, Receiver, Sender, TryRecvError};
use meshflow_actor::{Act, Completion, Driver, DriverConfig, Executor, Plan};

use super::{chain, driver, random_plan, settings};

/// Actors in the ping-pong chain; they alternate between two threads.
const CHAIN: usize = 101;
/// Steps of one piece through the chain; the first few warm up and are not counted.
const STEPS: usize = 200;
const WARM_UP_STEPS: usize = 10;
/// Round trips of the crossbeam references.
const ROUND_TRIPS: usize = 20_000;
/// Steps of the 1000-actor plan per setting.
const DAG_STEPS: usize = 60;

/// Prints the table to standard output.
pub fn print() {
    let spin = DriverConfig::default().spin;
    println!("hop latency between two threads: median (p90) of round trips / 2, timed in the acts");
    println!("(spin: the default budget of {spin:?}; park: zero)");
    println!("{:<40} {:>12} {:>12}   load (1, 5, 15 min)", "setting", "median µs", "p90 µs");
    for (name, config) in settings() {
        row(&format!("driver {name}"), &mut hop_samples(config));
    }
    row("crossbeam ping-pong, blocking recv", &mut ping_pong(Wait::Block));
    row("crossbeam ping-pong, spinning try_recv", &mut ping_pong(Wait::Spin));
    println!();
    println!("1000-actor random plan on two threads, 4 pieces: median (p90) step time");
    println!("{:<40} {:>12} {:>12}   load (1, 5, 15 min)", "setting", "median µs", "p90 µs");
    let plan = random_plan(1000, 2, 7);
    for (name, config) in settings() {
        row(&format!("driver {name}"), &mut step_samples(&plan, config));
    }
    println!();
}

fn row(name: &str, samples: &mut [f64]) {
    samples.sort_by(f64::total_cmp);
    let quantile = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize] / 1000.0;
    println!("{name:<40} {:>12.2} {:>12.2}   {}", quantile(0.5), quantile(0.9), load());
}

/// The load averages, as `uptime` gives them (Linux), or "n/a".
fn load() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let fields: Vec<&str> = text.split_whitespace().take(3).collect();
    if fields.len() == 3 {
        fields.join(", ")
    } else {
        "n/a".into()
    }
}

/// Records when each actor acted, in nanoseconds since a shared epoch.
#[derive(Clone)]
pub struct Stamps {
    epoch: Instant,
    times: Arc<Vec<AtomicU64>>,
}

impl Stamps {
    /// When each actor last acted; read after a step, which orders the executors' writes first.
    pub fn times(&self) -> Vec<u64> {
        self.times.iter().map(|time| time.load(Ordering::Relaxed)).collect()
    }
}

impl Executor<()> for Stamps {
    type Error = Infallible;

    fn act(&mut self, act: &Act<'_, ()>) -> Result<Completion, Infallible> {
        let now = self.epoch.elapsed().as_nanos() as u64;
        self.times[act.actor.index()].store(now, Ordering::Relaxed);
        Ok(Completion::Done)
    }
}

/// A chain of `actors` alternating between two threads, its acts stamped.
pub fn stamped_chain(actors: usize, config: DriverConfig) -> (Driver<()>, Stamps) {
    let plan = chain(actors, 1, |index| (index % 2) as u32);
    let stamps = Stamps {
        epoch: Instant::now(),
        times: Arc::new((0..actors).map(|_| AtomicU64::new(0)).collect()),
    };
    let shared = stamps.clone();
    let threaded = Driver::start(plan, config, move |_, _| shared.clone()).expect("starts");
    (threaded, stamps)
}

/// One piece down a chain alternating between two threads, many times: actors `i` and `i + 2`
/// act on the same thread, so half the time between their acts is one hop (an act that does
/// nothing, its messages out, the other thread's act, its messages back).
fn hop_samples(config: DriverConfig) -> Vec<f64> {
    let (mut threaded, stamps) = stamped_chain(CHAIN, config);
    let mut samples = Vec::with_capacity((STEPS - WARM_UP_STEPS) * CHAIN);
    for step in 0..STEPS {
        threaded.run_step(1).expect("the chain runs");
        if step >= WARM_UP_STEPS {
            let times = stamps.times();
            samples.extend(times.windows(3).map(|window| (window[2] - window[0]) as f64 / 2.0));
        }
    }
    threaded.stop().expect("the chain stops");
    samples
}

fn step_samples(plan: &Plan<()>, config: DriverConfig) -> Vec<f64> {
    let mut threaded = driver(plan, config);
    let samples = (0..DAG_STEPS)
        .map(|_| {
            let begin = Instant::now();
            threaded.run_step(4).expect("the plan runs");
            begin.elapsed().as_nanos() as f64
        })
        .collect();
    threaded.stop().expect("the plan stops");
    samples
}

#[derive(Clone, Copy)]
enum Wait {
    Block,
    Spin,
}

fn receive(inbox: &Receiver<u64>, wait: Wait) -> Option<u64> {
    match wait {
        Wait::Block => inbox.recv().ok(),
        Wait::Spin => loop {
            match inbox.try_recv() {
                Ok(token) => return Some(token),
                Err(TryRecvError::Empty) => std::hint::spin_loop(),
                Err(TryRecvError::Disconnected) => return None,
            }
        },
    }
}

/// Round trips / 2 of a token between this thread and a peer, over two crossbeam channels.
fn ping_pong(wait: Wait) -> Vec<f64> {
    let (to_peer, peer_inbox): (Sender<u64>, Receiver<u64>) = channel::unbounded();
    let (to_main, main_inbox) = channel::unbounded();
    let peer = std::thread::spawn(move || {
        while let Some(token) = receive(&peer_inbox, wait) {
            if to_main.send(token + 1).is_err() {
                return;
            }
        }
    });
    let samples = (0..ROUND_TRIPS as u64)
        .map(|token| {
            let begin = Instant::now();
            to_peer.send(token).expect("the peer is alive");
            receive(&main_inbox, wait).expect("the peer answers");
            begin.elapsed().as_nanos() as f64 / 2.0
        })
        .collect();
    drop(to_peer);
    peer.join().expect("the peer ends");
    samples
}
