#!/usr/bin/env bash
# GPU check, second half (on a GPU machine: CUDA driver, NCCL and PyTorch; no Rust, no cargo).
# Runs what pack.sh packed, within a few minutes:
#   1. the typed-error/round-trip test and the NVRTC compile of every kernel (sm of this GPU too);
#   2. every op on the GPU against the CPU backend in f32, bf16 and f16, the caching allocator in
#      steady state, and matmul TFLOP/s;
#   3. NCCL with the ranks one GPU allows (one rank, host and device tensors);
#   4. torch.matmul TFLOP/s in the same call, and the ratios meshflow / torch.
# Usage: .gpu/run.sh [LOG_DIR]   (exit status 0 only when every part passed)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log_dir=${1:-${OUT:-/tmp}}
log="$log_dir/gpu-check.log"
: >"$log"
# shellcheck source=/dev/null
. "$here/device-env.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$log"
failed=()
part() {
  local name=$1
  shift
  echo "== $name: $*" | tee -a "$log"
  timeout 240 "$@" 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("$name")
}
part device "$here/bin/cuda_device" --test-threads=1
part nvrtc "$here/bin/cuda_kernels" --test-threads=1
part ops "$here/bin/cuda_gpu" --include-ignored --nocapture --test-threads=1
part nccl "$here/bin/comm_lib" nccl:: --nocapture --test-threads=1
part torch python3 "$here/matmul_torch.py"

echo "== summary" | tee -a "$log"
grep -h '^GPU-CHECK' "$log" | sort -u | tee -a "$log.summary"
# Ratios: "GPU-CHECK matmul <who> <dtype> <n> <tflops> TFLOP/s".
awk '$2 == "matmul" { t[$3 " " $4 " " $5] = $6 }
     END { for (k in t) { split(k, p, " "); if (p[1] == "meshflow" && (("torch " p[2] " " p[3]) in t))
             printf "GPU-CHECK ratio matmul %s %s: meshflow/torch = %.3f\n", p[2], p[3], t[k] / t["torch " p[2] " " p[3]] } }' \
  "$log" | sort | tee -a "$log"
echo "GPU-CHECK not yet: GPT 20 steps on the GPU vs CPU and step time vs PyTorch eager (the session runtime does not place actors on GPUs yet)" | tee -a "$log"
if [ ${#failed[@]} -gt 0 ]; then
  echo "GPU-CHECK FAILED parts: ${failed[*]}" | tee -a "$log"
  exit 1
fi
echo "GPU-CHECK all parts passed" | tee -a "$log"
