//! Character-level GPT on the King James Genesis (shipped in `examples/data/`), trained on CPU
//! devices with any mix of data and tensor parallelism: only the placement and SBP annotations
//! change, the losses do not.
//!
//! ```sh
//! cargo run --release --example gpt -- --dp 2 --tp 2 --steps 200
//! ```
//!
//! With `--checkpoint-dir DIR` it saves a checkpoint every `--save-every` steps and at the end,
//! and resumes from it when it exists (on any mesh: checkpoints reshard). A loss that turns NaN
//! or infinite stops the run with an error, and no checkpoint holding such values is saved over
//! the last good one.
//!
//! With `--init-from FILE` (weights in the layout of `shared/formats/gpt-weights.md`) and
//! `--data FILE` (`data.tokens`), it reproduces another framework's run step for step.
//!
//! Under `meshflow launch` (or srun, mpirun) the same command is one process of a job: the
//! `dp × tp × pp` devices are shared out evenly, process by process, and the losses are those of
//! the same mesh in one process; rank 0 prints.
//!
//! ```sh
//! cargo run --release -- launch --nproc-per-node 2 -- target/release/examples/gpt --dp 2 --tp 1
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use meshflow::checkpoint::{self, LoadOptions, SaveOptions};
use meshflow::compile::{Program, View};
use meshflow::data::{inputs_and_targets, Batches, CharTokenizer, TokenFile};
use meshflow::dist::{self, Job, JoinOptions};
use meshflow::flags;
use meshflow::nn::{Gpt, GptConfig, Layouts, WeightInit};
use meshflow::ops::ops::adamw::AdamW;
use meshflow::ops::{io, DType, Device, Tensor as HostTensor};
use meshflow::placement::{DeviceType, Placement};
use meshflow::schedule::Schedule;
use meshflow::session::{DeviceKind, Optimizer, Session, SessionConfig, Training};
use meshflow::{Error, Graph};

/// Errors of the run: meshflow's, the checkpoint's and the example's own, each with its own
/// message.
type Result<T, E = Box<dyn std::error::Error>> = std::result::Result<T, E>;

/// Where the devices run.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum DeviceArg {
    /// CPU threads.
    Cpu,
    /// GPUs: device rank i on GPU i (build with `--features cuda`).
    Cuda,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ScheduleKind {
    Constant,
    Cosine,
}

/// Train a character-level GPT on CPU devices (or GPUs with `--device cuda`).
#[derive(Debug, Parser)]
struct Args {
    /// Data-parallel size (mesh axis 0).
    #[arg(long, default_value_t = 2, value_parser = flags::count)]
    dp: usize,
    /// Tensor-parallel size (mesh axis 1).
    #[arg(long, default_value_t = 2, value_parser = flags::count)]
    tp: usize,
    /// Pipeline stages, each a dp x tp mesh of its own devices.
    #[arg(long, default_value_t = 1, value_parser = flags::count)]
    pp: usize,
    /// Micro-batches per step (gradient accumulation; what a pipeline streams).
    #[arg(long, default_value_t = 1, value_parser = flags::count)]
    micro_batches: usize,
    /// Shard the optimizer state over the data-parallel axis (ZeRO).
    #[arg(long)]
    zero: bool,
    /// Kernel threads per device.
    #[arg(long, default_value_t = 1, value_parser = flags::count)]
    threads: usize,
    /// Run the devices on CPU threads or on GPUs.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Training steps.
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 16, value_parser = flags::count)]
    batch: usize,
    /// Context length.
    #[arg(long, default_value_t = 64, value_parser = flags::count)]
    ctx: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 4, value_parser = flags::count)]
    layers: usize,
    /// Attention heads.
    #[arg(long, value_parser = flags::count)]
    heads: Option<usize>,
    /// Model width.
    #[arg(long, default_value_t = 128, value_parser = flags::count)]
    d_model: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// AdamW β1.
    #[arg(long, default_value_t = 0.9)]
    beta1: f64,
    /// AdamW β2.
    #[arg(long, default_value_t = 0.999)]
    beta2: f64,
    /// AdamW ε.
    #[arg(long, default_value_t = 1e-8)]
    eps: f64,
    /// Learning-rate schedule.
    #[arg(long, value_enum, default_value_t = ScheduleKind::Cosine)]
    schedule: ScheduleKind,
    /// Warmup steps of the cosine schedule.
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// Gradient clipping by global norm (0 = off).
    #[arg(long, default_value_t = 0.0)]
    clip_grad: f64,
    /// Dropout probability (0 = off); masks change every step and are the same on any mesh.
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Recompute each block's forward in the backward instead of keeping its activations.
    #[arg(long)]
    activation_checkpointing: bool,
    /// Initial parameters (safetensors, names of shared/formats/gpt-weights.md).
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Token batches (safetensors `data.tokens`, i64 [steps, batch, ctx + 1]).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Text corpus (when no --data is given).
    #[arg(long, default_value = "examples/data/kjv-genesis.txt")]
    corpus: PathBuf,
    /// Seed of the initial weights and the batches.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Print the loss every this many steps (every step when --data is given).
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    /// Write pictures of the compiled plan (logical.dot, physical.dot; `dot -Tsvg`) here.
    #[arg(long)]
    dot: Option<PathBuf>,
    /// Checkpoint directory: training resumes from it when it holds a checkpoint, and saves into
    /// it every --save-every steps and at the end.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Save a checkpoint every this many steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    save_every: usize,
    /// Characters to generate at the end (0: none).
    #[arg(long, default_value_t = 200)]
    sample: usize,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    let text = std::fs::read_to_string(&args.corpus)
        .map_err(|e| Error::Data(format!("{}: {e}", args.corpus.display())))?;
    if text.is_empty() {
        return Err(Error::Data(format!("corpus {} is empty", args.corpus.display())).into());
    }
    let tokenizer = CharTokenizer::from_text(&text);
    let init = args.init_from.as_ref().map(io::load).transpose()?;
    let config = model_config(args, &tokenizer, init.as_ref())?;
    let token_file = args.data.as_ref().map(|p| TokenFile::read(p)).transpose()?;
    let (batch, ctx) = match &token_file {
        Some(f) => (f.batch, f.ctx),
        None => (args.batch, args.ctx.min(config.ctx)),
    };
    let stage_size = args.dp * args.tp;
    let stages = (0..args.pp)
        .map(|s| {
            let ranks = (s * stage_size..(s + 1) * stage_size).collect();
            let placement = Placement::new(DeviceType::Cpu, vec![args.dp, args.tp], ranks)?;
            Ok(Layouts { placement, data_axis: Some(0), tensor_axis: Some(1) })
        })
        .collect::<Result<Vec<_>>>()?;
    let (first, last) = (&stages[0], &stages[stages.len() - 1]);
    let graph = Graph::new();
    let ids =
        graph.input("ids", [batch, ctx], DType::I64, &first.placement, Some(first.batch()))?;
    let targets =
        graph.input("targets", [batch, ctx], DType::I64, &last.placement, Some(last.batch()))?;
    let weights = WeightInit { std: 0.02, seed: args.seed };
    let model = Gpt::pipelined(&graph, config, &stages, weights)?
        .with_activation_checkpointing(args.activation_checkpointing)
        .with_dropout(args.dropout, args.seed);
    let loss = model.loss(&ids, &targets)?;
    let optimizer = Optimizer::AdamW(AdamW {
        lr: args.lr,
        beta1: args.beta1,
        beta2: args.beta2,
        eps: args.eps,
        weight_decay: args.weight_decay,
        step: 1,
    });
    let schedule = match args.schedule {
        ScheduleKind::Cosine if args.init_from.is_none() => {
            Schedule::WarmupCosine { warmup: args.warmup, total: args.steps, min_ratio: 0.1 }
        }
        _ => Schedule::Constant,
    };
    let mut training = Training::new(&loss, optimizer, schedule);
    if args.clip_grad > 0.0 {
        training = training.clip_grad_norm(args.clip_grad);
    }
    let devices = stage_size * stages.len();
    let job = join_job(devices)?;
    // Rank 0 of a job reports; alone, this process does.
    let leader = job.as_ref().is_none_or(|job| job.world().rank == 0);
    let session_config = SessionConfig {
        devices,
        job: job.clone(),
        threads_per_device: args.threads,
        micro_batches: args.micro_batches,
        zero_axis: args.zero.then_some(0),
        device: match (args.device, &job) {
            (DeviceArg::Cpu, _) => DeviceKind::Cpu,
            (DeviceArg::Cuda, None) => DeviceKind::Cuda,
            // The processes of one host take GPUs in turn by their local rank, as torchrun's
            // LOCAL_RANK habit: local rank l drives GPUs l·share .. (l+1)·share.
            (DeviceArg::Cuda, Some(job)) => {
                let share = devices / job.world().world_size;
                let first = job.world().local_rank * share;
                DeviceKind::Each((first..first + share).map(Device::Cuda).collect())
            }
        },
        ..Default::default()
    };
    let mut session = Session::new(&graph, &[&loss], Some(training), session_config)?;
    if let Some(dir) = args.dot.as_ref().filter(|_| leader) {
        write_pictures(session.program(), dir)?;
    }
    if let Some(init) = &init {
        let values: Vec<(String, HostTensor)> = init
            .tensors
            .iter()
            .filter(|(name, _)| !name.starts_with("data.") && !name.contains(".exp_avg"))
            .map(|(n, t)| Ok((n.clone(), t.to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        session.load_variables(&values)?;
    }
    let say = |line: &str| {
        if leader {
            println!("{line}");
        }
    };
    say(&format!(
        "gpt: {} parameters, vocab {}, ctx {ctx}, {} layers, {} heads, d {}; dp {} x tp {} x pp {} \
         ({devices} {:?} devices), {} micro-batches{}",
        config.parameters(),
        config.vocab,
        config.n_layer,
        config.n_head,
        config.d_model,
        args.dp,
        args.tp,
        stages.len(),
        args.device,
        args.micro_batches,
        if args.zero { ", ZeRO" } else { "" },
    ));
    let mut batches = Batches::new(tokenizer.encode(&text)?, batch, ctx, args.seed)?;
    let steps = token_file.as_ref().map_or(args.steps, |f| f.steps.min(args.steps));
    // Rank 0 alone checks the destination: the check makes and removes a temporary sibling,
    // which another process's check would remove as stale.
    if let Some(dir) = args.checkpoint_dir.as_ref().filter(|_| leader) {
        checkpoint::check_destination(dir)?;
    }
    let start = resume(&mut session, args.checkpoint_dir.as_deref(), &say)?;
    if token_file.is_none() {
        for _ in 0..start {
            batches.next_step();
        }
    }
    let started = Instant::now();
    let bar = if leader { ProgressBar::new(steps as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]")
            .map_err(|e| Error::Graph(format!("progress bar template: {e}")))?,
    );
    bar.set_position(start as u64);
    for step in start..steps {
        let tokens = match &token_file {
            Some(f) => f.step(step)?.to_vec(),
            None => batches.next_step(),
        };
        let (x, y) = inputs_and_targets(&tokens, batch, ctx);
        let feeds = [
            (&ids, HostTensor::from_vec(x, [batch, ctx])?),
            (&targets, HostTensor::from_vec(y, [batch, ctx])?),
        ];
        let value = session.step(&feeds)?[0].to_vec::<f32>()?[0];
        if !value.is_finite() {
            bar.finish_and_clear();
            let kept = match &args.checkpoint_dir {
                Some(dir) => format!("; the checkpoint in {} is left as it was", dir.display()),
                None => String::new(),
            };
            return Err(Error::Data(format!(
                "step {step}: the loss is {value}, training diverged (a lower --lr, --clip-grad \
                 or a larger --eps may help){kept}"
            ))
            .into());
        }
        let seconds = started.elapsed().as_secs_f64();
        let tokens_per_second = ((step + 1 - start) * batch * ctx) as f64 / seconds;
        let every = if token_file.is_some() { 1 } else { args.log_every.max(1) };
        bar.set_message(format!("loss {value:.4}, {tokens_per_second:.0} tokens/s"));
        bar.inc(1);
        if step % every == 0 || step + 1 == steps {
            let line = format!("step {step} loss {value:.6} ({tokens_per_second:.0} tokens/s)");
            // A hidden bar (output not a terminal) drops its println; the log must not.
            if bar.is_hidden() {
                say(&line);
            } else {
                bar.println(line);
            }
        }
        save_due(&session, args, step + 1, steps)?;
    }
    bar.finish_and_clear();
    if args.sample > 0 && token_file.is_none() {
        // Collective in a job: every process takes part, rank 0 writes the sample.
        let parameters = session.gather_variables()?;
        if leader {
            let text = sample(config, &tokenizer, &text, &parameters, ctx, args.sample)?;
            println!("sample:\n{text}");
        }
    }
    drop(session);
    if let Some(job) = job {
        job.barrier("gpt example done")?;
        if let Ok(job) = Arc::try_unwrap(job) {
            job.finish()?;
        }
    }
    Ok(())
}

/// Joins the job this process is one of, when it was started by `meshflow launch` (or srun,
/// mpirun), driving its even share of the `devices`; `None` when it runs alone.
fn join_job(devices: usize) -> Result<Option<Arc<Job>>> {
    let world = dist::init()?;
    let processes = world.world_size;
    if processes == 1 {
        return Ok(None);
    }
    if !devices.is_multiple_of(processes) {
        return Err(Error::Graph(format!(
            "dp × tp × pp = {devices} devices do not split evenly over the {processes} processes \
             of the job"
        ))
        .into());
    }
    let share = u32::try_from(devices / processes)?;
    let job = world.join(&JoinOptions { devices: share, ..JoinOptions::default() })?;
    Ok(Some(Arc::new(job)))
}

/// Writes `logical.dot` and `physical.dot` of `program` into `dir`.
fn write_pictures(program: &Program, dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Data(format!("{}: {e}", dir.display())))?;
    for (name, view) in [("logical.dot", View::Logical), ("physical.dot", View::Physical)] {
        let path = dir.join(name);
        std::fs::write(&path, program.to_dot(view))
            .map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
    }
    println!("plan pictures: {}/{{logical,physical}}.dot (render with dot -Tsvg)", dir.display());
    Ok(())
}

/// Loads the checkpoint in `dir` when it holds one; returns the step to continue from.
fn resume(session: &mut Session, dir: Option<&Path>, say: &dyn Fn(&str)) -> Result<usize> {
    let Some(dir) = dir.filter(|d| d.join(checkpoint::INDEX_FILE).exists()) else {
        return Ok(0);
    };
    checkpoint::load(session, dir, &LoadOptions::default())?;
    say(&format!("resumed from {} after step {}", dir.display(), session.steps_done()));
    Ok(session.steps_done() as usize)
}

/// Saves a checkpoint after `done` steps when one is due (every --save-every, and at the end),
/// unless a weight or optimizer state has become NaN or infinite: a diverged run then stops
/// with that error instead of replacing the last good checkpoint.
fn save_due(session: &Session, args: &Args, done: usize, steps: usize) -> Result<()> {
    let Some(dir) = &args.checkpoint_dir else { return Ok(()) };
    if done == steps || (args.save_every > 0 && done.is_multiple_of(args.save_every)) {
        let finite_only = SaveOptions { finite_only: true, ..SaveOptions::default() };
        checkpoint::save_with(session, dir, &finite_only)?;
    }
    Ok(())
}

/// The model shape: from the weights file when given (its `config` metadata), else the flags.
fn model_config(
    args: &Args,
    tokenizer: &CharTokenizer,
    init: Option<&io::Named>,
) -> Result<GptConfig> {
    let Some(init) = init else {
        return Ok(GptConfig {
            vocab: tokenizer.vocab(),
            ctx: args.ctx,
            n_layer: args.layers,
            n_head: args.heads.unwrap_or(4),
            d_model: args.d_model,
        });
    };
    let json = init
        .metadata
        .get("config")
        .ok_or_else(|| Error::Data("--init-from: no `config` metadata".into()))?;
    let field = |name: &str| -> Result<usize> {
        let start = json
            .find(&format!("\"{name}\""))
            .ok_or_else(|| Error::Data(format!("config has no {name}")))?;
        let rest = &json[start + name.len() + 2..];
        let digits: String = rest
            .chars()
            .skip_while(|c| !c.is_ascii_digit())
            .take_while(char::is_ascii_digit)
            .collect();
        digits
            .parse()
            .map_err(|_| Error::Data(format!("config field {name} is not a number: {json}")).into())
    };
    Ok(GptConfig {
        vocab: field("vocab")?,
        ctx: field("ctx")?,
        n_layer: field("n_layer")?,
        n_head: args.heads.map_or_else(|| field("n_head"), Ok)?,
        d_model: field("d_model")?,
    })
}

/// Greedy-free sampling: each next character drawn from the softmax of the last position, on
/// one device, over a window of the last `ctx` characters (seeded from the corpus' start).
fn sample(
    config: GptConfig,
    tokenizer: &CharTokenizer,
    text: &str,
    parameters: &[(String, HostTensor)],
    ctx: usize,
    count: usize,
) -> Result<String> {
    let placement = Placement::line(DeviceType::Cpu, 1)?;
    let layouts = Layouts::single(placement.clone());
    let graph = Graph::new();
    let ids = graph.input("ids", [1, ctx], DType::I64, &placement, None)?;
    let model = Gpt::new(&graph, config, &layouts, WeightInit { std: 0.02, seed: 0 })?;
    let probabilities = model.forward(&ids)?.softmax()?;
    let mut session = Session::new(&graph, &[&probabilities], None, SessionConfig::default())?;
    let weights: Vec<_> = parameters
        .iter()
        .filter(|(n, _)| !n.contains(".exp_avg") && !n.starts_with("rng."))
        .cloned()
        .collect();
    session.load_variables(&weights)?;
    let mut window = tokenizer.encode(&text.chars().take(ctx).collect::<String>())?;
    let mut out = String::new();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for _ in 0..count {
        let feed = HostTensor::from_vec(window.clone(), [1, ctx])?;
        let p = session.step(&[(&ids, feed)])?[0].to_vec::<f32>()?;
        let last = &p[(ctx - 1) * config.vocab..ctx * config.vocab];
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut u = (state >> 11) as f32 / (1u64 << 53) as f32;
        let next = last.iter().position(|&q| {
            u -= q;
            u <= 0.0
        });
        let next = next.unwrap_or(config.vocab - 1) as i64;
        out.push_str(&tokenizer.decode(&[next]));
        window.remove(0);
        window.push(next);
    }
    Ok(out)
}
