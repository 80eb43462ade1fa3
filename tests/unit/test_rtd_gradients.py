"""Gradients of the RTD objective are exactly what DeBERTa-v3 says they are.

A wrong gradient that still "trains" is the worst bug this project can have, so each sharing
mode's gradient routing is asserted exactly (zeros are zeros, not small), and the combined loss
is checked against float64 central finite differences, which know nothing of our autograd graph.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from pretrain.models.deberta import DebertaConfig
from pretrain.models.rtd import RTDModel
from tests.unit.tiny_rtd import VOCAB, tiny_batch, tiny_model


def run(model: RTDModel, seed: int = 7):
    ids, mask, labels = tiny_batch()
    return model(ids, mask, labels, sampling_generator=torch.Generator().manual_seed(seed))


def grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(
        torch.autograd.grad(
            loss, params, retain_graph=True, allow_unused=True, materialize_grads=True
        )
    )


def is_zero(t: torch.Tensor) -> bool:
    return torch.count_nonzero(t).item() == 0


# ---------------------------------------------------------------- routing of each sharing mode


@pytest.mark.parametrize("position_biased_input", [False, True])
def test_gdes_each_loss_updates_only_its_own_table(position_biased_input: bool) -> None:
    model = tiny_model("gdes", position_biased_input=position_biased_input)
    out = run(model)
    gen = model.generator.embeddings
    tables = [(gen.word_embeddings.weight, model.word_embeddings_delta)]
    if position_biased_input:
        tables.append((gen.position_embeddings.weight, model.position_embeddings_delta))
    for e_gen, e_delta in tables:
        mlm_gen, mlm_delta = grads(out.gen_loss, [e_gen, e_delta])
        rtd_gen, rtd_delta = grads(out.disc_loss, [e_gen, e_delta])
        assert is_zero(rtd_gen), "RTD loss leaked into E_gen through the stop-gradient"
        assert is_zero(mlm_delta), "MLM loss reached E_delta"
        assert not is_zero(mlm_gen) and not is_zero(rtd_delta)


def test_gdes_delta_starts_at_zero_so_disc_starts_with_generator_embeddings() -> None:
    torch.manual_seed(0)
    model = RTDModel(
        DebertaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
        )
    )
    assert is_zero(model.word_embeddings_delta)
    word, _ = model.discriminator_embedding_weights()
    assert torch.equal(word, model.generator.embeddings.word_embeddings.weight)
    assert model.discriminator.embeddings.word_embeddings is None  # no stale third table


def test_es_shared_table_gets_the_sum_of_both_losses() -> None:
    model = tiny_model("es").double()  # f64 so the sum is exact up to accumulation order
    assert model.discriminator.embeddings.word_embeddings is None
    out = run(model)
    e = model.generator.embeddings.word_embeddings.weight
    (mlm,) = grads(out.gen_loss, [e])
    (rtd,) = grads(out.disc_loss, [e])
    assert not is_zero(mlm) and not is_zero(rtd)
    out.loss.backward()
    torch.testing.assert_close(e.grad, mlm + model.rtd.rtd_weight * rtd, rtol=1e-10, atol=1e-14)


def test_nes_tables_are_independent() -> None:
    model = tiny_model("nes")
    out = run(model)
    e_gen = model.generator.embeddings.word_embeddings.weight
    e_disc = model.discriminator.embeddings.word_embeddings.weight
    assert e_gen.data_ptr() != e_disc.data_ptr()
    mlm_gen, mlm_disc = grads(out.gen_loss, [e_gen, e_disc])
    rtd_gen, rtd_disc = grads(out.disc_loss, [e_gen, e_disc])
    assert is_zero(rtd_gen) and is_zero(mlm_disc)
    assert not is_zero(mlm_gen) and not is_zero(rtd_disc)


@pytest.mark.parametrize("sharing", ["gdes", "es", "nes"])
def test_sampling_blocks_every_gradient_from_rtd_to_the_generator(sharing: str) -> None:
    # The discriminator sees sampled ids, which carry no gradient; so the RTD loss reaches the
    # generator only through a shared embedding table, and only in ES.
    model = tiny_model(sharing, enhanced_mask_decoder=True)
    out = run(model)
    assert not out.disc_ids.requires_grad
    shared = model.generator.embeddings.word_embeddings.weight
    generator_side = [
        p for n, p in model.named_parameters() if n.startswith(("generator.", "mlm_head.", "emd."))
    ]
    for p, g in zip(generator_side, grads(out.disc_loss, generator_side), strict=True):
        if sharing == "es" and p is shared:
            assert not is_zero(g)
        else:
            assert is_zero(g)
    # ... and the MLM loss never reaches the discriminator side.
    disc_side = [
        p for n, p in model.named_parameters() if n.startswith(("discriminator.", "rtd_head."))
    ]
    assert all(is_zero(g) for g in grads(out.gen_loss, disc_side))


# ------------------------------------------------------------------ finite differences (f64)


def loss_fn(model: RTDModel, which: str = "loss"):
    """The objective as a pure function of a parameter dict, with sampling noise held fixed."""
    ids, mask, labels = tiny_batch()

    def f(params: dict[str, torch.Tensor]):
        out = functional_call(
            model,
            params,
            (ids, mask, labels),
            {"sampling_generator": torch.Generator().manual_seed(7)},
        )
        return getattr(out, which), out.disc_ids

    return f


def directional_fd(
    f, params: dict[str, torch.Tensor], name: str, direction: torch.Tensor, eps=1e-6
):
    plus = {**params, name: params[name] + eps * direction}
    minus = {**params, name: params[name] - eps * direction}
    (f_plus, ids_plus), (f_minus, ids_minus) = f(plus), f(minus)
    _, ids_base = f(params)
    # The sampled corruption must not flip inside the stencil, or the FD crosses a step.
    assert torch.equal(ids_plus, ids_base) and torch.equal(ids_minus, ids_base)
    return ((f_plus - f_minus) / (2 * eps)).item()


@pytest.mark.parametrize("sharing", ["gdes", "es", "nes"])
def test_combined_loss_gradient_matches_finite_differences(sharing: str) -> None:
    model = tiny_model(sharing, position_biased_input=True).double()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    f = loss_fn(model)
    loss, _ = f(params)
    autograd = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    # Under GDES the generator tables' autograd gradient deliberately omits the path through
    # the discriminator; they are checked against the MLM loss alone in the next test.
    stopped = {
        "generator.embeddings.word_embeddings.weight",
        "generator.embeddings.position_embeddings.weight",
    }
    g = torch.Generator().manual_seed(3)
    checked = 0
    for name, p in params.items():
        if sharing == "gdes" and name in stopped:
            continue
        direction = torch.randn(p.shape, generator=g, dtype=p.dtype)
        expected = directional_fd(f, params, name, direction)
        got = (autograd[name] * direction).sum().item()
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-8), name
        checked += 1
    assert checked >= 40


def test_gdes_generator_table_gradient_is_the_mlm_gradient_only() -> None:
    model = tiny_model("gdes", position_biased_input=True).double()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    total, mlm, rtd = (
        loss_fn(model, "loss"),
        loss_fn(model, "gen_loss"),
        loss_fn(model, "disc_loss"),
    )
    loss, _ = total(params)
    names = [
        "generator.embeddings.word_embeddings.weight",
        "generator.embeddings.position_embeddings.weight",
    ]
    autograd = torch.autograd.grad(loss, [params[n] for n in names])
    g = torch.Generator().manual_seed(4)
    for name, grad in zip(names, autograd, strict=True):
        direction = torch.randn(params[name].shape, generator=g, dtype=torch.float64)
        got = (grad * direction).sum().item()
        assert got == pytest.approx(
            directional_fd(mlm, params, name, direction), rel=1e-5, abs=1e-8
        )
        # The true derivative of the total differs by the stopped RTD path: the stop-gradient
        # is doing something, and exactly that.
        through_disc = directional_fd(rtd, params, name, direction)
        assert abs(through_disc) > 1e-6
        assert directional_fd(total, params, name, direction) == pytest.approx(
            got + model.rtd.rtd_weight * through_disc, rel=1e-5, abs=1e-8
        )
