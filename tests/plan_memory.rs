//! Memory accounting of the planner on a tiny model, against numbers computed by hand.

use meshflow::compile::{compile, CompileConfig, Request};
use meshflow::ops::{DType, Tensor as HostTensor};
use meshflow::placement::{DeviceType, NdSbp, Placement, Sbp};
use meshflow::plan::memory::memory;
use meshflow::Graph;

/// `z = gelu(x · w)` with x `[4, 8]` and w `[8, 16]` (f32) on `devices` devices, x split by rows.
fn tiny(devices: usize, w_is_state: bool) -> Vec<meshflow::plan::Memory> {
    let placement = Placement::line(DeviceType::Cpu, devices).unwrap();
    let graph = Graph::new();
    let rows = NdSbp(vec![Sbp::Split(0)]);
    let x = graph.input("x", [4, 8], DType::F32, &placement, Some(rows)).unwrap();
    let w = HostTensor::zeros([8, 16], DType::F32);
    let broadcast = Some(NdSbp(vec![Sbp::Broadcast]));
    let w = graph.parameter("w", w, &placement, broadcast).unwrap();
    let z = x.matmul(&w).unwrap().gelu(false).unwrap();
    let requests = [Request { value: z.value(), layout: None }];
    let program = compile(&graph.snapshot(), &requests, &CompileConfig::default()).unwrap();
    let states = if w_is_state { vec![w.value()] } else { Vec::new() };
    memory(&program, &states, &[])
}

#[test]
fn one_device_holds_the_weight_and_peaks_with_two_activations_alive() {
    let [m] = tiny(1, false)[..] else { panic!("one rank") };
    // w: 8·16·4 = 512 B. Steps: x (128 B live), matmul y (+256 → 384, then x is freed → 256),
    // gelu z (+256 → 512 peak, then y is freed; z is requested and stays).
    assert_eq!((m.rank, m.parameters, m.optimizer, m.activations_peak), (0, 512, 0, 512));
    assert_eq!(m.total(), 1024);
}

#[test]
fn data_parallel_halves_the_activations_not_the_weight() {
    let memories = tiny(2, false);
    assert_eq!(memories.len(), 2);
    for m in memories {
        // Each rank: x rows 2·8·4 = 64 B, y and z 2·16·4 = 128 B each: peak 64 + 128 + 128 - 64.
        assert_eq!((m.parameters, m.optimizer, m.activations_peak), (512, 0, 256), "{m:?}");
    }
}

#[test]
fn optimizer_state_is_counted_apart_from_parameters() {
    let [m] = tiny(1, true)[..] else { panic!("one rank") };
    assert_eq!((m.parameters, m.optimizer, m.activations_peak), (0, 512, 512));
}
