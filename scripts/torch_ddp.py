"""PyTorch DistributedDataParallel reference for `meshflow bench train`'s data-parallel
strategies: the models of `torch_train.py` (same sizes, AdamW), trained by `--world` processes on
this machine over gloo (127.0.0.1), each with `--threads` threads and its 1/world share of the
batch, as meshflow's DP strategies split it. Prints one JSON object on stdout (rank 0's times):

    {"torch": "2.x", "threads": 1, "world": 2, "gpt": {"median_ms": ..., "mean_ms": ...,
     "steps": ...}, "mlp": {...}}

Every rank runs the same number of steps (rank 0 picks it from the warm-up and broadcasts it),
so no rank waits in an all-reduce that the others never join.

Run:  python3 scripts/torch_ddp.py [--world 2] [--threads 1] [--seconds 3] [--only gpt|mlp]
"""
import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_train import Gpt, Mlp, training_step  # noqa: E402  (one definition of each)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_ddp(model, batch, seconds, warmup, min_steps):
    """Rank 0's step times, at least `min_steps` of them; every rank runs the same number of
    steps."""
    step = training_step(DistributedDataParallel(model), batch)

    begin = time.perf_counter()
    for _ in range(warmup):
        step()
    per_step = (time.perf_counter() - begin) / max(warmup, 1)
    steps = torch.tensor([max(min_steps, int(seconds / max(per_step, 1e-6)))])
    dist.broadcast(steps, src=0)
    times = []
    for _ in range(int(steps.item())):
        begin = time.perf_counter()
        step()
        times.append((time.perf_counter() - begin) * 1e3)
    return {"median_ms": statistics.median(times), "mean_ms": statistics.mean(times),
            "steps": len(times)}


def worker(rank, args, port, queue):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    torch.manual_seed(0)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "world": args.world}
    if args.only in (None, "gpt"):
        vocab, ctx, layers, heads, d, batch = map(int, args.gpt.split(","))
        ids = torch.randint(vocab, (batch, ctx + 1)).chunk(args.world)[rank]
        model = Gpt(vocab, ctx, layers, heads, d)
        result["gpt"] = time_ddp(model, (ids[:, :-1], ids[:, 1:]), args.seconds, args.warmup,
                                 args.min_steps)
    if args.only in (None, "mlp"):
        *sizes, batch = map(int, args.mlp.split(","))
        x = torch.randn(batch, sizes[0]).chunk(args.world)[rank]
        y = torch.randint(sizes[-1], (batch,)).chunk(args.world)[rank]
        result["mlp"] = time_ddp(Mlp(sizes), (x, y), args.seconds, args.warmup, args.min_steps)
    dist.destroy_process_group()
    if rank == 0:
        queue.put(result)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-steps", type=int, default=5, help="fewest timed steps per model")
    parser.add_argument("--only", choices=("gpt", "mlp"))
    parser.add_argument("--gpt", default="512,128,4,4,256,8",
                        help="vocab,ctx,layers,heads,d_model,batch")
    parser.add_argument("--mlp", default="784,1024,1024,10,256", help="sizes...,batch")
    args = parser.parse_args()
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.spawn(worker, args=(args, free_port(), queue), nprocs=args.world, join=True)
    json.dump(queue.get(), sys.stdout)
    print()


if __name__ == "__main__":
    main()
