"""torch.matmul TFLOP/s for the GPU check, printed as meshflow's cuda_gpu test prints its own.

Same sizes and dtypes as `matmul_throughput` in ops/tests/cuda_gpu.rs; f32 without TF32 (cuBLAS
COMPUTE_32F, as meshflow runs f32). Timed with CUDA events over about a second per case.
"""

import torch


def seconds_per_call(run):
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls, elapsed = 0, 0.0
    while calls < 10 or elapsed < 1.0:
        start.record()
        for _ in range(10):
            run()
        end.record()
        end.synchronize()
        elapsed += start.elapsed_time(end) / 1e3
        calls += 10
    return elapsed / calls


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    for name, dtype in (("bf16", torch.bfloat16), ("f32", torch.float32)):
        for n in (4096, 8192):
            a = torch.rand(n, n, device="cuda", dtype=dtype) * 2 - 1
            seconds = seconds_per_call(lambda: torch.matmul(a, a))
            print(f"GPU-CHECK matmul torch {name} {n} {2 * n**3 / seconds / 1e12:.1f} TFLOP/s")


if __name__ == "__main__":
    main()
