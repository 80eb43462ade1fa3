"""Hugging Face export and import: our RTD pair <-> `transformers` DeBERTa-v2 directories.

    python -m pretrain.export RUN_DIR_OR_CHECKPOINT OUT_DIR [--tokenizer DIR] [--no-generator]

writes two model directories that `transformers` loads with no code of ours:

    OUT/discriminator   DebertaV2Model weights: AutoModel, DebertaV2ForSequenceClassification, ...
    OUT/generator       DebertaV2ForMaskedLM weights, loss-for-loss our generator + MLM head

each with `config.json` (every DebertaV2Config key written out, never left to a default),
`model.safetensors` and the run's tokenizer files. `from_hf` / `rtd_from_hf` go the other way,
for fine-tuning with our backbone or continuing pretraining from a Hugging Face checkpoint.

    python -m pretrain.export extend EXPORT_DIR OUT_DIR --old-tokenizer OLD --new-tokenizer NEW

grows an export's vocabulary to a tokenizer extended by `python -m data_prep.extend_vocab`
(`extend_embeddings`: each new row the mean of the old rows of its piece's old tokens).

Why it is shaped so:
- Parameter names are translated only by `deberta.to_hf_state_dict` / `from_hf_state_dict`;
  this module adds the head names and the embedding-sharing arithmetic, nothing else.
- The discriminator is exported with the tables it *embeds with*: E_gen + E_delta under GDES,
  E_gen under ES, its own under NES (word and absolute-position tables alike). That is the model
  the RTD loss trained; E_delta alone means nothing outside the pair.
- The generator's head is exported as transformers' *legacy* head (`config.legacy=true`, the
  default): `cls.predictions.transform.{dense,LayerNorm}`, `cls.predictions.decoder` tied to the
  word embeddings, `cls.predictions.bias`. It is exactly ours (dense hidden->embedding_size,
  activation, LayerNorm, tied decoder + bias), holds for any `embedding_size`, and loads with
  the default config. The other head (`legacy=false`, `lm_predictions.lm_head.*`, the layout of
  microsoft/DeBERTa's own checkpoints) computes the same function but projects to hidden_size,
  so it cannot hold an `embedding_size != hidden_size` model. (transformers' docstring calls the
  legacy head unfit for mask infilling: Microsoft's checkpoints store their head under the other
  names, so loaded into this one it starts untrained. Ours stores it under these names; the
  tests show its logits and loss are ours.) The enhanced mask decoder has no transformers
  counterpart: a generator trained with it is refused rather than exported as another function.
- Writing needs only safetensors and json: no transformers, no GPU, no process group. A
  DeepSpeed checkpoint is consolidated offline on CPU (ZeRO-1/2/3 with DeepSpeed's
  `zero_to_fp32`; ZeRO-0 from the module states, preferring the fp32 master copy under
  bf16/fp16), so the export holds the fp32 weights the optimizer was updating.
- The discriminator directory also holds `rtd_head.safetensors` (the replaced-token detector),
  which transformers never reads; `rtd_from_hf` picks it up, so ours -> HF -> ours loses nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.checkpoint import (
    ABANDONED,
    DAMAGED,
    LATEST,
    TRAINER_STATE,
    CheckpointError,
    published_tag,
    verify,
)
from pretrain.metrics import job_order
from pretrain.models.deberta import (
    DebertaConfig,
    DebertaModel,
    from_hf_state_dict,
    to_hf_state_dict,
)
from pretrain.models.rtd import RTDConfig, RTDModel

DISCRIMINATOR = "discriminator"
GENERATOR = "generator"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
RTD_HEAD_FILE = "rtd_head.safetensors"
# The RTD head's form, in its file's metadata: "deberta" is LayerNorm(h + h_[CLS]) first. Files
# without it hold the earlier form (its LayerNorm after the activation), whose weights have the
# same names but another meaning, so they are not loaded.
RTD_HEAD_FORM = {"rtd_head": "deberta"}

WORD = "embeddings.word_embeddings.weight"
POSITION = "embeddings.position_embeddings.weight"

# Every key transformers' DebertaV2 reads, with the value it assumes when config.json omits the
# key (DebertaV2Config's defaults, and for the keys it reads by getattr, DebertaV2Model's). These
# are not our DebertaConfig defaults (which are DeBERTa-v3-base's): relative attention is *off*
# and absolute positions *on* in a bare DebertaV2Config. Reading uses them; writing writes them
# all, from our config.
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 128100,
    "hidden_size": 1536,
    "num_hidden_layers": 24,
    "num_attention_heads": 24,
    "intermediate_size": 6144,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-7,
    "relative_attention": False,
    "max_relative_positions": -1,
    "position_buckets": -1,
    "pad_token_id": 0,
    "position_biased_input": True,
    "pos_att_type": None,
    "share_att_key": False,
    "norm_rel_ebd": "none",
    "conv_kernel_size": 0,
    "conv_groups": 1,
    "conv_act": "tanh",
    "embedding_size": None,  # = hidden_size
    "attention_head_size": None,  # = hidden_size // num_attention_heads
}
# DebertaV2Config keys that shape no part of our backbone, written with the values that make
# the exported directories behave as described above.
HF_ONLY: dict[str, Any] = {
    "pooler_dropout": 0.0,
    "pooler_hidden_act": "gelu",
    "legacy": True,  # the generator's MLM head, see the module docstring
    "tie_word_embeddings": True,  # the decoder is the word embedding table
    "bos_token_id": None,
    "eos_token_id": None,
}


class ExportError(ValueError):
    """A user-fixable problem (paths, missing files, an unexportable model); one line."""


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def hf_config_dict(config: DebertaConfig, architecture: str) -> dict[str, Any]:
    """config.json for a DebertaV2 model directory: every key explicit, none left to defaults."""
    ours = config.to_hf_dict()
    d: dict[str, Any] = {"architectures": [architecture], "model_type": "deberta-v2"}
    d.update({k: ours[k] for k in HF_DEFAULTS})  # drops any non-shape key DebertaConfig holds
    d.update(HF_ONLY)
    d["pooler_hidden_size"] = config.hidden_size
    d["dtype"] = "float32"
    return d


def config_from_hf_dict(d: dict[str, Any]) -> DebertaConfig:
    """Our DebertaConfig for a DebertaV2 config.json, with transformers' defaults where it is silent."""
    if d.get("model_type", "deberta-v2") != "deberta-v2":
        raise ExportError(f"model_type is {d.get('model_type')!r}; only deberta-v2 can be imported")
    v = {k: d.get(k, default) for k, default in HF_DEFAULTS.items()}
    pos = v["pos_att_type"]
    if isinstance(pos, str):
        pos = [t.strip() for t in pos.lower().split("|") if t.strip()]
    v["pos_att_type"] = list(pos or [])
    # transformers accepts "layer_norm|..." and checks membership
    norm = str(v["norm_rel_ebd"]).lower().split("|")
    v["norm_rel_ebd"] = "layer_norm" if "layer_norm" in [n.strip() for n in norm] else "none"
    if v["pad_token_id"] is None:
        v["pad_token_id"] = 0
    # Keep our "same as hidden" spelling, so from_hf(to_hf(c)) gives c back.
    if v["embedding_size"] == v["hidden_size"]:
        v["embedding_size"] = None
    if v["attention_head_size"] is not None and (
        v["attention_head_size"] * v["num_attention_heads"] == v["hidden_size"]
    ):
        v["attention_head_size"] = None
    try:
        return DebertaConfig(**v)
    except ValueError as e:
        raise ExportError(f"cannot build our backbone from this config.json: {e}") from None


def read_hf_config(directory: str | Path) -> DebertaConfig:
    path = Path(directory).expanduser() / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{path} not found: not a Hugging Face model directory")
    return config_from_hf_dict(json.loads(path.read_text()))


# --------------------------------------------------------------------------------------------
# Weights files
# --------------------------------------------------------------------------------------------


def read_hf_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers model directory: safetensors (single or sharded) or the
    older pytorch_model.bin (read with weights_only)."""
    from safetensors.torch import load_file

    d = Path(directory).expanduser()
    if (d / WEIGHTS_FILE).is_file():
        return load_file(d / WEIGHTS_FILE)
    for index_name, loader in (
        ("model.safetensors.index.json", lambda p: load_file(p)),
        ("pytorch_model.bin.index.json", lambda p: torch.load(p, map_location="cpu", weights_only=True)),
    ):  # fmt: skip
        if (d / index_name).is_file():
            shards = sorted(set(json.loads((d / index_name).read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(loader(d / shard))
            return state
    if (d / "pytorch_model.bin").is_file():
        return torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ExportError(
        f"no weights in {d}: expected model.safetensors (or a sharded index, or pytorch_model.bin)"
    )


def _head_form(path: Path) -> dict[str, str]:
    """The RTD_HEAD_FORM keys of an RTD head file's metadata (none in an earlier export's)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: v for k, v in (f.metadata() or {}).items() if k in RTD_HEAD_FORM}


def _write_model_dir(
    out: Path,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    tokenizer_dir: Path | None,
    extra_files: dict[str, dict[str, torch.Tensor]] | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)

    def plain(s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # safetensors refuses shared storage; fp32 on CPU whatever the model was trained in
        return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in s.items()}

    save_file(plain(state), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    for name, tensors in (extra_files or {}).items():
        save_file(
            # One key at most: safetensors writes its metadata in hash order, so a second key
            # would make the same export's bytes differ from run to run.
            plain(tensors),
            str(out / name),
            metadata=extra_metadata or {"format": "pt"},
        )
    # safetensors writes owner-only files; give them the mode of every other file written here
    umask = os.umask(0)
    os.umask(umask)
    for name in [WEIGHTS_FILE, *(extra_files or {})]:
        os.chmod(out / name, 0o666 & ~umask)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer_dir is not None:
        from data_prep.tokenizer import copy_tokenizer_files

        copy_tokenizer_files(tokenizer_dir, out)


def check_tokenizer_dir(tokenizer_dir: str | Path, vocab_size: int) -> Path:
    """The tokenizer directory, checked: HF files present, every id has an embedding row."""
    from data_prep.tokenizer import (
        HF_TOKENIZER_FILE,
        REQUIRED_FILES,
        TokenizerError,
        load_tokenizer,
    )

    d = Path(tokenizer_dir).expanduser()
    missing = [n for n in REQUIRED_FILES if not (d / n).is_file()]
    if missing:
        raise ExportError(
            f"tokenizer directory {d} lacks {', '.join(missing)}; "
            "use a directory written by python -m data_prep.tokenizer"
        )
    try:
        tok = load_tokenizer(d)
    except TokenizerError as e:
        raise ExportError(str(e)) from None
    if tok.vocab_size > vocab_size:
        raise ExportError(
            f"tokenizer {d} has {tok.vocab_size} ids but the model only {vocab_size} embeddings: "
            "not the tokenizer this model was trained with"
        )
    pieces = _tokenizer_json_pieces(d)
    if pieces is not None and pieces != tok.pieces:
        raise ExportError(
            f"{d / HF_TOKENIZER_FILE} does not hold the vocabulary of {tok.path}, and transformers "
            "loads tokenizer.json first: the export would tokenize otherwise than training did; "
            "delete it (transformers builds it again from spm.model)"
        )
    return d


# --------------------------------------------------------------------------------------------
# Ours -> Hugging Face
# --------------------------------------------------------------------------------------------


def discriminator_state_dict(model: RTDModel) -> dict[str, torch.Tensor]:
    """The discriminator backbone's state (our names) with the tables it embeds with."""
    state = dict(model.discriminator.state_dict())
    word, position = model.discriminator_embedding_weights()
    if word is not None:  # GDES / ES compose their tables; NES's are already in `state`
        state[WORD] = word.detach()
    if position is not None:
        state[POSITION] = position.detach()
    return state


def generator_hf_state_dict(model: RTDModel) -> dict[str, torch.Tensor]:
    """Generator backbone + MLM head under DebertaV2ForMaskedLM's names (legacy head)."""
    head = model.mlm_head
    state = to_hf_state_dict(dict(model.generator.state_dict()), prefix="deberta.")
    state.update(
        {
            "cls.predictions.transform.dense.weight": head.dense.weight,
            "cls.predictions.transform.dense.bias": head.dense.bias,
            "cls.predictions.transform.LayerNorm.weight": head.norm.weight,
            "cls.predictions.transform.LayerNorm.bias": head.norm.bias,
            # the decoder's weight and bias are tied to the word embeddings and to this bias;
            # transformers re-ties them on load, as its own save_pretrained leaves them out
            "cls.predictions.bias": head.bias,
        }
    )
    return state


def _check_exportable(model: RTDModel, generator: bool) -> None:
    if generator and model.emd is not None:
        raise ExportError(
            "this generator decodes through the enhanced mask decoder, which transformers' "
            "DebertaV2ForMaskedLM cannot express; export the discriminator alone "
            "(--no-generator, or generator=False)"
        )


def to_hf(
    model: RTDModel,
    tokenizer_dir: str | Path | None,
    out_dir: str | Path,
    *,
    generator: bool = True,
) -> dict[str, Path]:
    """Write `out_dir/discriminator` (and `out_dir/generator`) as transformers model directories.

    `tokenizer_dir`: the run's tokenizer (spm.model, tokenizer_config.json, ...), copied into
    both; None writes weights and config only. `generator=False` skips the generator, the only
    way to export a model trained with the enhanced mask decoder. Returns the directories written.
    """
    _check_exportable(model, generator)
    tok = check_tokenizer_dir(tokenizer_dir, model.config.vocab_size) if tokenizer_dir else None
    out = Path(out_dir).expanduser()
    written: dict[str, Path] = {}
    with torch.no_grad():
        _write_model_dir(
            out / DISCRIMINATOR,
            hf_config_dict(model.config, "DebertaV2Model"),
            to_hf_state_dict(discriminator_state_dict(model)),
            tok,
            extra_files={RTD_HEAD_FILE: dict(model.rtd_head.state_dict())},
            extra_metadata=RTD_HEAD_FORM,
        )
        written[DISCRIMINATOR] = out / DISCRIMINATOR
        if generator:
            _write_model_dir(
                out / GENERATOR,
                hf_config_dict(model.generator_config, "DebertaV2ForMaskedLM"),
                generator_hf_state_dict(model),
                tok,
            )
            written[GENERATOR] = out / GENERATOR
    return written


# --------------------------------------------------------------------------------------------
# Hugging Face -> ours
# --------------------------------------------------------------------------------------------


def _backbone_state(directory: Path) -> dict[str, torch.Tensor]:
    """The DebertaV2Model part of a directory's weights, in our names. Task models keep the
    backbone under `deberta.`; a bare DebertaV2Model saves it unprefixed."""
    state = read_hf_weights(directory)
    prefix = "deberta." if any(k.startswith("deberta.") for k in state) else ""
    ours = from_hf_state_dict(state, prefix)
    return {k: v for k, v in ours.items() if k.startswith(("embeddings.", "encoder."))}


def _drop_unused_positions(state: dict[str, torch.Tensor], config: DebertaConfig) -> None:
    # Some published checkpoints carry an absolute-position table their config does not use;
    # transformers ignores it on load (`_keys_to_ignore_on_load_unexpected`), and so do we.
    if not config.position_biased_input:
        state.pop(POSITION, None)


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = " ".join(str(e).split())
        raise ExportError(f"{what} does not match its config: {detail}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing {', '.join(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"unexpected {', '.join(result.unexpected_keys)}")
    if problems:
        raise ExportError(f"{what} does not match its config: {'; '.join(problems)}")


def from_hf(path: str | Path) -> tuple[DebertaModel, DebertaConfig]:
    """Our discriminator backbone from a local transformers DebertaV2 directory (any DebertaV2
    task model: the backbone is taken, heads ignored). In eval mode, as transformers returns it;
    `model(input_ids, attention_mask)` gives the last hidden states."""
    d = Path(path).expanduser()
    if not d.is_dir():
        raise ExportError(f"{d} is not a directory")
    config = read_hf_config(d)
    model = DebertaModel(config)
    state = _backbone_state(d)
    _drop_unused_positions(state, config)
    _load_strict(model, state, f"the backbone in {d}")
    return model.eval(), config


def _generator_head_state(directory: Path) -> dict[str, torch.Tensor]:
    """Our MLMHead's state from a DebertaV2ForMaskedLM directory (either head variant)."""
    state = read_hf_weights(directory)
    for prefix in ("cls.predictions.transform.", "lm_predictions.lm_head."):
        if f"{prefix}dense.weight" in state:
            bias_key = (
                "cls.predictions.bias"
                if prefix.startswith("cls")
                else "lm_predictions.lm_head.bias"
            )
            if bias_key not in state and "cls.predictions.decoder.bias" in state:
                bias_key = "cls.predictions.decoder.bias"
            head = {
                "dense.weight": state[f"{prefix}dense.weight"],
                "dense.bias": state[f"{prefix}dense.bias"],
                "norm.weight": state[f"{prefix}LayerNorm.weight"],
                "norm.bias": state[f"{prefix}LayerNorm.bias"],
                "bias": state[bias_key],
            }
            decoder = state.get("cls.predictions.decoder.weight")
            word = state.get(f"deberta.{WORD}")
            if decoder is not None and word is not None and not torch.equal(decoder, word):
                raise ExportError(
                    f"{directory}: the MLM decoder is not tied to the word embeddings; "
                    "our generator ties them"
                )
            return head
    raise ExportError(
        f"{directory} holds no MLM head (cls.predictions.* or lm_predictions.*): "
        "give a DebertaV2ForMaskedLM directory as the generator"
    )


def rtd_from_hf(
    disc_dir: str | Path,
    generator_dir: str | Path | None = None,
    rtd_config: RTDConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> RTDModel:
    """An RTDModel initialised from a local transformers discriminator, to continue pretraining.

    The model's shape is the discriminator's config.json; the generator's is derived from it as
    always (`rtd.generator_depth_ratio`). Its weights are those of `generator_dir` (a
    DebertaV2ForMaskedLM directory, e.g. our exported generator) when given, else the
    discriminator's embeddings and its lower layers, with a freshly initialised MLM head.
    Embedding tables by sharing mode: GDES E_gen = the generator's table (the discriminator's
    without one) and E_delta = E_disc - E_gen, so the discriminator starts embedding with the
    imported table (bit-exact in our round-trip tests, in general up to one fp32 rounding);
    ES keeps one table, the discriminator's; NES each its own. The RTD head comes from
    `rtd_head.safetensors` when the directory is one of our exports, else fresh. `log` receives
    one line per part saying where its weights came from.

    The tokenizer must be the checkpoint's own (`check_init_tokenizer`); the model's vocabulary
    is the checkpoint's.
    """
    say = log or (lambda _msg: None)
    disc, config = from_hf(disc_dir)
    rtd = rtd_config or RTDConfig()
    model = RTDModel(config, rtd)  # heads (and EMD) start from their own initialisation
    gen_config = model.generator_config
    disc_state = dict(disc.state_dict())
    disc_word = disc_state[WORD]
    disc_pos = disc_state.get(POSITION)

    if generator_dir is not None:
        g = Path(generator_dir).expanduser()
        their = read_hf_config(g)
        want = dataclasses.replace(config, num_hidden_layers=their.num_hidden_layers)
        dropouts = ("hidden_dropout_prob", "attention_probs_dropout_prob")
        differ = [
            k for k in HF_DEFAULTS if k not in dropouts and getattr(their, k) != getattr(want, k)
        ]
        if differ:
            raise ExportError(
                f"generator {g} differs from the discriminator in {', '.join(differ)}; "
                "the generator must have the discriminator's shape at a fraction of its depth"
            )
        if their.num_hidden_layers != gen_config.num_hidden_layers:
            ratio = their.num_hidden_layers / config.num_hidden_layers
            raise ExportError(
                f"generator {g} has {their.num_hidden_layers} layers but "
                f"rtd.generator_depth_ratio={rtd.generator_depth_ratio} derives "
                f"{gen_config.num_hidden_layers}; set rtd.generator_depth_ratio={ratio:g}"
            )
        gen_state = _backbone_state(g)
        _drop_unused_positions(gen_state, their)
        _load_strict(model.mlm_head, _generator_head_state(g), f"the MLM head in {g}")
        say(f"generator and MLM head from {g}")
    else:
        keep = gen_config.num_hidden_layers
        gen_state = {
            k: v
            for k, v in disc_state.items()
            if not k.startswith("encoder.layer.") or int(k.split(".")[2]) < keep
        }
        say(
            f"generator from the discriminator's embeddings and lower {keep} of "
            f"{config.num_hidden_layers} layers; MLM head newly initialised"
        )
    _load_strict(model.generator, gen_state, "the generator")
    gen_word, gen_pos = model.generator_embedding_weights()

    mode = rtd.embedding_sharing
    with torch.no_grad():
        if mode == "nes":
            _load_strict(model.discriminator, disc_state, "the discriminator")
        else:
            tables = {k: v for k, v in disc_state.items() if k not in (WORD, POSITION)}
            _load_strict(model.discriminator, tables, "the discriminator")
            if mode == "es":
                if generator_dir is not None and not torch.equal(gen_word, disc_word):
                    warnings.warn(
                        "rtd.embedding_sharing=es keeps one word table: the discriminator's "
                        "replaces the generator's",
                        stacklevel=2,
                    )
                gen_word.copy_(disc_word)
                if gen_pos is not None and disc_pos is not None:
                    gen_pos.copy_(disc_pos)
            else:  # gdes: the discriminator embeds with E_gen + E_delta = its imported table
                assert model.word_embeddings_delta is not None
                model.word_embeddings_delta.copy_(disc_word - gen_word)
                if model.position_embeddings_delta is not None:
                    assert gen_pos is not None and disc_pos is not None
                    model.position_embeddings_delta.copy_(disc_pos - gen_pos)

    head_file = Path(disc_dir).expanduser() / RTD_HEAD_FILE
    if head_file.is_file():
        from safetensors.torch import load_file

        if _head_form(head_file) == RTD_HEAD_FORM:
            _load_strict(model.rtd_head, load_file(head_file), f"{head_file}")
            say(f"RTD head from {head_file}")
        else:
            warnings.warn(
                f"{head_file} holds the RTD head of an earlier version of this project (another "
                "form: its LayerNorm after the activation); the RTD head is newly initialised",
                stacklevel=2,
            )
    else:
        say("RTD head newly initialised")
    return model


def check_init_tokenizer(hf_dir: str | Path, tokenizer_dir: str | Path | None) -> str | None:
    """Refuse to continue pretraining a checkpoint on another tokenizer's ids: compared with the
    checkpoint's spm.model, or, where transformers 5 saved only its tokenizer.json, with that
    file's vocabulary, piece by piece. Returns a warning when the checkpoint has neither."""
    from data_prep.tokenizer import (
        EXTENSION_FILE,
        HF_TOKENIZER_FILE,
        MODEL_FILE,
        load_tokenizer,
        sha256_file,
    )

    hf = Path(hf_dir).expanduser()
    tok_dir = Path(tokenizer_dir).expanduser() if tokenizer_dir is not None else None
    if tok_dir is None or not (tok_dir / MODEL_FILE).is_file():
        return None  # data.tokenizer's own checks speak for it
    their_sha = None
    if (hf / MODEL_FILE).is_file():
        their_sha = sha256_file(hf / MODEL_FILE)
        if sha256_file(tok_dir / MODEL_FILE) == their_sha:
            return None
    else:
        pieces = _tokenizer_json_pieces(hf)
        if pieces is None:
            return (
                f"warning: {hf_dir} holds no tokenizer ({MODEL_FILE} or {HF_TOKENIZER_FILE}), so "
                f"data.tokenizer={tokenizer_dir} cannot be checked against it: its embeddings "
                "are indexed by the ids of the tokenizer it was trained with"
            )
        if pieces == load_tokenizer(tok_dir).pieces:
            return None
    extension = tok_dir / EXTENSION_FILE
    info = json.loads(extension.read_text()) if extension.is_file() else {}
    if their_sha is not None and info.get("old_sha256") == their_sha:  # model not grown yet
        export_dir = Path(hf_dir).parent
        raise ExportError(
            f"data.tokenizer={tokenizer_dir} extends the tokenizer of {hf_dir} to "
            f"{info.get('vocab_size')} ids, but the model still has the old "
            f"{info.get('old_vocab_size')}: grow it first with `python -m pretrain.export "
            f"extend {export_dir} OUT --old-tokenizer {hf_dir} --new-tokenizer "
            f"{tokenizer_dir}` and pass model.init_from=OUT (its discriminator and "
            "generator)"
        )
    raise ExportError(
        f"data.tokenizer={tokenizer_dir} is not the tokenizer of {hf_dir}: its embeddings "
        f"are indexed by that tokenizer's ids; use data.tokenizer={Path(hf_dir)} and a "
        "corpus prepared with it"
    )


def _tokenizer_json_pieces(hf_dir: Path) -> list[str] | None:
    """The pieces of a transformers tokenizer.json's Unigram model (what transformers makes of
    a DeBERTa-v2 SentencePiece model), id by id; None where there is no such file."""
    from data_prep.tokenizer import HF_TOKENIZER_FILE

    path = hf_dir / HF_TOKENIZER_FILE
    try:
        model = json.loads(path.read_text())["model"]
        return [str(entry[0]) for entry in model["vocab"]] if model["type"] == "Unigram" else None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


# --------------------------------------------------------------------------------------------
# Reading a training run's checkpoint (CPU, no process group)
# --------------------------------------------------------------------------------------------


@dataclass
class RunCheckpoint:
    model: RTDModel
    step: int
    directory: Path  # the step_XXXXXXXX directory read
    config: dict[str, Any]  # the run's resolved config, as saved in trainer_state.json
    tokenizer_dir: Path | None  # the tokenizer the run used, when the config names it


def locate_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory (step_XXXXXXXX/) meant by a run dir (its latest), the run's
    checkpoints/ dir (its latest), or a checkpoint dir itself."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ExportError(f"{p} does not exist")
    if not p.is_dir():
        raise ExportError(f"{p} is not a directory; give a run directory or a checkpoint directory")
    if (p / TRAINER_STATE).is_file():
        if p.name.endswith((ABANDONED, DAMAGED)):
            why = "abandoned by a rewind" if p.name.endswith(ABANDONED) else "set aside as damaged"
            print(f"warning: {p.name} was {why}; exporting it as asked", file=sys.stderr)
        return p
    root = p / "checkpoints" if (p / "checkpoints" / LATEST).is_file() else p
    if (root / LATEST).is_file():
        try:
            tag = published_tag(root)
        except CheckpointError as e:
            raise ExportError(str(e)) from None
        assert tag is not None
        problem = verify(root / tag)
        if problem is not None:
            raise ExportError(
                f"the latest checkpoint {root / tag} is damaged ({problem}); give an older "
                "checkpoint directory instead, or rerun the training to repair the run"
            )
        return root / tag
    jobs = sorted((d for d in p.iterdir() if (d / "checkpoints" / LATEST).is_file()), key=job_order)
    if jobs:  # a sweep's directory
        raise ExportError(
            f"{p} holds the runs of a sweep ({', '.join(d.name for d in jobs)}), not one run: "
            f"export one of them, e.g. python -m pretrain.export {jobs[0]} OUT_DIR"
        )
    raise ExportError(
        f"no checkpoint in {p}: expected a run directory (with checkpoints/{LATEST}) or a "
        f"checkpoint directory (step_XXXXXXXX/ with {TRAINER_STATE}); has the run saved yet?"
    )


def read_deepspeed_weights(step_dir: str | Path) -> dict[str, torch.Tensor]:
    """The model's fp32 weights from one DeepSpeed checkpoint, on CPU, without distributed.

    ZeRO-1/2/3 and DeepSpeed's bf16 optimizer (bf16 at stages 0 and 1) keep fp32 master
    partitions in `*optim_states.pt`; `gather_zero_checkpoint` gathers them (ZeRO-3's module
    file holds only empty placeholders). ZeRO-0 keeps the module in its training dtype; under
    fp16 (and bf16 saved before 27bbd0b) the fp32 masters sit beside it and are preferred.
    """
    d = Path(step_dir)
    if any(d.glob("*zero_pp_rank_*_optim_states.pt")):
        from pretrain.engine import gather_zero_checkpoint  # imports deepspeed: only when needed

        return {k: v.float() for k, v in gather_zero_checkpoint(d).items()}
    path = d / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise ExportError(f"{d} holds no DeepSpeed model states ({path.name} is missing)")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    module = {k: v for k, v in saved["module"].items() if isinstance(v, torch.Tensor)}
    optimizer = saved.get("optimizer")
    masters = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    if masters:
        module = _with_fp32_masters(module, [t for group in masters for t in group])
    return {k: v.float() for k, v in module.items()}


def _with_fp32_masters(
    module: dict[str, torch.Tensor], masters: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Replace low-precision module tensors by their fp32 masters.

    The checkpoint lists the masters by optimizer group, without names; each master rounds to
    exactly its module tensor, which identifies it (found by a cheap fingerprint, confirmed by
    equality). Where several tensors of one shape round to the same values the pairing may swap
    them, costing at most what the rounding already did; a master that matches nothing leaves
    the module tensor as it is.
    """

    def fingerprint(t: torch.Tensor) -> tuple:
        return (tuple(t.shape), float(t.detach().double().sum()))

    out = dict(module)
    low = {n: v for n, v in module.items() if v.is_floating_point() and v.dtype != torch.float32}
    if not low:
        return out
    dtype = next(iter(low.values())).dtype
    candidates: dict[tuple, list[str]] = {}
    for name, tensor in low.items():
        candidates.setdefault(fingerprint(tensor), []).append(name)
    for master in masters:
        rounded = master.to(dtype)
        names = candidates.get(fingerprint(rounded), [])
        for name in names:
            if torch.equal(rounded, low[name]):
                out[name] = master.float()
                names.remove(name)
                break
    return out


def _known_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def run_tokenizer_dir(config: dict[str, Any]) -> Path | None:
    """The tokenizer a run used: `data.tokenizer`, else the first corpus's own (the default
    corpus's, or the copy in a prepared corpus's `tokenizer/`), else unknown (corpora prepared
    before they kept a copy record only its hash). The order is the data pipeline's."""
    data = config.get("data", {})
    if data.get("tokenizer"):
        return Path(data["tokenizer"]).expanduser()
    corpora = [s.get("corpus") for s in data.get("sources") or []] or [data.get("corpus")]
    for corpus in corpora:
        if corpus == "default":
            from pretrain.data.pipeline import default_corpus_paths

            cache = data.get("cache_dir", "~/.cache/pretrain")
            return default_corpus_paths(cache, int(data.get("default_vocab_size", 8000)))[2]
        if corpus is not None:
            from data_prep.corpus import TOKENIZER_DIR
            from data_prep.tokenizer import MODEL_FILE

            copy = Path(corpus).expanduser() / TOKENIZER_DIR
            if (copy / MODEL_FILE).is_file():
                return copy
    return None


def _corpus_tokenizer_hashes(config: dict[str, Any]) -> set[str]:
    """sha256 of the tokenizer each prepared corpus of the run was tokenized with, where the
    manifest is still there to say."""
    data = config.get("data", {})
    corpora = [s.get("corpus") for s in data.get("sources") or []] or [data.get("corpus")]
    hashes = set()
    for c in corpora:
        if c is None:
            continue
        if c == "default":
            from pretrain.data.pipeline import default_corpus_paths

            shards = default_corpus_paths(
                data.get("cache_dir", "~/.cache/pretrain"),
                int(data.get("default_vocab_size", 8000)),
            )[1]
        else:
            shards = Path(c).expanduser()
        manifest = shards / "manifest.json"
        if manifest.is_file():
            sha = json.loads(manifest.read_text()).get("tokenizer", {}).get("sha256")
            if sha:
                hashes.add(sha)
    return hashes


def _absolute_data_paths(config: dict[str, Any], cwd: str | None) -> dict[str, Any]:
    """The run's config with its corpus and tokenizer paths made absolute against the directory
    it was launched from (recorded in trainer_state.json), so that export works from anywhere."""
    if cwd is None:  # checkpoints from before the launch directory was recorded
        return config

    def absolute(path: Any) -> Any:
        if not isinstance(path, str) or path == "default":
            return path
        return str(Path(cwd) / Path(path).expanduser())  # an absolute path stays itself

    data = dict(config.get("data", {}))
    data["corpus"], data["tokenizer"] = (
        absolute(data.get("corpus")),
        absolute(data.get("tokenizer")),
    )
    data["sources"] = [
        {**s, "corpus": absolute(s.get("corpus"))} for s in data.get("sources") or []
    ]
    return {**config, "data": data}


def load_run_checkpoint(path: str | Path) -> RunCheckpoint:
    """The RTD model of a run's latest checkpoint (or of the checkpoint given), on CPU in fp32."""
    step_dir = locate_checkpoint(path)
    state = json.loads((step_dir / TRAINER_STATE).read_text())
    config = _absolute_data_paths(state["config"], state.get("cwd"))
    try:
        fields = _known_fields(DebertaConfig, config["model"])
        # Eager attention: a run trained with the fused kernel loads on a CPU all the same.
        model_config = DebertaConfig(**{**fields, "attention_impl": "eager"})
        rtd_config = RTDConfig(**_known_fields(RTDConfig, config["rtd"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{step_dir / TRAINER_STATE} holds no usable model config: {e}") from None
    model = RTDModel(model_config, rtd_config)
    _load_strict(model, read_deepspeed_weights(step_dir), f"checkpoint {step_dir}")
    return RunCheckpoint(
        model.eval(), int(state["step"]), step_dir, config, run_tokenizer_dir(config)
    )


# --------------------------------------------------------------------------------------------
# Vocabulary extension (after python -m data_prep.extend_vocab)
# --------------------------------------------------------------------------------------------

# Tensors indexed by token id besides the word tables: the MLM head's output bias (and an
# untied decoder, should a directory hold one) in either head layout.
_VOCAB_ROWS = (
    "cls.predictions.bias",
    "cls.predictions.decoder.weight",
    "cls.predictions.decoder.bias",
    "lm_predictions.lm_head.bias",
)


def new_piece_sources(old_tokenizer: Any, new_tokenizer: Any) -> list[list[int]]:
    """For each new id (old vocab .. new vocab - 1), the old ids its piece's text encodes to:
    the piece with "▁" read as a space, stripped, through the old tokenizer; [UNK] if nothing."""
    from data_prep.tokenizer import WORD_START

    sources = []
    for i in range(old_tokenizer.vocab_size, new_tokenizer.vocab_size):
        text = new_tokenizer.id_to_piece(i).replace(WORD_START, " ").strip()
        sources.append(old_tokenizer.encode(text) or [old_tokenizer.unk_id])
    return sources


def grow_rows(table: torch.Tensor, sources: Sequence[Sequence[int]]) -> torch.Tensor:
    """`table` with one row appended per entry of `sources`: the mean of those old rows
    (computed in float64), old rows untouched. Works for a bias vector as for a matrix."""
    if not sources:
        return table.clone()
    new = [table[list(ids)].double().mean(0).to(table.dtype) for ids in sources]
    return torch.cat([table, torch.stack(new)])


def _extend_model_dir(
    src: Path,
    out: Path,
    old_vocab: int,
    sources: Sequence[Sequence[int]],
    new_tokenizer_dir: Path,
) -> None:
    config = json.loads((src / CONFIG_FILE).read_text())
    if config.get("vocab_size") != old_vocab:
        raise ExportError(
            f"{src / CONFIG_FILE} has vocab_size {config.get('vocab_size')} but the old tokenizer "
            f"{old_vocab} ids; extend the tokenizer this model was trained with"
        )
    state = read_hf_weights(src)
    grown = [k for k in state if k.endswith(WORD) or k in _VOCAB_ROWS]
    if not any(k.endswith(WORD) for k in grown):
        raise ExportError(f"{src} holds no {WORD}: not a DebertaV2 model directory")
    for k in grown:
        if state[k].shape[0] != old_vocab:
            raise ExportError(
                f"{src}: {k} has {state[k].shape[0]} rows, not vocab_size {old_vocab}"
            )
        state[k] = grow_rows(state[k], sources)
    config["vocab_size"] = old_vocab + len(sources)
    extra: dict[str, dict[str, torch.Tensor]] = {}
    form: dict[str, str] = {}
    if (src / RTD_HEAD_FILE).is_file():
        from safetensors.torch import load_file

        extra[RTD_HEAD_FILE] = load_file(src / RTD_HEAD_FILE)
        form = _head_form(src / RTD_HEAD_FILE)
    _write_model_dir(out, config, state, new_tokenizer_dir, extra, form)  # extension.json too


def extend_embeddings(
    hf_dir: str | Path,
    old_tokenizer_dir: str | Path,
    new_tokenizer_dir: str | Path,
    out_dir: str | Path,
    generator_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Grow an exported model's vocabulary to an extended tokenizer's (data_prep.extend_vocab).

    `hf_dir`: an export root (holding discriminator/ and maybe generator/) or a model directory
    (any DebertaV2 model; a generator/ beside a discriminator/ is picked up). Writes
    `out_dir/discriminator` (and `out_dir/generator`) in `to_hf`'s layout, so `rtd_from_hf`
    continues pretraining from them. Each new id's word-embedding row (and MLM output bias)
    is the mean of the old rows of the ids the old tokenizer gives for the piece's text
    (`new_piece_sources`); old rows are copied bit for bit; config.json's vocab_size is the new
    one; the new tokenizer files are copied in. Returns the directories written.
    """
    from data_prep.tokenizer import MODEL_FILE, TokenizerError, load_tokenizer, sha256_file

    d = Path(hf_dir).expanduser()
    if (d / DISCRIMINATOR / CONFIG_FILE).is_file():
        disc = d / DISCRIMINATOR
    else:
        disc = d
    if generator_dir is not None:
        gen: Path | None = Path(generator_dir).expanduser()
    else:
        beside = disc.parent / GENERATOR
        gen = beside if disc.name == DISCRIMINATOR and (beside / CONFIG_FILE).is_file() else None
    for part in (disc, gen):
        if part is not None and not (part / CONFIG_FILE).is_file():
            if (part / "checkpoints").is_dir():
                raise ExportError(
                    f"{part} is a training run, not a Hugging Face model directory: export it "
                    f"first (python -m pretrain.export {part} OUT) and extend OUT"
                )
            raise ExportError(f"{part / CONFIG_FILE} not found: not a Hugging Face model directory")
    old_dir = Path(old_tokenizer_dir).expanduser()
    new_dir = check_tokenizer_dir(new_tokenizer_dir, sys.maxsize)
    try:
        old, new = load_tokenizer(old_dir), load_tokenizer(new_dir)
    except TokenizerError as e:
        raise ExportError(str(e)) from None
    if new.vocab_size < old.vocab_size:
        raise ExportError(
            f"--new-tokenizer {new_dir} has {new.vocab_size} ids, fewer than --old-tokenizer "
            f"{old_dir}'s {old.vocab_size}: are the two swapped?"
        )
    if any(new.id_to_piece(i) != old.id_to_piece(i) for i in range(old.vocab_size)):
        raise ExportError(
            f"tokenizer {new_dir} does not extend {old_dir} (its first {old.vocab_size} ids are "
            "not the old pieces); make it with python -m data_prep.extend_vocab"
        )
    for part in (disc, gen):
        shipped = part / MODEL_FILE if part is not None else None
        if shipped is not None and shipped.is_file() and sha256_file(shipped) != old.sha256:
            raise ExportError(
                f"{part} ships a different tokenizer than {old_dir}; pass the tokenizer the "
                "model was trained with as the old one"
            )
    sources = new_piece_sources(old, new)
    out = Path(out_dir).expanduser()
    written = {DISCRIMINATOR: out / DISCRIMINATOR}
    if gen is not None:
        written[GENERATOR] = out / GENERATOR
    for name, src in ((DISCRIMINATOR, disc), (GENERATOR, gen)):
        if src is not None:
            if src.resolve() == written[name].resolve():
                raise ExportError(f"the output {written[name]} is the input; choose another OUT")
            _extend_model_dir(src, written[name], old.vocab_size, sources, new_dir)
    return written


def extend_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.export extend",
        description="Grow an exported model's embeddings to an extended tokenizer "
        "(python -m data_prep.extend_vocab): new rows are the mean of the old rows of each new "
        "piece's old tokens. Writes OUT/discriminator (and OUT/generator).",
    )
    parser.add_argument(
        "source", help="an export directory (discriminator/, generator/) or a model"
    )
    parser.add_argument("out", help="output directory")
    parser.add_argument("--old-tokenizer", required=True, help="the model's own tokenizer")
    parser.add_argument("--new-tokenizer", required=True, help="the extended tokenizer")
    parser.add_argument(
        "--generator", default=None, help="generator directory (default: generator/ beside)"
    )
    args = parser.parse_args(argv)
    earlier = _export_in(args.out)
    try:
        written = extend_embeddings(
            args.source, args.old_tokenizer, args.new_tokenizer, args.out, args.generator
        )
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    vocab = json.loads((written[DISCRIMINATOR] / CONFIG_FILE).read_text())["vocab_size"]
    print(f"extended to {vocab} ids -> " + ", ".join(str(p) for p in written.values()) + earlier)
    return 0


def _export_in(out: str | Path) -> str:
    """ " (replacing the export that was in OUT)" when OUT holds one, else ""."""
    parts = (Path(out) / DISCRIMINATOR, Path(out) / GENERATOR)
    held = any((d / CONFIG_FILE).is_file() for d in parts)
    return f" (replacing the export that was in {out})" if held else ""


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def export_run(
    source: str | Path,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    generator: bool = True,
) -> tuple[RunCheckpoint, dict[str, Path]]:
    """What the CLI does: read the checkpoint, find its tokenizer, write the HF directories."""
    run = load_run_checkpoint(source)
    _check_exportable(run.model, generator)
    tok = Path(tokenizer_dir).expanduser() if tokenizer_dir else run.tokenizer_dir
    if tok is None:
        raise ExportError(
            "the run's tokenizer is unknown (data.tokenizer was not set and the corpus is not "
            "the default one); pass --tokenizer DIR, the directory the corpus was prepared with"
        )
    if tok.is_file():  # runs from before training refused a file as data.tokenizer
        raise ExportError(
            f"tokenizer {tok} is a file, not the tokenizer directory; pass --tokenizer "
            f"{tok.parent} (the directory `python -m data_prep.tokenizer --out DIR` wrote)"
        )
    if not tok.is_dir():
        raise ExportError(f"the run's tokenizer directory {tok} is missing; pass --tokenizer DIR")
    hashes = _corpus_tokenizer_hashes(run.config)
    if hashes:
        from data_prep.tokenizer import MODEL_FILE, sha256_file

        if (tok / MODEL_FILE).is_file() and sha256_file(tok / MODEL_FILE) not in hashes:
            raise ExportError(
                f"tokenizer {tok} is not the one the run's corpus was tokenized with "
                "(sha256 differs from the corpus manifest); pass the right --tokenizer DIR"
            )
    return run, to_hf(run.model, tok, out_dir, generator=generator)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["extend"] and not Path("extend").exists():
        return extend_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.export",
        description="Export a run's discriminator and generator as Hugging Face DebertaV2 "
        "model directories (OUT/discriminator, OUT/generator).",
    )
    parser.add_argument(
        "source", help="a run directory, its checkpoints/ directory, or one checkpoint"
    )
    parser.add_argument("out", help="output directory")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer directory (default: the one the run used)"
    )
    parser.add_argument(
        "--no-generator",
        action="store_true",
        help="export the discriminator only (needed for a generator with the enhanced mask decoder)",
    )
    args = parser.parse_args(argv)
    # Consolidation runs on CPU; naming the accelerator spares DeepSpeed's detection (and its
    # warning) in this process of our own.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    earlier = _export_in(args.out)
    try:
        run, written = export_run(args.source, args.out, args.tokenizer, not args.no_generator)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sharing = run.model.rtd.embedding_sharing
    print(
        f"exported step {run.step} of {run.directory} ({sharing}) -> "
        + ", ".join(str(p) for p in written.values())
        + earlier
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
