//! The arithmetic of `meshflow bench`: nccl-tests' bus-bandwidth factors, PaLM FLOP counts of
//! the reference models against hand-computed numbers, MFU, medians and strategy names.

use meshflow::bench::arithmetic::{
    algorithm_bandwidth, bus_bandwidth, gpt_matmul_parameters, gpt_step_flops, median, mfu,
    mlp_parameters, mlp_step_flops, relative_change, Collective,
};
use meshflow::bench::parse_strategies;
use meshflow::bench::train::{Model, GPT_BATCH, GPT_REFERENCE, MLP_BATCH, MLP_SIZES};
use meshflow::nn::GptConfig;
use meshflow::plan::strategies::SessionStrategy as Strategy;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1.0)
}

#[test]
fn bus_factors_are_nccl_tests_factors() {
    let expected = [
        (Collective::AllReduce, 1.5),
        (Collective::AllGather, 0.75),
        (Collective::ReduceScatter, 0.75),
        (Collective::Broadcast, 1.0),
        (Collective::Reduce, 1.0),
        (Collective::AllToAll, 0.75),
    ];
    for (collective, factor) in expected {
        assert!(close(collective.bus_factor(4), factor), "{collective:?} on 4 ranks");
    }
    assert!(close(Collective::AllReduce.bus_factor(2), 1.0));
    assert!(close(Collective::AllReduce.bus_factor(8), 1.75));
    assert!(close(Collective::AllGather.bus_factor(2), 0.5));
    assert!(close(Collective::AllToAll.bus_factor(8), 0.875));
    assert!(close(Collective::AllReduce.bus_factor(1), 0.0));
}

#[test]
fn bandwidths_scale_bytes_over_seconds() {
    assert!(close(algorithm_bandwidth(2_000_000_000, 0.5), 4.0));
    assert!(close(bus_bandwidth(Collective::AllReduce, 4, 1_000_000_000, 1.0), 1.5));
    assert!(close(bus_bandwidth(Collective::Broadcast, 4, 3_000_000_000, 2.0), 1.5));
    assert!(close(bus_bandwidth(Collective::ReduceScatter, 2, 1_000_000_000, 0.25), 2.0));
}

#[test]
fn gpt_reference_flops_match_the_hand_count() {
    // Block: LayerNorms 4d, c_attn 3d²+3d, attn_proj d²+d, c_fc 4d²+4d, mlp_proj 4d²+d:
    // 12·256² + 13·256 = 789 760; the model adds wte 512·256, lm_head 512·256, wpe 128·256
    // and ln_f 2·256: 3 454 464.
    assert_eq!(GPT_REFERENCE.parameters(), 3_454_464);
    // Without the wte and wpe tables (lookups, not matmuls).
    assert_eq!(gpt_matmul_parameters(&GPT_REFERENCE), 3_290_624);
    // Per token 6·3 290 624 + 12·4·4·64·128 = 19 743 744 + 1 572 864; 8·128 tokens.
    assert!(close(gpt_step_flops(&GPT_REFERENCE, GPT_BATCH, 128), 21_828_206_592.0));
    assert!(close(Model::Gpt.step_flops(), 21_828_206_592.0));
    assert_eq!(Model::Gpt.items_per_step(), 1024);
}

#[test]
fn small_gpt_flops_match_the_hand_count() {
    let config = GptConfig { vocab: 16, ctx: 8, n_layer: 1, n_head: 2, d_model: 8 };
    // 12·64 + 13·8 = 872 per block; + 2·16·8 + 8·8 + 2·8 = 1208; minus 16·8 + 8·8 = 1016.
    assert_eq!(config.parameters(), 1208);
    assert_eq!(gpt_matmul_parameters(&config), 1016);
    // (6·1016 + 12·1·2·4·8) · 2·8 = (6096 + 768) · 16.
    assert!(close(gpt_step_flops(&config, 2, 8), 109_824.0));
    // A shorter sequence shrinks the attention term per token too: (6096 + 12·1·2·4·4) · 2·4.
    assert!(close(gpt_step_flops(&config, 2, 4), 51_840.0));
}

#[test]
fn mlp_reference_flops_match_the_hand_count() {
    // 784·1024 + 1024 + 1024·1024 + 1024 + 1024·10 + 10.
    assert_eq!(mlp_parameters(&MLP_SIZES), 1_863_690);
    assert!(close(mlp_step_flops(&MLP_SIZES, MLP_BATCH), 2_862_627_840.0));
    assert!(close(Model::Mlp.step_flops(), 2_862_627_840.0));
    assert_eq!(mlp_parameters(&[2, 3]), 9);
    assert!(close(mlp_step_flops(&[2, 3], 10), 540.0));
}

#[test]
fn mfu_is_achieved_over_peak() {
    assert!(close(mfu(1e12, 0.5, 4e12), 0.5));
    assert!(close(mfu(21_828_206_592.0, 0.27, 161.7e9), 21_828_206_592.0 / 0.27 / 161.7e9));
    assert_eq!(mfu(1e12, 0.5, 0.0), 0.0);
    assert_eq!(mfu(1e12, 0.0, 1e12), 0.0);
}

#[test]
fn medians_and_changes() {
    assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    assert_eq!(median(&[]), 0.0);
    assert!(close(relative_change(100.0, 80.0), -0.2));
    assert!(close(relative_change(10.0, 12.0), 0.2));
    assert_eq!(relative_change(0.0, 5.0), 0.0);
}

#[test]
fn strategies_parse_from_their_short_names() {
    let parse = |text: &str| {
        let parsed = parse_strategies(text, 2).expect(text);
        assert_eq!(parsed.len(), 1, "{text}");
        parsed[0]
    };
    assert_eq!(parse("1"), Strategy::single(2));
    assert_eq!(parse("dp2"), Strategy::mesh(2, 1));
    assert_eq!(parse("tp2"), Strategy::mesh(1, 2));
    assert_eq!(parse("dp2tp2"), Strategy::mesh(2, 2));
    assert_eq!(parse("DP2×TP2"), Strategy::mesh(2, 2));
    assert_eq!(parse("pp2mb4"), Strategy::pipeline(1, 2, 4));
    assert_eq!(parse("dp2pp2mb4"), Strategy::pipeline(2, 2, 4));
    assert_eq!(parse("dp2zero"), Strategy { zero: true, ..Strategy::mesh(2, 1) });
    assert_eq!(parse("dp2proc2"), Strategy { processes: 2, ..Strategy::mesh(2, 1) });
    assert_eq!(parse("dp2tp2").label(), "DP2×TP2");
    assert_eq!(parse("1").label(), "1dev×2thr");
    assert_eq!(parse("pp2mb4").label(), "PP2×4mb");
    assert_eq!(parse("dp2pp2mb4").label(), "DP2×PP2×4mb");
    assert_eq!(parse("dp2zero").label(), "DP2+ZeRO");
    assert_eq!(parse("dp2proc2").label(), "DP2/2proc");
    assert_eq!(parse("zero_dp2"), Strategy { zero: true, ..Strategy::mesh(2, 1) });
    // Every part must be known, once, with a size of at least 1; the error names the part.
    for (text, named) in [
        ("fsdp", "\"fsdp\""),
        ("dp0", "dp0"),
        ("dp3y", "\"y\""),
        ("dp2foo", "\"foo\""),
        ("dp2dp4", "dp is given twice"),
        ("zerozero", "zero is given twice"),
        ("tp", "tp needs a size"),
        ("", "empty"),
    ] {
        let error = parse_strategies(text, 2).expect_err(text).to_string();
        assert!(error.contains(named), "{text:?}: {error}");
    }
}

/// `bench train` runs the calibration's list (the one device with the bench's threads), and a
/// launched strategy's text parses back to it.
#[test]
fn bench_train_runs_every_strategy_the_calibration_runs() {
    use meshflow::bench::launched::strategy_text;
    let all = parse_strategies("all", 3).unwrap();
    let every = Strategy::every();
    assert_eq!(all.len(), every.len());
    for (bench, calibrated) in all.iter().zip(&every) {
        let threads = if calibrated.devices() == 1 { 3 } else { 1 };
        assert_eq!(*bench, Strategy { threads, ..*calibrated });
        assert_eq!(parse_strategies(&strategy_text(bench), 1).unwrap()[0].dp, bench.dp);
        let round_trip = parse_strategies(&strategy_text(calibrated), 1).unwrap()[0];
        assert_eq!(round_trip, *calibrated);
    }
}
