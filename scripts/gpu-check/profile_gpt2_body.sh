#!/usr/bin/env bash
# GPU check, optional diagnostic: where the GPU time of a GPT-2-body step goes (the shape of
# gpt2_body.sh), per kernel. meshflow: two steps of the GPT example under Nsight Compute
# (`ncu --clock-control none`, one metric: each kernel's duration), summed per kernel name;
# PyTorch eager f32 (explicit softmax, no TF32): two steps under torch.profiler, CUDA time per op.
# Run from the pack folder: .gpu/profile_gpt2_body.sh [LOG_DIR] (default $OUT, else /tmp).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log_dir=${1:-${OUT:-/tmp}}
mkdir -p "$log_dir"
# shellcheck source=/dev/null
. "$here/device-env.sh" >/dev/null
[ -e "$here/bin/gpt.gz" ] && gunzip -f "$here/bin/gpt.gz" && chmod +x "$here/bin/gpt"
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
corpus=$here/data/kjv-genesis.txt
vocab=$(python3 -c 'import sys; print(len(set(open(sys.argv[1]).read())))' "$corpus")
raw=$log_dir/ncu-gpt2-body.csv
timeout 240 "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --launch-count 6000 \
  "$here/bin/gpt" --dp 1 --tp 1 --device cuda --steps 2 --log-every 1 --sample 0 \
  --schedule constant --batch 8 --ctx 1024 --layers 12 --heads 12 --d-model 768 \
  --corpus "$corpus" >"$raw" 2>"$log_dir/ncu-gpt2-body.err"
echo "ncu exit $? ($(wc -l <"$raw") lines)"
python3 - "$raw" <<'PY'
import csv, collections, sys
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
head, body = rows[0], rows[1:]
name, unit, value = head.index("Kernel Name"), head.index("Metric Unit"), head.index("Metric Value")
scale = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0, "s": 1e3, "second": 1e3}
total, count = collections.Counter(), collections.Counter()
for r in body:
    ms = float(r[value].replace(",", "")) * scale[r[unit]]
    total[r[name][:90]] += ms / 2
    count[r[name][:90]] += 1
print(f"GPU-PROFILE meshflow: {sum(count.values())} kernels in 2 steps, {sum(total.values()):.1f} ms of kernels per step")
for k, ms in total.most_common(30):
    print(f"GPU-PROFILE meshflow {ms:9.3f} ms/step {count[k] // 2:5d}/step  {k}")
PY
timeout 90 python3 - "$here" "$vocab" <<'PY'
import sys, torch
sys.path.insert(0, sys.argv[1])
from torch_train import Gpt
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(0)
vocab = int(sys.argv[2])
model = Gpt(vocab, 1024, 12, 12, 768, False).cuda()
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
ids = torch.randint(vocab, (8, 1025), device="cuda")
def step():
    loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
for _ in range(3):
    step()
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(2):
        step()
    torch.cuda.synchronize()
events = [e for e in prof.key_averages() if e.device_time_total > 0]
events.sort(key=lambda e: -e.device_time_total)
kernels = sum(e.self_device_time_total for e in events) / 2e3
print(f"GPU-PROFILE torch: {kernels:.1f} ms of kernels per step (below: ops and kernels, each with its kernels' time)")
for e in events[:40]:
    print(f"GPU-PROFILE torch {e.device_time_total / 2e3:9.3f} ms/step {e.count // 2:5d}/step  {e.key[:90]}")
PY
