"""Golden values for the core ops of meshflow-ops (element-wise, reductions, shape ops).

Run from the repository root:  python3 scripts/golden/core.py
Writes ops/tests/golden/core.safetensors (see golden.py for the convention).
"""
import torch

from golden import Golden

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


def binary(g):
    shapes = [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((2, 1, 4), (3, 1)), ((5,), ())]
    ops = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}
    for name, fn in ops.items():
        for k, (sa, sb) in enumerate(shapes):
            for dtype in (F32, F64):
                b = g.randn(*sb, dtype=dtype)
                if name == "div":
                    b = b.sign() * (b.abs() + 0.5)
                g.case(f"{name}_{k}_{dtype_name(dtype)}", name, [g.randn(*sa, dtype=dtype), b], fn)
        for dtype in (BF16, F16):
            b = g.rand(2, 1, 4, low=0.5, high=2.0, dtype=dtype)
            g.case(f"{name}_half_{dtype_name(dtype)}", name, [g.randn(3, 1, dtype=dtype), b], fn)


def reductions(g):
    cases = [((3, 4, 5), [1], False), ((3, 4, 5), [0, 2], True), ((3, 4, 5), [-1], True),
             ((6, 7), [], False), ((2, 3, 4, 5), [1, 2], False), ((4, 300), [1], False)]
    for k, (shape, axes, keepdim) in enumerate(cases):
        for dtype in (F32, F64):
            x = g.randn(*shape, dtype=dtype)
            dims = axes if axes else list(range(len(shape)))
            g.case(f"sum_{k}_{dtype_name(dtype)}", "sum", [x],
                   lambda x, d=dims, kd=keepdim: x.sum(dim=d, keepdim=kd), axes=axes, keepdim=keepdim)
    g.case("sum_bf16", "sum", [g.randn(4, 64, dtype=BF16)], lambda x: x.sum(dim=[1]), axes=[1], keepdim=False)


def shapes(g):
    for dtype in (F32, F64):
        n = dtype_name(dtype)
        g.case(f"reshape_{n}", "reshape", [g.randn(2, 3, 4, dtype=dtype)], lambda x: x.reshape(6, 4), shape=[6, 4])
        g.case(f"broadcast_to_{n}", "broadcast_to", [g.randn(3, 1, dtype=dtype)],
               lambda x: x.expand(2, 3, 4), shape=[2, 3, 4])


def casts(g):
    g.case("cast_f32_f64", "cast", [g.randn(3, 4)], lambda x: x.to(F64), dtype="f64")
    g.case("cast_f64_f32", "cast", [g.randn(3, 4, dtype=F64)], lambda x: x.to(F32), dtype="f32")
    g.case("cast_f32_bf16", "cast", [g.randn(3, 4)], lambda x: x.to(BF16), dtype="bf16")
    g.case("cast_f32_f16", "cast", [g.randn(3, 4)], lambda x: x.to(F16), dtype="f16")
    g.case("cast_f32_i64", "cast", [g.randn(3, 4) * 10], lambda x: x.to(torch.int64), dtype="i64")
    g.case("cast_i64_f32", "cast", [g.randint(100, 3, 4)], lambda x: x.to(F32), dtype="f32")
    g.case("cast_f32_bool", "cast", [torch.tensor([0.0, 1.5, -2.0, 0.0])], lambda x: x.to(torch.bool), dtype="bool")


def dtype_name(dtype):
    return {F32: "f32", F64: "f64", BF16: "bf16", F16: "f16"}[dtype]


def main():
    g = Golden("core")
    binary(g)
    reductions(g)
    shapes(g)
    casts(g)
    g.save()


if __name__ == "__main__":
    main()
