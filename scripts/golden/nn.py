"""Golden values for the nn ops of meshflow-ops (matmul, softmax, log_softmax, layer_norm,
rms_norm, embedding, cross_entropy, adamw, sgd), computed by PyTorch.

Writes ops/tests/golden/nn.safetensors in the convention of golden.py (beside this file):
per case <case>.in.<i>, .out.<j>, .cot.<j>, .grad.<i>, and metadata "cases".

Optimizer cases (adamw_*, sgd_*) are several consecutive steps of torch.optim on one parameter:
case <name>_t<k> holds the state before step k as inputs (param, grad, state...) and after it as
outputs; they carry no cotangents or gradients.

Run:  python3 scripts/golden/nn.py   (needs torch, safetensors)
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from golden import Golden  # noqa: E402

FLOATS = {"f32": torch.float32, "f64": torch.float64}


def product(ta, tb):
    def fn(a, b):
        return (a.mT if ta else a) @ (b.mT if tb else b)

    return fn


def matmul_cases(g):
    for name, dtype in FLOATS.items():
        for ta in (False, True):
            for tb in (False, True):
                a = g.randn(*((4, 3) if ta else (3, 4)), dtype=dtype)
                b = g.randn(*((5, 4) if tb else (4, 5)), dtype=dtype)
                case = f"matmul_2d_{int(ta)}{int(tb)}_{name}"
                g.case(case, "matmul", [a, b], product(ta, tb), transpose_a=ta, transpose_b=tb)
        flags = dict(transpose_a=False, transpose_b=False)
        g.case(f"matmul_batched_{name}", "matmul",
               [g.randn(2, 3, 4, dtype=dtype), g.randn(2, 4, 5, dtype=dtype)], product(False, False), **flags)
        g.case(f"matmul_weight_{name}", "matmul",
               [g.randn(2, 3, 4, dtype=dtype), g.randn(4, 5, dtype=dtype)], product(False, False), **flags)
        g.case(f"matmul_weight_tt_{name}", "matmul",
               [g.randn(2, 4, 3, dtype=dtype), g.randn(5, 4, dtype=dtype)], product(True, True),
               transpose_a=True, transpose_b=True)
        g.case(f"matmul_shared_lhs_{name}", "matmul",
               [g.randn(3, 4, dtype=dtype), g.randn(2, 2, 4, 5, dtype=dtype)], product(False, False), **flags)
    for name, dtype in {"bf16": torch.bfloat16, "f16": torch.float16}.items():
        g.case(f"matmul_2d_{name}", "matmul", [g.randn(8, 16, dtype=dtype), g.randn(16, 4, dtype=dtype)],
               product(False, False), transpose_a=False, transpose_b=False)
        g.case(f"matmul_weight_nt_{name}", "matmul",
               [g.randn(2, 3, 16, dtype=dtype), g.randn(5, 16, dtype=dtype)], product(False, True),
               transpose_a=False, transpose_b=True)


def row_cases(g):
    for name, dtype in FLOATS.items():
        for shape in ((4, 7), (2, 3, 5)):
            tag = "x".join(map(str, shape))
            x = g.randn(*shape, dtype=dtype) * 3
            g.case(f"softmax_{tag}_{name}", "softmax", [x], lambda x: torch.softmax(x, -1))
            g.case(f"log_softmax_{tag}_{name}", "log_softmax", [x], lambda x: torch.log_softmax(x, -1))
        for shape in ((4, 8), (2, 3, 16)):
            tag = "x".join(map(str, shape))
            d = shape[-1]
            x = g.randn(*shape, dtype=dtype) * 2 + 0.5
            w, b = g.randn(d, dtype=dtype), g.randn(d, dtype=dtype)
            g.case(f"layer_norm_{tag}_{name}", "layer_norm", [x, w, b],
                   lambda x, w, b: F.layer_norm(x, (d,), w, b, 1e-5), eps=1e-5)
            g.case(f"rms_norm_{tag}_{name}", "rms_norm", [x, w],
                   lambda x, w: F.rms_norm(x, (d,), w, 1e-6), eps=1e-6)


def lookup_cases(g):
    for name, dtype in FLOATS.items():
        table = g.randn(10, 6, dtype=dtype)
        ids = torch.tensor([[1, 4, 1], [9, 0, 4]], dtype=torch.int64)
        g.case(f"embedding_{name}", "embedding", [table, ids], lambda t, i: F.embedding(i, t))
        logits = g.randn(6, 5, dtype=dtype) * 2
        targets = torch.tensor([0, 4, 2, 2, 1, 3], dtype=torch.int64)
        g.case(f"cross_entropy_{name}", "cross_entropy", [logits, targets], F.cross_entropy)
        logits = g.randn(2, 3, 7, dtype=dtype)
        targets = g.randint(7, 2, 3)
        g.case(f"cross_entropy_3d_{name}", "cross_entropy", [logits, targets],
               lambda l, t: F.cross_entropy(l.reshape(-1, 7), t.reshape(-1)))


def optimizer_steps(g, case, op, param, make, state_keys, attributes, steps=3):
    """Runs `steps` steps of torch.optim; records each step as a case (no cotangents)."""
    p = param.detach().clone().requires_grad_(True)
    optimizer = make([p])
    for t in range(1, steps + 1):
        grad = g.randn(*p.shape, dtype=p.dtype)
        state = optimizer.state[p]
        before = [state[k].detach().clone() if k in state else torch.zeros_like(p) for k in state_keys]
        inputs = [p.detach().clone(), grad] + before
        p.grad = grad.clone()
        optimizer.step()
        outputs = [p.detach().clone()] + [optimizer.state[p][k].detach().clone() for k in state_keys]
        name = f"{case}_t{t}"
        for i, x in enumerate(inputs):
            g.tensors[f"{name}.in.{i}"] = x.contiguous()
        for j, x in enumerate(outputs):
            g.tensors[f"{name}.out.{j}"] = x.contiguous()
        g.cases[name] = {"op": op, "step": t, **attributes}


def optimizer_cases(g):
    adamw = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    sgd = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    for name, dtype in FLOATS.items():
        param = g.randn(3, 5, dtype=dtype)
        optimizer_steps(
            g, f"adamw_{name}", "adamw", param,
            lambda ps: torch.optim.AdamW(ps, lr=adamw["lr"], betas=(adamw["beta1"], adamw["beta2"]),
                                         eps=adamw["eps"], weight_decay=adamw["weight_decay"]),
            ["exp_avg", "exp_avg_sq"], adamw)
        optimizer_steps(
            g, f"sgd_{name}", "sgd", param,
            lambda ps: torch.optim.SGD(ps, **sgd), ["momentum_buffer"], sgd)


def main():
    g = Golden("nn", seed=2)
    matmul_cases(g)
    row_cases(g)
    lookup_cases(g)
    optimizer_cases(g)
    g.save()


if __name__ == "__main__":
    main()
