"""The joint q/k/v projection's split takes its gradients back without a copy when they are
adjacent slices of one buffer, and copies them otherwise."""

from __future__ import annotations

import torch

from pretrain.models.attention import joined
from pretrain.models.deberta import _joint_linear, _SplitLast


def test_joined_finds_adjacent_slices_only() -> None:
    y = torch.randn(2, 5, 12)
    a, b, c = y.split(4, dim=-1)
    whole = joined([a, b, c])
    assert whole is not None and whole.data_ptr() == y.data_ptr() and torch.equal(whole, y)
    pair = joined([b, c])
    assert pair is not None and torch.equal(pair, y[..., 4:])
    assert joined([a, c]) is None  # a gap
    assert joined([b, a]) is None  # out of order
    assert joined([a, None, c]) is None
    assert joined([a, torch.randn(2, 5, 12)[..., 4:8]]) is None  # another buffer
    assert joined([a, b.to(torch.float64)]) is None
    heads = torch.randn(2, 3, 4, 8).transpose(1, 2)  # [2, 4, 3, 8], rows of 24 elements
    assert torch.equal(joined(list(heads.split(4, dim=-1))), heads)
    # slices whose rows would overlap once joined: a [6, 2] buffer read as rows of 1
    narrow = torch.randn(6, 2).as_strided((6, 1), (1, 1))
    assert joined([narrow, narrow.as_strided((6, 1), (1, 1), 1)]) is None


def _grad_of_split(grads: list[torch.Tensor | None]) -> torch.Tensor:
    """The gradient `_SplitLast` hands to the tensor it split, given its outputs' gradients."""
    y = torch.randn(2, 5, 12, requires_grad=True)
    seen: list[torch.Tensor] = []
    z = y * 1.0  # a non-leaf, whose incoming gradient a hook sees as it is
    z.register_hook(lambda g: seen.append(g))
    parts = _SplitLast.apply(z, [4, 4, 4])
    torch.autograd.backward(
        [p for p, g in zip(parts, grads, strict=True) if g is not None],
        [g for g in grads if g is not None],
    )
    return seen[0]


def test_split_takes_back_one_buffer_and_copies_anything_else() -> None:
    buffer = torch.randn(2, 5, 12)
    got = _grad_of_split(list(buffer.split(4, dim=-1)))
    assert got.data_ptr() == buffer.data_ptr() and torch.equal(got, buffer)  # no copy
    apart = [torch.randn(2, 5, 4) for _ in range(3)]
    got = _grad_of_split(apart)  # separate gradients: a cat, as split's own backward
    assert got.data_ptr() != apart[0].data_ptr() and torch.equal(got, torch.cat(apart, -1))
    got = _grad_of_split([apart[0], None, apart[2]])  # an unused output: zeros there
    assert torch.equal(got, torch.cat([apart[0], torch.zeros(2, 5, 4), apart[2]], -1))


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
