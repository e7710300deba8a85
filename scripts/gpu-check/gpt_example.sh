#!/usr/bin/env bash
# GPU check: the GPT example for 20 steps on the GPU (--device cuda) and on the CPU, losses
# compared within 1e-3 (f32; F32_TOLERANCE in tests/cuda_session.rs says why). Called by run.sh
# from the pack folder: gpt_example.sh LOG_DIR THREADS. Writes LOG_DIR/gpt-{cuda,cpu}.log.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log_dir=$1
threads=$2
common=(--dp 1 --tp 1 --steps 20 --log-every 1 --sample 0 --schedule constant
  --threads "$threads" --corpus "$here/data/kjv-genesis.txt")
for device in cuda cpu; do
  if ! "$here/bin/gpt" "${common[@]}" --device "$device" >"$log_dir/gpt-$device.log" 2>&1; then
    tail -n 20 "$log_dir/gpt-$device.log"
    echo "GPU-CHECK gpt example: the $device run failed"
    exit 1
  fi
done
tail -n 3 "$log_dir/gpt-cuda.log"
# Lines: "step N loss X (T tokens/s)"; paste puts the CPU's fields from $7 on.
paste <(grep '^step' "$log_dir/gpt-cuda.log") <(grep '^step' "$log_dir/gpt-cpu.log") | awk '
  { d = $4 - $10; if (d < 0) d = -d; if (d > worst) worst = d; n++; gpu = $5; cpu = $11 }
  END {
    sub(/\(/, "", gpu); sub(/\(/, "", cpu)
    printf "GPU-CHECK gpt example f32 %d steps: max |gpu - cpu| = %.2e (tolerance 1e-3); %s vs %s tokens/s\n", n, worst, gpu, cpu
    exit (n == 20 && worst <= 1e-3) ? 0 : 1
  }'
