"""Export from a real run directory: train 2 steps under ZeRO-3, export with the CLI, load in
transformers, and get the trained model's numbers back.

The reference weights are gathered from the live DeepSpeed engine (`GatheredParameters`); the
export reads the partitioned checkpoint files offline, in another process, without a process
group. Agreement of the two is what says the ZeRO-3 consolidation is right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.config import ConfigError
from pretrain.metrics import read_metrics
from tests.integration.test_trainer import make_config

transformers = pytest.importorskip("transformers")

TOL = 1e-5


@pytest.fixture
def one_thread():
    """A tiny model: a second intra-op thread only spin-waits on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_zero3_run_exports_to_transformers_with_our_numbers(
    tiny_corpus: dict, tmp_path: Path, one_thread: None
) -> None:
    import deepspeed

    from pretrain.models.rtd import RTDModel
    from pretrain.trainer import Trainer

    run = tmp_path / "run"
    trainer = Trainer(
        make_config(
            tiny_corpus, run, "deepspeed=zero3", "trainer.max_steps=2", "trainer.eval_every=0"
        )
    )
    trainer.fit()
    live = trainer.engine.module
    with deepspeed.zero.GatheredParameters(list(live.parameters())):
        trained = {name: p.detach().clone() for name, p in live.named_parameters()}
    reference = RTDModel(trainer.config.model, trainer.config.rtd)
    reference.load_state_dict(trained, strict=True)
    reference.eval()
    assert reference.word_embeddings_delta is not None
    assert reference.word_embeddings_delta.abs().max() > 0  # trained: GDES's delta moved off 0

    out = tmp_path / "hf"
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.export", str(run), str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "exported step 2" in proc.stdout

    disc, info = transformers.AutoModel.from_pretrained(
        out / "discriminator", output_loading_info=True
    )
    assert not (info["missing_keys"] or info["unexpected_keys"]), info
    gen, info = transformers.AutoModelForMaskedLM.from_pretrained(
        out / "generator", output_loading_info=True
    )
    assert not (info["missing_keys"] or info["unexpected_keys"]), info
    tok = transformers.AutoTokenizer.from_pretrained(out / "discriminator")

    texts = ["Return the number of items in the container.", "Open a file and return a stream."]
    batch = tok(texts, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask.eq(0).any()  # padding in the batch
    with torch.no_grad():
        word, pos = reference.discriminator_embedding_weights()
        ours = reference.discriminator(ids, mask, None, word, pos)
        theirs = disc.eval()(ids, attention_mask=mask).last_hidden_state
        gen_word, _ = reference.generator_embedding_weights()
        hidden = reference.generator(ids, mask)
        our_logits = reference.mlm_head(hidden[mask.bool()], gen_word)
        their_logits = gen.eval()(ids, attention_mask=mask).logits[mask.bool()]
    hidden_diff = (ours - theirs).abs().max().item()
    logit_diff = (our_logits - their_logits).abs().max().item()
    print(
        f"zero3 export: discriminator hidden {hidden_diff:.2e}, generator logits {logit_diff:.2e}"
    )
    assert hidden_diff <= TOL and logit_diff <= TOL


def test_continued_pretraining_starts_from_the_exported_model(
    tiny_corpus: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from pretrain.export import from_hf, load_run_checkpoint, to_hf
    from pretrain.trainer import Trainer
    from tests.integration.test_trainer import train

    train(tiny_corpus, tmp_path / "base", "trainer.max_steps=2", "trainer.eval_every=0")
    run = load_run_checkpoint(tmp_path / "base")
    to_hf(run.model, run.tokenizer_dir, tmp_path / "hf")

    def continued(*extra: str) -> Trainer:
        return Trainer(make_config(
            tiny_corpus, tmp_path / "adapted", "trainer.eval_every=0",
            f"model.init_from={tmp_path / 'hf/discriminator'}",
            f"model.init_generator_from={tmp_path / 'hf/generator'}",
            "model.hidden_size=32",  # ignored: the checkpoint's config.json sets the shape
            "model.hidden_dropout_prob=0.0",  # kept: dropout is the run's (0.1 in the export)
            *extra,
        ))  # fmt: skip

    adapted = continued("trainer.max_steps=2")
    assert adapted.config.model.hidden_size == 64
    assert adapted.config.model.hidden_dropout_prob == 0.0
    assert json.loads((tmp_path / "hf/discriminator/config.json").read_text())[
        "hidden_dropout_prob"
    ] == pytest.approx(0.1)
    out = capsys.readouterr().out.splitlines()
    warnings = [line for line in out if line.startswith("warning: model.init_from")]
    assert warnings == [  # the setting the checkpoint overrides is named, and only it
        f"warning: model.init_from: the model's shape is that of "
        f"{tmp_path / 'hf/discriminator'}/config.json, not the model.* settings: hidden_size "
        "64 (model.hidden_size=32)"
    ]
    backbone, _ = from_hf(tmp_path / "hf/discriminator")
    ours = adapted.model.discriminator.state_dict()
    word, _ = adapted.model.discriminator_embedding_weights()
    for name, value in backbone.state_dict().items():
        got = word if name == "embeddings.word_embeddings.weight" else ours[name]
        torch.testing.assert_close(got, value, rtol=0, atol=1e-6)
    records = adapted.fit()
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    said = capsys.readouterr().out
    assert f"discriminator from {tmp_path / 'hf/discriminator'}" in said
    assert f"generator and MLM head from {tmp_path / 'hf/generator'}" in said
    # Resumed, it goes on from its own checkpoint, and does not say it starts from init_from.
    assert [r["step"] for r in continued("trainer.max_steps=3").fit() if r["split"] == "train"] == [
        3
    ]
    said = capsys.readouterr().out
    assert f"resumed from step 2 in {tmp_path / 'adapted'}" in said
    assert "discriminator from" not in said and "MLM head from" not in said


def test_evaluation_only_measures_an_export_as_its_run_did(
    tiny_corpus: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """trainer.max_steps=0 evaluates the starting model, here an export, on the held-out split
    and trains nothing: the numbers are the run's own evaluation at the exported step (the
    held-out batches, masks and noise are the same whatever trainer.seed)."""
    from pretrain.export import load_run_checkpoint, to_hf
    from pretrain.trainer import Trainer
    from tests.integration.test_trainer import train

    base = train(tiny_corpus, tmp_path / "base", "trainer.max_steps=2", "trainer.eval_every=2")
    [want] = [r for r in base if r["split"] == "valid" and r["step"] == 2]
    run = load_run_checkpoint(tmp_path / "base")
    to_hf(run.model, run.tokenizer_dir, tmp_path / "hf")
    capsys.readouterr()
    evaluation = make_config(
        tiny_corpus, tmp_path / "eval", "trainer.max_steps=0", "trainer.seed=5",
        f"model.init_from={tmp_path / 'hf/discriminator'}",
        f"model.init_generator_from={tmp_path / 'hf/generator'}",
    )  # fmt: skip
    evaluated = Trainer(evaluation).fit()
    assert evaluated == [{**want, "step": 0}]
    assert read_metrics(tmp_path / "eval") == evaluated
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["config.yaml", "metrics.jsonl"]
    said = capsys.readouterr().out
    assert "evaluation only (trainer.max_steps=0): 16 held-out sequences of 64 tokens" in said
    assert "warning: evaluation only" not in said
    # The export's own directory loads the same pair.
    root = make_config(
        tiny_corpus, tmp_path / "eval_root", "trainer.max_steps=0", f"model.init_from={tmp_path / 'hf'}"
    )  # fmt: skip
    assert Trainer(root).fit() == evaluated
    # Run again in its own directory, an evaluation replaces the one there.
    assert Trainer(evaluation).fit() == evaluated
    assert read_metrics(tmp_path / "eval") == evaluated
    assert f"replacing the earlier evaluation in {tmp_path / 'eval/metrics.jsonl'} (1 record)" in (
        capsys.readouterr().out
    )
    # Heads the checkpoint does not give are new: the figures they leave meaningless are named.
    (tmp_path / "hf/discriminator/rtd_head.safetensors").unlink()
    alone = Trainer(make_config(tiny_corpus, tmp_path / "alone", "trainer.max_steps=0",
                                f"model.init_from={tmp_path / 'hf/discriminator'}"))  # fmt: skip
    assert alone.fit()[0]["gen_loss"] != want["gen_loss"]  # a new MLM head, not the trained one
    warned = [line for line in capsys.readouterr().out.splitlines() if "evaluation only," in line]
    assert len(warned) == 2
    assert warned[0].startswith(
        "warning: evaluation only, without model.init_generator_from: the MLM head is new"
    )
    assert warned[1] == (
        f"warning: evaluation only, {tmp_path / 'hf/discriminator'} has no rtd_head.safetensors, "
        "so the RTD head is new and disc_acc and disc_auc measure an untrained discriminator head"
    )
    # The run directory of a trained run is not re-evaluated: it says how to evaluate it.
    kept = (tmp_path / "base/metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError) as refused:
        train(tiny_corpus, tmp_path / "base", "trainer.max_steps=0")
    assert str(refused.value) == (
        f"trainer.max_steps=0 evaluates a new run's starting model, but {tmp_path / 'base'} "
        f"holds a run trained to step 2: to evaluate it, export it (python -m pretrain.export "
        f"{tmp_path / 'base'} OUT) and give model.init_from=OUT to a new run (another name= or "
        "hydra.run.dir=)"
    )
    assert (tmp_path / "base/metrics.jsonl").read_bytes() == kept
    # Nor started over there (trainer.resume=false), which would clear the run's metrics.
    with pytest.raises(ConfigError, match="would clear its metrics.jsonl: give the evaluation"):
        train(tiny_corpus, tmp_path / "base", "trainer.max_steps=0", "trainer.resume=false")
    assert (tmp_path / "base/metrics.jsonl").read_bytes() == kept


def test_a_run_without_data_tokenizer_uses_and_exports_its_corpus_copy(
    tiny_corpus: dict, tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.tokenizer may be left out for a prepared corpus: training reads the corpus's copy
    of its tokenizer (whole-word masking needs it) and export ships it, also from another
    directory than the one the run was launched from with a relative data.corpus."""
    from pretrain.export import export_run
    from pretrain.trainer import Trainer

    run = tmp_path / "run"
    monkeypatch.chdir(tiny_corpus["shards"].parent)
    config = make_config(tiny_corpus, run, "data.tokenizer=null", "data.corpus=shards/",
                         "masking=whole_word", "trainer.max_steps=1", "trainer.eval_every=0")  # fmt: skip
    assert config.data.tokenizer is None
    Trainer(config).fit()
    monkeypatch.chdir(tmp_path)
    _, written = export_run(run, tmp_path / "hf")
    spm = (tiny_corpus["tokenizer"] / "spm.model").read_bytes()
    assert (written["discriminator"] / "spm.model").read_bytes() == spm


def test_a_checkpoint_with_fewer_embeddings_than_the_tokenizer_is_refused(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    from pretrain.export import to_hf
    from pretrain.models.deberta import DebertaConfig
    from pretrain.models.rtd import RTDModel
    from pretrain.trainer import Trainer

    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    to_hf(RTDModel(DebertaConfig(vocab_size=300, **shape)), None, tmp_path / "hf")
    with pytest.raises(ConfigError) as refused:  # model.vocab_size cannot fix it: init_from sets it
        Trainer(make_config(tiny_corpus, tmp_path / "run", f"model.init_from={tmp_path / 'hf'}"))
    assert str(refused.value) == (
        f"model.init_from={tmp_path / 'hf/discriminator'} has 300 embeddings, fewer than the "
        f"{tiny_corpus['vocab_size']} ids of data.tokenizer={tiny_corpus['tokenizer']}: it was "
        "not trained with that tokenizer; use the checkpoint's own, or one that extends it "
        "(python -m data_prep.extend_vocab) with the model grown to it"
    )
