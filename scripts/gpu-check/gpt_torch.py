"""PyTorch eager reference of the GPU check: the GPT step time on the GPU, printed as meshflow's
`gpt_reference_step_time_on_a_gpu` test (tests/cuda_session.rs) prints its own.

The model is scripts/torch_train.py's GPT (imported from the copy packed next to this file) (nanoGPT layout: pre-norm LayerNorm eps 1e-5, causal
self-attention with a fused c_attn and an explicit masked softmax as meshflow computes it, MLP
with exact GELU, learned positions, untied lm_head without bias, mean cross-entropy), with its
position index on the model's device. Config (vocab 512, ctx 128, 4 layers, 4 heads, d 256,
batch 8) and AdamW as in the meshflow test. f32 runs without TF32 (meshflow's cuBLAS f32 is
COMPUTE_32F); bf16 is autocast (products in bf16; norms, softmax and the loss in f32, as
meshflow's `with_compute_dtype(bf16)`). A step is forward, backward, AdamW step and zero_grad,
then a synchronize (meshflow's step ends with the loss on the host); the median of 20 steps after
3 warm-up steps is printed. `sdpa` rows use F.scaled_dot_product_attention (torch's fused
attention) for reference.

Run:  python3 gpt_torch.py [--gpt 512,128,4,4,256,8] [--steps 20]
"""
import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_train import Gpt  # noqa: E402  (the one definition of the model, packed next to this)


def step_times(model, ids, dtype, warmup, steps):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())

    def step():
        with autocast:
            loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return loss

    first = step().item()
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        step()
        times.append((time.perf_counter() - begin) * 1e3)
    last = step().item()
    return statistics.median(times), first, last


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpt", default="512,128,4,4,256,8",
                        help="vocab,ctx,layers,heads,d_model,batch")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    vocab, ctx, layers, heads, d, batch = map(int, args.gpt.split(","))
    ids = torch.randint(vocab, (batch, ctx + 1), device="cuda")
    for name, sdpa in (("torch", False), ("torch-sdpa", True)):
        for dtype in ("f32", "bf16"):
            model = Gpt(vocab, ctx, layers, heads, d, sdpa).cuda()
            median, first, last = step_times(model, ids, dtype, args.warmup, args.steps)
            print(f"GPU-CHECK gpt step {name} {dtype} {median:.3f} ms "
                  f"(loss {first:.3f} -> {last:.3f})")


if __name__ == "__main__":
    main()
