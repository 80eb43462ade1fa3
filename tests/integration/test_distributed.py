"""Two CPU processes (gloo) give the losses of one process with the same global batch.

The corpus is cut into the same partitions whatever the world size and masks and sampling
noise are keyed by sample, so 2 ranks x 1 micro batch see exactly the data of 1 rank x 2
accumulated micro batches. What may differ is floating-point summation order in the gradient
reduction (and ZeRO's partitioned optimizer step), hence the tolerance below.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.test_trainer import overrides_for

REL_TOL = 1e-4  # relative, on every logged loss of 4 steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    launcher: list[str], corpus: dict, run_dir: Path, *extra: str, split: str = "train"
) -> list[dict]:
    overrides = overrides_for(
        corpus,
        run_dir,
        "trainer.max_steps=4",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "model.hidden_dropout_prob=0.0",  # dropout streams differ per rank by design
        f"hydra.run.dir={run_dir}",
        *extra,
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [*launcher, *overrides], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MPU is not provided" not in proc.stdout + proc.stderr  # DeepSpeed's noise, dropped
    run_dir.with_suffix(".out").write_text(proc.stdout + proc.stderr)  # the latest launch's
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def torchrun(nproc: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}", "-m", "pretrain",
    ]  # fmt: skip


def assert_same_losses(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    worst = max(
        abs(rb[k] - ra[k]) / abs(ra[k])
        for ra, rb in zip(a, b, strict=True)
        for k in ("loss", "gen_loss", "disc_loss")
    )
    print(f"worst relative loss difference over 4 steps: {worst:.2e}")
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "gen_loss", "disc_loss"):
            assert rb[key] == pytest.approx(ra[key], rel=REL_TOL), (ra["step"], key)
        assert rb["tokens_seen"] == ra["tokens_seen"]


@pytest.fixture(scope="module")
def single_process(tiny_corpus: dict, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    run = tmp_path_factory.mktemp("single")
    return launch(
        torchrun(1), tiny_corpus, run, "trainer.micro_batch_size=8", "trainer.global_batch_size=16"
    )


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_zero_match_one_rank(
    stage: int, single_process, tiny_corpus: dict, tmp_path: Path
) -> None:
    two = launch(
        torchrun(2), tiny_corpus, tmp_path / "two",
        "trainer.micro_batch_size=8", "trainer.global_batch_size=16", f"deepspeed=zero{stage}",
    )  # fmt: skip
    assert_same_losses(single_process, two)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not on PATH")
def test_deepspeed_launcher_matches_one_rank(
    single_process, tiny_corpus: dict, tmp_path: Path
) -> None:
    launcher = [
        shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
        "--module", "pretrain",
    ]  # fmt: skip
    two = launch(
        launcher, tiny_corpus, tmp_path / "ds",
        "trainer.micro_batch_size=8", "trainer.global_batch_size=16", "deepspeed=zero2",
    )  # fmt: skip
    assert_same_losses(single_process, two)


@pytest.mark.slow
@pytest.mark.parametrize(
    "before, after, setup",
    [(2, 1, ("deepspeed=zero2",)), (1, 2, ("deepspeed=zero3",)),
     (2, 1, ("deepspeed=zero0", "deepspeed.precision=bf16"))],  # DeepSpeed's bf16 optimizer
    ids=["zero2", "zero3", "bf16"],
)  # fmt: skip
def test_resume_on_another_number_of_ranks(
    before: int, after: int, setup: tuple[str, ...], tiny_corpus: dict, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    common = ("trainer.micro_batch_size=8", "trainer.global_batch_size=16", *setup)
    first = launch(torchrun(before), tiny_corpus, run, *common, "trainer.max_steps=3")
    assert [r["step"] for r in first] == [1, 2, 3]
    both = launch(torchrun(after), tiny_corpus, run, *common, "trainer.max_steps=5")
    resumed = [r for r in both if r["step"] > 3]
    assert [r["step"] for r in resumed] == [4, 5]  # it resumed, it did not start over
    assert resumed[0]["tokens_seen"] == first[-1]["tokens_seen"] + 16 * 64
    # the optimizer state came back: the loss continues from where it was, not from scratch
    assert resumed[0]["loss"] < first[0]["loss"]
    said = run.with_suffix(".out").read_text()
    converted = (
        " from its universal form (step_00000003_universal, kept beside it until it is pruned)"
    )
    assert (
        f"saved on {before} rank(s), resumed on {after}: weights and optimizer state loaded"
        f"{converted}, each data partition moved to its new rank"
    ) in said
    # DeepSpeed's own pointer to the conversion named its temporary directory.
    assert (run / "checkpoints/latest_universal").read_text().strip() == "step_00000003_universal"
    # The export's own gathering of the saved partitions agrees with DeepSpeed's conversion.
    from pretrain.export import read_deepspeed_weights

    gathered = read_deepspeed_weights(run / "checkpoints/step_00000003")
    universal = run / "checkpoints/step_00000003_universal/zero"
    assert set(gathered) == {p.parent.name for p in universal.glob("*/fp32.pt")}
    for name, weight in gathered.items():
        saved = torch.load(universal / name / "fp32.pt", weights_only=False)
        saved = saved["param"] if isinstance(saved, dict) else saved
        assert torch.equal(weight, saved.float().view_as(weight)), name


@pytest.mark.slow
def test_an_evaluation_on_two_ranks_matches_one_rank(tiny_corpus: dict, tmp_path: Path) -> None:
    # The held-out set is fixed by trainer.eval_sequences, not by micro batch x ranks, and AUC
    # ranks every rank's positions: 2 ranks of micro 3 measure what 1 rank of micro 8 does.
    common = ("trainer.max_steps=0", "trainer.eval_sequences=24", "deepspeed=zero3")
    one = launch(torchrun(1), tiny_corpus, tmp_path / "one", *common, split="valid")
    two = launch(
        torchrun(2), tiny_corpus, tmp_path / "two", *common, "trainer.micro_batch_size=3",
        split="valid",  # global batch 16 is no multiple of 3 x 2: no training batch is formed
    )  # fmt: skip
    assert len(one) == len(two) == 1
    for key in ("gen_loss", "gen_acc", "gen_acc_unigram", "disc_acc", "disc_auc"):
        assert two[0][key] == pytest.approx(one[0][key], rel=REL_TOL, abs=1e-6), key
