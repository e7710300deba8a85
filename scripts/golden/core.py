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


def unary(g):
    F = torch.nn.functional
    fns = {
        "exp": (torch.exp, False), "log": (torch.log, True), "sqrt": (torch.sqrt, True),
        "rsqrt": (torch.rsqrt, True), "relu": (torch.relu, False), "silu": (F.silu, False),
        "tanh": (torch.tanh, False), "sigmoid": (torch.sigmoid, False),
    }
    for name, (fn, positive) in fns.items():
        for dtype in (F32, F64):
            x = g.rand(3, 5, low=0.2, high=3.0, dtype=dtype) if positive else g.randn(3, 5, dtype=dtype)
            g.case(f"{name}_{dtype_name(dtype)}", name, [x], fn)
    for approximate in ("none", "tanh"):
        for dtype in (F32, F64, BF16, F16):
            g.case(f"gelu_{approximate}_{dtype_name(dtype)}", "gelu", [g.randn(4, 6, dtype=dtype) * 2],
                   lambda x, a=approximate: F.gelu(x, approximate=a), tanh=approximate == "tanh")
    for dtype in (BF16, F16):
        g.case(f"silu_{dtype_name(dtype)}", "silu", [g.randn(4, 6, dtype=dtype)], F.silu)
        g.case(f"exp_{dtype_name(dtype)}", "exp", [g.randn(4, 6, dtype=dtype)], torch.exp)
    for dtype in (F32, F64):
        n = dtype_name(dtype)
        g.case(f"add_scalar_{n}", "add_scalar", [g.randn(2, 3, dtype=dtype)], lambda x: x + 1.5, value=1.5)
        g.case(f"mul_scalar_{n}", "mul_scalar", [g.randn(2, 3, dtype=dtype)], lambda x: x * -2.5, value=-2.5)
        g.case(f"pow_scalar_3_{n}", "pow_scalar", [g.randn(2, 3, dtype=dtype)], lambda x: x ** 3, exponent=3.0)
        g.case(f"pow_scalar_half_{n}", "pow_scalar", [g.rand(2, 3, low=0.5, high=2.0, dtype=dtype)],
               lambda x: x ** 0.5, exponent=0.5)
        g.case(f"pow_{n}", "pow", [g.rand(3, 4, low=0.5, high=2.0, dtype=dtype), g.randn(4, dtype=dtype)],
               torch.pow)


def more_reductions(g):
    cases = [((3, 4, 5), [1], False), ((3, 4, 5), [0, 2], True), ((6, 7), [], False), ((4, 300), [-1], True)]
    for k, (shape, axes, keepdim) in enumerate(cases):
        dims = axes if axes else list(range(len(shape)))
        for dtype in (F32, F64):
            n = dtype_name(dtype)
            g.case(f"mean_{k}_{n}", "mean", [g.randn(*shape, dtype=dtype)],
                   lambda x, d=dims, kd=keepdim: x.mean(dim=d, keepdim=kd), axes=axes, keepdim=keepdim)
            g.case(f"max_{k}_{n}", "max", [g.randn(*shape, dtype=dtype)],
                   lambda x, d=dims, kd=keepdim: x.amax(dim=d, keepdim=kd), axes=axes, keepdim=keepdim)
    g.case("mean_bf16", "mean", [g.randn(4, 64, dtype=BF16)], lambda x: x.mean(dim=[1]), axes=[1], keepdim=False)
    g.case("max_f16", "max", [g.randn(4, 64, dtype=F16)], lambda x: x.amax(dim=[1]), axes=[1], keepdim=False)


def layout(g):
    for dtype in (F32, F64):
        n = dtype_name(dtype)
        g.case(f"permute_{n}", "permute", [g.randn(2, 3, 4, dtype=dtype)], lambda x: x.permute(2, 0, 1), perm=[2, 0, 1])
        g.case(f"transpose_{n}", "permute", [g.randn(2, 3, 4, 5, dtype=dtype)], lambda x: x.transpose(1, 3),
               perm=[0, 3, 2, 1])
        g.case(f"narrow_{n}", "narrow", [g.randn(4, 5, 6, dtype=dtype)], lambda x: x.narrow(1, 1, 3),
               axis=1, start=1, len=3)
        g.case(f"narrow_last_{n}", "narrow", [g.randn(4, 6, dtype=dtype)], lambda x: x.narrow(-1, 4, 2),
               axis=-1, start=4, len=2)
        g.case(f"concat_{n}", "concat", [g.randn(2, 1, 3, dtype=dtype), g.randn(2, 4, 3, dtype=dtype),
                                         g.randn(2, 2, 3, dtype=dtype)], lambda *xs: torch.cat(xs, dim=1), axis=1)
        g.case(f"split_{n}", "split", [g.randn(4, 7, dtype=dtype)], lambda x: torch.split(x, [2, 5], dim=1),
               axis=1, sizes=[2, 5])
        cond = g.randn(3, 4) > 0
        g.case(f"where_{n}", "where", [cond, g.randn(3, 4, dtype=dtype), g.randn(4, dtype=dtype)], torch.where)
        causal = torch.ones(4, 4, dtype=torch.bool).triu(1)
        g.case(f"masked_fill_{n}", "masked_fill", [g.randn(2, 4, 4, dtype=dtype), causal],
               lambda x, m: x.masked_fill(m, -1e9), value=-1e9)
        g.case(f"masked_fill_zero_{n}", "masked_fill", [g.randn(3, 4, dtype=dtype), g.randn(4) > 0],
               lambda x, m: x.masked_fill(m, 0.0), value=0.0)
        g.case(f"fill_{n}", "fill", [g.randn(2, 3, dtype=dtype)], lambda x: torch.full_like(x, 2.0), value=2.0)


def dtype_name(dtype):
    return {F32: "f32", F64: "f64", BF16: "bf16", F16: "f16"}[dtype]


def main():
    g = Golden("core")
    binary(g)
    reductions(g)
    shapes(g)
    casts(g)
    unary(g)
    more_reductions(g)
    layout(g)
    g.save()


if __name__ == "__main__":
    main()
