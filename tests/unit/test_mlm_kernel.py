"""The MLM row kernel (`mlm_kernel`, `mlm_objective(impl="triton")`) against the torch path.

The oracle is the torch path of `mlm_objective`, itself checked against the plain ops (full
logits, `F.cross_entropy`, autograd, `argmax`, `sample_replacements`) in test_mlm_objective.py;
float64 references where the kernel's fp32 rounding would otherwise decide a draw.

On CPU the kernel runs under Triton's interpreter, in a subprocess (see `interpreter.py`).
Tolerances: fp32, 1e-5 relative on the loss and 1e-5 (abs + rel) on gradients (measured
<= 1e-6); fp16 parameters, 2e-2 of each gradient's largest entry, as test_mlm_objective's
half-precision case. Argmax and draws: equal.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pretrain.models import heads  # noqa: E402
from pretrain.models.heads import mlm_objective  # noqa: E402
from tests.unit.interpreter import INTERPRETED, interpreted, run_interpreted  # noqa: E402

E = 8


@pytest.mark.skipif(INTERPRETED, reason="this is that subprocess")
def test_kernel_under_triton_interpreter() -> None:
    run_interpreted(__file__)


def _inputs(n: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "states": torch.randn(n, E, generator=g).to(dtype).requires_grad_(True),
        "weight": (0.5 * torch.randn(vocab, E, generator=g)).to(dtype).requires_grad_(True),
        "bias": (0.1 * torch.randn(vocab, generator=g)).to(dtype).requires_grad_(True),
        "targets": torch.randint(0, vocab, (n,), generator=g),
        "uniforms": torch.rand(n, generator=g),
    }


def _run(x: dict[str, torch.Tensor], impl: str, **kw):
    out = mlm_objective(
        x["states"], x["weight"], x["bias"], x["targets"], x["uniforms"], impl=impl, **kw
    )
    leaves = [x["states"], x["weight"], x["bias"]]
    return out, torch.autograd.grad(2.5 * out.loss_sum, leaves)


@interpreted
@pytest.mark.parametrize("vocab", [50, 300])  # one block of 64; several, the last partial
@pytest.mark.parametrize("chunk_rows", [1, 7, 100])
@pytest.mark.parametrize(("temperature", "exclude"), [(1.0, False), (0.7, True)])
def test_fp32_matches_the_torch_path(
    vocab: int, chunk_rows: int, temperature: float, exclude: bool
) -> None:
    x = _inputs(37, vocab, torch.float32)
    kw = dict(temperature=temperature, exclude_original=exclude, chunk_rows=chunk_rows)
    want, want_grads = _run(x, "torch", **kw)
    got, got_grads = _run(x, "triton", **kw)
    torch.testing.assert_close(got.loss_sum, want.loss_sum, rtol=1e-5, atol=0)
    assert torch.equal(got.predicted, want.predicted)
    assert torch.equal(got.sampled, want.sampled)
    if exclude:
        assert not (got.sampled == x["targets"]).any()
    for name, a, b in zip(("states", "weight", "bias"), got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@interpreted
def test_fp16_parameters_match_the_torch_path() -> None:
    # How DeepSpeed runs fp16: half parameters, no autocast. The kernel stores softmax - one_hot
    # in fp16 for the two gradient matmuls, as the torch path casts it before them.
    x = _inputs(64, 300, torch.float16)
    want, want_grads = _run(x, "torch", chunk_rows=16)
    got, got_grads = _run(x, "triton", chunk_rows=16)
    assert got.loss_sum.dtype == torch.float32
    torch.testing.assert_close(got.loss_sum, want.loss_sum, rtol=1e-5, atol=1e-4)
    assert torch.equal(got.predicted, want.predicted)
    assert torch.equal(got.sampled, want.sampled)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert a.dtype == torch.float16
        tol = 2e-2 * b.abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=tol)


@interpreted
def test_bf16_autocast_bias_gradient_is_as_accurate_as_the_torch_paths() -> None:
    # Under autocast the kernel stores softmax - one_hot in bf16 for the matmuls; at a target
    # that entry is p - 1, where bf16's steps are 2^-8, and rows sharing a target would add up
    # roundings of one sign (0.3% of the bias gradient here before the kernel added them back).
    # Against float64: at the frequent targets, better than bf16's resolution; elsewhere, where
    # the bf16 logits' own error dominates, within 4x of the torch path's (which sums fp32).
    g = torch.Generator().manual_seed(0)
    n, vocab = 512, 300
    base = {
        "states": torch.randn(n, E, generator=g),
        "weight": 0.5 * torch.randn(vocab, E, generator=g),
        "bias": 0.1 * torch.randn(vocab, generator=g),
        "targets": torch.randint(0, 4, (n,), generator=g),  # four frequent targets
        "uniforms": torch.rand(n, generator=g),
    }

    def bias_grad(dtype: torch.dtype, impl: str, autocast: bool) -> torch.Tensor:
        x = {k: v.to(dtype).requires_grad_() if v.is_floating_point() and k != "uniforms" else v
             for k, v in base.items()}  # fmt: skip
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got, grads = _run(x, impl)
        return grads[2].double()

    reference = bias_grad(torch.float64, "torch", autocast=False)
    err = {
        impl: (bias_grad(torch.float32, impl, autocast=True) - reference).abs()
        for impl in ("torch", "triton")
    }
    assert (err["triton"][:4] / reference[:4].abs()).max() <= 2**-9, err
    assert err["triton"][4:].max() <= 4 * err["torch"][4:].max(), err


def _fixed_logits(logits: torch.Tensor, targets: list[int], uniforms: list[float]):
    """States and a table whose products are 0, so the bias alone sets the logits."""
    n, vocab = logits.shape
    assert n == 1
    return {
        "states": torch.zeros(n, E, requires_grad=True),
        "weight": torch.zeros(vocab, E, requires_grad=True),
        "bias": logits[0].clone().requires_grad_(True),
        "targets": torch.tensor(targets),
        "uniforms": torch.tensor(uniforms),
    }


@interpreted
@pytest.mark.parametrize(
    "tied",
    [
        [250, 150, 70],  # three blocks of 64, each in another lane
        [250, 134, 70],  # 70 and 134 in one lane of two blocks
        [130, 70],  # the first maximum in a higher lane (6) than a later one (2)
    ],
)
def test_argmax_takes_the_first_of_tied_maxima_across_blocks(tied: list[int]) -> None:
    logits = torch.zeros(1, 300)
    logits[0, tied] = 3.0
    got, _ = _run(_fixed_logits(logits, [0], [0.5]), "triton")
    assert got.predicted.tolist() == [70]


@interpreted
@pytest.mark.parametrize(
    ("u", "exclude", "want"),
    [
        (0.0, False, 0),  # the first token with mass
        (0.0, True, 1),  # the target (0) excluded
        (0.999999, False, 299),  # the last token
        (0.999999, True, 298),  # ... unless it is the excluded target
        (0.501, False, 150),  # uniform over 300: past 150 of them
        (127.5 / 300, False, 127),  # the last token of a block of 64
        (128.5 / 300, False, 128),  # the first of the next
        (1.0, False, 299),  # u past all the mass (torch.rand never draws 1): the last token
        (1.0, True, 298),  # ... with mass, never the excluded target (torch's path clamps to it)
    ],
)
def test_draws_at_the_ends_and_never_the_excluded_target(u: float, exclude: bool, want: int):
    target = 299 if exclude and u > 0.5 else 0
    x = _fixed_logits(torch.zeros(1, 300), [target], [u])
    got, _ = _run(x, "triton", exclude_original=exclude)
    assert got.sampled.tolist() == [want]
    if u < 1.0:
        want_torch, _ = _run(_fixed_logits(torch.zeros(1, 300), [target], [u]), "torch",
                             exclude_original=exclude)  # fmt: skip
        assert want_torch.sampled.tolist() == [want]


@interpreted
@pytest.mark.parametrize(("seed", "vocab"), [(0, 64), (7, 100)])  # one block; the last of two
def test_a_threshold_within_rounding_of_the_total_draws_the_last_token(seed: int, vocab: int):
    # With u just under 1 the block sum (a tree) passes u * total where the running sum along
    # the block (a scan) does not, for these logits: the search in the block finds no token
    # past it, and the draw falls back to the block's last token with mass, not index V.
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(1, vocab, generator=g)
    u = 1.0 - 2**-24
    got, _ = _run(_fixed_logits(logits, [0], [u]), "triton")
    want, _ = _run(_fixed_logits(logits, [0], [u]), "torch")
    assert got.sampled.tolist() == want.sampled.tolist() == [vocab - 1]


@interpreted
def test_strided_targets_uniforms_and_bias() -> None:
    x = _inputs(10, 300, torch.float32)
    want, want_grads = _run(x, "torch")
    strided = {
        **x,
        "targets": torch.stack([x["targets"], x["targets"]], 1)[:, 0],
        "uniforms": torch.stack([x["uniforms"], x["uniforms"]], 1)[:, 0],
        "bias": torch.stack([x["bias"].detach(), x["bias"].detach()], 1)[:, 0].requires_grad_(),
    }
    assert strided["targets"].stride() == (2,) and strided["bias"].stride() == (2,)
    got, got_grads = _run(strided, "triton")
    torch.testing.assert_close(got.loss_sum, want.loss_sum, rtol=1e-5, atol=0)
    assert torch.equal(got.sampled, want.sampled)


@interpreted
def test_float64_model_reduces_in_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel computes in fp32; a float64 model keeps float64 through the torch path.
    monkeypatch.setattr(heads, "MLM_IMPL", "triton")
    x = _inputs(37, 50, torch.float64)
    got, _ = _run(x, None)  # type: ignore[arg-type]
    want, _ = _run(x, "torch")
    assert got.loss_sum.dtype == torch.float64
    torch.testing.assert_close(got.loss_sum, want.loss_sum, rtol=1e-12, atol=0)


def test_auto_reduces_in_torch_off_cuda() -> None:
    # The default: the kernel on CUDA only, so a CPU run never needs Triton's interpreter.
    assert heads.MLM_IMPL == "auto"
    x = _inputs(37, 50, torch.float32)
    got, got_grads = _run(x, "auto")
    want, want_grads = _run(x, "torch")
    assert torch.equal(got.loss_sum, want.loss_sum) and torch.equal(got.sampled, want.sampled)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.equal(g, w)


def test_unknown_impl_is_refused() -> None:
    x = _inputs(3, 50, torch.float32)
    with pytest.raises(ValueError, match="impl must be 'torch', 'triton' or 'auto'"):
        _run(x, "cuda")
