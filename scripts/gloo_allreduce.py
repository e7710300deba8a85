#!/usr/bin/env python3
"""All-reduce between 2 processes with torch.distributed/gloo on loopback: the reference for
meshflow's QUIC all-reduce (comm/benches/comm.rs runs this in the same benchmark run).

Prints one "bytes busbw_GBps cpu_seconds_per_GB" line per size on stdout (CPU time of rank 0
per GB all-reduced, timed calls only) and an nccl-tests-style table on stderr.
busbw = algbw * 2 (n - 1) / n, as nccl-tests computes it for all-reduce.

    python3 scripts/gloo_allreduce.py --sizes 8 1024 1048576 268435456
"""

import argparse
import os
import resource
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def timed(run, size):
    """Same warm-up and iteration counts as comm/benches/comm.rs (both ranks must run the same
    number). Returns the seconds and the CPU seconds of this process per run."""
    iterations = max(2, min(20, (512 << 20) // max(size, 1)))
    run()
    run()
    cpu = cpu_seconds()
    started = time.perf_counter()
    for _ in range(iterations):
        run()
    return (time.perf_counter() - started) / iterations, (cpu_seconds() - cpu) / iterations


def cpu_seconds():
    """User plus system CPU seconds of this process, every thread (gloo's included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(rank, port, sizes, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = []
    for size in sizes:
        count = max(size // 4, 1)
        tensor = torch.full((count,), float(rank + 1), dtype=torch.float32)

        # Timed in place without refilling (the values double each call, exactly): gloo is not
        # charged for a fill that meshflow's all-reduce does not do. Checked on a fresh fill.
        seconds, cpu = timed(lambda: dist.all_reduce(tensor), count * 4)
        cpu_per_gb = cpu / (count * 4 / 1e9)
        tensor.fill_(float(rank + 1))
        dist.all_reduce(tensor)
        wrong = int((tensor != 3.0).sum())
        results.append((count * 4, seconds, wrong, cpu_per_gb))
    dist.destroy_process_group()
    if rank == 0:
        queue.put(results)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 1 << 10, 1 << 16, 1 << 20, 1 << 24, 1 << 26])
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=worker, args=(rank, port, args.sizes, queue)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    results = queue.get(timeout=600)
    for process in processes:
        process.join()
    print(f"# torch {torch.__version__} gloo all_reduce, {WORLD} processes", file=sys.stderr)
    print(f"#{'size':>12} {'time(us)':>12} {'algbw(GB/s)':>12} {'busbw(GB/s)':>12} {'#wrong':>7}", file=sys.stderr)
    for size, seconds, wrong, cpu_per_gb in results:
        algbw = size / seconds / 1e9
        busbw = algbw * 2 * (WORLD - 1) / WORLD
        print(f" {size:>12} {seconds * 1e6:>12.1f} {algbw:>12.3f} {busbw:>12.3f} {wrong:>7}", file=sys.stderr)
        print(f"{size} {busbw} {cpu_per_gb}")


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    main()
