//! The session runs on the actor runtime: pipeline stages overlap (1F1B: stage 1 works on a
//! piece while stage 0 runs the forward of the next), each rank's acts follow the schedule, and
//! the losses stay those of one device.

use meshflow::compile::actors::{ActorProgram, PieceOrder, Work};
use meshflow::compile::Step;
use meshflow::nn::{Gpt, GptConfig, Layouts, WeightInit};
use meshflow::ops::ops::adamw::AdamW;
use meshflow::ops::DType;
use meshflow::placement::{DeviceType, Placement};
use meshflow::schedule::Schedule;
use meshflow::session::{Optimizer, Session, SessionConfig, Training};
use meshflow::{Graph, Tensor};

mod common;
use common::{token_batch, PATTERN};

const CONFIG: GptConfig = GptConfig { vocab: 16, ctx: 8, n_layer: 2, n_head: 2, d_model: 16 };
const BATCH: usize = 8;
const STEPS: usize = 4;
const PIECES: u32 = 4;

/// A GPT on `stages` one-device pipeline stages, trained with AdamW.
fn session(stages: usize, config: SessionConfig) -> (Session, Tensor, Tensor) {
    let layouts: Vec<Layouts> = (0..stages)
        .map(|rank| Layouts::single(Placement::new(DeviceType::Cpu, vec![1], vec![rank]).unwrap()))
        .collect();
    let (first, last) = (&layouts[0], &layouts[stages - 1]);
    let g = Graph::new();
    let ids = g.input("ids", [BATCH, CONFIG.ctx], DType::I64, &first.placement, None).unwrap();
    let targets = g.input("targets", [BATCH, CONFIG.ctx], DType::I64, &last.placement, None);
    let targets = targets.unwrap();
    let model = Gpt::pipelined(&g, CONFIG, &layouts, WeightInit { std: 0.02, seed: 7 }).unwrap();
    let loss = model.loss(&ids, &targets).unwrap();
    let optimizer = Optimizer::AdamW(AdamW { weight_decay: 0.1, ..AdamW::new(1e-2) });
    let training = Training::new(&loss, optimizer, Schedule::Constant);
    let config = SessionConfig { devices: stages, ..config };
    (Session::new(&g, &[&loss], Some(training), config).unwrap(), ids, targets)
}

fn losses(session: &mut Session, ids: &Tensor, targets: &Tensor) -> Vec<f32> {
    (0..STEPS)
        .map(|step| {
            let (x, y) = token_batch(BATCH, CONFIG.ctx, CONFIG.vocab, step, PATTERN);
            session.step(&[(ids, x), (targets, y)]).unwrap()[0].to_vec::<f32>().unwrap()[0]
        })
        .collect()
}

/// The losses of two runs agree within 2e-4 at every step.
fn assert_close(a: &[f32], b: &[f32], what: &str) {
    common::assert_close(a, b, 2e-4, what);
}

/// What an actor does, for a schedule: `Some((piece, is forward))` for the kernels of the
/// pieces, `None` for everything else.
fn unit(actors: &ActorProgram, session: &Session, actor: usize) -> Option<(u32, bool)> {
    let payload = actors.plan.actors[actor].payload;
    let Work::Step { step } = payload.work else { return None };
    let per_piece = actors.phases[step] == meshflow::compile::actors::Phase::Piece;
    let kernel = matches!(session.program().steps[step], Step::Kernel { .. });
    let end = actors.forward_end.expect("the loss ends the forward");
    (per_piece && kernel).then_some((payload.piece, step <= end))
}

/// A rank's chain of acts, collapsed to its (piece, forward) units in order.
fn schedule(session: &Session, rank: usize) -> Vec<(u32, bool)> {
    let actors = session.actors();
    let (_, chain) = actors.chains.iter().find(|((r, _), _)| *r == rank).expect("a chain");
    let mut units: Vec<(u32, bool)> = Vec::new();
    for actor in chain {
        if let Some(unit) = unit(actors, session, actor.index()) {
            if units.last() != Some(&unit) {
                units.push(unit);
            }
        }
    }
    units
}

#[test]
fn pipeline_stages_overlap_one_forward_one_backward_with_the_losses_of_one_device() {
    let micro = |order, trace| SessionConfig {
        micro_batches: PIECES as usize,
        piece_order: order,
        trace,
        ..SessionConfig::default()
    };
    let (mut one, ids, targets) = session(1, SessionConfig::default());
    let expected = losses(&mut one, &ids, &targets);

    let (mut pipe, ids, targets) = session(2, micro(PieceOrder::OneForwardOneBackward, true));
    assert_eq!(pipe.actors().order, PieceOrder::OneForwardOneBackward);
    let (f, b) = (|p| (p, true), |p| (p, false));
    assert_eq!(schedule(&pipe, 0), [f(0), f(1), b(0), f(2), b(1), f(3), b(2), b(3)]);
    assert_eq!(schedule(&pipe, 1), [f(0), b(0), f(1), b(1), f(2), b(2), f(3), b(3)]);
    assert_close(&expected, &losses(&mut pipe, &ids, &targets), "pp2 1f1b, 4 pieces");

    // In the last step, stage 1 starts the forward of piece 0 while stage 0 still runs
    // forwards (its forward of piece 3 ends later).
    let report = pipe.stop().unwrap();
    let last = (STEPS - 1) as u64;
    let events: Vec<_> = report.trace.events.iter().filter(|e| e.sequence == last).collect();
    let piped = &pipe;
    let of = |rank: usize, wanted: (u32, bool)| {
        events.iter().filter(move |e| {
            let actors = piped.actors();
            actors.plan.actors[e.actor.index()].payload.rank == rank
                && unit(actors, piped, e.actor.index()) == Some(wanted)
        })
    };
    let stage1_starts = of(1, f(0)).map(|e| e.start).min().expect("stage 1 forwards piece 0");
    let stage0_ends = of(0, f(3)).map(|e| e.end).max().expect("stage 0 forwards piece 3");
    assert!(
        stage1_starts < stage0_ends,
        "no overlap: stage 1 began piece 0 at {stage1_starts} ns, stage 0 ended piece 3 at \
         {stage0_ends} ns"
    );

    let (mut gpipe, ids, targets) = session(2, micro(PieceOrder::GPipe, false));
    let forwards = (0..PIECES).map(f);
    let gpipe_order: Vec<_> = forwards.chain((0..PIECES).map(b)).collect();
    assert_eq!(schedule(&gpipe, 0), gpipe_order);
    assert_close(&expected, &losses(&mut gpipe, &ids, &targets), "pp2 gpipe, 4 pieces");
}
