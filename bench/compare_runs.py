"""Do two or more training runs learn alike? Reads each run's metrics.jsonl, one run directory
per argument (a sweep's directory stands for its jobs), the first being the reference.

    python bench/compare_runs.py runs/eager runs/triton runs/eager_seed1 [--seed-run]

Names each run by the config values that set it apart (`rtd.embedding_sharing=es`), prints
the held-out numbers of every run at each evaluation step side by side (all there is for
evaluation-only runs, trainer.max_steps=0), then, for each run
against the reference, the mean absolute difference of the training loss (smoothed over
`--window` logged records) over the steps both logged. With --seed-run the last run differs
from the reference only in its seed: its difference is the noise floor, and each other run
gets a verdict, "within noise" when its mean difference is at most the floor's, both taken
over the steps all three runs logged (issue 7's check that the fused attention trains like
eager); there is no verdict from fewer than MIN_VERDICT_STEPS such steps, and the exit status
is 1 when a run does not track or has no verdict. `python -m pretrain.metrics plot` draws the
same runs' curves on one set of axes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain.config import ConfigError
from pretrain.metrics import find_runs, held_out_set_differences, read_logged, run_labels

HELD_OUT = ("gen_loss", "gen_acc", "gen_acc_unigram", "disc_acc", "disc_auc")
MIN_VERDICT_STEPS = 5


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
    if args.window < 1:
        print("error: --window must be at least 1", file=sys.stderr)
        return 2
    for arg in args.runs:
        if arg.is_file():  # a shell glob over a sweep also names its multirun.yaml
            print(f"skipping {arg}: not a run directory", file=sys.stderr)
    try:
        found = find_runs([arg for arg in args.runs if not arg.is_file()])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = {str(run): read_logged(run) for run in found}  # each holds metrics.jsonl
    if len(runs) < 2 + args.seed_run:
        print(
            f"error: {len(runs)} run(s) found; give at least {2 + args.seed_run} run directories",
            file=sys.stderr,
        )
        return 2

    print("runs (what sets each apart)")
    for run, label in run_labels(found).items():
        print(f"  {run}: {label or '(same config)'}")
    names = list(runs)
    print("held-out evaluation (" + ", ".join(HELD_OUT) + ")")
    if apart := held_out_set_differences(found):
        print(
            f"  note: not one held-out set: the runs differ in {', '.join(apart)}, so these "
            "numbers compare other sequences or masks, not only the models"
        )
    evals = {
        n: {r["step"]: r for r in recs if r.get("split") == "valid"} for n, recs in runs.items()
    }
    if not any(evals.values()):
        print("  none logged (trainer.eval_every=0, or no held-out split)")
    for step in sorted(set().union(*(e.keys() for e in evals.values()))):
        print(f"  step {step}")
        for name in names:
            r = evals[name].get(step)
            cells = "  ".join(f"{k} {r[k]:.4f}" if r and k in r else f"{k} -" for k in HELD_OUT)
            print(f"    {name}: {cells}")

    smoothed = {name: smoothed_train_loss(recs, args.window) for name, recs in runs.items()}
    reference = smoothed[names[0]]
    if not any(smoothed.values()):  # trainer.max_steps=0 runs: their evaluations are all
        print("training loss: none logged (evaluation-only runs, trainer.max_steps=0)")
        if args.seed_run:
            print("verdict: none: --seed-run judges training curves")
        return 1 if args.seed_run else 0

    def mean_diff(name: str, steps: list[int]) -> float:
        return sum(abs(smoothed[name][s] - reference[s]) for s in steps) / len(steps)

    records = "record" if args.window == 1 else f"{args.window} records"
    print(f"training loss, smoothed over the last {records}, against {names[0]}")
    short = [name for name in names if len(smoothed[name]) < 2 * args.window]
    if short:  # the trailing mean then blurs most of the run
        print(f"  note: {len(short)} run(s) logged fewer than {2 * args.window} records; "
              "a smaller --window follows their curves more closely")  # fmt: skip
    for name in names[1:]:
        other = smoothed[name]
        common = sorted(set(reference) & set(other))
        if not common:
            print(f"  {name}: no common steps")
            continue
        diffs = [abs(other[s] - reference[s]) for s in common]
        last = common[-1]
        print(
            f"  {name}: mean |diff| {mean_diff(name, common):.4f}, max {max(diffs):.4f} over "
            f"{len(common)} steps; smoothed at step {last}: {other[last]:.4f} vs "
            f"{reference[last]:.4f}"
        )
    if not args.seed_run:
        return 0
    seed_run, ok = names[-1], True
    for name in names[1:-1]:
        # The floor and the run's difference over the same steps: a seed run that stopped
        # early must not judge a long run by its first, noisiest records alone.
        steps = sorted(set(reference) & set(smoothed[name]) & set(smoothed[seed_run]))
        if len(steps) < MIN_VERDICT_STEPS:
            ok = False
            print(
                f"verdict: none for {name}: {len(steps)} steps logged by it, {names[0]} and "
                f"{seed_run} alike (at least {MIN_VERDICT_STEPS} needed)"
            )
            continue
        got, floor = mean_diff(name, steps), mean_diff(seed_run, steps)
        within = got <= floor
        ok &= within
        print(
            f"verdict: {name} {'tracks' if within else 'does NOT track'} {names[0]} within "
            f"noise: mean |diff| {got:.4f} vs {floor:.4f} for another seed ({seed_run}), "
            f"over steps {steps[0]}-{steps[-1]} ({len(steps)} records)"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
