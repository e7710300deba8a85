#!/usr/bin/env bash
# GPU check, optional part (not in run.sh's budget): the GPT example at GPT-2 small's body shape
# (ctx 1024, 12 layers, 12 heads, d 768, batch 8; the corpus's character vocabulary instead of
# GPT-2's 50,257 tokens) on GPU 0 in f32, against the same model in PyTorch eager
# (gpt_torch.py, f32 without TF32 and bf16 autocast, explicit softmax and sdpa) in the same call.
# Run from the pack folder: .gpu/gpt2_body.sh [LOG_DIR] (default $OUT, else /tmp). Prints
# "GPU-CHECK gpt2-body ..." lines; meshflow's step time is the mean of steps 10-19 from the
# example's cumulative tokens/s.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log_dir=${1:-${OUT:-/tmp}}
mkdir -p "$log_dir"
# shellcheck source=/dev/null
. "$here/device-env.sh" >/dev/null
for packed in "$here"/bin/gpt.gz; do
  [ -e "$packed" ] && gunzip -f "$packed" && chmod +x "${packed%.gz}"
done
corpus=$here/data/kjv-genesis.txt
vocab=$(python3 -c 'import sys; print(len(set(open(sys.argv[1]).read())))' "$corpus")
batch=8 ctx=1024
log=$log_dir/gpt2-body-cuda.log
timeout 150 "$here/bin/gpt" --dp 1 --tp 1 --device cuda --steps 20 --log-every 1 --sample 0 \
  --schedule constant --batch $batch --ctx $ctx --layers 12 --heads 12 --d-model 768 \
  --corpus "$corpus" >"$log" 2>&1
status=$?
tail -n 4 "$log"
if [ $status -ne 0 ]; then
  echo "GPU-CHECK gpt2-body meshflow: the example failed (exit $status)"
else
  # "step N loss X (T tokens/s)": T is cumulative, so step N ended at (N + 1) * batch * ctx / T s.
  awk -v tokens=$((batch * ctx)) '$1 == "step" { t = $5; sub(/\(/, "", t); end[$2] = ($2 + 1) * tokens / t; loss[$2] = $4 }
    END { printf "GPU-CHECK gpt2-body meshflow f32 %.3f ms/step (mean of steps 10-19; loss %.3f -> %.3f)\n",
            (end[19] - end[9]) * 100, loss[0], loss[19] }' "$log"
fi
timeout 150 python3 "$here/gpt_torch.py" --gpt "$vocab,$ctx,12,12,768,$batch" --steps 10 --warmup 3 |
  sed 's/^GPU-CHECK gpt step/GPU-CHECK gpt2-body/'
