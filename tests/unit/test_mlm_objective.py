"""`mlm_objective` (chunked decoder + cross-entropy + argmax + sampling) against the plain ops.

The reference is what the chunking replaces: full [N, V] logits from the tied decoder,
`F.cross_entropy(reduction="sum")` differentiated by autograd, `argmax`, and
`sample_replacements` on the same logits. The gradient path through the whole RTD model is
also checked by finite differences in test_rtd_gradients.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.models.heads import mlm_objective, sample_replacements

N, V, E = 37, 50, 8


def inputs(dtype: torch.dtype, n: int = N, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "states": torch.randn(n, E, generator=g, dtype=dtype).requires_grad_(True),
        "weight": (0.5 * torch.randn(V, E, generator=g, dtype=dtype)).requires_grad_(True),
        "bias": (0.1 * torch.randn(V, generator=g, dtype=dtype)).requires_grad_(True),
        "targets": torch.randint(0, V, (n,), generator=g),
        "uniforms": torch.rand(n, generator=g, dtype=torch.float64),
    }


def reference(x: dict[str, torch.Tensor], temperature: float, exclude: bool):
    logits = torch.matmul(x["states"], x["weight"].t()) + x["bias"]
    half = logits.dtype in (torch.float16, torch.bfloat16)
    loss = F.cross_entropy(logits.float() if half else logits, x["targets"], reduction="sum")
    with torch.no_grad():
        sampled = sample_replacements(
            logits, temperature, x["targets"] if exclude else None, uniforms=x["uniforms"]
        )
    return loss, sampled, logits.argmax(-1)


def grads(loss: torch.Tensor, x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [x["states"], x["weight"], x["bias"]]))


@pytest.mark.parametrize("chunk_rows", [1, 5, N, 100])
@pytest.mark.parametrize(("temperature", "exclude"), [(1.0, False), (0.7, True)])
def test_float64_matches_cross_entropy_argmax_and_sampling(
    chunk_rows: int, temperature: float, exclude: bool
) -> None:
    x = inputs(torch.float64)
    ref_loss, ref_sampled, ref_predicted = reference(x, temperature, exclude)
    out = mlm_objective(
        x["states"], x["weight"], x["bias"], x["targets"], x["uniforms"], temperature, exclude,
        chunk_rows=chunk_rows,
    )  # fmt: skip
    torch.testing.assert_close(out.loss_sum, ref_loss, rtol=1e-12, atol=0)
    assert torch.equal(out.predicted, ref_predicted)
    assert torch.equal(out.sampled, ref_sampled)
    if exclude:
        assert not (out.sampled == x["targets"]).any()
    # A non-unit upstream gradient, as a mean over rows and a loss scale give it.
    for got, want in zip(grads(3.5 * out.loss_sum, x), grads(3.5 * ref_loss, x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_bf16_autocast_matches_the_plain_ops_under_autocast() -> None:
    # Stated tolerance: both sides make bf16 logits; ours sums d_weight over chunks in fp32
    # where autograd rounds one bf16 matmul, so gradients agree to bf16's ~3 digits.
    x = inputs(torch.float32, n=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, _, _ = reference(x, 1.0, False)
        out = mlm_objective(
            x["states"], x["weight"], x["bias"], x["targets"], x["uniforms"], chunk_rows=16
        )
    assert out.loss_sum.dtype == torch.float32
    torch.testing.assert_close(out.loss_sum, ref_loss, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads(out.loss_sum, x), grads(ref_loss, x), strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def saved_shapes(fn) -> list[tuple[int, ...]]:
    """Shapes of every tensor autograd saves for backward while `fn` runs."""
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_never_saves_logits_not_even_a_chunk() -> None:
    x = inputs(torch.float32, n=200)
    plain = saved_shapes(lambda: reference(x, 1.0, False))
    assert (200, V) in plain  # the probe sees the logits the plain ops save
    ours = saved_shapes(
        lambda: mlm_objective(
            x["states"], x["weight"], x["bias"], x["targets"], x["uniforms"], chunk_rows=16
        )
    )
    # Only the gradients: d_states [N, E], d_weight [V, E], d_bias [V]; no [rows, V] tensor.
    assert sorted(ours) == sorted([(200, E), (V, E), (V,)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_without_autocast(dtype: torch.dtype) -> None:
    # How DeepSpeed runs bf16/fp16: the parameters themselves are half, no autocast. Both
    # sides make half logits and upcast them; ours sums d_weight over chunks in fp32.
    x = {k: v.detach().to(dtype).requires_grad_(True) if v.is_floating_point() and k != "uniforms"
         else v for k, v in inputs(torch.float32, n=64).items()}  # fmt: skip
    ref_loss, _, ref_predicted = reference(x, 1.0, False)
    out = mlm_objective(
        x["states"], x["weight"], x["bias"], x["targets"], x["uniforms"], chunk_rows=16
    )
    assert out.loss_sum.dtype == torch.float32
    torch.testing.assert_close(out.loss_sum, ref_loss.float(), rtol=1e-5, atol=1e-4)
    assert torch.equal(out.predicted, ref_predicted)
    for got, want in zip(grads(out.loss_sum, x), grads(ref_loss, x), strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(
            got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item()
        )


def test_float64_stays_float64_under_autocast() -> None:
    x = inputs(torch.float64)
    ref_loss, _, _ = reference(x, 1.0, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mlm_objective(x["states"], x["weight"], x["bias"], x["targets"], x["uniforms"])
    assert out.loss_sum.dtype == torch.float64
    torch.testing.assert_close(out.loss_sum, ref_loss, rtol=1e-12, atol=0)


def test_chunk_rows_below_one_is_refused() -> None:
    x = inputs(torch.float32)
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        mlm_objective(
            x["states"], x["weight"], x["bias"], x["targets"], x["uniforms"], chunk_rows=0
        )


def test_without_grad_it_computes_the_same_and_records_nothing() -> None:
    x = inputs(torch.float64)
    with_grad = mlm_objective(x["states"], x["weight"], x["bias"], x["targets"], x["uniforms"])
    with torch.no_grad():
        without = mlm_objective(x["states"], x["weight"], x["bias"], x["targets"], x["uniforms"])
    assert not without.loss_sum.requires_grad
    torch.testing.assert_close(without.loss_sum, with_grad.loss_sum.detach(), rtol=0, atol=0)
    assert torch.equal(without.sampled, with_grad.sampled)


def test_frozen_table_gets_no_gradient_and_no_rows_is_zero() -> None:
    x = inputs(torch.float64)
    x["weight"].requires_grad_(False)
    out = mlm_objective(x["states"], x["weight"], x["bias"], x["targets"], x["uniforms"])
    out.loss_sum.backward()
    assert x["weight"].grad is None and x["states"].grad is not None

    empty = inputs(torch.float64, n=0)
    out = mlm_objective(
        empty["states"], empty["weight"], empty["bias"], empty["targets"], empty["uniforms"]
    )
    out.loss_sum.backward()
    assert out.loss_sum.item() == 0.0 and out.sampled.shape == (0,)
    assert empty["weight"].grad is not None and not empty["weight"].grad.any()


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gpu_bf16_autocast_matches_the_plain_ops_at_v3_vocabulary(impl: str) -> None:
    # v3's 128100-token vocabulary, several chunks of rows: the shape the chunking is for;
    # each chunk reduced by torch ops or by the Triton kernel (`mlm_kernel`).
    g = torch.Generator(device="cuda").manual_seed(0)
    n, vocab, e = 3000, 128100, 768
    x = {
        "states": torch.randn(n, e, generator=g, device="cuda").requires_grad_(True),
        "weight": (0.05 * torch.randn(vocab, e, generator=g, device="cuda")).requires_grad_(True),
        "bias": torch.zeros(vocab, device="cuda").requires_grad_(True),
        "targets": torch.randint(0, vocab, (n,), generator=g, device="cuda"),
        "uniforms": torch.rand(n, generator=g, device="cuda"),
    }
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref_loss, _, ref_predicted = reference(x, 1.0, False)
        out = mlm_objective(
            x["states"], x["weight"], x["bias"], x["targets"], x["uniforms"], chunk_rows=512,
            impl=impl,
        )  # fmt: skip
    torch.testing.assert_close(out.loss_sum, ref_loss, rtol=1e-4, atol=0)
    assert (out.predicted == ref_predicted).float().mean() > 0.99
    for got, want in zip(grads(out.loss_sum, x), grads(ref_loss, x), strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
