"""numpy (OpenBLAS) f32 matmul at the sizes of `cargo bench --bench ops -- matmul`, and the ratio
of meshflow's figures to it.

By default it first runs the criterion matmul bench (so both are measured in the same run, on the
same machine state), then times numpy at 1 and 2 threads (threadpoolctl), then reads criterion's
estimates (mean time) and prints GFLOP/s for both and meshflow / OpenBLAS.

    python3 scripts/bench_numpy_matmul.py              # bench both, print the table
    python3 scripts/bench_numpy_matmul.py --no-cargo   # reuse the last criterion results

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


def criterion_gflops(target_dir, n, threads):
    path = os.path.join(target_dir, "criterion", "matmul_f32", f"{threads}_threads", str(n), "new",
                        "estimates.json")
    with open(path) as f:
        estimates = json.load(f)
    # Mean time per iteration, as numpy's figure above.
    mean_ns = estimates["mean"]["point_estimate"]
    return 2 * n**3 / mean_ns


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--no-cargo", action="store_true", help="reuse existing criterion results")
    args = parser.parse_args()
    target_dir = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    if not args.no_cargo:
        command = ["cargo", "bench", "--bench", "ops", "--", "matmul"]
        print("running", " ".join(command), file=sys.stderr)
        subprocess.run(command, cwd=ROOT, check=True)
    blas = [info for info in threadpool_info() if info.get("user_api") == "blas"]
    for info in blas:
        print(f"numpy {np.__version__}: {info.get('internal_api')} {info.get('version')} "
              f"kernel {info.get('architecture')} ({info.get('filepath')})")
    print(f"{'size':>6} {'threads':>7} {'meshflow GFLOP/s':>17} {'OpenBLAS GFLOP/s':>17} {'ratio':>7}")
    for threads in THREADS:
        for n in SIZES:
            ours = criterion_gflops(target_dir, n, threads)
            theirs = numpy_gflops(n, threads)
            print(f"{n:>6} {threads:>7} {ours:>17.1f} {theirs:>17.1f} {ours / theirs:>7.2f}")


if __name__ == "__main__":
    main()
