"""Save, publish, verify and find checkpoints: everything a run needs to continue exactly.

Layout under `<run_dir>/checkpoints/`:

    step_00000200/            one checkpoint (DeepSpeed's model/optimizer/scheduler files, plus:)
        trainer_state.json    step, tokens seen, resolved config (rank 0)
        rank_00000.pt         that rank's data-loader state and RNG states (every rank)
        manifest.json         size and sha256 of every file above, written last (rank 0)
    latest                    the tag of the newest *published* checkpoint

Publishing, and why it is safe:
- Every rank writes its files into `step_X.partial/` (the engine's save reports a write error
  instead of raising it, so that no rank leaves its collective save early); the ranks then
  agree (a collective) that all writes succeeded. Only then does rank 0 hash the directory into `manifest.json`, rename it
  to `step_X/` and rewrite `latest` atomically (temp file, fsync, rename). A save killed
  half-way leaves `latest` at the previous checkpoint; a save that fails (full disk, unwritable
  directory) raises `CheckpointError` on every rank, removes its partial directory and leaves
  the previous checkpoint published.
- Resuming verifies the published checkpoint against its manifest (every file present, same
  size, same sha256). One that fails is renamed `step_X.damaged` with a warning and the newest
  older checkpoint that verifies is used instead. Directories newer than `latest` are saves that
  never finished, like `*.partial`; they are deleted. The manifest covers the files rank 0 can see: on several
  nodes without a shared file system, only rank 0's node's files are checked.
- Checkpoints beyond `keep_last` are deleted only after a new one is published.
- `python -m pretrain.checkpoint rewind RUN_DIR STEP` publishes an older kept checkpoint again
  (after a divergence whose last good state already holds wrecked weights, say): the newer ones
  are renamed `step_X.abandoned`, never deleted, and the next run resumes from STEP.
  `python -m pretrain.checkpoint list RUN_DIR` shows what there is to choose from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.metrics import METRICS_FILE, read_logged

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
DAMAGED = ".damaged"
ABANDONED = ".abandoned"  # newer than a rewind's step: kept for inspection, never resumed
PARTIAL = ".partial"  # a checkpoint being written; renamed to its tag once complete
_TAG = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or no intact one can be found to resume from."""


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
    """Finds, writes, verifies and prunes the checkpoints of one run directory.

    `barrier`, `all_ok` (every rank's bool -> their AND) and `broadcast` (rank 0's object -> every
    rank) are the collectives it needs; the defaults serve a single process."""

    def __init__(
        self,
        run_dir: str | Path,
        keep_last: int,
        rank: int = 0,
        barrier: Callable[[], Any] | None = None,
        all_ok: Callable[[bool], bool] | None = None,
        broadcast: Callable[[Any], Any] | None = None,
        log: Callable[[str], Any] = print,
    ):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self._barrier = barrier or (lambda: None)
        self._all_ok = all_ok or (lambda ok: ok)
        self._broadcast = broadcast or (lambda obj: obj)
        self._log = log

    def latest(self) -> str | None:
        """The tag to resume from: the newest published checkpoint that verifies, or None for a
        fresh run. Rank 0 verifies, sets damaged checkpoints aside, deletes unfinished saves,
        and tells the other ranks. Collective: all ranks call it."""
        found: tuple[str | None, str | None] = (None, None)
        if self.rank == 0:
            try:
                found = (self._choose_and_tidy(), None)
            except CheckpointError as e:
                found = (None, str(e))
        tag, error = self._broadcast(found)
        if error is not None:
            raise CheckpointError(error)
        return tag

    def _choose_and_tidy(self) -> str | None:
        published = published_tag(self.root)
        if published is None:
            return None
        newest = step_of(published)
        for d in self.root.iterdir():  # saves that never published: nothing worth keeping
            if d.name.endswith(PARTIAL) or (_TAG.match(d.name) and step_of(d.name) > newest):
                shutil.rmtree(d, ignore_errors=True)
        rejected: list[str] = []
        for d in sorted(step_dirs(self.root), key=lambda d: d.name, reverse=True):
            problem = verify(d)
            if problem is None:
                if rejected:
                    self._log(
                        f"warning: resuming from {d.name} instead; damaged checkpoints were "
                        f"renamed *{DAMAGED} for inspection (delete them when done)"
                    )
                return d.name
            rejected.append(f"{d.name}: {problem}")
            self._log(f"warning: checkpoint {d.name} is damaged ({problem}); skipping it")
            _set_aside(d)
        raise CheckpointError(
            f"no intact checkpoint in {self.root} ({'; '.join(rejected)}); "
            "start a new run_dir, or set trainer.resume=false to start over in this one"
        )

    def save(
        self, engine, step: int, trainer_state: dict[str, Any], rank_state: dict[str, Any]
    ) -> str:
        """Write one checkpoint on every rank, then publish it. Collective: all ranks call it.
        Raises `CheckpointError` on every rank if any rank's write failed; the previously
        published checkpoint stays published and intact."""
        tag = tag_for(step)
        partial = self.root / (tag + PARTIAL)
        previous = published_tag(self.root) if self.rank == 0 else None
        error: OSError | None = None
        try:
            if self.rank == 0:  # leftovers of an unfinished save of this step
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(partial, ignore_errors=True)
        except OSError as e:
            error = e
        # Every rank enters the engine's (collective) save, or none does.
        ready = self._all_ok(error is None)
        if ready:
            error = engine.save(str(self.root), partial.name, client_state={"step": step})
            try:
                if error is None:
                    torch.save(rank_state, partial / rank_file(self.rank))
                if error is None and self.rank == 0:
                    _write_atomic(partial / TRAINER_STATE, json.dumps(trainer_state, indent=1))
            except OSError as e:
                error = e
        # Every rank's files are on disk, or none count.
        written = ready and self._all_ok(error is None)
        if written and self.rank == 0:
            try:
                _write_atomic(partial / MANIFEST, json.dumps(manifest(partial), indent=1))
                final = self.root / tag
                if final.exists():  # the same step saved again (e.g. a stop right after a save)
                    shutil.rmtree(final)
                partial.rename(final)
                _write_atomic(self.root / LATEST, tag + "\n")
            except OSError as e:
                error = e
        if not self._all_ok(error is None):
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            kept = f"{previous} stays the latest checkpoint" if previous else "none was saved yet"
            cause = (
                f"{error.strerror or error} ({error.filename})" if error else "another rank failed"
            )
            raise CheckpointError(
                f"could not write checkpoint {tag} in {self.root}: {cause}; {kept}"
            )
        if self.rank == 0:
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
            pointer = self.root / "latest_universal"  # DeepSpeed's, which named `tmp`
            if pointer.is_file():
                _write_atomic(pointer, universal)
        self._barrier()
        return universal

    def _prune(self, keep: str) -> None:
        tags = sorted(d.name for d in step_dirs(self.root))
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


def step_of(tag: str) -> int:
    match = _TAG.match(tag)
    assert match, tag
    return int(match.group(1))


def step_dirs(root: Path) -> list[Path]:
    """Every step_XXXXXXXX directory under `root`, published or not."""
    if not root.is_dir():
        return []
    return [d for d in root.iterdir() if d.is_dir() and _TAG.match(d.name)]


def published_tag(root: Path) -> str | None:
    """What `latest` names (not yet verified), or None if nothing was ever published."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not _TAG.match(tag):
        raise CheckpointError(f"{pointer} holds {tag!r}, not a checkpoint tag; is it damaged?")
    return tag


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def manifest(directory: Path) -> dict[str, Any]:
    """Size and sha256 of every file in a checkpoint directory (but the manifest itself)."""
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")
    )
    return {
        "files": {
            str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in files
        }
    }


def verify(directory: Path) -> str | None:
    """None if the checkpoint matches its manifest, else what is wrong with it, in a phrase."""
    try:
        expected = json.loads((directory / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}: its save never finished"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, want in sorted(expected.items()):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, expected {want['bytes']}"
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match its sha256"
    if TRAINER_STATE not in expected:
        return f"{TRAINER_STATE} is not in the manifest"
    return None


def _set_aside(directory: Path) -> None:
    aside = directory.with_name(directory.name + DAMAGED)
    shutil.rmtree(aside, ignore_errors=True)
    directory.rename(aside)


def rewind(run_dir: str | Path, step: int) -> list[str]:
    """Publish the kept checkpoint of `step` again so that the next run resumes from it; rename
    the newer ones `step_X.abandoned` and copy `metrics.jsonl` aside (the resumed run drops its
    records past `step`). Returns what was done, a line each. Raises `CheckpointError` with what
    to do when `step` cannot be resumed from; then nothing is changed."""
    run, root = _run_and_root(run_dir)
    kept = sorted(step_of(d.name) for d in step_dirs(root))
    if not kept:
        raise _no_checkpoint(run, root)
    target = root / tag_for(step)
    if step not in kept:
        raise CheckpointError(
            f"no checkpoint of step {step} in {root}; kept: {', '.join(map(str, kept))}"
        )
    problem = verify(target)
    if problem is not None:
        raise CheckpointError(f"checkpoint {target.name} is damaged ({problem}); pick another")
    if published_tag(root) == target.name:
        return [f"{target.name} is already the latest checkpoint: nothing changed"]
    done = []
    metrics = run / METRICS_FILE
    if metrics.is_file():
        copy = _free_name(metrics.with_name(f"metrics.before_rewind_to_{step}.jsonl"))
        shutil.copyfile(metrics, copy)
        done.append(f"copied {metrics.name} to {copy.name}")
    for newer in sorted(s for s in kept if s > step):
        directory = root / tag_for(newer)
        aside = _free_name(directory.with_name(directory.name + ABANDONED))
        directory.rename(aside)
        shutil.rmtree(root / f"{directory.name}_universal", ignore_errors=True)  # derived
        done.append(f"renamed {directory.name} to {aside.name}")
    _write_atomic(root / LATEST, target.name + "\n")
    done.append(f"{LATEST} is {target.name}: the next run resumes from step {step}")
    return done


def _run_and_root(run_dir: str | Path) -> tuple[Path, Path]:
    """(run directory, its checkpoints/) from either of them, as export accepts."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"{run} does not exist; give a run directory")
    if run.name == "checkpoints" and not (run / "checkpoints").is_dir():
        run = run.parent
    return run, run / "checkpoints"


def _no_checkpoint(run: Path, root: Path) -> CheckpointError:
    return CheckpointError(f"{root} holds no checkpoint; is {run} a run directory?")


def _free_name(path: Path) -> Path:
    """`path`, or with .2, .3, ... before its suffix if that is taken (a.jsonl, a.2.jsonl): a
    second rewind loses nothing."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
    return candidate


def describe(run_dir: str | Path) -> list[str]:
    """A line per checkpoint directory of a run, oldest first: its step, tokens seen, the train
    loss logged at that step (or the last before it), and whether it is the latest or set
    aside; for choosing where to rewind to. Reads no weights and hashes nothing (rewind
    verifies the one chosen)."""
    run, root = _run_and_root(run_dir)
    dirs = [  # (step, dir): step_X, step_X.abandoned, step_X.2.abandoned, step_X.damaged
        (step_of(d.name.split(".")[0]), d)
        for d in (root.iterdir() if root.is_dir() else [])
        if d.is_dir()
        and _TAG.match(d.name.split(".")[0])
        and (_TAG.match(d.name) or d.name.endswith((ABANDONED, DAMAGED)))
    ]
    if not dirs:
        raise _no_checkpoint(run, root)
    losses = {
        int(r["step"]): float(r["loss"])
        for r in read_logged(run)
        if r.get("split") == "train" and r.get("loss") is not None and "step" in r
    }
    latest = published_tag(root)
    lines = []
    for step, d in sorted(dirs):
        try:
            tokens = f"{int(json.loads((d / TRAINER_STATE).read_text())['tokens_seen']):,}"
        except (OSError, ValueError, KeyError, TypeError):
            tokens = "?"
        # A step between two logged ones (save_every not a multiple of log_every) shows the
        # last logged before it, saying which.
        logged = max((s for s in losses if s <= step), default=None)
        loss = "-" if logged is None else f"{losses[logged]:.4g}"
        note = "" if logged in (None, step) else f"  (logged at step {logged})"
        note += "  (latest)" if d.name == latest else ""
        if d.name != tag_for(step):  # metrics.jsonl holds the losses of the branch kept
            loss, note = "-", f"  set aside: {d.name}"
        lines.append(f"step {step:>8}  tokens {tokens:>14}  train loss {loss:>8}{note}")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pretrain.checkpoint")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "list", help="the run's checkpoints: step, tokens seen, train loss, latest or set aside"
    ).add_argument("run_dir", type=Path, help="the run directory (holds checkpoints/)")
    r = sub.add_parser(
        "rewind",
        help="resume the next run from an older kept checkpoint; newer ones are renamed "
        "step_X.abandoned (not deleted). Stop the run first.",
    )
    r.add_argument("run_dir", type=Path, help="the run directory (holds checkpoints/)")
    r.add_argument("step", type=int, help="the step of a kept checkpoint (step_XXXXXXXX/)")
    args = p.parse_args(argv)
    try:
        if args.command == "list":
            lines = describe(args.run_dir)
        else:
            lines = rewind(args.run_dir, args.step)
    except (CheckpointError, OSError) as e:
        sys.exit(f"error: {e}")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
