"""Do two or more training runs learn alike? Reads each run's metrics.jsonl, one run directory
per argument, the first being the reference.

    python bench/compare_runs.py runs/eager runs/triton runs/eager_seed1 [--seed-run]

Prints the held-out numbers of every run at each evaluation step side by side, then, for each
run against the reference, the mean absolute difference of the training loss (smoothed over
`--window` logged records) over the steps both logged. With --seed-run the last run differs
from the reference only in its seed: its difference is the noise floor, and each other run
gets a verdict, "within noise" when its mean difference is at most the floor's (issue 7's
check that the fused attention trains like eager); the exit status is 1 when one is not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELD_OUT = ("gen_loss", "gen_acc", "disc_acc", "disc_auc")


def read(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no metrics.jsonl (is it a run directory?)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a crash, as the trainer itself drops on resume
    return records


def smoothed_train_loss(records: list[dict], window: int) -> dict[int, float]:
    """Step -> mean of the training loss over the last `window` logged records (one per
    trainer.log_every steps). A step logged twice (a resumed run) counts once, the last."""
    by_step = {r["step"]: r["loss"] for r in records if r.get("split") == "train"}
    steps = sorted(by_step.items())
    out: dict[int, float] = {}
    for i, (step, _) in enumerate(steps):
        recent = [loss for _, loss in steps[max(0, i - window + 1) : i + 1]]
        out[step] = sum(recent) / len(recent)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=" ".join((__doc__ or "").split("\n\n")[0].split()))
    p.add_argument("runs", nargs="+", type=Path, help="run directories; the first is the reference")
    p.add_argument(
        "--window", type=int, default=20, help="training-loss smoothing, in logged records"
    )
    p.add_argument(
        "--seed-run",
        action="store_true",
        help="the last run is the reference with another seed: judge the others against it",
    )
    args = p.parse_args(argv)
    if len(args.runs) < 2 + args.seed_run or args.window < 1:
        print(
            f"error: give at least {2 + args.seed_run} run directories and --window >= 1",
            file=sys.stderr,
        )
        return 2
    try:
        runs = {str(run): read(run) for run in args.runs}
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    names = list(runs)
    print("held-out evaluation (" + ", ".join(HELD_OUT) + ")")
    evals = {
        n: {r["step"]: r for r in recs if r.get("split") == "valid"} for n, recs in runs.items()
    }
    for step in sorted(set().union(*(e.keys() for e in evals.values()))):
        print(f"  step {step}")
        for name in names:
            r = evals[name].get(step)
            cells = "  ".join(f"{k} {r[k]:.4f}" if r and k in r else f"{k} -" for k in HELD_OUT)
            print(f"    {name}: {cells}")

    reference = smoothed_train_loss(runs[names[0]], args.window)
    print(f"training loss, smoothed over {args.window} records, against {names[0]}")
    mean_diff: dict[str, float] = {}
    for name in names[1:]:
        other = smoothed_train_loss(runs[name], args.window)
        common = sorted(set(reference) & set(other))
        if not common:
            print(f"  {name}: no common steps")
            continue
        diffs = [abs(other[s] - reference[s]) for s in common]
        mean_diff[name] = sum(diffs) / len(diffs)
        last = common[-1]
        print(
            f"  {name}: mean |diff| {mean_diff[name]:.4f}, max {max(diffs):.4f} over "
            f"{len(common)} steps; at step {last}: {other[last]:.4f} vs {reference[last]:.4f}"
        )
    if not args.seed_run:
        return 0
    seed_run = names[-1]
    if seed_run not in mean_diff:
        print(f"verdict: none, {seed_run} shares no step with {names[0]}")
        return 1
    floor, ok = mean_diff[seed_run], True
    for name in names[1:-1]:
        within = name in mean_diff and mean_diff[name] <= floor
        ok &= within
        got = f"{mean_diff[name]:.4f}" if name in mean_diff else "no common steps"
        print(
            f"verdict: {name} {'tracks' if within else 'does NOT track'} {names[0]} within "
            f"noise: mean |diff| {got} vs {floor:.4f} for another seed ({seed_run})"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
