"""PyTorch reference for `meshflow bench train`: the same two models, the same sizes, AdamW, on the
CPU with a fixed number of threads (or eager on GPU 0 with --device cuda); prints one JSON object
on stdout.

- GPT (nanoGPT layout of shared/formats/gpt-weights.md): pre-norm LayerNorm (eps 1e-5), causal
  self-attention with a fused c_attn and explicit softmax (as meshflow computes it), MLP with exact
  GELU, learned positions, untied lm_head without bias; mean cross-entropy of next tokens.
- The same GPT with `F.scaled_dot_product_attention(is_causal=True)` (torch's fused attention)
  in place of the explicit softmax: a second, faster reference, reported as `gpt_sdpa`.
- MLP 784-1024-1024-10 (nn.Linear, ReLU), cross-entropy against random labels.

Each model is timed over training steps (forward, backward, AdamW step, zero_grad) after warm-up
steps; the JSON gives the median and mean step time in milliseconds:

    {"torch": "2.x", "threads": 2, "device": "cpu",
     "gpt": {"median_ms": ..., "mean_ms": ..., "steps": ...}, "gpt_sdpa": {...}, "mlp": {...}}

On the GPU (--device cuda) the models and batches live on GPU 0, f32 without TF32 (as meshflow's
cuBLAS f32 products), and each timed step ends with torch.cuda.synchronize() (the clock starts
after one too), so a step's time is the GPU's work, not the launch queue's.

With --serve the script builds and warms its models once, prints {"ready": [names]}, then
answers requests on stdin until EOF: a line "<model> <seconds>" (gpt or mlp) times that model
(the GPT in both variants) after one warm-up step and prints one JSON line as above, with only
that model's figures. `meshflow bench train` keeps one such process for all its rounds, so that
its own steps and PyTorch's take turns a few seconds apart instead of a process start apart.

Run:  python3 scripts/torch_train.py [--threads 2] [--seconds 3] [--only gpt|mlp] [--device cuda]
      python3 scripts/torch_train.py --serve [--threads 2] [--only gpt|mlp]
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, heads, sdpa):
        super().__init__()
        self.heads = heads
        self.sdpa = sdpa
        self.ln_1 = nn.LayerNorm(d, eps=1e-5)
        self.c_attn = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d, eps=1e-5)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def attention(self, x, mask):
        b, t, d = x.shape
        hd = d // self.heads
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, hd).transpose(1, 2) for z in (q, k, v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.attn_proj(y.transpose(1, 2).reshape(b, t, d))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        weights = scores.masked_fill(mask[:t, :t], float("-inf")).softmax(dim=-1)
        y = (weights @ v).transpose(1, 2).reshape(b, t, d)
        return self.attn_proj(y)

    def forward(self, x, mask):
        x = x + self.attention(self.ln_1(x), mask)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class Gpt(nn.Module):
    def __init__(self, vocab, ctx, layers, heads, d, sdpa=False):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads, sdpa) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, eps=1e-5)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", torch.ones(ctx, ctx, dtype=torch.bool).triu(1))

    def forward(self, ids, targets):
        t = ids.shape[1]
        x = self.wte(ids) + self.wpe(torch.arange(t, device=ids.device))
        for block in self.blocks:
            x = block(x, self.mask)
        logits = self.lm_head(self.ln_f(x))
        # The loss in f32 also under bf16 autocast (the GPU check's reference).
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


class Mlp(nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x, y):
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index + 1 < len(self.layers):
                x = F.relu(x)
        return F.cross_entropy(x, y)


def training_step(model, batch, synchronize=lambda: None):
    """One step of the benchmark's training (forward, backward, AdamW, zero_grad), as a function;
    `synchronize` runs at its end (torch.cuda.synchronize on the GPU)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    def step():
        loss = model(*batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        return loss

    return step


def synchronizer(device):
    """What ends a timed step on `device`: waiting for the GPU's queue, or nothing on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_steps(model, batch, seconds, warmup, min_steps, device=torch.device("cpu")):
    synchronize = synchronizer(device)
    model = model.to(device)
    batch = tuple(tensor.to(device) for tensor in batch)
    return time_step(training_step(model, batch, synchronize), synchronize, seconds, warmup,
                     min_steps)


def time_step(step, synchronize, seconds, warmup, min_steps):
    """Times `step` (see training_step) for `seconds`, at least `min_steps` times, after `warmup`
    untimed calls."""
    for _ in range(warmup):
        step()
    synchronize()
    times = []
    started = time.perf_counter()
    while len(times) < min_steps or time.perf_counter() - started < seconds:
        begin = time.perf_counter()
        step()
        times.append((time.perf_counter() - begin) * 1e3)
    return {"median_ms": statistics.median(times), "mean_ms": statistics.mean(times),
            "steps": len(times)}


def models(args):
    """(figure name, model, batch) of each model the arguments select."""
    chosen = []
    if args.only in (None, "gpt"):
        vocab, ctx, layers, heads, d, batch = map(int, args.gpt.split(","))
        ids = torch.randint(vocab, (batch, ctx + 1))
        for key, sdpa in (("gpt", False), ("gpt_sdpa", True)):
            chosen.append((key, Gpt(vocab, ctx, layers, heads, d, sdpa), (ids[:, :-1], ids[:, 1:])))
    if args.only in (None, "mlp"):
        *sizes, batch = map(int, args.mlp.split(","))
        x = torch.randn(batch, sizes[0])
        y = torch.randint(sizes[-1], (batch,))
        chosen.append(("mlp", Mlp(sizes), (x, y)))
    return chosen


def serve(args, device, result):
    """The --serve loop: one warmed step function per figure, timed on request."""
    synchronize = synchronizer(device)
    steps = {}
    for key, model, batch in models(args):
        model = model.to(device)
        batch = tuple(tensor.to(device) for tensor in batch)
        steps[key] = training_step(model, batch, synchronize)
        for _ in range(args.warmup):
            steps[key]()
    print(json.dumps({"ready": list(steps)}), flush=True)
    for line in sys.stdin:
        words = line.split()
        try:
            name, seconds = words[0], float(words[1])
        except (IndexError, ValueError):
            name, seconds = None, None
        # A positive, finite number of seconds (NaN fails `> 0`; infinity would never answer).
        if not (len(words) == 2 and name in ("gpt", "mlp") and seconds is not None
                and seconds > 0 and math.isfinite(seconds)):
            sys.exit(f"torch_train.py --serve: expected '<gpt|mlp> <seconds>', got {line!r}")
        answer = dict(result)
        for key in [k for k in steps if k == name or k.startswith(name + "_")]:
            answer[key] = time_step(steps[key], synchronize, seconds, 1, args.min_steps)
        print(json.dumps(answer), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-steps", type=int, default=5)
    parser.add_argument("--only", choices=("gpt", "mlp"))
    parser.add_argument("--gpt", default="512,128,4,4,256,8",
                        help="vocab,ctx,layers,heads,d_model,batch")
    parser.add_argument("--mlp", default="784,1024,1024,10,256", help="sizes...,batch")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: eager on GPU 0, f32 without TF32")
    parser.add_argument("--serve", action="store_true",
                        help="time on request from stdin (see the module's text)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("torch_train.py: --device cuda, but torch sees no GPU")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "device": device.type}
    if args.serve:
        serve(args, device, result)
        return
    for key, model, batch in models(args):
        result[key] = time_steps(model, batch, args.seconds, args.warmup, args.min_steps, device)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
