"""Shared writer of golden files for meshflow-ops tests.

Convention (every scripts/golden/<group>.py follows it):
  ops/tests/golden/<group>.safetensors holds, per case named <case>:
    <case>.in.<i>    inputs
    <case>.out.<j>   forward outputs (torch)
    <case>.cot.<j>   random cotangents, one per float output
    <case>.grad.<i>  gradient of sum_j sum(out_j * cot_j) w.r.t. float input i (zeros if unused)
  and the safetensors metadata key "cases" = JSON {case: {"op": name, ...attributes}}.

Usage:
    from golden import Golden
    g = Golden("core")
    g.case("add_f32", "add", [g.randn(3, 4), g.randn(4)], lambda a, b: a + b)
    g.save()
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


class Golden:
    """Collects cases and writes ops/tests/golden/<group>.safetensors."""

    def __init__(self, group, seed=0):
        self.group = group
        self.generator = torch.Generator().manual_seed(seed)
        self.tensors = {}
        self.cases = {}

    def randn(self, *shape, dtype=torch.float32):
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float64).to(dtype)

    def rand(self, *shape, low=0.0, high=1.0, dtype=torch.float32):
        u = torch.rand(tuple(shape), generator=self.generator, dtype=torch.float64)
        return (low + (high - low) * u).to(dtype)

    def randint(self, high, *shape, dtype=torch.int64):
        return torch.randint(0, high, shape, generator=self.generator).to(dtype)

    def case(self, name, op, inputs, fn, **attributes):
        """Runs fn(*inputs) with autograd and stores inputs, outputs, cotangents, gradients."""
        if name in self.cases:
            raise ValueError(f"case {name} twice")
        inputs = [x.detach().clone().contiguous() for x in inputs]
        leaves = [x.requires_grad_(True) if x.is_floating_point() else x for x in inputs]
        outputs = fn(*leaves)
        if not isinstance(outputs, (tuple, list)):
            outputs = (outputs,)
        float_outputs, cotangents = [], []
        for j, out in enumerate(outputs):
            self.tensors[f"{name}.out.{j}"] = out.detach().contiguous()
            if out.is_floating_point() and out.requires_grad:
                cot = self.randn(*out.shape, dtype=out.dtype)
                self.tensors[f"{name}.cot.{j}"] = cot
                float_outputs.append(out)
                cotangents.append(cot)
        float_inputs = [i for i, x in enumerate(leaves) if x.is_floating_point()]
        grads = [None] * len(float_inputs)
        if float_outputs and float_inputs:
            grads = torch.autograd.grad(
                float_outputs,
                [leaves[i] for i in float_inputs],
                grad_outputs=cotangents,
                allow_unused=True,
            )
        for i, x in enumerate(leaves):
            self.tensors[f"{name}.in.{i}"] = x.detach().contiguous()
        for i, grad in zip(float_inputs, grads):
            if grad is None:
                grad = torch.zeros_like(leaves[i])
            self.tensors[f"{name}.grad.{i}"] = grad.detach().contiguous()
        self.cases[name] = {"op": op, **attributes}

    def save(self):
        path = os.path.join(ROOT, "ops", "tests", "golden", f"{self.group}.safetensors")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tensors = {k: v.clone() for k, v in self.tensors.items()}
        save_file(tensors, path, metadata={"cases": json.dumps(self.cases, sort_keys=True)})
        size = os.path.getsize(path)
        print(f"{path}: {len(self.cases)} cases, {size} bytes", file=sys.stderr)
        if size > 1 << 20:
            raise SystemExit(f"{path} is over 1 MiB; shrink the cases")
