"""The RTD pair's forward: labels, sampling, metrics, the derived generator and the EMD."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.models.deberta import DebertaConfig
from pretrain.models.heads import EnhancedMaskDecoder, RTDHead, sample_replacements
from pretrain.models.rtd import (
    IGNORE_INDEX,
    RTDConfig,
    RTDModel,
    generator_config,
    masked_rows_of,
    rtd_metrics,
)
from tests.unit.tiny_rtd import MASK_ID, VOCAB, tiny_batch, tiny_model


def forced_generator_model(token: int, **rtd_kwargs) -> RTDModel:
    """A model whose generator samples `token` with probability ~1 (huge output bias)."""
    model = tiny_model("gdes", **rtd_kwargs)
    with torch.no_grad():
        model.mlm_head.bias.zero_()
        model.mlm_head.bias[token] = 100.0
    return model


def test_sampled_original_is_not_replaced() -> None:
    model = forced_generator_model(7)
    ids, mask, labels = tiny_batch()
    masked = labels != IGNORE_INDEX
    # Half the masked positions hold 7 originally: the generator "guesses" them right.
    originals = torch.where(torch.arange(ids.numel()).view(ids.shape) % 2 == 0, 7, 9)
    labels = torch.where(masked, originals, labels)
    out = model(ids, mask, labels, sampling_generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.disc_ids[masked], torch.full_like(out.disc_ids[masked], 7))
    assert torch.equal(out.replaced, masked & (labels != 7))
    assert out.replaced.sum() > 0 and (masked & ~out.replaced).sum() > 0
    # unmasked positions reach the discriminator unchanged, padding is never "replaced"
    assert torch.equal(out.disc_ids[~masked], ids[~masked])
    assert not out.replaced[mask == 0].any()


def test_exclude_original_always_replaces() -> None:
    model = forced_generator_model(7, exclude_original=True)
    ids, mask, labels = tiny_batch()
    masked = labels != IGNORE_INDEX
    labels = torch.where(masked, torch.full_like(labels, 7), labels)
    out = model(ids, mask, labels, sampling_generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.replaced, masked)
    assert out.metrics["replaced_frac"].item() == 1.0


def test_sampling_follows_tempered_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(40000, 1)
    for temperature in (1.0, 2.0):
        g = torch.Generator().manual_seed(0)
        counts = torch.bincount(sample_replacements(logits, temperature, generator=g), minlength=4)
        expected = torch.softmax(logits[0] / temperature, -1) * logits.shape[0]
        chi2 = (((counts - expected) ** 2) / expected).sum().item()
        assert chi2 < 16.3  # chi-square, 3 dof, p = 0.001


def test_sampling_is_deterministic_given_generator_and_excludes() -> None:
    logits = torch.randn(64, 11)
    a = sample_replacements(logits, generator=torch.Generator().manual_seed(5))
    b = sample_replacements(logits, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    exclude = logits.argmax(-1)
    big = logits.clone()
    big[torch.arange(64), exclude] = 1e4
    sampled = sample_replacements(big, exclude=exclude, generator=torch.Generator().manual_seed(0))
    assert not (sampled == exclude).any()


def test_metrics_against_hand_count() -> None:
    gen_predicted = torch.tensor([1, 0, 1])
    targets = torch.tensor([1, 1, 1])  # 2 of 3 right
    disc_logits = torch.tensor([[3.0, -1.0, 2.0, -4.0]])
    replaced = torch.tensor([[True, True, False, False]])
    valid = torch.tensor([[True, True, True, False]])
    masked = torch.tensor([[True, True, True, False]])
    m = rtd_metrics(gen_predicted, targets, disc_logits, replaced, valid, masked)
    assert m["gen_acc"].item() == pytest.approx(2 / 3)
    # predicted replaced: positions 0, 2 (3 is padding); correct: 0 (TP), 1 (FN), 2 (FP) -> 1/3
    assert m["disc_acc"].item() == pytest.approx(1 / 3)
    assert m["disc_precision"].item() == pytest.approx(1 / 2)
    assert m["disc_recall"].item() == pytest.approx(1 / 2)
    assert m["replaced_frac"].item() == pytest.approx(2 / 3)


def test_losses_are_the_textbook_formulas() -> None:
    model = tiny_model("nes").eval()
    ids, mask, labels = tiny_batch()
    out = model(ids, mask, labels, sampling_generator=torch.Generator().manual_seed(1))
    masked = labels != IGNORE_INDEX
    hidden = model.generator(ids, mask)[masked]
    logits = model.mlm_head(hidden, model.generator.embeddings.word_embeddings.weight)
    log_probs = torch.log_softmax(logits, -1)
    mlm = -log_probs[torch.arange(len(logits)), labels[masked]].mean()
    p = torch.sigmoid(out.disc_logits[mask.bool()])
    y = out.replaced[mask.bool()].float()
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    torch.testing.assert_close(out.gen_loss, mlm)
    torch.testing.assert_close(out.disc_loss, bce)
    torch.testing.assert_close(out.loss, mlm + 10.0 * bce)


def test_nothing_masked_gives_zero_mlm_loss_not_nan() -> None:
    model = tiny_model("gdes")
    ids, mask, _ = tiny_batch()
    out = model(ids, mask, torch.full_like(ids, IGNORE_INDEX))
    assert out.gen_loss.item() == 0.0 and math.isfinite(out.loss.item())


def test_generator_is_derived_from_discriminator() -> None:
    disc = DebertaConfig(
        hidden_size=64, num_hidden_layers=12, num_attention_heads=4, intermediate_size=128
    )
    assert generator_config(disc, 0.5).num_hidden_layers == 6
    assert generator_config(disc, 1 / 3).num_hidden_layers == 4
    gen = generator_config(disc, 0.5)
    assert (gen.hidden_size, gen.num_attention_heads, gen.vocab_size) == (64, 4, disc.vocab_size)
    model = RTDModel(
        DebertaConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=32,
        ),
        RTDConfig(generator_depth_ratio=0.25),
    )
    assert len(model.generator.encoder.layer) == 1 and len(model.discriminator.encoder.layer) == 4


def test_emd_with_zero_positions_and_one_step_is_the_last_layer() -> None:
    # Re-running the last layer with query = H_{n-1} (no positions added) recomputes H_n: an
    # independent check that EMD wires keys, values and queries the way DeBERTa does.
    model = tiny_model("gdes", enhanced_mask_decoder=True, emd_steps=1).eval()
    ids, mask, _ = tiny_batch()
    with torch.no_grad():
        model.emd.position_embeddings.weight.zero_()
        states = model.generator.forward_layers(ids, mask)
        emd = model.emd(states[-2], mask, model.generator.encoder)
    torch.testing.assert_close(emd, states[-1], rtol=0, atol=1e-6)


def test_emd_positions_train_from_mlm_only() -> None:
    model = tiny_model("gdes", enhanced_mask_decoder=True)
    ids, mask, labels = tiny_batch()
    out = model(ids, mask, labels)
    table = model.emd.position_embeddings.weight
    (from_mlm,) = torch.autograd.grad(out.gen_loss, [table], retain_graph=True)
    (from_rtd,) = torch.autograd.grad(
        out.disc_loss, [table], allow_unused=True, materialize_grads=True
    )
    assert torch.count_nonzero(from_mlm) > 0 and torch.count_nonzero(from_rtd) == 0


def test_emd_refuses_absolute_positions_in_the_input() -> None:
    config = DebertaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        position_biased_input=True,
    )
    with pytest.raises(ValueError, match="position_biased_input"):
        EnhancedMaskDecoder(config)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(embedding_sharing="shared"), "embedding_sharing"),
        (dict(generator_depth_ratio=0.0), "generator_depth_ratio"),
        (dict(temperature=0.0), "temperature"),
        (dict(rtd_weight=-1.0), "rtd_weight"),
    ],
)
def test_bad_rtd_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RTDConfig(**kwargs)


def test_mask_token_id_is_never_sampled_into_unmasked_positions() -> None:
    model = tiny_model("es")
    ids, mask, labels = tiny_batch()
    out = model(ids, mask, labels)
    assert not (out.disc_ids[labels == IGNORE_INDEX] == MASK_ID).any()


def test_given_uniforms_decide_the_draw_by_inverse_cdf() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).repeat(5, 1)
    u = torch.tensor([0.05, 0.15, 0.35, 0.65, 0.999])
    # cdf = 0.1, 0.3, 0.6, 1.0: u falls in token 0, 1, 2, 3, 3
    sampled = sample_replacements(logits, uniforms=u, generator=torch.Generator().manual_seed(9))
    assert sampled.tolist() == [0, 1, 2, 3, 3]


def test_sampling_noise_in_the_batch_makes_corruption_independent_of_rng() -> None:
    model = tiny_model("gdes")
    ids, mask, labels = tiny_batch()
    noise = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3))
    a = model(
        ids, mask, labels, sampling_generator=torch.Generator().manual_seed(1), sampling_noise=noise
    )
    b = model(
        ids, mask, labels, sampling_generator=torch.Generator().manual_seed(2), sampling_noise=noise
    )
    assert torch.equal(a.disc_ids, b.disc_ids)
    # ... and a row's corruption depends only on its own noise, not on the rest of the batch
    c = model(ids[:1], mask[:1], labels[:1], sampling_noise=noise[:1])
    assert torch.equal(c.disc_ids[0], a.disc_ids[0])


def test_rtd_head_is_debertas_replaced_token_detector() -> None:
    """microsoft/DeBERTa's LMMaskPredictionHead, written out: LayerNorm(h_cls + h_i), dense,
    activation, classifier; every parameter perturbed so that none is the identity."""
    torch.manual_seed(0)
    config = DebertaConfig(
        hidden_size=16, num_attention_heads=2, hidden_act="gelu", layer_norm_eps=1e-7
    )
    head = RTDHead(config)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    hidden = torch.randn(3, 7, 16)
    states = hidden[:, :1] + hidden
    normed = (states - states.mean(-1, keepdim=True)) / torch.sqrt(
        states.var(-1, unbiased=False, keepdim=True) + 1e-7
    ) * head.norm.weight + head.norm.bias
    inner = normed @ head.dense.weight.T + head.dense.bias
    activated = 0.5 * inner * (1 + torch.erf(inner / math.sqrt(2)))
    expected = (activated @ head.classifier.weight.T + head.classifier.bias).squeeze(-1)
    torch.testing.assert_close(head(hidden), expected, rtol=1e-5, atol=1e-5)
    # The [CLS] state reaches every token's logit.
    moved = hidden.clone()
    moved[:, 0] += torch.randn(16)  # not a constant, which LayerNorm would remove
    assert (head(moved)[:, 1:] - head(hidden)[:, 1:]).abs().min() > 1e-4


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("mode", ["gdes", "es", "nes"])
def test_a_training_step_waits_for_the_device_only_for_rows_not_given(
    mode: str, given: bool
) -> None:
    """On a GPU every op that must read a device value on the host (a boolean mask's nonzero,
    `.item()`, ...) stalls the host until the queued work is done, and the GPU then idles
    while the host launches the next kernels. The masked rows' count sets shapes: found in the
    step, they are its one such wait; given (found on the host, as `Engine.forward` does), the
    step has none. The losses and metrics must not add any. Counted on CPU at the
    dispatcher, forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    # lift_fresh: a tensor made from host data (torch.tensor, as_tensor), on a GPU a copy that
    # waits for the device.
    waits = {"aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select", "aten::item"}
    waits.add("aten::lift_fresh")

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            if name in waits:
                self.seen.append(name)
            elif name.startswith(("aten::index", "aten::_index_put")):
                # x[mask] and x[mask] = y find the mask's nonzero entries inside the op
                indices = args[1] if len(args) > 1 else ()  # index_select & co: an int dim
                indices = indices if isinstance(indices, (list, tuple)) else ()
                if any(getattr(i, "dtype", None) == torch.bool for i in indices):
                    self.seen.append(f"{name} with a boolean mask")
            return func(*args, **(kwargs or {}))

    model = tiny_model(mode)
    ids, mask, labels = tiny_batch()
    noise = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0))
    rows = masked_rows_of(labels) if given else None
    model(ids, mask, labels, sampling_noise=noise)  # first call: fills the models' caches
    with Count() as count:
        out = model(ids, mask, labels, sampling_noise=noise, masked_rows=rows)
        (out.loss + sum(v.float().sum() for v in out.metrics.values())).backward()
    assert count.seen == ([] if given else ["aten::nonzero"]), count.seen


@pytest.mark.parametrize("mode", ["gdes", "es", "nes"])
def test_masked_rows_given_or_found_give_the_same_step(mode: str) -> None:
    model = tiny_model(mode)
    ids, mask, labels = tiny_batch()
    noise = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0))
    rows = masked_rows_of(labels)
    assert torch.equal(rows, (labels.flatten() != IGNORE_INDEX).nonzero().flatten())
    assert torch.equal(masked_rows_of(labels.t().contiguous().t()), rows)  # row-major order
    outs, grads = [], []
    for given in (None, rows):
        torch.manual_seed(0)  # the same hidden dropout
        out = model(ids, mask, labels, sampling_noise=noise, masked_rows=given)
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.equal(outs[0].disc_ids, outs[1].disc_ids)
    assert torch.equal(outs[0].loss, outs[1].loss)
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_labels_of_any_memory_layout_give_the_same_step() -> None:
    model = tiny_model("gdes").eval()
    ids, mask, labels = tiny_batch()
    noise = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0))
    want = model(ids, mask, labels, sampling_noise=noise)
    column_major = labels.t().contiguous().t()
    assert not column_major.is_contiguous()
    got = model(ids, mask, column_major, sampling_noise=noise)
    assert torch.equal(got.disc_ids, want.disc_ids)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
