#!/usr/bin/env bash
# GPU check: `meshflow bench` on the GPU, called by run.sh from the pack folder:
#   bench.sh comm  LOG_DIR THREADS   every collective over the GPUs with NCCL (nccl-tests style,
#                                    one GPU is a world of 1) next to the device-thread rows;
#                                    fails without NCCL rows or with any #wrong;
#   bench.sh train LOG_DIR THREADS   the GPT and MLP reference configs on GPU 0 (--device cuda,
#                                    --strategies 1) against PyTorch eager on the GPU; fails
#                                    without a GPU figure per model.
# Writes LOG_DIR/bench-comm.json or LOG_DIR/bench-train-cuda.json and prints GPU-CHECK lines.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
what=$1
log_dir=$2
threads=$3
# pack.sh ships the binaries gzipped and run.sh unpacks them; run alone, bench.sh unpacks
# meshflow once per machine itself (an unpacked bin/meshflow wins).
meshflow=$here/bin/meshflow
if [ ! -x "$meshflow" ]; then
  meshflow=${TMPDIR:-/tmp}/meshflow-gpu-check/meshflow
  if [ ! -x "$meshflow" ] || [ "$here/bin/meshflow.gz" -nt "$meshflow" ]; then
    mkdir -p "$(dirname "$meshflow")"
    gunzip -c "$here/bin/meshflow.gz" >"$meshflow.part" && chmod +x "$meshflow.part" &&
      mv "$meshflow.part" "$meshflow" || { echo "GPU-CHECK bench $what: cannot unpack meshflow"; exit 1; }
  fi
fi

case "$what" in
  comm)
    json=$log_dir/bench-comm.json
    "$meshflow" bench comm --ranks 2 --max-bytes $((64 << 20)) --json "$json" || exit 1
    python3 - "$json" <<'EOF'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["comm"] if r["transport"] == "nccl"]
if not rows:
    print("GPU-CHECK bench comm nccl: no NCCL rows (see the '# nccl:' line above)")
    sys.exit(1)
wrong = sum(r["wrong"] for r in rows)
largest = {}
for r in rows:
    if r["bytes"] >= largest.get(r["collective"], {"bytes": -1})["bytes"]:
        largest[r["collective"]] = r
print(f"GPU-CHECK bench comm nccl: {len(rows)} rows over {rows[0]['ranks']} GPU(s), #wrong {wrong}")
for name, r in largest.items():
    print(f"GPU-CHECK bench comm nccl {name} {r['bytes']} B: {r['seconds'] * 1e6:.1f} us, "
          f"algbw {r['algbw']:.1f} GB/s, busbw {r['busbw']:.1f} GB/s")
sys.exit(1 if wrong else 0)
EOF
    ;;
  train)
    json=$log_dir/bench-train-cuda.json
    "$meshflow" bench train --device cuda --strategies 1 --seconds 1 --min-steps 5 --rounds 2 \
      --threads "$threads" --torch-script "$here/torch_train.py" --json "$json" || exit 1
    python3 - "$json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
ours = [f for f in report["train"] if f.get("device") == "cuda"]
theirs = {f["model"]: f for f in report["torch"]
          if f.get("device") == "cuda" and not f.get("fused_attention")}
print(f"GPU-CHECK bench train cuda: peak {report['peak_flops'] / 1e12:.1f} TFLOP/s "
      f"({report['peak_source']})")
for f in ours:
    line = (f"GPU-CHECK bench train cuda {f['model']}: {f['times']['median'] * 1e3:.3f} ms/step, "
            f"MFU {f['mfu'] * 100:.1f}%, loss {f['loss']:.3f}")
    if f["model"] in theirs:
        torch_ms = theirs[f["model"]]["times"]["median"] * 1e3
        line += f"; torch eager {torch_ms:.3f} ms, ratio of medians {f['times']['median'] * 1e3 / torch_ms:.3f}"
    print(line)
sys.exit(0 if {f["model"] for f in ours} >= {"gpt", "mlp"} else 1)
EOF
    ;;
  *)
    echo "usage: $0 comm|train LOG_DIR THREADS" >&2
    exit 2
    ;;
esac
