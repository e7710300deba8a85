#!/usr/bin/env bash
# GPU check, second half (on a GPU machine: CUDA driver, NCCL and PyTorch; no Rust, no cargo).
# Runs what pack.sh packed in at most BUDGET seconds (default 420: the device lease is 15 min,
# of which the machine's start and the transfers take a few). Each part runs in its own process
# under `timeout` (its own limit, cut to what is left of the budget), so a hang or a crashed
# CUDA context costs one part, not the rest; the goals' measurements come first:
#   env        what device-env.sh found, the GPU, the driver, torch and its CUDA;
#   device     the typed-error/round-trip test (cuda_device);
#   matmul     meshflow bf16 and f32 matmul TFLOP/s at 4096³ and 8192³ (cuBLASLt), then
#   torch      torch.matmul on the same sizes, and the ratios (goal: bf16 >= 0.9);
#   step       the reference GPT step (vocab 512, ctx 128, 4 layers, 4 heads, d 256, batch 8) in
#              f32 and bf16, then
#   torch-gpt  the same step in PyTorch eager (gpt_torch.py), and the ratios (goal: <= 0.8);
#   ops        every op on the GPU against the CPU backend in f32, bf16 and f16, and the caching
#              allocator in steady state;
#   session    GPT sessions trained 20 steps on the GPU and on the CPU, losses compared;
#   nccl       NCCL with the one rank one GPU allows (every collective, host and device
#              tensors), and the abort of a failed job;
#   boxing     every collective boxing step of every plan over a few meshes as the GPU runs it
#              (device kernels around one collective of equal pieces, padded where an axis does
#              not divide; the collective simulated over the ranks) against the reference
#              executor (src/exec/even.rs);
#   bench-comm `meshflow bench comm`: every collective nccl-tests style over the GPUs with NCCL
#              (and over 2 device threads), #wrong must be 0 (bench.sh comm);
#   example    the GPT example 20 steps with --device cuda and on the CPU (1e-3);
#   bench-train `meshflow bench train --device cuda --strategies 1`: the GPT and MLP reference
#              configs on GPU 0 against PyTorch eager on the GPU (bench.sh train);
#   nvrtc      every generated kernel compiled by this machine's NVRTC for sm_90 and sm_80.
# Usage: .gpu/run.sh [LOG_DIR]   (default $OUT, else /tmp). Exit status 0 only when every part
# passed. Writes 6 files (the device tool brings back at most 8): LOG_DIR/gpu-check.log
# (everything, written as it runs), gpu-check.log.summary (the GPU-CHECK lines and the part
# statuses), the example's gpt-cuda.log and gpt-cpu.log, and the benches' bench-comm.json and
# bench-train-cuda.json.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log_dir=${1:-${OUT:-/tmp}}
mkdir -p "$log_dir"
log="$log_dir/gpu-check.log"
summary="$log.summary"
: >"$log"
: >"$summary"
export PYTHONUNBUFFERED=1 RUST_BACKTRACE=1
budget=${BUDGET:-420}
threads=$(nproc 2>/dev/null || echo 8)
[ "$threads" -gt 8 ] && threads=8
failed=()

say() { echo "$*" | tee -a "$log" "$summary"; }

# pack.sh ships the binaries gzipped (the pack must stay under 64 MiB): unpack them in place.
for packed in "$here"/bin/*.gz; do
  [ -e "$packed" ] || continue
  gunzip -f "$packed" && chmod +x "${packed%.gz}" || say "GPU-CHECK unpack: cannot unpack $packed"
done

# part NAME LIMIT COMMAND...: runs COMMAND for at most LIMIT seconds (less if the budget is
# nearly spent; skipped when under 10 s are left), its output appended to the log as it comes.
part() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    say "GPU-CHECK part $name: skipped, the ${budget} s budget is spent"
    failed+=("$name(skipped)")
    return
  fi
  echo "== $name (limit $limit s): $*" | tee -a "$log"
  local started=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log"
  local status=${PIPESTATUS[0]}
  local verdict="exit $status"
  [ "$status" -eq 124 ] || [ "$status" -eq 137 ] && verdict="TIMED OUT after $limit s"
  say "GPU-CHECK part $name: $verdict in $((SECONDS - started)) s"
  [ "$status" -eq 0 ] || failed+=("$name")
}

# Every part needs the libraries on LD_LIBRARY_PATH; the env part sources it again to report.
# shellcheck source=/dev/null
. "$here/device-env.sh" >/dev/null
part env 30 bash -c ". '$here/device-env.sh'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"nccl\", torch.cuda.nccl.version(), torch.cuda.get_device_name(0))'"
part device 30 "$here/bin/cuda_device" --test-threads=1
part matmul 60 "$here/bin/cuda_gpu" matmul_throughput --exact --include-ignored --nocapture
part torch 60 python3 "$here/matmul_torch.py"
part step 90 "$here/bin/cuda_session" gpt_reference_step_time_on_a_gpu --exact --include-ignored --nocapture
part torch-gpt 90 python3 "$here/gpt_torch.py"
part ops 120 "$here/bin/cuda_gpu" --nocapture --test-threads=1
part session 120 "$here/bin/cuda_session" --nocapture --test-threads=1
part nccl 60 "$here/bin/comm_lib" nccl:: --nocapture --test-threads=1
part boxing 60 "$here/bin/meshflow_lib" exec::even --nocapture --test-threads=1
part bench-comm 60 "$here/bench.sh" comm "$log_dir" "$threads"
part example 120 "$here/gpt_example.sh" "$log_dir" "$threads"
part bench-train 150 "$here/bench.sh" train "$log_dir" "$threads"
part nvrtc 90 "$here/bin/cuda_kernels"

echo "== summary after $SECONDS s" | tee -a "$log"
grep -h '^GPU-CHECK' "$log" | grep -v '^GPU-CHECK part ' | sort -u | tee -a "$summary"
# Ratios: "GPU-CHECK matmul <who> <dtype> <n> <tflops> TFLOP/s".
awk '$2 == "matmul" && $7 == "TFLOP/s" { t[$3 " " $4 " " $5] = $6 }
     END { for (k in t) { split(k, p, " "); if (p[1] ~ /^meshflow/ && (("torch " p[2] " " p[3]) in t))
             printf "GPU-CHECK ratio matmul %s %s: %s/torch = %.3f (goal bf16 >= 0.9)\n", p[2], p[3], p[1], t[k] / t["torch " p[2] " " p[3]] } }' \
  "$log" | sort | tee -a "$log" "$summary"
# Ratios: "GPU-CHECK gpt step <who> <dtype> <ms> ms"; the step time is the goal (<= 0.8x eager).
awk '$2 == "gpt" && $3 == "step" { t[$4 " " $5] = $6 }
     END { for (k in t) { split(k, p, " "); if (p[1] == "meshflow") for (w in t) { split(w, q, " ")
             if (q[1] != "meshflow" && q[2] == p[2])
               printf "GPU-CHECK ratio gpt step %s: meshflow/%s = %.3f (goal <= 0.8 against torch)\n", p[2], q[1], t[k] / t[w] } } }' \
  "$log" | sort | tee -a "$log" "$summary"
if [ ${#failed[@]} -gt 0 ]; then
  say "GPU-CHECK FAILED parts: ${failed[*]} (total $SECONDS s)"
  exit 1
fi
say "GPU-CHECK all parts passed in $SECONDS s"
