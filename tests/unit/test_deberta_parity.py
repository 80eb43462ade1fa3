"""Our backbone against transformers' DebertaV2Model, the numerical oracle.

Weights come from a randomly initialised HF model (perturbed so LayerNorms and biases are not
at their trivial init), are copied through `from_hf_state_dict`, and both models see the same
random ids with padding in the batch. Hidden states and every parameter's gradient must agree.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DebertaV2Config, DebertaV2Model

from pretrain.models.deberta import (
    DebertaConfig,
    DebertaModel,
    from_hf_state_dict,
    log_bucket_position,
    preset,
    to_hf_state_dict,
)

TOL = 1e-5  # max abs difference, fp32 on CPU

SMALL = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)

# Each config flips the features the issue names: buckets, shared key, conv, c2p/p2c, absolute
# positions; the last ones add an embedding projection, token types and no relative attention.
CONFIGS = {
    "v3_buckets_shared_both": dict(position_buckets=8, max_relative_positions=32),
    # transformers' other names for our activations, as published configs spell them
    "gelu_fast_swish_conv": dict(
        position_buckets=8, hidden_act="gelu_fast", conv_kernel_size=3, conv_act="swish"
    ),
    "no_buckets_own_keys": dict(
        position_buckets=-1, share_att_key=False, max_relative_positions=16
    ),
    "conv_c2p_only": dict(
        position_buckets=8, pos_att_type=["c2p"], conv_kernel_size=3, conv_act="tanh"
    ),
    "p2c_only_abs_pos_no_relnorm": dict(
        position_buckets=-1,
        pos_att_type=["p2c"],
        position_biased_input=True,
        norm_rel_ebd="none",
        share_att_key=False,
    ),
    "conv_groups_gelu_embproj_own_keys": dict(
        position_buckets=16,
        share_att_key=False,
        conv_kernel_size=5,
        conv_groups=4,
        conv_act="gelu",
        embedding_size=24,
    ),
    "bert_like_no_relative": dict(
        relative_attention=False,
        pos_att_type=[],
        position_biased_input=True,
        type_vocab_size=2,
        norm_rel_ebd="none",
    ),
}


def make_pair(overrides: dict, seed: int = 0) -> tuple[DebertaV2Model, DebertaModel, DebertaConfig]:
    torch.manual_seed(seed)
    config = DebertaConfig(**{**SMALL, **overrides})
    hf = DebertaV2Model(DebertaV2Config(**config.to_hf_dict())).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = DebertaModel(config).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict()), strict=True)
    return hf, ours, config


def make_batch(config: DebertaConfig, length: int = 40, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 7 :] = 0  # some padding
    mask[2, 9:] = 0  # mostly padding
    ids[mask == 0] = config.pad_token_id
    types = torch.randint(0, max(config.type_vocab_size, 1), ids.shape, generator=g)
    return ids, mask, types


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hidden_states_match_hf(name: str) -> None:
    hf, ours, config = make_pair(CONFIGS[name])
    ids, mask, types = make_batch(config)
    kwargs = {"token_type_ids": types} if config.type_vocab_size else {}
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, **kwargs).last_hidden_state
        got = ours(ids, mask, **kwargs)
    diff = (expected - got).abs().max().item()
    print(f"parity {name}: hidden max abs diff {diff:.3e}")
    assert expected.abs().max() > 0.1  # a non-trivial output, or the comparison proves nothing
    assert diff <= TOL


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_gradients_match_hf(name: str) -> None:
    hf, ours, config = make_pair(CONFIGS[name])
    ids, mask, types = make_batch(config)
    kwargs = {"token_type_ids": types} if config.type_vocab_size else {}
    weights = torch.randn(
        *ids.shape, config.hidden_size, generator=torch.Generator().manual_seed(5)
    )
    (hf(ids, attention_mask=mask, **kwargs).last_hidden_state * weights).sum().backward()
    (ours(ids, mask, **kwargs) * weights).sum().backward()

    hf_grads = dict(hf.named_parameters())
    worst = 0.0
    for our_name, hf_name in zip(
        dict(ours.named_parameters()), to_hf_state_dict(dict(ours.named_parameters())), strict=True
    ):
        ours_grad = dict(ours.named_parameters())[our_name].grad
        hf_grad = hf_grads[hf_name].grad
        assert (ours_grad is None) == (hf_grad is None), our_name
        if ours_grad is None:
            continue
        scale = max(1.0, hf_grad.abs().max().item())
        diff = (ours_grad - hf_grad).abs().max().item() / scale
        worst = max(worst, diff)
        assert diff <= TOL, f"{our_name}: {diff:.2e}"
    print(f"parity {name}: worst gradient diff {worst:.3e}")


def test_state_dict_names_round_trip_every_parameter() -> None:
    for overrides in CONFIGS.values():
        _, ours, _ = make_pair(overrides)
        state = ours.state_dict()
        assert (
            from_hf_state_dict(to_hf_state_dict(state, "deberta."), "deberta.").keys()
            == state.keys()
        )


def test_log_buckets_against_hand_values() -> None:
    # bucket_size 8 (mid 4), max_position 32: |d| <= 4 exact; beyond,
    # ceil(log(|d|/4) / log(31/4) * 3) + 4, e.g. d=5 -> ceil(0.3274)+4 = 5, d=31 -> 7, d=100 -> 9.
    d = torch.tensor([-100, -31, -5, -4, -1, 0, 1, 3, 4, 5, 8, 31, 100])
    expected = torch.tensor([-9, -7, -5, -4, -1, 0, 1, 3, 4, 5, 6, 7, 9])
    assert torch.equal(log_bucket_position(d, 8, 32), expected)


def test_presets_have_published_shapes() -> None:
    shapes = {n: preset(n) for n in ("xsmall", "small", "base", "large")}
    assert (shapes["xsmall"].num_hidden_layers, shapes["xsmall"].hidden_size) == (12, 384)
    assert (shapes["small"].num_hidden_layers, shapes["small"].hidden_size) == (6, 768)
    assert (shapes["base"].num_hidden_layers, shapes["base"].hidden_size) == (12, 768)
    assert (shapes["large"].num_hidden_layers, shapes["large"].hidden_size) == (24, 1024)
    assert all(c.vocab_size == 128100 for c in shapes.values())


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=30, num_attention_heads=4), "num_attention_heads"),
        (dict(pos_att_type=["c2c"]), "pos_att_type"),
        (dict(hidden_act="swish9"), "hidden_act"),
        (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
    ],
)
def test_bad_config_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DebertaConfig(**{**SMALL, **overrides})


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["v3_buckets_shared_both", "conv_groups_gelu_embproj_own_keys"])
def test_bf16_gpu_matches_hf(name: str) -> None:
    # bf16 keeps 8 bits of mantissa: compare against the fp32 HF output with a bf16-sized
    # tolerance, and require ours to be no worse than HF's own bf16 result.
    hf, ours, config = make_pair(CONFIGS[name])
    ids, mask, _ = make_batch(config, length=256)
    hf, ours, ids, mask = hf.cuda(), ours.cuda(), ids.cuda(), mask.cuda()
    with torch.no_grad():
        reference = hf(ids, attention_mask=mask).last_hidden_state
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hf_bf16 = hf(ids, attention_mask=mask).last_hidden_state.float()
            ours_bf16 = ours(ids, mask).float()
    valid = mask.bool()
    ours_err = (ours_bf16 - reference)[valid].abs().max().item()
    hf_err = (hf_bf16 - reference)[valid].abs().max().item()
    assert ours_err <= max(5e-2, 1.5 * hf_err)
