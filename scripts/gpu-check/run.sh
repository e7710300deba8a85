#!/usr/bin/env bash
# GPU check, second half (on a GPU machine: CUDA driver, NCCL and PyTorch; no Rust, no cargo).
# Runs what pack.sh packed, in about 5 minutes (each part at most 240 s):
#   1. the typed-error/round-trip test and the NVRTC compile of every kernel (sm of this GPU too);
#   2. every op on the GPU against the CPU backend in f32, bf16 and f16, the caching allocator in
#      steady state, and matmul TFLOP/s;
#   3. NCCL with the ranks one GPU allows (one rank, host and device tensors);
#   4. torch.matmul TFLOP/s in the same call, and the ratios meshflow / torch;
#   5. sessions on the GPU (tests/cuda_session.rs): a GPT trained 20 steps on the GPU and on the
#      CPU in f32 and bf16, losses compared (tolerances justified in the test), and the reference
#      GPT step (vocab 512, ctx 128, 4 layers, 4 heads, d 256, batch 8) timed;
#   6. the GPT example, 20 steps with --device cuda and on the CPU, losses compared (1e-3);
#   7. the same GPT step in PyTorch eager (gpt_torch.py), and the ratio meshflow / torch
#      (goal: <= 0.8).
# Usage: .gpu/run.sh [LOG_DIR]   (default $OUT, else /tmp; exit status 0 only when every part
# passed). Writes LOG_DIR/gpu-check.log (everything), gpu-check.log.summary (the GPU-CHECK lines)
# and the example's logs gpt-cuda.log and gpt-cpu.log.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log_dir=${1:-${OUT:-/tmp}}
mkdir -p "$log_dir"
log="$log_dir/gpu-check.log"
: >"$log"
: >"$log.summary"
# shellcheck source=/dev/null
. "$here/device-env.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$log"
threads=$(nproc 2>/dev/null || echo 8)
[ "$threads" -gt 8 ] && threads=8
failed=()
part() {
  local name=$1
  shift
  echo "== $name: $*" | tee -a "$log"
  local started=$SECONDS
  timeout 240 "$@" 2>&1 | tee -a "$log"
  local status=${PIPESTATUS[0]}
  echo "== $name: exit $status after $((SECONDS - started)) s" | tee -a "$log"
  [ "$status" -eq 0 ] || failed+=("$name")
}

part device "$here/bin/cuda_device" --test-threads=1
part nvrtc "$here/bin/cuda_kernels" --test-threads=1
part ops "$here/bin/cuda_gpu" --include-ignored --nocapture --test-threads=1
part nccl "$here/bin/comm_lib" nccl:: --nocapture --test-threads=1
part torch python3 "$here/matmul_torch.py"
part session "$here/bin/cuda_session" --include-ignored --nocapture --test-threads=1
part example "$here/gpt_example.sh" "$log_dir" "$threads"
part torch-gpt python3 "$here/gpt_torch.py"

echo "== summary" | tee -a "$log"
grep -h '^GPU-CHECK' "$log" | sort -u | tee -a "$log.summary"
# Ratios: "GPU-CHECK matmul <who> <dtype> <n> <tflops> TFLOP/s".
awk '$2 == "matmul" { t[$3 " " $4 " " $5] = $6 }
     END { for (k in t) { split(k, p, " "); if (p[1] == "meshflow" && (("torch " p[2] " " p[3]) in t))
             printf "GPU-CHECK ratio matmul %s %s: meshflow/torch = %.3f (goal bf16 >= 0.9)\n", p[2], p[3], t[k] / t["torch " p[2] " " p[3]] } }' \
  "$log" | sort | tee -a "$log" "$log.summary"
# Ratios: "GPU-CHECK gpt step <who> <dtype> <ms> ms"; the step time is the goal (<= 0.8x eager).
awk '$2 == "gpt" && $3 == "step" { t[$4 " " $5] = $6 }
     END { for (k in t) { split(k, p, " "); if (p[1] == "meshflow") for (w in t) { split(w, q, " ")
             if (q[1] != "meshflow" && q[2] == p[2])
               printf "GPU-CHECK ratio gpt step %s: meshflow/%s = %.3f (goal <= 0.8 against torch)\n", p[2], q[1], t[k] / t[w] } } }' \
  "$log" | sort | tee -a "$log" "$log.summary"
if [ ${#failed[@]} -gt 0 ]; then
  echo "GPU-CHECK FAILED parts: ${failed[*]}" | tee -a "$log" "$log.summary"
  exit 1
fi
echo "GPU-CHECK all parts passed" | tee -a "$log" "$log.summary"
