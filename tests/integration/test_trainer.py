"""The trainer end to end in one CPU process: trains, logs, evaluates, saves, resumes exactly."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pretrain.config import Config, ConfigError, register_schema, to_config

CONF = Path(__file__).resolve().parents[2] / "conf"
register_schema()


def overrides_for(corpus: dict, run_dir: Path, *extra: str) -> list[str]:
    """A model small enough that a step takes ~0.1 s, on the session's tiny real corpus."""
    return [
        "experiment=quickstart",
        f"run_dir={run_dir}",
        f"data.corpus={corpus['shards']}",
        f"data.tokenizer={corpus['tokenizer']}",
        f"model.vocab_size={corpus['vocab_size']}",
        "model.hidden_size=64",
        "model.num_hidden_layers=2",
        "model.num_attention_heads=2",
        "model.intermediate_size=128",
        "model.position_buckets=16",
        "model.hidden_dropout_prob=0.1",  # dropout on: resume must restore its RNG too
        "data.seq_len=64",
        "data.num_workers=0",
        "trainer.micro_batch_size=8",
        "trainer.global_batch_size=16",  # 2 accumulation steps
        "trainer.max_steps=6",
        "trainer.log_every=1",
        "trainer.eval_every=3",
        "trainer.eval_sequences=16",  # 2 of each of the 8 partitions
        "trainer.save_every=3",
        "optim.warmup_steps=2",
        "optim.schedule=linear",  # the published recipes' schedule (the quick start's is constant)
        "masking=span",  # the default masking (the quick start's is token)
        "logging.progress_bar=false",
        "logging.plots=false",
        *extra,
    ]


def make_config(corpus: dict, run_dir: Path, *extra: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_config(compose("config", overrides=overrides_for(corpus, run_dir, *extra)))


def train(corpus: dict, run_dir: Path, *extra: str, until_step: int | None = None) -> list[dict]:
    from pretrain.trainer import Trainer

    return Trainer(make_config(corpus, run_dir, *extra)).fit(until_step=until_step)


def numbers(records: list[dict]) -> list[tuple]:
    keys = (
        "step",
        "split",
        "loss",
        "gen_loss",
        "disc_loss",
        "gen_acc",
        "disc_acc",
        "grad_norm",
        "disc_auc",
    )
    return [tuple(r.get(k) for k in keys) for r in records]


def test_exact_resume_gives_the_identical_loss_sequence(tiny_corpus: dict, tmp_path: Path) -> None:
    straight = train(tiny_corpus, tmp_path / "straight")
    first = train(tiny_corpus, tmp_path / "staged", until_step=3)
    assert (
        json.loads((tmp_path / "staged/checkpoints/step_00000003/trainer_state.json").read_text())[
            "step"
        ]
        == 3
    )
    second = train(tiny_corpus, tmp_path / "staged")
    assert [r["step"] for r in second][0] == 4  # it resumed rather than starting over
    assert numbers(first + second) == numbers(straight)  # bitwise: exact float equality
    # the learning signal is real, or equality would prove little
    assert len({r["loss"] for r in straight if r["split"] == "train"}) == 6


def test_run_directory_holds_metrics_checkpoints_config_and_plots(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    train(tiny_corpus, run, "trainer.keep_last=1", "logging.plots=true")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in trained] == [1, 2, 3, 4, 5, 6]
    for key in (
        "loss",
        "gen_loss",
        "gen_acc",
        "disc_loss",
        "disc_acc",
        "lr",
        "grad_norm",
        "tokens_per_s",
    ):
        assert all(isinstance(r[key], float) for r in trained), key
    assert trained[0]["tokens_seen"] == 16 * 64  # packed: every position is a real token
    evals = [r for r in records if r["split"] == "valid"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(0.0 <= r["disc_auc"] <= 1.0 and 0.0 <= r["gen_acc"] <= 1.0 for r in evals)
    # The same held-out batches at every evaluation, so the same best-constant-guess baseline.
    assert len({r["gen_acc_unigram"] for r in evals}) == 1 and 0 < evals[0]["gen_acc_unigram"] < 1
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000006"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000006"]
    assert "hidden_size: 64" in (run / "config.yaml").read_text()
    assert (run / "plots/train_loss.png").stat().st_size > 1000
    assert (run / "plots/valid_disc_auc.png").is_file()


def test_held_out_batches_do_not_depend_on_the_seed(tiny_corpus: dict, tmp_path: Path) -> None:
    # Seed replicates must be measured on one held-out set, while training data moves.
    from pretrain.data.pipeline import build_data
    from pretrain.engine import World

    world = World(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    bundles = [
        build_data(make_config(tiny_corpus, tmp_path / str(seed), f"trainer.seed={seed}"), world)
        for seed in (0, 5)
    ]

    def first(batches, n: int = 2) -> list[dict]:
        return [next(batches) for _ in range(n)]

    valid = [list(b.valid_batches()) for b in bundles]
    assert [len(v) for v in valid] == [2, 2]  # 16 sequences in micro batches of 8
    train = [first(iter(b.train)) for b in bundles]
    for key in ("input_ids", "labels", "sampling_noise"):
        assert all(torch.equal(a[key], b[key]) for a, b in zip(*valid, strict=True)), key
    assert not all(torch.equal(a["labels"], b["labels"]) for a, b in zip(*train, strict=True)), (
        "the training batches should move with the seed"
    )


@pytest.mark.parametrize("micro, ranks", [(3, 1), (8, 2), (5, 4)])
def test_the_held_out_set_does_not_depend_on_micro_batch_or_ranks(
    micro: int, ranks: int, tiny_corpus: dict, tmp_path: Path
) -> None:
    # Runs that differ in micro batch or number of ranks (a sweep over the batch size, a run
    # resumed on more GPUs) must be measured on the same held-out sequences, masks and noise.
    from pretrain.data.pipeline import build_data
    from pretrain.engine import World

    def rows(micro: int, ranks: int) -> tuple[list[tuple], list[int]]:
        config = make_config(
            tiny_corpus, tmp_path / "run", f"trainer.micro_batch_size={micro}",
            "trainer.global_batch_size=24", "trainer.eval_sequences=21",
        )  # fmt: skip
        found, counts = [], []
        for rank in range(ranks):
            world = World(rank=rank, local_rank=rank, world_size=ranks, device=torch.device("cpu"))
            data = build_data(config, world)
            batches = list(data.valid_batches())
            assert len(batches) == data.valid_batch_count
            assert all(len(b["input_ids"]) <= micro for b in batches)
            counts.append(len(batches))
            keys = ("sample_index", "input_ids", "labels", "attention_mask", "sampling_noise")
            found += [
                tuple(b[k][i].numpy().tobytes() for k in keys)
                for b in batches
                for i in range(len(b["input_ids"]))
            ]
        return sorted(found), counts

    reference, _ = rows(8, 1)
    assert len(reference) == 24  # 21 rounded up to 3 sequences of each of the 8 partitions
    found, counts = rows(micro, ranks)
    assert found == reference
    assert len(set(counts)) == 1  # every rank runs as many forwards (ZeRO-3 gathers in each)


def test_a_refused_resume_names_the_run_and_a_sweep_jobs_way_out(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    from pretrain.data.loader import LoaderStateError
    from pretrain.trainer import Trainer

    run = tmp_path / "1"
    train(tiny_corpus, run, "trainer.max_steps=2", "trainer.eval_every=0")
    changed = make_config(tiny_corpus, run, "trainer.max_steps=4", "trainer.seed=1")
    said = f"cannot resume {run}: the run read its data with trainer.seed=0, not trainer.seed=1; "
    with pytest.raises(LoaderStateError) as single:
        Trainer(changed).fit()
    assert str(single.value) == (
        said + "resume with trainer.seed=0 or start a new run (another name= or hydra.run.dir=)"
    )
    with pytest.raises(LoaderStateError) as job:  # a sweep's job is found by its number
        Trainer(changed, sweep_job=True).fit()
    assert str(job.value) == (
        said + "resume with trainer.seed=0 or give the new values another hydra.sweep.dir"
    )
    # What a sweep varies tells its jobs apart, even where a plain resume may change it: a
    # sweep over the micro batch, its list reordered, would report one job's result as another's.
    other_micro = make_config(tiny_corpus, run, "trainer.max_steps=4", "trainer.micro_batch_size=4")
    for swept in (("trainer.micro_batch_size",), ("trainer",)):
        with pytest.raises(ConfigError) as refused:
            Trainer(other_micro, sweep_job=True, swept=("optim.lr", *swept)).fit()
        moved = (
            "trainer.micro_batch_size=8 (now 4)" if "." in swept[0] else "other trainer settings"
        )
        assert str(refused.value) == (
            f"sweep job {run} was trained with {moved}: a sweep finds its jobs again by number, "
            "so resume it with the same values, or give the new values another hydra.sweep.dir"
        )
    resumed = Trainer(other_micro, sweep_job=True, swept=("optim.lr",)).fit()  # not swept
    assert [r["step"] for r in resumed if r["split"] == "train"] == [3, 4]
    # How the model runs (FREE_ON_RESUME: dropout, the attention kernel, whose default changed
    # from eager to auto) may change on any resume, a sweep job's over the model group too.
    free = make_config(
        tiny_corpus, run, "trainer.max_steps=6", "trainer.micro_batch_size=4",
        "model.attention_impl=eager",
    )  # fmt: skip
    resumed = Trainer(free, sweep_job=True, swept=("model",)).fit()
    assert [r["step"] for r in resumed if r["split"] == "train"] == [5, 6]


def test_a_held_out_split_smaller_than_an_evaluation_is_a_warning(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    from pretrain.trainer import Trainer

    manifest = json.loads((tiny_corpus["shards"] / "manifest.json").read_text())
    held_out = manifest["splits"]["valid"]["num_tokens"]
    # Whole partitions: one more sequence for each of the 8 than the split fills (x 64 tokens).
    sequences = (held_out // (8 * 64) + 1) * 8
    lines = Trainer(
        make_config(tiny_corpus, tmp_path / "run", f"trainer.eval_sequences={sequences - 7}")
    )
    said = lines._start_lines(False, 6)
    assert (  # the rounding to whole partitions is said
        f"note: trainer.eval_sequences={sequences - 7} reads {sequences} held-out sequences, a "
        "whole number from each of the data.streams=8 partitions" in said
    )
    warned = [x for x in said if "held-out split has" in x]
    assert warned == [  # rounded up to whole partitions: 8 x (sequences / 8)
        f"warning: the held-out split has {held_out} tokens, but an evaluation reads "
        f"{sequences * 64} ({sequences} sequences x data.seq_len): it reads the same sequences "
        "again, so its numbers are noisier than they look; prepare the corpus with a larger "
        "--valid-fraction, or lower trainer.eval_sequences"
    ]
    fits = Trainer(
        make_config(tiny_corpus, tmp_path / "run", f"trainer.eval_sequences={sequences - 8}")
    )
    assert not [x for x in fits._start_lines(False, 6) if "held-out split has" in x or "note:" in x]


def test_lr_warms_up_then_decays_linearly(tiny_corpus: dict, tmp_path: Path) -> None:
    records = [r for r in train(tiny_corpus, tmp_path / "lr") if r["split"] == "train"]
    lr = [r["lr"] for r in records]  # the rate that the *next* step will use
    peak = 1e-3  # quickstart's optim.lr; warmup 2 steps, then linear to 0 at step 6
    assert lr == pytest.approx([peak, peak, 0.75 * peak, 0.5 * peak, 0.25 * peak, 0.0])


def test_resuming_with_a_changed_model_is_refused_by_name(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    from pretrain.trainer import Trainer

    train(tiny_corpus, tmp_path / "run", until_step=3)
    changed = Trainer(make_config(tiny_corpus, tmp_path / "run", "model.intermediate_size=96"))
    with pytest.raises(ConfigError, match="intermediate_size"):
        changed.fit()


def test_wandb_offline_run_is_written_without_network(
    tiny_corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")  # CI exports disabled; this test wants offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "wb"
    train(tiny_corpus, run, "logging.wandb=offline", "trainer.max_steps=2", "trainer.eval_every=0")
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_cli_bad_corpus_path_is_one_clear_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "experiment=quickstart", f"data.corpus={tmp_path}/missing",
         f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.corpus=") and "manifest.json" in last
    assert "Traceback" not in proc.stderr


def test_a_refused_launch_does_not_wait_for_dynamo_deepspeed_or_triton(tmp_path: Path) -> None:
    """Most mistakes are refused before training starts; their one line should come after the
    import of torch alone, not after dynamo's (2 s, which torch's optimizers import when the
    engine is built), DeepSpeed's or Triton's."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pretrain", "experiment=quickstart",
         f"data.corpus={tmp_path}/missing", f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data.corpus=")
    timings = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[-1].strip() for line in timings}
    assert {"torch", "hydra", "pretrain.config"} <= imported
    assert not {"torch._dynamo", "torch._inductor", "deepspeed", "triton"} & imported


def test_cli_misspelt_override_names_the_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "trainer.max_step=5", f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    # One line that names the key and the right one, not Hydra's "+key=value" (also refused).
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: unknown config key 'trainer.max_step'; did you mean max_steps?")


def test_bf16_on_cpu_trains_with_finite_decreasing_loss(tiny_corpus: dict, tmp_path: Path) -> None:
    records = train(
        tiny_corpus, tmp_path / "bf16", "deepspeed.precision=bf16", "trainer.max_steps=4",
        "trainer.eval_every=4", "optim.warmup_steps=1",
    )  # fmt: skip
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 4 and all(isinstance(x, float) for x in losses)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "stage, precision",
    [(0, "bf16"), (1, "bf16"), (3, "fp32")],
    ids=["zero0_bf16", "zero1_bf16", "zero3"],
)
def test_fused_adamw_under_deepspeed_trains_as_the_default_loop(
    stage: int, precision: str, tiny_corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a GPU the engine's AdamW runs fused (CPU keeps the default loop). torch's fused AdamW
    # runs on CPU too, so DeepSpeed's optimizer wrappers are checked with it here: each stage
    # hands it other tensors (the model's parameters, bf16 masters, flat fp32 partitions).
    import pretrain.engine
    from pretrain.trainer import Trainer

    def run(fused: bool) -> list[float]:
        monkeypatch.setattr(pretrain.engine, "fused_adamw", lambda device: fused)
        trainer = Trainer(
            make_config(
                tiny_corpus, tmp_path / str(fused), f"deepspeed=zero{stage}",
                f"deepspeed.precision={precision}", "trainer.max_steps=3",
                "trainer.eval_every=0", "trainer.save_every=0", "optim.warmup_steps=1",
            )
        )  # fmt: skip
        inner = trainer.engine.optimizer
        while not isinstance(inner, torch.optim.AdamW):  # DeepSpeed's wrapper(s) around it
            inner = inner.optimizer
        assert bool(inner.defaults["fused"]) == fused
        return [r["loss"] for r in trainer.fit() if r["split"] == "train"]

    fused, loop = run(True), run(False)
    assert len(fused) == 3
    # The same updates up to rounding: the losses after one and two of them agree closely.
    assert fused == pytest.approx(loop, rel=1e-4)


def test_a_run_resumed_from_an_unfused_checkpoint_runs_fused(
    tiny_corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Loading a checkpoint replaces the optimizer's groups with the saved ones, which said
    # fused=False before runs on a GPU ran fused; the resumed run must run fused all the same.
    import pretrain.engine
    from pretrain.trainer import Trainer

    run = tmp_path / "run"
    common = ("deepspeed=zero1", "deepspeed.precision=bf16", "trainer.eval_every=0")
    monkeypatch.setattr(pretrain.engine, "fused_adamw", lambda device: False)
    train(tiny_corpus, run, *common, "trainer.max_steps=2")
    monkeypatch.setattr(pretrain.engine, "fused_adamw", lambda device: True)
    trainer = Trainer(make_config(tiny_corpus, run, *common, "trainer.max_steps=3"))
    assert [r["step"] for r in trainer.fit() if r["split"] == "train"] == [3]
    inner = trainer.engine.optimizer
    while not isinstance(inner, torch.optim.AdamW):
        inner = inner.optimizer
    assert all(group["fused"] for group in inner.param_groups)
    steps = [state["step"] for state in inner.state.values()]
    assert steps and all(s.dtype == torch.float32 and float(s) == 3 for s in steps)


def test_two_weighted_sources_mix_as_configured(tiny_corpus: dict, tmp_path: Path) -> None:
    # The same shards under two names, weighted 3:1, plus the raw text of a jsonl file streamed
    # through `datasets` and tokenized on the fly: a domain corpus beside a general one.
    text = tmp_path / "domain.jsonl"
    text.write_text(
        "".join(
            json.dumps({"text": f"Domain sentence number {i} about proteins."}) + "\n"
            for i in range(400)
        )
    )
    shards = tiny_corpus["shards"]
    sources = (
        f"data.sources=[{{name:general,corpus:'{shards}',weight:3.0}},"
        f"{{name:again,corpus:'{shards}',weight:0.5}},"
        f"{{name:domain,dataset:json,data_files:['{text}'],weight:0.5}}]"
    )
    records = train(
        tiny_corpus, tmp_path / "mix", sources, "trainer.max_steps=8", "trainer.eval_every=0"
    )
    last = [r for r in records if r["split"] == "train"][-1]
    shares = {k.split("/")[-1]: v for k, v in last.items() if k.startswith("data/share/")}
    assert set(shares) == {"general", "again", "domain"}
    # 8 steps x 16 sequences = 128 draws of p = (0.75, 0.125, 0.125): within 4 sigma
    assert shares["general"] == pytest.approx(0.75, abs=4 * (0.75 * 0.25 / 128) ** 0.5)
    assert shares["domain"] > 0


def test_mismatched_source_config_is_refused(tiny_corpus: dict, tmp_path: Path) -> None:
    shards = tiny_corpus["shards"]
    with pytest.raises(ConfigError, match="weight to every source"):
        make_config(
            tiny_corpus,
            tmp_path,
            f"data.sources=[{{name:a,corpus:'{shards}',weight:1.0}},{{name:b,corpus:'{shards}'}}]",
        )


def test_a_resumed_run_may_change_dropout(tiny_corpus: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny_corpus, run, "trainer.max_steps=2", "trainer.eval_every=0")
    records = train(
        tiny_corpus, run, "trainer.max_steps=3", "trainer.eval_every=0",
        "model.hidden_dropout_prob=0.0", "model.attention_probs_dropout_prob=0.0",
    )  # fmt: skip
    assert [r["step"] for r in records] == [3]  # resumed from step 2, not refused


def test_compiled_layers_train_like_eager_ones(tiny_corpus: dict, tmp_path: Path) -> None:
    from pretrain.trainer import Trainer

    # No dropout: compiled dropout draws from inductor's own RNG, so only dropout-free runs
    # can be compared number for number.
    # Evaluation at steps 0 and 3: eval mode and no_grad compile their own graphs.
    common = ("trainer.max_steps=3", "trainer.eval_every=3", "model.hidden_dropout_prob=0.0")
    eager = train(tiny_corpus, tmp_path / "eager", *common)
    config = make_config(tiny_corpus, tmp_path / "compiled", *common, "trainer.compile=true")
    trainer = Trainer(config)
    layers = [*trainer.model.generator.encoder.layer, *trainer.model.discriminator.encoder.layer]
    assert all(layer._compiled_call_impl is not None for layer in layers)
    compiled = trainer.fit()
    # The same sampled corruption and nearly the same losses (equal to the 6 digits logged on
    # this CPU); compiled kernels may round differently from eager ones, hence a tolerance,
    # still far below what a wrong layer would give.
    assert [(r["step"], r["split"]) for r in compiled] == [(r["step"], r["split"]) for r in eager]
    assert {r["split"] for r in eager} == {"train", "valid"}
    for a, b in zip(eager, compiled, strict=True):
        for key in ("loss", "gen_loss", "disc_loss", "grad_norm", "disc_auc"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], a["split"], key)


def test_a_short_evaluation_batch_leaves_the_compiled_training_graph_static(
    tiny_corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 24 held-out sequences in micro batches of 5: the last has 4. Dynamo's default would then
    # recompile with a symbolic batch size and compile the training graph (after the first
    # evaluation) symbolic too. A recording backend sees each graph's example inputs.
    from pretrain.trainer import Trainer

    graphs: list[tuple[bool, tuple]] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        # A symbolic size shows in the placeholders' example values (and as an extra input).
        values = [n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder")]
        shapes = tuple(tuple(v.shape) for v in values if isinstance(v, torch.Tensor))
        graphs.append((torch.is_grad_enabled(), shapes))
        return gm.forward

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend=record, **kw)
    )
    config = make_config(
        tiny_corpus, tmp_path / "run", "trainer.compile=true", "trainer.micro_batch_size=5",
        "trainer.global_batch_size=5", "trainer.eval_sequences=20", "trainer.max_steps=2",
        "trainer.eval_every=2", "model.hidden_dropout_prob=0.0",
    )  # fmt: skip
    trainer = Trainer(config)
    assert trainer.data.valid_batch_count == 5
    trainer.fit()
    torch._dynamo.reset()
    symbolic = [g for g in graphs if any(isinstance(d, torch.SymInt) for s in g[1] for d in s)]
    assert not symbolic, symbolic
    # The hidden states are the graphs' only 3-D inputs: [B, L, hidden].
    batch_sizes = {(grad, s[0]) for grad, shapes in graphs for s in shapes if len(s) == 3}
    assert batch_sizes == {(False, 5), (False, 4), (True, 5)}, (batch_sizes, graphs)


def test_compile_with_zero3_is_refused(tiny_corpus: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trainer.compile=true with deepspeed.zero_stage=3"):
        make_config(
            tiny_corpus, tmp_path / "run", "trainer.compile=true", "deepspeed.zero_stage=3"
        ).validate()


def test_deterministic_switch_is_set_per_run_and_changes_no_number_on_cpu(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    from pretrain.trainer import Trainer

    common = ("trainer.max_steps=2", "trainer.eval_every=0")
    try:
        config = make_config(tiny_corpus, tmp_path / "det", *common, "trainer.deterministic=true")
        trainer = Trainer(config)
        assert torch.are_deterministic_algorithms_enabled()
        deterministic = trainer.fit()
        plain = train(tiny_corpus, tmp_path / "plain", *common)  # as a sweep's next job would
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert numbers(deterministic) == numbers(plain)


def test_a_changed_learning_rate_applies_on_resume(
    tiny_corpus: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The checkpoint's optimizer and schedule states hold the old peak rate; the new config's
    must win from the first resumed step (the advice after a divergence is to lower it)."""
    lower = train(tiny_corpus, tmp_path / "lower", "optim.lr=5e-4")
    train(tiny_corpus, tmp_path / "staged", until_step=3)  # at the default 1e-3
    resumed = train(tiny_corpus, tmp_path / "staged", "optim.lr=5e-4")
    rate = {r["step"]: r["lr"] for r in lower if r["split"] == "train"}
    got = {r["step"]: r["lr"] for r in resumed if r["split"] == "train"}
    assert sorted(got) == [4, 5, 6] and all(got[s] == rate[s] for s in got), (got, rate)
    assert "changed on resume: optim.lr 0.001 -> 0.0005" in capsys.readouterr().out
    # The first resumed step's own rate (logged rates are the next step's), and the other
    # hyper-parameters, straight from the optimizer's groups after a resume at step 3.
    from pretrain.trainer import Trainer

    train(tiny_corpus, tmp_path / "again", until_step=3)
    again = Trainer(make_config(tiny_corpus, tmp_path / "again", "optim.lr=5e-4",
                                "optim.weight_decay=0.05"))  # fmt: skip
    assert again.resume()
    fresh = Trainer(make_config(tiny_corpus, tmp_path / "fresh", "optim.lr=5e-4",
                                "optim.weight_decay=0.05"))  # fmt: skip
    expected = {r["step"]: r["lr"] for r in lower if r["split"] == "train"}[3]
    groups = again.engine.optimizer.param_groups, fresh.engine.optimizer.param_groups
    for g, f in zip(*groups, strict=True):
        assert g["weight_decay"] == f["weight_decay"]
        assert g["initial_lr"] == f["initial_lr"]
    assert again.engine.lr() == pytest.approx(expected)
    # A larger global batch applies too, and is said; another ZeRO stage, whose checkpoint
    # DeepSpeed lays out otherwise, is refused in one line (it was DeepSpeed's traceback).
    capsys.readouterr()
    assert [r["step"] for r in train(tiny_corpus, tmp_path / "again", "trainer.max_steps=4",
            "trainer.global_batch_size=32") if r["split"] == "train"] == [4]  # fmt: skip
    assert "changed on resume: trainer.global_batch_size 16 -> 32" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"it was trained with deepspeed.zero_stage=0 \(now 1\)"):
        train(tiny_corpus, tmp_path / "again", "trainer.max_steps=5", "deepspeed.zero_stage=1")


def test_resume_false_starts_over_and_says_so(
    tiny_corpus: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    train(tiny_corpus, run, "trainer.max_steps=3")
    capsys.readouterr()
    train(tiny_corpus, run, "trainer.max_steps=3", "trainer.resume=false")
    assert (f"warning: trainer.resume=false: starting over in {run}; the earlier run's "
            "metrics.jsonl is cleared and its checkpoints (latest: step_00000003) are replaced "
            "as this run saves") in capsys.readouterr().out  # fmt: skip
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["step"], r["split"]) for r in rows]
    assert steps == [(0, "valid"), (1, "train"), (2, "train"), (3, "train"), (3, "valid")]


def test_a_run_that_failed_before_logging_is_simply_started_again(
    tiny_corpus: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A first launch refused at its first batch leaves config.yaml and an empty metrics.jsonl;
    the next launch is a new run, with no warning about clearing an earlier one."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").touch()
    (run / "config.yaml").write_text("earlier: attempt\n")
    train(tiny_corpus, run, "trainer.max_steps=1")
    out = capsys.readouterr().out
    assert f"new run in {run}" in out and "warning: no checkpoint to resume" not in out, out


def test_a_corpus_without_a_held_out_split_is_warned_about(
    tiny_corpus: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from data_prep.corpus import prepare_corpus

    inputs = json.loads((tiny_corpus["shards"] / "manifest.json").read_text())["inputs"]
    no_valid = tmp_path / "no_valid"
    prepare_corpus(no_valid, tiny_corpus["tokenizer"], inputs, valid_fraction=0.0, progress=False)
    records = train(tiny_corpus, tmp_path / "run", f"data.corpus={no_valid}",
                    "trainer.max_steps=1", "trainer.eval_every=1")  # fmt: skip
    assert [r["split"] for r in records] == ["train"]
    assert ("warning: trainer.eval_every=1 but the data has no held-out split, so there are no "
            "evaluations") in capsys.readouterr().out  # fmt: skip
    evaluate_only = make_config(tiny_corpus, tmp_path / "eval", f"data.corpus={no_valid}",
                                "trainer.max_steps=0")  # fmt: skip
    from pretrain.trainer import Trainer

    with pytest.raises(ConfigError, match="trainer.max_steps=0 evaluates the starting model on "
                       "the held-out split, but the data has none"):  # fmt: skip
        Trainer(evaluate_only)


def test_console_says_what_runs_and_logs_lines_without_a_bar(
    tiny_corpus: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch job (no progress bar) still gets a line per logged step and per evaluation; a
    run says what it is and where its checkpoint went; settings that waste a run are warned
    about; a finished run run again says so and does nothing."""
    run = tmp_path / "run"
    extra = ("logging.progress_bar=false", "trainer.max_steps=2", "trainer.eval_every=2",
             "optim.warmup_steps=5", f"model.vocab_size={tiny_corpus['vocab_size'] + 1000}")  # fmt: skip
    before = signal.getsignal(signal.SIGINT)
    train(tiny_corpus, run, *extra)
    assert signal.getsignal(signal.SIGINT) is before  # put back: Ctrl-C works after a fit

    def ours() -> list[str]:  # not DeepSpeed's log lines
        return [line for line in capsys.readouterr().out.splitlines() if line[:1] != "["]

    out = ours()
    assert out[0] == f"new run in {run}"
    assert out[1].startswith("0.") and "M parameters" in out[1]
    assert "1 rank on cpu (fp32, attention eager), " in out[1]  # auto on a CPU: eager
    assert "global batch 16 = micro 8 x accumulation 2 x 1 rank of 64 tokens, to step 2" in out[1]
    assert "warning: optim.warmup_steps=5 >= trainer.max_steps=2" in out[2]
    assert f"{tiny_corpus['vocab_size']} ids: 1000 embedding rows are never used" in out[3]
    assert [line.split()[0] for line in out[4:9]] == [
        "step=0",
        "step=1",
        "step=2",
        "step=2",
        "step",
    ]
    assert "split=valid" in out[4] and "loss=" in out[5] and "split=valid" in out[7]
    assert out[8] == (f"step 2: checkpoint {run}/checkpoints/step_00000002; to load it in "
                      f"transformers: python -m pretrain.export {run} OUT_DIR")  # fmt: skip

    assert train(tiny_corpus, run, *extra) == []
    again = ours()
    assert again[-2:] == [f"resumed from step 2 in {run}", "nothing to train: the run is at "
                          "step 2 (raise trainer.max_steps to go on)"]  # fmt: skip
    # Run again with a lower max_steps: the reported step is past it, and says so.
    assert train(tiny_corpus, run, *extra, "trainer.max_steps=1") == []
    assert ours()[-1] == ("nothing to train: the run is at step 2, past trainer.max_steps=1 "
                          "(raise trainer.max_steps to go on)")  # fmt: skip


def test_cli_help_says_what_it_is_and_how_to_start() -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pretrain", "--help"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "powered by Hydra" not in proc.stdout
    assert proc.stdout.startswith("python -m pretrain [key=value ...]: pretrain a DeBERTa-v3")
    assert "experiment: deberta_v3_base, deberta_v3_large" in proc.stdout  # Hydra's groups
    assert "python -m pretrain experiment=quickstart trainer.max_steps=100" in proc.stdout


def test_checkpoint_list_shows_the_last_loss_logged_before_an_unlogged_step(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    from pretrain.checkpoint import describe

    run = tmp_path / "run"
    records = train(tiny_corpus, run, "trainer.max_steps=4", "trainer.log_every=2",
                    "trainer.save_every=3", "trainer.eval_every=0")  # fmt: skip
    loss = {r["step"]: r["loss"] for r in records if r["split"] == "train"}
    assert sorted(loss) == [2, 4]  # step 3 is saved but not logged
    lines = describe(run)
    assert [line.split("  train loss ")[1] for line in lines] == [
        f"{loss[2]:>8.4g}  (logged at step 2)",
        f"{loss[4]:>8.4g}  (latest)",
    ]


def test_zero3_with_every_parameter_partitioned_trains_as_zero0(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    # ZeRO-3 keeps small parameters whole (stage3_param_persistence_threshold, 1e5 elements by
    # default: every weight of the tiny model); at threshold 0 each is partitioned and gathered
    # by hooks. The attention reads its projections' weights without calling those modules
    # (one matmul for q, k, v), which DeepSpeed gathers on that first access and registers as
    # the attention's own; were they not gathered, this would fail on shapes or numbers.
    threshold = "+deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0"
    common = ("trainer.max_steps=3", "trainer.eval_every=0", "trainer.save_every=0")
    zero3 = train(tiny_corpus, tmp_path / "z3", "deepspeed=zero3", threshold, *common)
    zero0 = train(tiny_corpus, tmp_path / "z0", "deepspeed=zero0", *common)
    losses = [[r["loss"] for r in run if r["split"] == "train"] for run in (zero3, zero0)]
    assert len(losses[0]) == 3
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_profile_steps_write_a_chrome_trace_of_exactly_those_steps(
    tiny_corpus: dict, tmp_path: Path
) -> None:
    import gzip

    common = ("trainer.eval_every=0", "trainer.save_every=0", "logging.profile_from=2")
    for max_steps, profiled in ((5, "2-3"), (2, "2-2")):  # the second ends inside the window
        run = tmp_path / f"run{max_steps}"
        train(
            tiny_corpus, run, *common, "logging.profile_steps=2", f"trainer.max_steps={max_steps}"
        )
        (path,) = (run / "profile").iterdir()
        assert path.name == f"rank00000_steps{profiled}.json.gz"
        events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
        # torch's optimizer marks each step: one per profiled optimizer step, none of the others
        steps = [e for e in events if str(e.get("name", "")).startswith("Optimizer.step#")]
        first, last = (int(x) for x in profiled.split("-"))
        assert len(steps) == last - first + 1, [e["name"] for e in steps]
        assert any(str(e.get("name", "")).startswith("aten::") for e in events)


def test_profiled_steps_leave_the_throughput_and_a_late_resume_profiles_nothing(
    tiny_corpus: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    common = ("trainer.eval_every=0", "trainer.save_every=0", "trainer.log_every=1")
    profiled = ("logging.profile_steps=2", "logging.profile_from=2")
    records = train(tiny_corpus, run, *common, *profiled, "trainer.max_steps=4")
    rates = {r["step"]: r.get("tokens_per_s") for r in records if r["split"] == "train"}
    # a window of profiled steps only has no rate; the others have one without their time
    assert rates[2] is None and rates[3] is None and rates[1] and rates[4], rates
    assert "profile of steps 2-3" in capsys.readouterr().out
    # Resumed at step 4, past profile_from: nothing profiled, and a line says so.
    (run / "profile" / "rank00000_steps2-3.json.gz").unlink()
    train(tiny_corpus, run, *common, *profiled, "trainer.max_steps=6")
    assert not any((run / "profile").iterdir())
    assert "warning: logging.profile_from=2 is not after step 4" in capsys.readouterr().out
