#!/usr/bin/env bash
# GPU check, first half (here, no GPU needed): build the CUDA test binaries and the GPT example
# with the `cuda` feature and pack them, the example's corpus and the run half into one
# git-ignored folder (at most 64 MiB) that a GPU machine with CUDA, NCCL and PyTorch but no Rust
# toolchain runs:
#
#   scripts/gpu-check/pack.sh [release|dev]     # default release; packs into .gpu/
#   .gpu/run.sh                                 # on the GPU machine (see run.sh)
#   .gpu/gpt2_body.sh, .gpu/profile_gpt2_body.sh # optional: GPT-2 small's body against torch,
#                                               # and where its step's GPU time goes
#
# Through the device tool (.gpu is git-ignored, so it travels only when carried; the pack and
# the tracked tree together stay under the tool's 64 MiB): run with command ".gpu/run.sh",
# carry [".gpu"], timeout_s 480. run.sh keeps to its 420 s budget and writes its 4 logs to $OUT.
#
# Where libnvrtc is loadable here (e.g. NVRTC_LIB_DIR=<the nvidia-cuda-nvrtc wheel's lib folder>),
# it first compiles every generated kernel to a CUBIN for sm_90 and sm_80 (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=${1:-release}
case "$profile" in
  release) profile_flag=(--release) ;;
  dev) profile_flag=() ;;
  *) echo "usage: $0 [release|dev]" >&2; exit 2 ;;
esac
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda}
pack=.gpu
rm -rf "$pack"
mkdir -p "$pack/bin"

# Executables of the test targets a cargo command builds, one "name path" per line.
executables() {
  cargo test "${profile_flag[@]}" --features cuda --no-run --message-format=json "$@" |
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        message = json.loads(line)
    except ValueError:
        continue
    if message.get("reason") == "compiler-artifact" and message.get("executable"):
        print(message["target"]["name"], message["executable"])'
}

{
  executables -p meshflow-ops --test cuda_gpu --test cuda_device --test cuda_kernels
  executables -p meshflow-comm --lib | sed 's/^meshflow_comm /comm_lib /'
  # (building an integration test also builds the meshflow binary; only the test is packed)
  executables -p meshflow --test cuda_session | grep '^cuda_session '
  # (the root crate's unit tests: boxing's even collectives on device memory)
  executables -p meshflow --lib | sed 's/^meshflow /meshflow_lib /'
} | while read -r name path; do
  cp "$path" "$pack/bin/$name"
  strip --strip-debug "$pack/bin/$name" 2>/dev/null || true
done
cargo build "${profile_flag[@]}" --features cuda --example gpt --bin meshflow
binary_dir=$CARGO_TARGET_DIR/$([ "$profile" = release ] && echo release || echo debug)
cp "$binary_dir/examples/gpt" "$pack/bin/gpt"
strip --strip-debug "$pack/bin/gpt" 2>/dev/null || true
# `meshflow bench comm` and `meshflow bench train --device cuda` (bench.sh).
cp "$binary_dir/meshflow" "$pack/bin/meshflow"
strip --strip-debug "$pack/bin/meshflow" 2>/dev/null || true
mkdir -p "$pack/data"
cp examples/data/kjv-genesis.txt "$pack/data/"

if [ -n "${NVRTC_LIB_DIR:-}" ]; then
  echo "== NVRTC compile check here ($NVRTC_LIB_DIR)"
  LD_LIBRARY_PATH="$NVRTC_LIB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$pack/bin/cuda_kernels" --test-threads=1
fi

# Each binary links much of meshflow (2-18 MiB stripped, 68 MiB in all, over the device tool's
# 64 MiB): they travel gzipped (about a third of that), and run.sh unpacks them in place first.
gzip -9 "$pack"/bin/*

here=scripts/gpu-check
cp "$here/run.sh" "$here/gpt_example.sh" "$here/gpt2_body.sh" "$here/profile_gpt2_body.sh" "$here/bench.sh" "$here/matmul_torch.py" "$here/gpt_torch.py" "$here/device-env.sh" "$pack/"
cp scripts/torch_train.py "$pack/"
chmod +x "$pack/run.sh" "$pack/gpt_example.sh" "$pack/gpt2_body.sh" "$pack/profile_gpt2_body.sh" "$pack/bench.sh" "$pack"/bin/*
size=$(du -sb "$pack" | cut -f1)
echo "packed $pack: $(ls "$pack/bin" | tr '\n' ' ')($((size / 1024 / 1024)) MiB)"
if [ "$size" -gt $((64 * 1024 * 1024)) ]; then
  echo "the pack exceeds 64 MiB" >&2
  exit 1
fi
