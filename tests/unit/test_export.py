"""Hugging Face export and import, checked against transformers itself.

The oracle is transformers: the exported directories are loaded with its Auto classes and
DebertaV2 task models, and their hidden states, MLM logits and MLM loss must equal ours (fp32,
CPU, 1e-5); loading must report no missing or unexpected weights. The way back (`from_hf`,
`rtd_from_hf`) is checked on models that transformers itself creates and saves, with its own
defaults left out of config.json, and by ours -> HF -> ours giving identical weights and outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForMaskedLM,
    AutoTokenizer,
    DebertaV2Config,
    DebertaV2ForMaskedLM,
    DebertaV2ForSequenceClassification,
    DebertaV2Model,
    DebertaV2Tokenizer,
)

from pretrain.export import (  # noqa: E402
    HF_DEFAULTS,
    RTD_HEAD_FILE,
    ExportError,
    _with_fp32_masters,
    check_init_tokenizer,
    check_tokenizer_dir,
    discriminator_state_dict,
    from_hf,
    hf_config_dict,
    locate_checkpoint,
    rtd_from_hf,
    run_tokenizer_dir,
    to_hf,
)
from pretrain.models.deberta import DebertaConfig  # noqa: E402
from pretrain.models.rtd import IGNORE_INDEX, RTDConfig, RTDModel  # noqa: E402
from tests.unit.tiny_rtd import TINY_SHAPE  # noqa: E402

TOL = 1e-5  # max abs difference, fp32 on CPU
MASK_ID = 4

BASE: dict[str, Any] = dict(vocab_size=60, num_hidden_layers=4, **TINY_SHAPE)
# Each sharing mode, and between them absolute positions (whose tables follow the sharing
# rule), an embedding projection (embedding_size != hidden_size: the legacy MLM head's reason
# to be), token types, own position projections and the convolution.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "gdes": ("gdes", {}),
    "gdes_abs_positions_embedding_proj": (
        "gdes",
        dict(position_biased_input=True, embedding_size=24),
    ),
    "es_abs_positions": ("es", dict(position_biased_input=True, share_att_key=False)),
    "nes_token_types_conv": ("nes", dict(type_vocab_size=2, conv_kernel_size=3)),
}


def make_model(case: str, seed: int = 0, **rtd_kwargs) -> RTDModel:
    sharing, overrides = CASES[case]
    torch.manual_seed(seed)
    model = RTDModel(
        DebertaConfig(**{**BASE, **overrides}), RTDConfig(embedding_sharing=sharing, **rtd_kwargs)
    )
    # Off the initialisation: E_delta != 0, LayerNorms and biases not at 1 / 0, NES tables apart.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def make_batch(config: DebertaConfig, length: int = 20, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    original = torch.randint(5, config.vocab_size, (3, length), generator=g)
    original[:, 0] = 1
    mask = torch.ones_like(original)
    mask[1, length - 6 :] = 0
    mask[2, 7:] = 0
    original[mask == 0] = config.pad_token_id
    masked = (torch.rand(original.shape, generator=g) < 0.3) & mask.bool()
    masked[:, 0] = False
    masked[0, 3] = True
    labels = torch.where(masked, original, torch.full_like(original, IGNORE_INDEX))
    input_ids = torch.where(masked, torch.full_like(original, MASK_ID), original)
    types = torch.randint(0, max(config.type_vocab_size, 1), original.shape, generator=g)
    noise = torch.rand(original.shape, generator=g)
    return input_ids, mask, labels, types, noise


def type_kwargs(config: DebertaConfig, types: torch.Tensor) -> dict:
    return {"token_type_ids": types} if config.type_vocab_size else {}


def our_discriminator(model: RTDModel, ids, mask, types=None) -> torch.Tensor:
    """Our discriminator's last hidden states, embedding with the tables of its sharing mode."""
    word, pos = model.discriminator_embedding_weights()
    return model.discriminator(ids, mask, types, word, pos)


def our_mlm_logits(model: RTDModel, ids, mask, types=None) -> torch.Tensor:
    """Our generator + MLM head at every position, [B, L, V]."""
    hidden = model.generator(ids, mask, types)
    word, _ = model.generator_embedding_weights()
    return model.mlm_head(hidden.flatten(0, 1), word).view(*ids.shape, -1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread only adds spin-waiting (10x slower on a
    busy 2-core machine). Restored afterwards for the rest of the session."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def no_problems(info: dict) -> bool:
    return not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[RTDModel, Path]]:
    out = {}
    for case in CASES:
        model = make_model(case)
        directory = tmp_path_factory.mktemp(case)
        to_hf(model, None, directory)
        out[case] = (model, directory)
    return out


# --------------------------------------------------------------------------------------------
# Export: transformers reproduces our discriminator and generator
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_discriminator_reproduces_our_hidden_states_and_rtd_logits(
    exported: dict, case: str
) -> None:
    model, directory = exported[case]
    hf, info = AutoModel.from_pretrained(directory / "discriminator", output_loading_info=True)
    assert type(hf) is DebertaV2Model and no_problems(info), info
    hf.eval()
    ids, mask, labels, types, noise = make_batch(model.config)
    kw = type_kwargs(model.config, types)
    with torch.no_grad():
        # the whole RTD forward: its corrupted ids, and the logits its discriminator gave them
        out = model(ids, mask, labels, sampling_noise=noise, **kw)
        ours = our_discriminator(model, out.disc_ids, mask, kw.get("token_type_ids"))
        theirs = hf(out.disc_ids, attention_mask=mask, **kw).last_hidden_state
        logits = model.rtd_head(theirs)
    diff = (ours - theirs).abs().max().item()
    logit_diff = (logits - out.disc_logits).abs().max().item()
    print(f"export {case}: discriminator hidden {diff:.2e}, RTD logits {logit_diff:.2e}")
    assert theirs.abs().max() > 0.1 and out.replaced.any()
    assert diff <= TOL and logit_diff <= TOL
    if model.word_embeddings_delta is not None:  # GDES: the effective table, not E_gen
        assert model.word_embeddings_delta.abs().max() > 0.01
        word, _ = model.discriminator_embedding_weights()
        assert torch.equal(hf.embeddings.word_embeddings.weight, word)


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_generator_is_a_masked_lm_with_our_logits_and_loss(
    exported: dict, case: str
) -> None:
    model, directory = exported[case]
    for cls in (DebertaV2ForMaskedLM, AutoModelForMaskedLM):
        hf, info = cls.from_pretrained(directory / "generator", output_loading_info=True)
        assert type(hf) is DebertaV2ForMaskedLM and no_problems(info), info
    hf.eval()
    decoder = hf.cls.predictions.decoder  # legacy head, tied as ours
    assert decoder.weight.data_ptr() == hf.deberta.embeddings.word_embeddings.weight.data_ptr()
    ids, mask, labels, types, noise = make_batch(model.config)
    kw = type_kwargs(model.config, types)
    with torch.no_grad():
        ours = our_mlm_logits(model, ids, mask, kw.get("token_type_ids"))
        hf_out = hf(ids, attention_mask=mask, labels=labels, **kw)
        our_loss = model(ids, mask, labels, sampling_noise=noise, **kw).gen_loss
    diff = (ours - hf_out.logits)[mask.bool()].abs().max().item()
    loss_diff = abs(our_loss.item() - hf_out.loss.item())
    print(f"export {case}: generator MLM logits {diff:.2e}, MLM loss {loss_diff:.2e}")
    assert diff <= TOL and loss_diff <= TOL


def test_sequence_classification_reports_only_the_new_classifier_and_pooler(
    exported: dict,
) -> None:
    model, directory = exported["gdes"]
    clf, info = DebertaV2ForSequenceClassification.from_pretrained(
        directory / "discriminator", num_labels=3, output_loading_info=True
    )
    new = {"classifier.weight", "classifier.bias", "pooler.dense.weight", "pooler.dense.bias"}
    assert set(info["missing_keys"]) == new
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, mask, *_ = make_batch(model.config)
    with torch.no_grad():
        theirs = clf.eval().deberta(ids, attention_mask=mask).last_hidden_state
        ours = our_discriminator(model, ids, mask)
        assert clf(ids, attention_mask=mask).logits.shape == (3, 3)
    assert (ours - theirs).abs().max().item() <= TOL


def test_config_json_writes_every_deberta_v2_key(exported: dict) -> None:
    model, directory = exported["gdes_abs_positions_embedding_proj"]
    written = json.loads((directory / "discriminator/config.json").read_text())
    required = set(DebertaV2Config.__annotations__) | {"pooler_hidden_size"} | set(HF_DEFAULTS)
    assert required <= set(written), required - set(written)
    assert written["architectures"] == ["DebertaV2Model"]
    loaded = DebertaV2Config.from_pretrained(directory / "discriminator")
    for key, value in model.config.to_hf_dict().items():
        assert getattr(loaded, key) == value, key
    gen = json.loads((directory / "generator/config.json").read_text())
    assert gen["architectures"] == ["DebertaV2ForMaskedLM"] and gen["legacy"] is True
    assert gen["num_hidden_layers"] == model.generator_config.num_hidden_layers == 2


def test_our_table_of_transformers_defaults_is_theirs() -> None:
    theirs = DebertaV2Config().to_dict()
    for key, value in HF_DEFAULTS.items():
        if key in theirs:
            assert theirs[key] == value, key


def test_a_generator_with_the_enhanced_mask_decoder_is_refused(tmp_path: Path) -> None:
    model = make_model("gdes", enhanced_mask_decoder=True)
    with pytest.raises(ExportError, match="enhanced mask decoder.*--no-generator"):
        to_hf(model, None, tmp_path)
    assert not (tmp_path / "discriminator").exists()  # refused before writing anything
    written = to_hf(model, None, tmp_path, generator=False)
    assert set(written) == {"discriminator"} and not (tmp_path / "generator").exists()


def test_exported_tokenizer_gives_our_ids(tiny_corpus: dict, tmp_path: Path) -> None:
    pytest.importorskip("google.protobuf")
    from data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_corpus["tokenizer"])
    torch.manual_seed(0)
    model = RTDModel(DebertaConfig(**{**BASE, "vocab_size": tiny_corpus["vocab_size"]}))
    to_hf(model, tiny_corpus["tokenizer"], tmp_path)
    texts = [
        "Return the number of items in the container.",
        "tabs\tand\nnewlines  mixed, café — naïve 3.14 [MASK] end",
    ]
    for part in ("discriminator", "generator"):
        assert (tmp_path / part / "spm.model").is_file()
        for cls in (DebertaV2Tokenizer, AutoTokenizer):
            hf = cls.from_pretrained(tmp_path / part)
            assert len(hf) == tok.vocab_size, cls.__name__
            specials = (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.unk_token_id)
            assert specials + (hf.mask_token_id,) == (0, 1, 2, 3, 4)
            for text in texts[:1]:
                assert hf(text)["input_ids"] == [tok.cls_id, *tok.encode(text), tok.sep_id]
            assert hf.encode(texts[1], add_special_tokens=False) == [
                *tok.encode(texts[1].split("[MASK]")[0]),
                tok.mask_id,
                *tok.encode(texts[1].split("[MASK]")[1]),
            ]
    with pytest.raises(ExportError, match="400 ids but the model only 60"):
        check_tokenizer_dir(tiny_corpus["tokenizer"], 60)
    # continued pretraining: the checkpoint's own tokenizer passes, another one is refused
    check_init_tokenizer(tmp_path / "discriminator", tiny_corpus["tokenizer"])
    other = tmp_path / "other_tokenizer"
    other.mkdir()
    (other / "spm.model").write_bytes(b"not the same model")
    with pytest.raises(ExportError, match="is not the tokenizer of"):
        check_init_tokenizer(tmp_path / "discriminator", other)
    # An extension of the checkpoint's tokenizer, the model not grown yet: say how to grow it.
    from data_prep.tokenizer import sha256_file

    (other / "extension.json").write_text(json.dumps({
        "old_sha256": sha256_file(tmp_path / "discriminator" / "spm.model"),
        "old_vocab_size": 400, "vocab_size": 450}))  # fmt: skip
    with pytest.raises(ExportError) as e:
        check_init_tokenizer(tmp_path / "discriminator", other)
    assert str(e.value) == (
        f"data.tokenizer={other} extends the tokenizer of {tmp_path / 'discriminator'} to 450 "
        f"ids, but the model still has the old 400: grow it first with `python -m "
        f"pretrain.export extend {tmp_path} OUT --old-tokenizer {tmp_path / 'discriminator'} "
        f"--new-tokenizer {other}` and pass model.init_from=OUT (its discriminator and "
        "generator)"
    )


def test_a_checkpoint_with_tokenizer_json_alone_is_checked_piece_by_piece(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    """transformers 5 saves a tokenizer as tokenizer.json alone (no spm.model): continuing such
    a checkpoint on another tokenizer must still be refused, and its own must pass."""
    pytest.importorskip("google.protobuf")
    from transformers import AutoTokenizer

    from data_prep.tokenizer import TokenizerError, load_tokenizer, train_tokenizer

    torch.manual_seed(0)
    model = RTDModel(DebertaConfig(**{**BASE, "vocab_size": tiny_corpus["vocab_size"]}))
    to_hf(model, tiny_corpus["tokenizer"], tmp_path / "hf", generator=False)
    saved = tmp_path / "saved"  # the checkpoint as transformers 5 saves it again
    AutoTokenizer.from_pretrained(tmp_path / "hf/discriminator").save_pretrained(saved)
    assert (saved / "tokenizer.json").is_file() and not (saved / "spm.model").exists()
    assert check_init_tokenizer(saved, tiny_corpus["tokenizer"]) is None
    inputs = sorted((tiny_corpus["shards"].parent / "text").glob("*.jsonl"))
    train_tokenizer(tmp_path / "other", inputs, vocab_size=300, num_threads=1, progress=False)
    with pytest.raises(ExportError, match=f"data.tokenizer={tmp_path / 'other'} is not the "):
        check_init_tokenizer(saved, tmp_path / "other")
    # A tokenizer.json that disagrees with the spm.model beside it is not exported:
    # transformers would load it first.
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_corpus["tokenizer"], mixed)
    AutoTokenizer.from_pretrained(tmp_path / "other").save_pretrained(tmp_path / "other_saved")
    (mixed / "tokenizer.json").write_bytes((tmp_path / "other_saved/tokenizer.json").read_bytes())
    with pytest.raises(ExportError, match=r"tokenizer.json does not hold the vocabulary of "):
        to_hf(model, mixed, tmp_path / "hf2", generator=False)
    (mixed / "tokenizer.json").write_bytes((saved / "tokenizer.json").read_bytes())
    to_hf(model, mixed, tmp_path / "hf2", generator=False)  # its own: exported
    # No tokenizer at all: nothing to compare, said.
    (saved / "tokenizer.json").unlink()
    warning = check_init_tokenizer(saved, tiny_corpus["tokenizer"])
    assert warning is not None and warning.startswith(
        f"warning: {saved} holds no tokenizer (spm.model or tokenizer.json), so data.tokenizer="
    )
    # As data.tokenizer or data_prep's --tokenizer: what is missing, not "train one".
    AutoTokenizer.from_pretrained(tmp_path / "hf/discriminator").save_pretrained(saved)
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(saved)
    assert str(e.value) == (
        f"no SentencePiece model at {saved / 'spm.model'}; it holds tokenizer.json only (as "
        "transformers 5 saves a tokenizer): this project tokenizes with the SentencePiece "
        "model, so put the checkpoint's original spm.model beside it"
    )


# --------------------------------------------------------------------------------------------
# Import: ours -> HF -> ours, and models transformers made
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_ours_hf_ours_is_identical(exported: dict, case: str) -> None:
    model, directory = exported[case]
    backbone, config = from_hf(directory / "discriminator")
    assert config == model.config
    expected = discriminator_state_dict(model)
    got = backbone.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    back = rtd_from_hf(directory / "discriminator", directory / "generator", model.rtd).eval()
    original, restored = model.state_dict(), back.state_dict()
    assert set(original) == set(restored)
    differ = [k for k in original if not torch.equal(original[k], restored[k])]
    # GDES stores E_gen + E_delta; E_delta comes back as their difference, to rounding
    assert set(differ) <= {"word_embeddings_delta", "position_embeddings_delta"}, differ
    for k in differ:
        assert (original[k] - restored[k]).abs().max() <= 1e-6
    tables = zip(
        model.discriminator_embedding_weights(), back.discriminator_embedding_weights(), strict=True
    )
    assert all(torch.equal(a, b) for a, b in tables if a is not None)  # what the model embeds with

    ids, mask, labels, types, noise = make_batch(model.config)
    kw = type_kwargs(model.config, types)
    with torch.no_grad():
        a = model(ids, mask, labels, sampling_noise=noise, **kw)
        b = back(ids, mask, labels, sampling_noise=noise, **kw)
        expected_hidden = our_discriminator(model, ids, mask, kw.get("token_type_ids"))
        assert torch.equal(backbone(ids, mask, **kw), expected_hidden)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.disc_logits, b.disc_logits)
    assert torch.equal(a.disc_ids, b.disc_ids)


def _hf_pair(
    tmp_path: Path, **overrides
) -> tuple[DebertaV2Model, DebertaV2ForMaskedLM, Path, Path]:
    """A discriminator and a half-depth generator made and saved by transformers (perturbed)."""
    kwargs: dict[str, Any] = dict(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        relative_attention=True,
        position_buckets=8,
        max_relative_positions=16,
        pos_att_type="p2c|c2p",
        position_biased_input=False,
        share_att_key=True,
        norm_rel_ebd="layer_norm",
    )
    kwargs.update(overrides)
    kwargs = {k: v for k, v in kwargs.items() if v is not ...}  # ... : leave to transformers
    torch.manual_seed(0)
    disc = DebertaV2Model(DebertaV2Config(**kwargs))
    gen = DebertaV2ForMaskedLM(DebertaV2Config(**{**kwargs, "num_hidden_layers": 2}))
    with torch.no_grad():
        for p in [*disc.parameters(), *gen.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    disc.save_pretrained(tmp_path / "disc")
    gen.save_pretrained(tmp_path / "gen")
    return disc.eval(), gen.eval(), tmp_path / "disc", tmp_path / "gen"


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # DeBERTa-v3's shape
        # keys transformers reads with getattr defaults, absent from config.json
        dict(position_buckets=..., share_att_key=..., norm_rel_ebd=..., pos_att_type=["c2p"]),
        dict(relative_attention=False, position_biased_input=True, type_vocab_size=2),
    ],
    ids=["v3", "defaults", "bert_like"],
)
def test_from_hf_reproduces_a_model_transformers_saved(tmp_path: Path, overrides: dict) -> None:
    hf, _, disc_dir, _ = _hf_pair(tmp_path, **overrides)
    saved = json.loads((disc_dir / "config.json").read_text())
    ours, config = from_hf(disc_dir)
    ids, mask, _, types, _ = make_batch(config)
    kw = type_kwargs(config, types)
    with torch.no_grad():
        diff = ours(ids, mask, **kw) - hf(ids, attention_mask=mask, **kw).last_hidden_state
    defaulted = sorted(set(HF_DEFAULTS) - set(saved))
    print(
        f"from_hf {sorted(overrides)}: hidden {diff.abs().max().item():.2e}; from defaults {defaulted}"
    )
    assert diff.abs().max().item() <= TOL


def test_continued_pretraining_from_a_discriminator_alone(tmp_path: Path) -> None:
    hf, _, disc_dir, _ = _hf_pair(tmp_path)
    ids, mask, labels, _, noise = make_batch(from_hf(disc_dir)[1])
    with torch.no_grad():
        reference = hf(ids, attention_mask=mask).last_hidden_state
    for sharing in ("gdes", "es", "nes"):
        log: list[str] = []
        model = rtd_from_hf(
            disc_dir, rtd_config=RTDConfig(embedding_sharing=sharing), log=log.append
        )
        assert any("lower 2 of 4 layers" in m for m in log) and any(
            "RTD head newly" in m for m in log
        )
        disc = dict(model.discriminator.state_dict())
        gen = dict(model.generator.state_dict())
        for k, v in gen.items():  # the generator is the discriminator's lower half
            shared_word = k == "embeddings.word_embeddings.weight" and sharing != "nes"
            source = model.discriminator_embedding_weights()[0] if shared_word else disc[k]
            assert torch.equal(v, source), (sharing, k)
        if model.word_embeddings_delta is not None:
            assert not model.word_embeddings_delta.any()
        model.eval()
        with torch.no_grad():
            diff = (our_discriminator(model, ids, mask) - reference).abs().max()
        assert diff.item() <= TOL, sharing
        model.train()
        out = model(ids, mask, labels, sampling_noise=noise)
        out.loss.backward()
        assert torch.isfinite(out.loss) and model.rtd_head.classifier.weight.grad is not None


def test_continued_pretraining_with_a_generator_transformers_saved(tmp_path: Path) -> None:
    _, hf_gen, disc_dir, gen_dir = _hf_pair(tmp_path)
    model = rtd_from_hf(disc_dir, gen_dir).eval()
    ids, mask, labels, _, _ = make_batch(model.config)
    with torch.no_grad():
        ours = our_mlm_logits(model, ids, mask)
        theirs = hf_gen(ids, attention_mask=mask).logits
    assert (ours - theirs).abs().max().item() <= TOL
    with pytest.raises(ExportError, match=r"set rtd.generator_depth_ratio=0.5"):
        rtd_from_hf(disc_dir, gen_dir, RTDConfig(generator_depth_ratio=0.25))


def test_the_non_legacy_mlm_head_imports_too(tmp_path: Path) -> None:
    _, _, disc_dir, _ = _hf_pair(tmp_path)
    torch.manual_seed(1)
    config = DebertaV2Config.from_pretrained(disc_dir)
    config.num_hidden_layers, config.legacy = 2, False
    hf_gen = DebertaV2ForMaskedLM(config)
    with torch.no_grad():
        for p in hf_gen.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf_gen.save_pretrained(tmp_path / "gen_new_head")
    model = rtd_from_hf(disc_dir, tmp_path / "gen_new_head").eval()
    ids, mask, *_ = make_batch(model.config)
    with torch.no_grad():
        ours = our_mlm_logits(model, ids, mask)
        theirs = hf_gen.eval()(ids, attention_mask=mask).logits
    assert (ours - theirs).abs().max().item() <= TOL


def test_rtd_head_travels_with_our_export(exported: dict) -> None:
    model, directory = exported["nes_token_types_conv"]
    assert (directory / "discriminator" / RTD_HEAD_FILE).is_file()
    log: list[str] = []
    back = rtd_from_hf(directory / "discriminator", rtd_config=model.rtd, log=log.append)
    assert any("RTD head from" in m for m in log)
    for k, v in model.rtd_head.state_dict().items():
        assert torch.equal(back.rtd_head.state_dict()[k], v)


def test_an_rtd_head_of_the_earlier_form_is_not_loaded(exported: dict, tmp_path: Path) -> None:
    """Exports from before the head took DeBERTa's form hold weights of the same names and
    another meaning, and no form in their metadata: not loaded, with a warning."""
    import shutil

    from safetensors.torch import load_file, save_file

    model, directory = exported["nes_token_types_conv"]
    old = tmp_path / "discriminator"
    shutil.copytree(directory / "discriminator", old)
    save_file(load_file(old / RTD_HEAD_FILE), str(old / RTD_HEAD_FILE), metadata={"format": "pt"})
    log: list[str] = []
    with pytest.warns(UserWarning, match="holds the RTD head of an earlier version"):
        back = rtd_from_hf(old, rtd_config=model.rtd, log=log.append)
    assert not any("RTD head from" in m for m in log)
    assert not torch.equal(back.rtd_head.dense.weight, model.rtd_head.dense.weight)


def test_exported_files_share_one_mode(exported: dict) -> None:
    """safetensors writes owner-only files; an export shared on a cluster needs the weights as
    readable as its config.json."""
    _, directory = exported["nes_token_types_conv"]
    for tower in ("discriminator", "generator"):
        modes = {p.name: p.stat().st_mode & 0o777 for p in (directory / tower).iterdir()}
        assert len(set(modes.values())) == 1, modes


# --------------------------------------------------------------------------------------------
# Reading runs, and the CLI's errors
# --------------------------------------------------------------------------------------------


def test_fp32_masters_replace_their_rounded_module_tensors() -> None:
    torch.manual_seed(0)
    masters = {f"w{i}": torch.randn(4, 3) for i in range(6)} | {
        "b": torch.zeros(3),
        "c": torch.zeros(3),
    }
    module = {k: v.bfloat16() for k, v in masters.items()}
    shuffled = [masters[k] for k in ("w3", "b", "w0", "w5", "c", "w1", "w2", "w4")]
    got = _with_fp32_masters(module, shuffled)
    assert all(torch.equal(got[k], masters[k]) and got[k].dtype == torch.float32 for k in masters)


def test_the_run_tokenizer_is_found_from_its_config(tmp_path: Path) -> None:
    from pretrain.data.pipeline import default_corpus_paths

    data = {
        "corpus": "default",
        "tokenizer": None,
        "cache_dir": str(tmp_path),
        "default_vocab_size": 500,
    }
    assert run_tokenizer_dir({"data": data}) == default_corpus_paths(str(tmp_path), 500)[2]
    assert run_tokenizer_dir({"data": {**data, "tokenizer": "tok"}}) == Path("tok")
    assert run_tokenizer_dir({"data": {**data, "corpus": str(tmp_path)}}) is None
    (tmp_path / "tokenizer").mkdir()  # a corpus prepared with its tokenizer's copy
    (tmp_path / "tokenizer" / "spm.model").write_bytes(b"")
    sources = [{"corpus": str(tmp_path / "other")}, {"corpus": str(tmp_path)}]
    for run in ({**data, "corpus": str(tmp_path)}, {**data, "sources": sources}):
        assert run_tokenizer_dir({"data": run}) == tmp_path / "tokenizer"


def test_hf_config_dict_leaves_out_keys_transformers_does_not_know() -> None:
    d = hf_config_dict(DebertaConfig(**BASE), "DebertaV2Model")
    assert set(d) - set(DebertaV2Config().to_dict()) <= set(HF_DEFAULTS)


def test_cli_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.export", str(tmp_path / "nowhere"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not exist" in lines[0]


def test_cli_without_a_checkpoint_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pretrain.export import main

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # a run that never saved
    assert main([str(tmp_path / "run"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no checkpoint in ")
    assert not (tmp_path / "out").exists()
    # A sweep's directory: its jobs are runs; say to export one.
    for job in ("10", "2"):
        (tmp_path / "sweep" / job / "checkpoints").mkdir(parents=True)
        (tmp_path / "sweep" / job / "checkpoints" / "latest").write_text("step_00000002")
    assert main([str(tmp_path / "sweep"), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'sweep'} holds the runs of a sweep (2, 10), not one run: export "
        f"one of them, e.g. python -m pretrain.export {tmp_path / 'sweep' / '2'} OUT_DIR\n"
    )


def test_cli_says_when_it_replaces_an_earlier_export(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    import pretrain.export as export

    out = tmp_path / "hf"
    written = {"discriminator": out / "discriminator"}
    run = SimpleNamespace(step=210, directory="run/step_210", model=SimpleNamespace(
        rtd=SimpleNamespace(embedding_sharing="gdes")))  # fmt: skip
    monkeypatch.setattr(export, "export_run", lambda *args: (run, written))
    assert export.main(["run", str(out)]) == 0
    assert "replacing" not in capsys.readouterr().out
    (out / "discriminator").mkdir(parents=True)
    (out / "discriminator" / "config.json").write_text("{}")  # an export made before
    assert export.main(["run", str(out)]) == 0
    assert capsys.readouterr().out == (
        f"exported step 210 of run/step_210 (gdes) -> {out / 'discriminator'} "
        f"(replacing the export that was in {out})\n"
    )


def test_a_checkpoint_set_aside_is_exported_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for name, why in (("step_00000008.abandoned", "abandoned by a rewind"),
                      ("step_00000006.damaged", "set aside as damaged")):  # fmt: skip
        step = tmp_path / name
        step.mkdir()
        (step / "trainer_state.json").write_text("{}")
        assert locate_checkpoint(step) == step
        assert capsys.readouterr().err == f"warning: {name} was {why}; exporting it as asked\n"
