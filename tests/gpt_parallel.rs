//! The GPT of `meshflow::nn` trains to the same losses on one device and in data, tensor and
//! hybrid parallel layouts (issue: equivalence of strategies; the full 20-step check runs in the
//! example's test).

use meshflow::nn::{Gpt, GptConfig, Init, Layouts};
use meshflow::ops::ops::adamw::AdamW;
use meshflow::ops::{DType, Tensor as HostTensor};
use meshflow::placement::{DeviceType, Placement};
use meshflow::schedule::Schedule;
use meshflow::session::{Optimizer, Session, SessionConfig, Training};
use meshflow::Graph;

const CONFIG: GptConfig = GptConfig { vocab: 16, ctx: 8, n_layer: 2, n_head: 2, d_model: 16 };
const BATCH: usize = 4;

fn losses(
    hierarchy: &[usize],
    data_axis: Option<usize>,
    tensor_axis: Option<usize>,
    steps: usize,
) -> Vec<f32> {
    let placement = Placement::grid(DeviceType::Cpu, hierarchy).unwrap();
    let layouts = Layouts { placement: placement.clone(), data_axis, tensor_axis };
    let g = Graph::new();
    let t = CONFIG.ctx;
    let ids = g.input("ids", [BATCH, t], DType::I64, &placement, Some(layouts.batch())).unwrap();
    let targets =
        g.input("targets", [BATCH, t], DType::I64, &placement, Some(layouts.batch())).unwrap();
    let model = Gpt::new(&g, CONFIG, &layouts, Init { std: 0.02, seed: 7 }).unwrap();
    let loss = model.loss(&ids, &targets).unwrap();
    let optimizer = Optimizer::AdamW(AdamW { weight_decay: 0.1, ..AdamW::new(1e-2) });
    let training = Training { loss: loss.clone(), optimizer, schedule: Schedule::Constant };
    let config = SessionConfig { devices: hierarchy.iter().product(), ..SessionConfig::default() };
    let mut session = Session::new(&g, &[&loss], Some(training), config).unwrap();
    (0..steps)
        .map(|step| {
            let tokens: Vec<i64> = (0..BATCH * (t + 1))
                .map(|k| ((k * 5 + step * 3 + k / 7) % CONFIG.vocab) as i64)
                .collect();
            let (x, y) = meshflow::data::inputs_and_targets(&tokens, BATCH, t);
            let x = HostTensor::from_vec(x, [BATCH, t]).unwrap();
            let y = HostTensor::from_vec(y, [BATCH, t]).unwrap();
            session.step(&[(&ids, x), (&targets, y)]).unwrap()[0].to_vec::<f32>().unwrap()[0]
        })
        .collect()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    for (step, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() < 2e-4, "{what}: step {step}: {x} vs {y} (all {a:?} vs {b:?})");
    }
}

#[test]
fn gpt_strategies_agree() {
    let one = losses(&[1], None, None, 4);
    assert!(one[3] < one[0], "loss did not fall: {one:?}");
    assert_close(&one, &losses(&[2], Some(0), None, 4), "dp2");
    assert_close(&one, &losses(&[2], None, Some(0), 4), "tp2");
    assert_close(&one, &losses(&[2, 2], Some(0), Some(1), 4), "dp2 x tp2");
}
