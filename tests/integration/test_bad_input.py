"""Bad input to `python -m pretrain`, one table row each: the real CLI, as a user would run it.

Every row asserts the same four things: a non-zero exit; one error line that names the problem
and says what to do (the row's fragment); no Python traceback; and nothing in the run directory
damaged. A row that relaunches an existing run compares every file's sha256 before and after;
the others must leave no checkpoint behind, and no directory at all when one process is refused
at start-up (Hydra's record of the launch included). Each launch is bounded by a timeout, so a rank that
hangs instead of exiting fails the row.

Every problem is ours to report as `error: ...`, a misspelt key and a value of the wrong type
included: both are checked against the schema before Hydra, which would hint at `+key=value` (a
silent no-op) for the one and report the other in six lines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.test_distributed import free_port
from tests.integration.test_launch import child_env
from tests.integration.test_trainer import overrides_for

TIMEOUT = 120  # seconds for one launch, start-up included
TRACEBACK = "Traceback (most recent call last)"
# Hydra's log of every launch in its output directory (here the run directory): appended to,
# where Hydra writes one (conf/hydra/job_logging/console.yaml turns it off).
HYDRA_LOG = "__main__.log"


@dataclass(frozen=True)
class Case:
    overrides: tuple[str, ...]  # on top of a tiny 2-step run; <name> is a path from `inputs`
    line: str  # a fragment of the error line
    also: str = ""  # a second fragment of the error line, where it names the problem
    ranks: int = 1  # > 1: that many processes in one world, launched as torchrun would
    resume: bool = False  # relaunch the trained run of the `trained_run` fixture
    # The new run directory stays (unpublished): the error was found once training started (the
    # first batch), or several ranks were refused (they would race to remove it).
    keeps_dir: bool = False
    # What the other ranks say when one rank's data fails (they name no file of theirs).
    elsewhere: str = ""
    # Environment variables set for the launch; None removes one.
    env: tuple[tuple[str, str | None], ...] = ()


# No API key anywhere wandb looks (HOME holds its ~/.netrc), so logging.wandb=online fails
# before it reaches for the network.
NO_WANDB_KEY = (("WANDB_API_KEY", None), ("WANDB_MODE", None), ("HOME", "<home>"))

CASES = [
    pytest.param(
        Case(("-m", "--cfg", "job"), "error: --cfg prints one run's config: drop -m (--multirun)"),
        id="cfg-of-a-sweep",
    ),
    pytest.param(
        Case(("trainer.max_stepz=3",),
             "error: unknown config key 'trainer.max_stepz'; did you mean max_steps?"),
        id="misspelt-key",
    ),
    pytest.param(
        Case(("trainer.max_steps=three",),
             "error: trainer.max_steps takes an integer, not 'three'"),
        id="wrong-type",
    ),
    pytest.param(
        Case(("data.corpus=/nonexistent/corpus",),
             "error: data.corpus=/nonexistent/corpus: no manifest.json there; prepare a corpus "
             "with `python -m data_prep.corpus"),
        id="missing-corpus",
    ),
    pytest.param(
        Case(("data.sources=[{name:notes,dataset:text,data_files:['<empty_txt>']}]",),
             "error: data.sources[0]: data_files are empty (<empty_txt>); give files that hold "
             "documents"),
        id="empty-text-file",
    ),
    pytest.param(
        Case(("data.corpus=<valid_only_shards>",),
             "error: data.corpus=<valid_only_shards> has no training documents (data_prep read 3 "
             "documents); prepare it again with `python -m data_prep.corpus`"),
        id="corpus-without-training-documents",
    ),
    pytest.param(
        Case(("data.sources=[{name:blob,dataset:text,data_files:['<blob>']}]",),
             "error: data.sources[0]: <blob> is not UTF-8 text (a binary file: it holds NUL "
             "bytes); remove it from data_files or convert it to text"),
        id="binary-text-file",
    ),
    pytest.param(
        Case(("data.tokenizer=<other_tokenizer>",),
             "was tokenized with tokenizer sha256 <shards_sha>..., not the given <other_sha>...; "
             "prepare the corpus again with this tokenizer or use the one it was made with"),
        id="tokenizer-not-the-corpus-one",
    ),
    pytest.param(
        Case(("data.tokenizer=/nonexistent/tokz",),
             "error: data.tokenizer=/nonexistent/tokz: no such directory; pass the directory "
             "that `python -m data_prep.tokenizer --out DIR` wrote"),
        id="missing-tokenizer",
    ),
    pytest.param(
        Case(("data.tokenizer=<tokenizer>/spm.model",),
             "error: data.tokenizer=<tokenizer>/spm.model: a file, not the tokenizer directory "
             "(data.tokenizer=<tokenizer> holds it); pass the directory that "
             "`python -m data_prep.tokenizer --out DIR` wrote"),
        id="tokenizer-model-file-not-its-directory",
    ),
    pytest.param(
        Case(("model.attention_impl=triton", "model.attention_probs_dropout_prob=0"),
             "error: model.attention_impl=triton needs a CUDA GPU (this run is on cpu); use "
             "model.attention_impl=eager, or auto"),
        id="fused-attention-without-a-gpu",
    ),
    pytest.param(
        Case(("data.corpus=<three_doc_shards>",),
             "error: source '<three_doc_shards>' has no sequence for partition 0 of 8 in a "
             "whole pass (it has 3 documents for 8 partitions, and a partition reads whole "
             "documents: a few long documents need splitting, e.g. by blank lines in plain "
             "text); give it more text, or use fewer data.streams or ranks or a shorter "
             "data.seq_len", keeps_dir=True),
        id="corpus-too-small-for-the-streams",
    ),
    pytest.param(
        Case(("data.corpus=<small_valid_shards>", "trainer.eval_every=1"),
             "error: the held-out split of source '<small_valid_shards>' has 2 document(s), "
             "fewer than data.streams=8, and an evaluation reads from every partition: prepare "
             "the corpus with a larger --valid-fraction, use fewer data.streams, or set "
             "trainer.eval_every=0 (no evaluations)"),
        id="held-out-split-smaller-than-the-streams",
    ),
    pytest.param(
        Case(("logging.wandb=online",),
             "error: logging.wandb=online: wandb could not start (", env=NO_WANDB_KEY),
        id="wandb-without-an-api-key",
    ),
    pytest.param(
        Case(("logging.wandb=online",),
             "error: logging.wandb=online: wandb could not start (", env=NO_WANDB_KEY, ranks=2,
             keeps_dir=True,
             elsewhere="error: logging.wandb=online: wandb could not start on rank 0"),
        id="wandb-without-an-api-key-on-2-ranks",
    ),
    pytest.param(
        Case(("model.init_from=/nonexistent/hf",),
             "error: model.init_from=/nonexistent/hf: no such directory; pass a Hugging Face "
             "DebertaV2 directory (such as the discriminator/ that `python -m pretrain.export` "
             "writes)"),
        id="missing-init-from",
    ),
    pytest.param(
        Case(("model.init_from=<old_run>",),
             "error: model.init_from=<old_run> is a training run, not a Hugging Face directory; "
             "export it first with `python -m pretrain.export <old_run> OUT_DIR` and pass "
             "model.init_from=OUT_DIR"),
        id="init-from-a-run-directory",
    ),
    pytest.param(
        Case(("model.vocab_size=300",),
             "error: model.vocab_size=300 is smaller than the corpus tokenizer's vocabulary "
             "(400 ids); set model.vocab_size=400"),
        id="vocab-smaller-than-corpus",
    ),
    pytest.param(
        Case(("data.seq_len=1024",),
             "error: data.seq_len=1024 must be in [8, model.max_position_embeddings=512]"),
        id="seq-len-above-model-limit",
    ),
    pytest.param(
        Case(("trainer.global_batch_size=24",),
             "error: trainer.global_batch_size=24 is not a multiple of "
             "trainer.micro_batch_size=8 x world size 2 = 16; use trainer.micro_batch_size=6 "
             "or a global batch that divides evenly", ranks=2, keeps_dir=True),
        id="global-batch-not-divisible-by-2-ranks",
    ),
    pytest.param(  # and no rank adds a .hydra/<time>/ record of the refused launch
        Case(("trainer.global_batch_size=24",),
             "error: trainer.global_batch_size=24 is not a multiple of", ranks=2, resume=True),
        id="resume-refused-on-2-ranks",
    ),
    pytest.param(
        Case(("model.hidden_size=96",),
             "error: cannot resume <run>: it was trained with model.hidden_size=64 (now 96), "
             "which shape its weights or optimizer state; resume with those, or start a new run "
             "(another name= or hydra.run.dir=)",
             resume=True),
        id="resume-with-changed-model",
    ),
    pytest.param(
        Case(("rtd.embedding_sharing=nes",),
             "error: cannot resume <run>: it was trained with rtd.embedding_sharing=gdes (now "
             "nes), which shape its weights or optimizer state; resume with those, or start a "
             "new run (another name= or hydra.run.dir=)",
             resume=True),
        id="resume-with-changed-embedding-sharing",
    ),
    pytest.param(
        Case(("data.seq_len=32",),
             "error: cannot resume <run>: the run read its data with data.seq_len=64, not "
             "data.seq_len=32; resume with data.seq_len=64 or start a new run (another name= or "
             "hydra.run.dir=)", resume=True),
        id="resume-with-changed-seq-len",
    ),
    pytest.param(
        Case(("data.corpus=<other_corpus>",),
             "error: cannot resume <run>: the run read the sources ['<shards>'], not "
             "['<other_corpus>']; resume with the original data.corpus or data.sources or start "
             "a new run (another name= or hydra.run.dir=)", resume=True),
        id="resume-with-another-corpus",
    ),
]  # fmt: skip


def fill(text: str, paths: dict[str, object]) -> str:
    for name, value in paths.items():
        text = text.replace(f"<{name}>", str(value))
    return text


def tiny_run(corpus: dict, run_dir: Path, *extra: str) -> list[str]:
    """A 2-step run that saves only at its end, Hydra's output directory being the run's."""
    return overrides_for(
        corpus, run_dir, "trainer.max_steps=2", "trainer.eval_every=0", "trainer.save_every=0",
        f"hydra.run.dir={run_dir}", *extra,
    )  # fmt: skip


def launch(
    overrides: list[str],
    ranks: int = 1,
    program: tuple[str, ...] = ("-m", "pretrain"),
    env: dict[str, str] | None = None,
    unset: tuple[str, ...] = (),
) -> list[tuple[int, str]]:
    """(exit code, stdout + stderr) of each rank of `python -m pretrain` (or `program`), with
    `env` set and `unset` removed from the environment. Several ranks get the environment
    torchrun gives its workers; unlike torchrun, nothing kills a rank when another exits, so
    every rank has to stop by itself."""
    cmd = [sys.executable, *program, *overrides]

    def environment(**world: str) -> dict[str, str]:
        made = child_env(**world, **(env or {}))
        return {k: v for k, v in made.items() if k not in unset}

    if ranks == 1:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=environment(), timeout=TIMEOUT,
        )  # fmt: skip
        return [(proc.returncode, proc.stdout)]
    world = {"WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=environment(RANK=str(r), LOCAL_RANK=str(r), **world),
        )
        for r in range(ranks)
    ]
    try:
        outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
        return [(p.returncode, out) for p, out in zip(procs, outputs, strict=True)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory, by its path in it."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def assert_undamaged(before: dict[str, bytes], after: dict[str, bytes]) -> None:
    """Every file as it was, and no new one: not even Hydra's record of the refused launch
    (.hydra/<time>/), which would claim a configuration that never trained."""
    for name, data in before.items():
        assert name in after, f"{name} was deleted"
        if name == HYDRA_LOG:
            assert after[name].startswith(data), f"{name} was rewritten"
        else:
            assert after[name] == data, f"{name} was changed"
    added = set(after) - set(before)
    assert not added, f"new files: {sorted(added)}"


@pytest.fixture(scope="module")
def inputs(tiny_corpus: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The bad files and corpora of the table, made with the project's own data_prep."""
    from data_prep.corpus import prepare_corpus
    from data_prep.tokenizer import load_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("bad_input")
    (root / "empty.txt").write_bytes(b"")
    # A PNG signature and bytes 0-255: what an image left in a text directory starts with.
    (root / "blob.bin").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 16)
    shards = tiny_corpus["shards"]
    # Three documents, all drawn into the held-out split: nothing left to train on.
    (root / "three.txt").write_text("A first document.\n\nA second one.\n\nAnd a third.\n")
    prepare_corpus(root / "valid_only_shards", tiny_corpus["tokenizer"], [root / "three.txt"],
                   valid_fraction=0.999, progress=False)  # fmt: skip
    # Two held-out documents, fewer than the 8 streams an evaluation reads from.
    prepare_corpus(root / "small_valid_shards", tiny_corpus["tokenizer"], [root / "three.txt",
                   *json.loads((shards / "manifest.json").read_text())["inputs"]],
                   valid_fraction=0.002, progress=False)  # fmt: skip
    # The same three documents all for training: too few for 8 streams of 64 tokens.
    prepare_corpus(root / "three_doc_shards", tiny_corpus["tokenizer"], [root / "three.txt"],
                   valid_fraction=0.0, progress=False)  # fmt: skip
    # Another corpus made with the same tokenizer, as a second experiment's would be.
    shutil.copytree(shards, root / "other_corpus")
    # What a training run leaves, given where a Hugging Face directory is expected.
    (root / "old_run" / "checkpoints").mkdir(parents=True)
    (root / "old_run" / "metrics.jsonl").write_text("")
    # Another tokenizer of the same text, as a second experiment's would be.
    text = json.loads((shards / "manifest.json").read_text())["inputs"]
    train_tokenizer(root / "other_tokenizer", text, vocab_size=300, num_threads=1, progress=False)
    return {
        "shards": shards,
        "tokenizer": tiny_corpus["tokenizer"],
        "three_doc_shards": root / "three_doc_shards",
        "small_valid_shards": root / "small_valid_shards",
        "other_corpus": root / "other_corpus",
        "old_run": root / "old_run",
        "empty_txt": root / "empty.txt",
        "blob": root / "blob.bin",
        "valid_only_shards": root / "valid_only_shards",
        "other_tokenizer": root / "other_tokenizer",
        "shards_sha": load_tokenizer(tiny_corpus["tokenizer"]).sha256[:12],
        "other_sha": load_tokenizer(root / "other_tokenizer").sha256[:12],
    }


@pytest.fixture(scope="module")
def trained_run(tiny_corpus: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding a finished 2-step run and its checkpoint."""
    run = tmp_path_factory.mktemp("trained") / "run"
    [(rc, out)] = launch(tiny_run(tiny_corpus, run))
    assert rc == 0, out[-3000:]
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000002"
    return run


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_at_once_with_one_line_and_no_damage(
    case: Case,
    tiny_corpus: dict,
    inputs: dict[str, object],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    run = request.getfixturevalue("trained_run") if case.resume else tmp_path / "run"
    paths = {**inputs, "run": run}
    before = snapshot(run) if case.resume else None
    if before is not None:
        assert {"config.yaml", "metrics.jsonl", "checkpoints/latest"} <= set(before)
    overrides = [fill(o, paths) for o in case.overrides]
    env = {k: fill(v, {**paths, "home": tmp_path / "home"}) for k, v in case.env if v is not None}
    unset = tuple(k for k, v in case.env if v is None)
    results = launch(tiny_run(tiny_corpus, run, *overrides), case.ranks, env=env, unset=unset)

    assert len(results) == case.ranks
    named = 0  # ranks whose line names the problem (the others may say `elsewhere`)
    for rank, (rc, out) in enumerate(results):
        where = f"rank {rank} of {case.ranks}:\n{out[-3000:]}"
        assert rc != 0, where
        assert TRACEBACK not in out, where
        lines = [line for line in out.splitlines() if line.strip()]
        ours = [line for line in lines if line.startswith("error: ")]
        assert len(ours) == 1, where
        error = ours[0]
        if fill(case.line, paths) in error:
            named += 1
            assert fill(case.also, paths) in error, where
        assert fill(case.line, paths) in error or (case.elsewhere and case.elsewhere in error), (
            where
        )
    assert named >= 1
    if case.resume:
        assert_undamaged(before, snapshot(run))  # checkpoints, metrics, config.yaml, .hydra
    else:
        assert not (run / "checkpoints").exists()
        # A refusal at start-up leaves no directory: not even Hydra's record of the launch.
        assert case.keeps_dir or not run.exists(), sorted(map(str, run.rglob("*")))


def test_resume_with_the_corpus_spelt_another_way(tiny_corpus: dict, tmp_path: Path) -> None:
    """Started with data.corpus=<relative path>/ (the source named so in the saved state, as in
    runs from before spellings were matched), resumed with the absolute path: the run goes on."""
    run = tmp_path / "run"
    shards = Path(tiny_corpus["shards"])
    [(rc, out)] = launch(tiny_run(tiny_corpus, run, f"data.corpus={os.path.relpath(shards)}/"))
    assert rc == 0, out[-3000:]
    [(rc, out)] = launch(tiny_run(tiny_corpus, run, f"data.corpus={shards}", "trainer.max_steps=3"))
    assert rc == 0 and TRACEBACK not in out, out[-3000:]
    assert "resumed from step 2" in out, out[-3000:]
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000003"


def test_export_refuses_a_tokenizer_file_naming_its_directory(
    trained_run: Path, tiny_corpus: dict, tmp_path: Path
) -> None:
    tokenizer = Path(tiny_corpus["tokenizer"])
    args = [str(trained_run), str(tmp_path / "hf"), "--tokenizer", str(tokenizer / "spm.model")]
    [(rc, out)] = launch(args, program=("-m", "pretrain.export"))
    assert rc != 0 and TRACEBACK not in out, out[-3000:]
    assert [line for line in out.splitlines() if line.startswith("error: ")] == [
        f"error: tokenizer {tokenizer / 'spm.model'} is a file, not the tokenizer directory; "
        f"pass --tokenizer {tokenizer} (the directory `python -m data_prep.tokenizer --out DIR` "
        "wrote)"
    ], out[-3000:]
    assert not (tmp_path / "hf").exists()
