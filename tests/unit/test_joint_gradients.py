"""The joint q/k/v projection (one matmul, its output split) gives the gradients of separate
linear layers."""

from __future__ import annotations

import torch

from pretrain.models.deberta import _joint_linear


def test_joint_linear_gradients_are_plain_splits() -> None:
    torch.manual_seed(0)
    linears = [torch.nn.Linear(6, 4) for _ in range(3)]
    x = torch.randn(2, 5, 6, requires_grad=True)
    weights = [torch.randn(2, 5, 4) for _ in range(3)]
    parts = _joint_linear(x, linears)
    sum((p * w).sum() for p, w in zip(parts, weights, strict=True)).backward()
    got = [x.grad] + [p.grad for m in linears for p in (m.weight, m.bias)]
    x.grad = None
    for m in linears:
        m.zero_grad()
    sum((m(x) * w).sum() for m, w in zip(linears, weights, strict=True)).backward()
    want = [x.grad] + [p.grad for m in linears for p in (m.weight, m.bias)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
