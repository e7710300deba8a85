//! A data-parallel MLP (784-1024-1024-10 by default) on synthetic data: inputs are random, and the
//! label of each is the argmax of a fixed random linear map of it, so the task is learnable. The
//! batch is split over the devices (`S(0)`); the weights are replicated (`B`); the compiler adds the
//! gradient reduction.
//!
//! ```sh
//! cargo run --release --example mlp -- --devices 2 --steps 100
//! ```

use clap::Parser;
use meshflow::flags;
use meshflow::ops::ops::adamw::AdamW;
use meshflow::ops::{DType, Tensor as HostTensor};
use meshflow::placement::{DeviceType, NdSbp, Placement, Sbp};
use meshflow::schedule::Schedule;
use meshflow::session::{Optimizer, Session, SessionConfig, Training};
use meshflow::{Graph, Result};

/// Train an MLP data parallel on CPU devices.
#[derive(Debug, Parser)]
struct Args {
    /// CPU devices (the data-parallel size).
    #[arg(long, default_value_t = 2, value_parser = flags::count)]
    devices: usize,
    /// Training steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Examples per step.
    #[arg(long, default_value_t = 256, value_parser = flags::count)]
    batch: usize,
    /// Input features.
    #[arg(long, default_value_t = 784, value_parser = flags::count)]
    inputs: usize,
    /// Hidden width (two hidden layers).
    #[arg(long, default_value_t = 1024, value_parser = flags::count)]
    hidden: usize,
    /// Classes.
    #[arg(long, default_value_t = 10, value_parser = flags::count)]
    classes: usize,
    /// Learning rate (AdamW).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Kernel threads per device.
    #[arg(long, default_value_t = 1, value_parser = flags::count)]
    threads: usize,
}

fn main() {
    if let Err(e) = run(&Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    let placement = Placement::line(DeviceType::Cpu, args.devices)?;
    let split = Some(NdSbp(vec![Sbp::Split(0)]));
    let replicated = Some(NdSbp(vec![Sbp::Broadcast]));
    let g = Graph::new();
    let x = g.input("x", [args.batch, args.inputs], DType::F32, &placement, split.clone())?;
    let y = g.input("y", [args.batch], DType::I64, &placement, split)?;
    let sizes = [args.inputs, args.hidden, args.hidden, args.classes];
    let mut h = x.clone();
    for (layer, pair) in sizes.windows(2).enumerate() {
        let std = (2.0 / pair[0] as f64).sqrt();
        let w = HostTensor::randn(vec![pair[0], pair[1]], 0.0, std, DType::F32, layer as u64)?;
        let w = g.parameter(&format!("fc{layer}.weight"), w, &placement, replicated.clone())?;
        let b = HostTensor::zeros([pair[1]], DType::F32);
        let b = g.parameter(&format!("fc{layer}.bias"), b, &placement, replicated.clone())?;
        let y = h.matmul(&w)?;
        h = if layer + 2 < sizes.len() { y.bias_relu(&b)? } else { y.add(&b)? };
    }
    let loss = h.cross_entropy(&y)?;
    let training = Training::new(&loss, Optimizer::AdamW(AdamW::new(args.lr)), Schedule::Constant);
    let config = SessionConfig {
        devices: args.devices,
        threads_per_device: args.threads,
        ..Default::default()
    };
    let mut session = Session::new(&g, &[&loss], Some(training), config)?;
    let teacher = HostTensor::randn(vec![args.inputs, args.classes], 0.0, 1.0, DType::F32, 99)?;
    let teacher = teacher.to_vec::<f32>()?;
    let started = std::time::Instant::now();
    for step in 0..args.steps {
        let xs = HostTensor::randn(
            vec![args.batch, args.inputs],
            0.0,
            1.0,
            DType::F32,
            1000 + step as u64,
        )?;
        let labels = label(&xs.to_vec::<f32>()?, &teacher, args.inputs, args.classes);
        let ys = HostTensor::from_vec(labels, [args.batch])?;
        let value = session.step(&[(&x, xs), (&y, ys)])?[0].to_vec::<f32>()?[0];
        if step % 10 == 0 || step + 1 == args.steps {
            let per_step = started.elapsed().as_secs_f64() / (step + 1) as f64;
            println!("step {step} loss {value:.6} ({:.1} ms/step)", per_step * 1e3);
        }
    }
    Ok(())
}

/// The class of each row of `xs`: the argmax of `x · teacher`.
fn label(xs: &[f32], teacher: &[f32], inputs: usize, classes: usize) -> Vec<i64> {
    xs.chunks_exact(inputs)
        .map(|x| {
            let score = |c: usize| {
                x.iter().enumerate().map(|(i, v)| v * teacher[i * classes + c]).sum::<f32>()
            };
            (0..classes)
                .map(|c| (c, score(c)))
                .fold((0, f32::MIN), |a, b| if b.1 > a.1 { b } else { a })
                .0 as i64
        })
        .collect()
}
