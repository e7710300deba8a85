//! `meshflow bench` reports: the JSON round trip, the comparison of two runs, the PyTorch
//! script's output, the SVG, and the collectives' closed-form check on real device threads.

use meshflow::bench::arithmetic::Collective;
use meshflow::bench::comm::{elements, in_process};
use meshflow::bench::report::{
    compare, CommFigure, Figure, Machine, Report, TorchFigure, TrainFigure,
};
use meshflow::bench::table::{self, goal, goal_on, torch_ratio};
use meshflow::bench::train::{Model, StepTimes, TrainDevice};
use meshflow::bench::{plot, torch};
use meshflow::plan::strategies::SessionStrategy as Strategy;

fn train(model: Model, strategy: Strategy, median: f64) -> TrainFigure {
    TrainFigure {
        model,
        strategy,
        times: StepTimes { median, mean: median * 1.1, steps: 5, rounds: vec![] },
        items_per_second: model.items_per_step() as f64 / median,
        flops_per_second: model.step_flops() / median,
        mfu: 0.25,
        loss: 6.2,
        device: TrainDevice::Cpu,
        ops: None,
    }
}

fn row(collective: Collective, bytes: usize, busbw: f64) -> CommFigure {
    CommFigure {
        transport: "in-process".into(),
        collective,
        ranks: 4,
        bytes,
        seconds: 1e-3,
        algbw: busbw / collective.bus_factor(4),
        busbw,
        wrong: 0,
        shared: false,
    }
}

fn figure(name: &str, value: f64, higher_is_better: bool) -> Figure {
    Figure {
        name: name.into(),
        value,
        unit: if higher_is_better { "acts/s" } else { "µs" }.into(),
        higher_is_better,
        reference: "reference".into(),
        reference_value: value * 2.0,
    }
}

fn sample(gpt_ms: f64, busbw: f64, hop_us: f64) -> Report {
    Report {
        machine: Machine { cores: 2, load_average: Some(1.5), started_unix: 1_790_000_000 },
        peak_flops: 160e9,
        peak_source: "test".into(),
        train: vec![
            train(Model::Gpt, Strategy::single(2), gpt_ms / 1e3),
            train(Model::Gpt, Strategy::mesh(2, 2), 0.5),
            train(Model::Mlp, Strategy::single(2), 0.03),
        ],
        torch: vec![TorchFigure {
            model: Model::Gpt,
            threads: 2,
            version: "2.x".into(),
            times: StepTimes { median: 0.4, mean: 0.41, steps: 7, rounds: vec![] },
            fused_attention: false,
            processes: 1,
            device: TrainDevice::Cpu,
        }],
        ops: vec![figure("matmul 1024³ ×2thr", 100.0, true)],
        comm: vec![row(Collective::AllReduce, 1 << 20, busbw), row(Collective::AllGather, 8, 0.1)],
        actors: vec![figure("hop between two threads", hop_us, false)],
    }
}

#[test]
fn reports_survive_a_json_round_trip() {
    let report = sample(300.0, 5.0, 12.0);
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("run.json");
    report.save(&path).expect("save");
    assert_eq!(Report::load(&path).expect("load"), report);
    assert!(Report::load(&directory.path().join("missing.json")).is_err());
}

#[test]
fn compare_gives_relative_change_and_direction() {
    let old = sample(300.0, 5.0, 12.0);
    let mut new = sample(240.0, 6.0, 15.0);
    new.train.pop(); // a metric only in the old run is left out
    let changes = compare(&old, &new);
    let find = |key: &str| changes.iter().find(|c| c.key == key).expect(key);
    let gpt = find("train/gpt/1dev×2thr");
    assert_eq!((gpt.old, gpt.new), (300.0, 240.0));
    assert!((gpt.relative + 0.2).abs() < 1e-12 && gpt.better, "{gpt:?}");
    let busbw = find("comm/in-process/all_reduce/4ranks/1048576B");
    assert!((busbw.relative - 0.2).abs() < 1e-12 && busbw.better, "{busbw:?}");
    let hop = find("actors/hop between two threads");
    assert!((hop.relative - 0.25).abs() < 1e-12 && !hop.better, "{hop:?}");
    assert!(changes.iter().all(|c| !c.key.starts_with("train/mlp")));
    let unchanged = find("train/gpt/DP2×TP2");
    assert_eq!(unchanged.relative, 0.0);
    assert_eq!(changes.len(), old.metrics().len() - 1);
}

#[test]
fn the_torch_ratio_is_against_the_single_device_row() {
    let report = sample(300.0, 5.0, 12.0);
    let ratio = torch_ratio(&report, Model::Gpt).expect("both measured");
    assert!((ratio - 0.75).abs() < 1e-12);
    assert!(torch_ratio(&report, Model::Mlp).is_none());
    assert_eq!((goal(Model::Gpt), goal(Model::Mlp)), (0.75, 0.7));
}

#[test]
fn rounds_merge_into_the_median_of_medians_and_pair_with_the_reference() {
    let round =
        |median: f64, steps: usize| StepTimes { median, mean: median, steps, rounds: vec![] };
    // Three rounds; the host was slow in the second one, for both sides.
    let ours = StepTimes::merged(&[round(0.10, 10), round(0.20, 10), round(0.11, 20)]).unwrap();
    assert_eq!(ours.rounds, vec![0.10, 0.20, 0.11]);
    assert_eq!((ours.median, ours.steps), (0.11, 40));
    assert!((ours.mean - (1.0 + 2.0 + 2.2) / 40.0).abs() < 1e-12);
    let theirs = StepTimes::merged(&[round(0.15, 5), round(0.30, 5), round(0.14, 5)]).unwrap();
    // Paired: each round's ratio, then their median (0.667, 0.667, 0.786); unpaired medians
    // would give 0.11 / 0.15 = 0.733.
    let paired = meshflow::bench::table::paired_ratio(&ours, &theirs);
    assert!((paired - 0.2 / 0.3).abs() < 1e-12, "{paired}");
    let single = StepTimes::merged(&[round(0.1, 3)]).unwrap();
    assert!(single.rounds.is_empty());
    assert!((meshflow::bench::table::paired_ratio(&single, &theirs) - 0.1 / 0.15).abs() < 1e-12);
    assert!(StepTimes::merged(&[]).is_none());
    // The table shows every round's ratio next to the goal's verdict.
    let mut report = sample(300.0, 5.0, 12.0);
    report.train[0].times = ours;
    report.torch[0].times = theirs;
    let text = meshflow::bench::table::train(&report);
    let line = text.lines().find(|l| l.contains("goal <=")).expect("the goal line");
    assert!(line.contains("= 0.67") && line.contains("(rounds 0.67 0.67 0.79)"), "{line}");
}

/// A `--device cuda` run: labelled `1gpu` and `torch@cuda`, keyed apart from CPU runs, paired
/// only with PyTorch on the same device, judged by issue 8's goal; CPU reports keep their JSON.
#[test]
fn a_gpu_run_is_labelled_keyed_and_judged_as_one() {
    let mut report = sample(300.0, 5.0, 12.0);
    report.train.truncate(1);
    let cpu_json = serde_json::to_string(&report).expect("json");
    assert!(!cpu_json.contains("\"device\""), "CPU reports are unchanged: {cpu_json}");
    report.train[0].device = TrainDevice::Cuda;
    report.train[0].times.median = 0.003;
    // Only a CPU PyTorch figure: no ratio against the GPU row.
    assert!(torch_ratio(&report, Model::Gpt).is_none());
    report.torch[0].device = TrainDevice::Cuda;
    report.torch[0].times.median = 0.004;
    let ratio = torch_ratio(&report, Model::Gpt).expect("both on the GPU");
    assert!((ratio - 0.75).abs() < 1e-12, "{ratio}");
    let text = meshflow::bench::table::train(&report);
    assert!(text.lines().any(|l| l.starts_with("gpt") && l.contains("1gpu")), "{text}");
    assert!(text.contains("torch@cuda"), "{text}");
    let line = text.lines().find(|l| l.contains("gpt on cuda")).expect("the goal line");
    assert!(line.contains("= 0.75") && line.contains("goal <= 0.80: met"), "{line}");
    let keys: Vec<String> = report.metrics().into_iter().map(|m| m.key).collect();
    assert!(keys.contains(&"train/gpt/1gpu".to_string()), "{keys:?}");
    assert!(keys.contains(&"torch/gpt/torch@cuda".to_string()), "{keys:?}");
    let json = serde_json::to_string(&report).expect("json");
    let back: Report = serde_json::from_str(&json).expect("parse");
    assert_eq!(back, report);
    assert_eq!(goal_on(Model::Gpt, TrainDevice::Cuda), Some(0.8));
    assert_eq!(goal_on(Model::Mlp, TrainDevice::Cuda), None);
    assert_eq!(goal_on(Model::Mlp, TrainDevice::Cpu), Some(goal(Model::Mlp)));
}

#[test]
fn the_train_table_compares_with_one_device_only_where_one_ran() {
    let mut report = sample(300.0, 5.0, 12.0);
    let text = meshflow::bench::table::train(&report);
    let mesh = text.lines().find(|line| line.contains("DP2×TP2")).expect("the mesh row");
    assert!(mesh.contains("0.60x"), "300 ms on one device, 500 ms on the mesh: {mesh}");
    report.train.retain(|f| f.strategy.devices() > 1);
    let text = meshflow::bench::table::train(&report);
    let mesh = text.lines().find(|line| line.contains("DP2×TP2")).expect("the mesh row");
    assert!(!mesh.contains("NaN") && mesh.contains(" - "), "no one-device row: {mesh}");
}

#[test]
fn torch_script_output_parses() {
    let stdout = concat!(
        "noise\n",
        r#"{"torch": "2.5.0", "threads": 2, "gpt": {"median_ms": 270.0, "mean_ms": 280.0, "steps": 9}, "#,
        r#""mlp": {"median_ms": 38.0, "mean_ms": 40.0, "steps": 60}}"#,
        "\n"
    );
    let figures = torch::parse(stdout).expect("parses");
    assert_eq!(figures.len(), 2);
    assert_eq!(figures[0].model, Model::Gpt);
    assert_eq!(figures[0].times, StepTimes { median: 0.27, mean: 0.28, steps: 9, rounds: vec![] });
    assert_eq!((figures[1].model, figures[1].threads), (Model::Mlp, 2));
    assert!((figures[1].times.median - 0.038).abs() < 1e-12);
    assert!(torch::parse("not json").is_err());
}

#[test]
fn the_svg_shows_strategies_and_collectives() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("plot.svg");
    plot::draw(&sample(300.0, 5.0, 12.0), &path).expect("draws");
    let svg = std::fs::read_to_string(&path).expect("written");
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
    for text in ["1dev×2thr", "DP2×TP2", "all_reduce", "all_gather", "PyTorch gpt"] {
        assert!(svg.contains(text), "{text} missing from the SVG");
    }
    assert_eq!(plot::human_bytes(16.0 * 1024.0 * 1024.0), "16 MiB");
    assert_eq!(plot::human_bytes(8.0), "8 B");
}

#[test]
fn every_collective_passes_its_closed_form_check_on_device_threads() {
    assert_eq!(elements(8, 4), 4);
    assert_eq!(elements(1 << 10, 4), 256);
    assert_eq!(elements(1000, 3), 249);
    for collective in Collective::ALL {
        let row = in_process(collective, 4, 1 << 10).expect("collective runs");
        assert_eq!(row.wrong, 0, "{collective:?}");
        assert_eq!((row.ranks, row.bytes), (4, 1 << 10));
        assert!(
            row.seconds > 0.0 && (row.busbw - row.algbw * collective.bus_factor(4)).abs() < 1e-9
        );
        // Only the broadcast hands every member the root's own buffer; the others produce
        // buffers of their own and report a bandwidth.
        let shares = collective == Collective::Broadcast;
        assert_eq!(row.shared, shares, "{collective:?}");
        assert_eq!(row.busbw > 0.0, !shares, "{collective:?}: {}", row.busbw);
    }
}

#[test]
fn a_collective_that_moved_nothing_has_no_bandwidth_in_the_table_or_the_metrics() {
    let moved = row(Collective::AllReduce, 1 << 10, 2.0);
    let shared = row(Collective::Broadcast, 1 << 10, 45_601.0).moving_nothing();
    assert_eq!((shared.algbw, shared.busbw, shared.shared), (0.0, 0.0, true));
    let text = table::comm(&[moved.clone(), shared.clone()], 10.0);
    let broadcast = text.lines().skip_while(|l| !l.contains("broadcast")).nth(2).expect("a row");
    assert_eq!(broadcast.split_whitespace().filter(|w| *w == "shared").count(), 2, "{broadcast}");
    assert!(text.contains("no bytes moved"), "{text}");
    let report = Report { comm: vec![moved, shared], ..sample(100.0, 2.0, 3.0) };
    let keys: Vec<String> = report.metrics().into_iter().map(|m| m.key).collect();
    assert!(keys.iter().any(|k| k.contains("all_reduce")), "{keys:?}");
    assert!(!keys.iter().any(|k| k.contains("broadcast")), "{keys:?}");
}

/// `--ops`: a traced session of the MLP on one device says where its step goes, per op, with
/// the FLOPs of the products it ran.
#[test]
fn the_ops_profile_of_a_traced_step_names_its_ops_and_their_flops() {
    use meshflow::bench::train::ops_profile;

    let profile = ops_profile(Model::Mlp, Strategy::single(1), TrainDevice::Cpu, 2).unwrap();
    assert_eq!((profile.rank, profile.steps), (0, 2));
    let op = |name: &str| profile.ops.iter().find(|o| o.op == name).cloned().unwrap();
    // Three linear layers: three forward products, three weight gradients and two input
    // gradients (the first layer's input takes none): 6·N·B less the first layer's dX.
    let matmul = op("matmul");
    assert_eq!(matmul.acts, 8);
    let first_dx = 2 * 256 * 784 * 1024;
    assert_eq!(matmul.flops, 6 * 256 * (784 * 1024 + 1024 * 1024 + 1024 * 10) - first_dx);
    assert!(matmul.seconds > 0.0 && matmul.flops_per_second() > 0.0);
    // AdamW on three weights and three biases; no collectives on one device.
    assert_eq!(op("adamw").acts, 6);
    assert!(profile.ops.iter().all(|o| !o.op.starts_with("boxing")));
    let seconds: Vec<f64> = profile.ops.iter().map(|o| o.seconds).collect();
    assert!(seconds.windows(2).all(|w| w[0] >= w[1]), "most seconds first: {seconds:?}");
}

#[test]
fn the_train_table_shows_each_traced_figure_per_op() {
    use meshflow::bench::report::OpsProfile;
    use meshflow::plan::acts::OpTime;

    let time = |op: &str, acts, seconds, flops| OpTime { op: op.into(), acts, seconds, flops };
    let mut figure = train(Model::Mlp, Strategy::single(2), 0.01);
    let ops = vec![time("matmul", 8, 0.006, 1_200_000_000), time("adamw", 6, 0.002, 0)];
    figure.ops = Some(OpsProfile { rank: 0, steps: 10, ops });
    let report = Report { train: vec![figure], ..Report::default() };
    let text = table::train(&report);
    assert!(text.contains("# ops: mlp 1dev×2thr, rank 0: median acts of 10 traced steps, 8.0 ms"));
    let line = |op: &str| text.lines().find(|l| l.starts_with(op)).unwrap().to_string();
    let matmul = line("matmul");
    let fields: Vec<&str> = matmul.split_whitespace().collect();
    assert_eq!(fields, ["matmul", "8", "6.000", "75.0%", "200.0"]);
    let adamw = line("adamw");
    assert!(adamw.ends_with(" -"), "no FLOPs, no rate: {adamw}");
    // The profile survives the JSON report.
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("ops.json");
    report.save(&path).expect("save");
    assert_eq!(Report::load(&path).expect("load").train[0].ops, report.train[0].ops);
}
