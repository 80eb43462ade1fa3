"""Save, publish and find checkpoints: everything a run needs to continue exactly.

Layout under `<run_dir>/checkpoints/`:

    step_00000200/            one checkpoint (DeepSpeed's model/optimizer/scheduler files, plus:)
        trainer_state.json    step, tokens seen, resolved config (rank 0)
        rank_00000.pt         that rank's data-loader state and RNG states (every rank)
    latest                    the tag of the newest *complete* checkpoint

A checkpoint is published by rewriting `latest` atomically (write a temp file, then rename)
after every rank has finished writing and passed a barrier; a save interrupted half-way leaves
`latest` pointing at the previous one, so a half-written checkpoint is never picked up. Only
then are checkpoints beyond `keep_last` deleted.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def capture_rng() -> dict[str, Any]:
    """Every RNG a step may draw from on this rank: torch (dropout), numpy, python. Masks and
    sampling noise are keyed by sample and need no state."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Finds, writes and prunes the checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path, keep_last: int, rank: int = 0, barrier=None):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self._barrier = barrier or (lambda: None)

    def latest(self) -> str | None:
        """The tag of the newest published checkpoint, or None for a fresh run."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        if not (self.root / tag / TRAINER_STATE).is_file():
            raise FileNotFoundError(
                f"{pointer} names checkpoint {tag!r} but {self.root / tag / TRAINER_STATE} is missing"
            )
        return tag

    def save(
        self, engine, step: int, trainer_state: dict[str, Any], rank_state: dict[str, Any]
    ) -> str:
        """Write one checkpoint on every rank, then publish it. Collective: all ranks call it."""
        tag = tag_for(step)
        self.root.mkdir(parents=True, exist_ok=True)
        engine.save(str(self.root), tag, client_state={"step": step})
        directory = self.root / tag
        torch.save(rank_state, directory / rank_file(self.rank))
        if self.rank == 0:
            _write_atomic(directory / TRAINER_STATE, json.dumps(trainer_state, indent=1))
        self._barrier()  # every rank's files are on disk before the pointer moves
        if self.rank == 0:
            _write_atomic(self.root / LATEST, tag + "\n")
            self._prune(keep=tag)
        self._barrier()
        return tag

    def trainer_state(self, tag: str) -> dict[str, Any]:
        """Step, tokens and config of a checkpoint, readable before loading any tensor."""
        return json.loads((self.root / tag / TRAINER_STATE).read_text())

    def load(self, engine, tag: str, engine_tag: str | None = None) -> dict[str, Any]:
        """Restore the engine (from `engine_tag`, e.g. a universal conversion, if given) and
        return this rank's saved state. Collective under ZeRO-3."""
        path = self.root / tag / rank_file(self.rank)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: checkpoint {tag} was written by fewer ranks than this run has"
            )
        engine.load(str(self.root), engine_tag or tag)
        return torch.load(path, weights_only=False)

    def all_rank_states(self, tag: str) -> list[dict[str, Any]]:
        """Every saved rank's state, for resuming on another number of ranks."""
        world = int(self.trainer_state(tag)["world_size"])
        return [
            torch.load(self.root / tag / rank_file(r), weights_only=False) for r in range(world)
        ]

    def universal_tag(self, tag: str, convert) -> str:
        """The DeepSpeed universal checkpoint of `tag`, converted once by rank 0 with
        `convert(src, dst)`; ZeRO-partitioned optimizer states need it to load on another
        number of ranks. Collective: all ranks call it."""
        universal = f"{tag}_universal"
        if self.rank == 0 and not (self.root / universal / "done").is_file():
            tmp = self.root / f"{universal}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            convert(self.root / tag, tmp)
            (tmp / "done").touch()
            shutil.rmtree(self.root / universal, ignore_errors=True)
            tmp.rename(self.root / universal)
        self._barrier()
        return universal

    def _prune(self, keep: str) -> None:
        tags = sorted(p.name for p in self.root.iterdir() if p.is_dir() and _TAG.match(p.name))
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(self.root / old, ignore_errors=True)
                shutil.rmtree(self.root / f"{old}_universal", ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
