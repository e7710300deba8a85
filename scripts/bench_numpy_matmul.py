"""numpy (OpenBLAS) f32 matmul at the sizes of `cargo bench -p meshflow --bench ops -- matmul`,
the ratio of meshflow's figures to it, and the row kernels' bandwidth as a fraction of memcpy.

By default it first runs the criterion groups `matmul_f32` and `rows_f32` (so both are measured in
the same run, on the same machine state), then times numpy at 1 and 2 threads (threadpoolctl),
then reads criterion's estimates (mean time) and prints two tables: GFLOP/s of meshflow and
OpenBLAS with their ratio, and GB/s of softmax, log_softmax, layer_norm, gelu and the
element-wise kernels with their ratio to memcpy at the same thread count.

    python3 scripts/bench_numpy_matmul.py              # bench both, print the tables
    python3 scripts/bench_numpy_matmul.py --no-cargo   # reuse the last criterion results
    python3 scripts/bench_numpy_matmul.py --train      # also the training-step kernels (µs)
    python3 scripts/bench_numpy_matmul.py --rows-only  # only the row kernels vs memcpy (~1 min)

OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are removed from this process's environment before numpy
loads, so OpenBLAS picks its kernel for the real CPU; the kernel it chose is printed.
"""
import argparse
import json
import os
import subprocess
import sys
import time

for variable in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
    os.environ.pop(variable, None)

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SIZES = (256, 512, 1024, 2048)
THREADS = (1, 2)


def numpy_gflops(n, threads, seconds=2.0):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    with threadpool_limits(limits=threads, user_api="blas"):
        a @ b  # warm up
        runs, start = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - start < seconds:
            a @ b
            runs += 1
        mean = (time.perf_counter() - start) / runs
    return 2 * n**3 / mean / 1e9


def criterion_results(target_dir, group):
    """{function id: (mean ns per iteration, throughput bytes or elements)} of one group."""
    results = {}
    root = os.path.join(target_dir, "criterion", group)
    for folder, _, files in os.walk(root):
        if os.path.basename(folder) != "new" or "benchmark.json" not in files:
            continue
        with open(os.path.join(folder, "benchmark.json")) as f:
            benchmark = json.load(f)
        with open(os.path.join(folder, "estimates.json")) as f:
            estimates = json.load(f)
        name = benchmark["full_id"][len(group) + 1:]
        throughput = benchmark.get("throughput") or {}
        amount = throughput.get("Bytes") or throughput.get("Elements")
        # Mean time per iteration, as numpy's figure below.
        results[name] = (estimates["mean"]["point_estimate"], amount)
    return results


def print_rows(target_dir):
    rows = criterion_results(target_dir, "rows_f32")
    print(f"{'kernel':>12} {'threads':>7} {'GB/s':>7} {'× memcpy':>9}")
    for threads in THREADS:
        memcpy = rows.get(f"memcpy/{threads}_threads")
        if memcpy is None:
            continue
        reference = memcpy[1] / memcpy[0]
        for name, (ns, amount) in sorted(rows.items()):
            kernel, _, suffix = name.partition("/")
            if suffix == f"{threads}_threads":
                print(f"{kernel:>12} {threads:>7} {amount / ns:>7.1f} {amount / ns / reference:>9.2f}")


def print_train(target_dir):
    for name, (ns, _) in sorted(criterion_results(target_dir, "train_f32").items()):
        print(f"{name:>28} {ns / 1e3:>10.1f} µs")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--no-cargo", action="store_true", help="reuse existing criterion results")
    parser.add_argument("--train", action="store_true", help="also bench the training kernels")
    parser.add_argument("--rows-only", action="store_true", help="only the row kernels vs memcpy")
    args = parser.parse_args()
    target_dir = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    if not args.no_cargo:
        groups = "rows_f32" if args.rows_only else "matmul_f32|rows_f32"
        groups += "|train_f32" if args.train else ""
        command = ["cargo", "bench", "-p", "meshflow", "--bench", "ops", "--", groups]
        print("running", " ".join(command), file=sys.stderr)
        subprocess.run(command, cwd=ROOT, check=True)
    if args.rows_only:
        print_rows(target_dir)
        return
    matmul = criterion_results(target_dir, "matmul_f32")
    blas = [info for info in threadpool_info() if info.get("user_api") == "blas"]
    for info in blas:
        print(f"numpy {np.__version__}: {info.get('internal_api')} {info.get('version')} "
              f"kernel {info.get('architecture')} ({info.get('filepath')})")
    print(f"{'size':>6} {'threads':>7} {'meshflow GFLOP/s':>17} {'OpenBLAS GFLOP/s':>17} {'ratio':>7}")
    for threads in THREADS:
        for n in SIZES:
            ours = 2 * n**3 / matmul[f"{threads}_threads/{n}"][0]
            theirs = numpy_gflops(n, threads)
            print(f"{n:>6} {threads:>7} {ours:>17.1f} {theirs:>17.1f} {ours / theirs:>7.2f}")
    print_rows(target_dir)
    if args.train:
        print_train(target_dir)


if __name__ == "__main__":
    main()
