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


def test_packed_eager_attention_takes_back_one_concatenation() -> None:
    """q, k, v handed to eager attention as one tensor (the model's self-attention does) are
    split from it, so their gradients come back as one `cat` into the joint gradient, not as
    three zero-filled full-width tensors summed, which viewing them by index would make."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pretrain.models.attention import packed_disentangled_attention, unpack

    class Log(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[tuple[str, tuple[int, ...]]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.ops.append((func.overloadpacket.__name__, tuple(out.shape)))
            return out

    torch.manual_seed(0)
    qkv = torch.randn(2, 5, 3 * 2 * 4, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    out = packed_disentangled_attention(qkv, 2, None, None, None, mask, 0.5)
    with Log() as log:
        out.sum().backward()
    full = [n for n, shape in log.ops if shape == tuple(qkv.shape) and n != "detach"]
    assert full == ["cat"], log.ops
    q, k, v = (x.detach().requires_grad_() for x in unpack(qkv.detach(), 2))
    assert q.shape == (2, 2, 5, 4) and q.stride() == (5 * 24, 4, 24, 1)  # views, no copy
    assert torch.equal(unpack(qkv, 2)[2], qkv[..., 16:].unflatten(-1, (2, 4)).transpose(1, 2))
