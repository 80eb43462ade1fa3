"""Optimizer parameter groups: decay exemptions, lr multipliers, layer-wise decay."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pretrain.config import Config, OptimConfig
from pretrain.engine import parameter_groups, resolve_precision
from pretrain.models.deberta import DebertaConfig
from pretrain.models.rtd import RTDModel


def groups_by_param(optim: OptimConfig) -> tuple[RTDModel, dict[str, dict]]:
    model = RTDModel(
        DebertaConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    config = dataclasses.replace(Config(), optim=optim)
    groups = parameter_groups(model, config)
    ids = {id(p): g for g in groups for p in g["params"]}
    named = {n: ids[id(p)] for n, p in model.named_parameters()}
    assert sum(len(g["params"]) for g in groups) == len(named)  # every parameter exactly once
    return model, named


def test_no_decay_for_biases_and_norms_only_and_multipliers_apply() -> None:
    """microsoft/DeBERTa's groups (training/optimizer_utils.py): no decay for `bias` and
    `LayerNorm.weight`, decay for the rest, embedding tables included."""
    model, g = groups_by_param(
        OptimConfig(lr=1.0, weight_decay=0.01, generator_lr_mult=0.5, embedding_lr_mult=2.0)
    )
    assert g["discriminator.encoder.layer.0.ffn_in.weight"]["weight_decay"] == 0.01
    assert g["discriminator.encoder.layer.0.ffn_in.bias"]["weight_decay"] == 0.0
    assert g["discriminator.encoder.layer.0.attention_norm.weight"]["weight_decay"] == 0.0
    assert g["discriminator.encoder.layer.0.attention_norm.bias"]["weight_decay"] == 0.0
    for table in (
        "generator.embeddings.word_embeddings.weight",
        "word_embeddings_delta",
        "discriminator.encoder.rel_embeddings.weight",
    ):
        assert g[table]["weight_decay"] == 0.01, table
    undecayed = {n for n, group in g.items() if group["weight_decay"] == 0.0}
    expected = set()
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            if name == "bias" or isinstance(module, torch.nn.LayerNorm):
                expected.add(f"{module_name}.{name}")
    assert undecayed == expected
    assert g["word_embeddings_delta"]["lr"] == 2.0
    assert g["generator.encoder.layer.1.ffn_in.weight"]["lr"] == 0.5
    assert g["mlm_head.dense.weight"]["lr"] == 0.5
    assert g["rtd_head.dense.weight"]["lr"] == 1.0


def test_layer_decay_scales_lr_by_depth_below_the_top() -> None:
    _, g = groups_by_param(OptimConfig(lr=1.0, layer_decay=0.5))
    # discriminator: 4 layers; generator: 2 layers (derived, half depth)
    assert g["rtd_head.classifier.weight"]["lr"] == 1.0
    assert g["discriminator.encoder.layer.3.ffn_in.weight"]["lr"] == 1.0
    assert g["discriminator.encoder.layer.0.ffn_in.weight"]["lr"] == pytest.approx(0.5**3)
    assert g["discriminator.encoder.rel_embeddings.weight"]["lr"] == pytest.approx(0.5**4)
    assert g["word_embeddings_delta"]["lr"] == pytest.approx(0.5**4)
    assert g["generator.encoder.layer.0.ffn_in.weight"]["lr"] == pytest.approx(0.5)
    assert g["generator.embeddings.word_embeddings.weight"]["lr"] == pytest.approx(0.5**2)


def test_deepspeeds_deprecated_collectives_do_not_flood_the_log() -> None:
    """ZeRO-3 printed torch's FutureWarning for its collectives at every step."""
    import warnings

    from pretrain.engine import _import_deepspeed

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # as if shown every time
        _import_deepspeed()
        warnings.warn(
            "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
            "`torch.distributed.reduce_scatter_single` instead.",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn("`other` is deprecated", FutureWarning, stacklevel=1)  # others still show
    assert [str(w.message) for w in seen] == ["`other` is deprecated"]


def test_auto_precision_is_bf16_only_where_the_gpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch's check says yes by default where bf16 is only emulated (V100, T4): not bf16 there.
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(
            torch.cuda,
            "is_bf16_supported",
            lambda including_emulation=True, native=native: native or including_emulation,
        )
        assert resolve_precision("auto", cuda) == ("bf16" if native else "fp32")
        assert resolve_precision("auto", cpu) == "fp32"
        assert resolve_precision("fp16", cuda) == "fp16"
