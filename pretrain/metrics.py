"""Where a run's numbers go: `metrics.jsonl` in the run directory, wandb, a progress bar, plots.

Only rank 0 writes. `metrics.jsonl` holds one JSON object per logged step (training records
have "split": "train", evaluations "split": "valid"), so a run can be read without wandb; on
resume, records past the checkpoint's step are dropped first, so a crash never leaves the same
step logged twice. `python -m pretrain.metrics plot RUN_DIR` redraws the PNG curves at any time;
given several runs, or a sweep's directory, it draws them on one set of axes per curve, each
run named by the config values that set it apart (`run_labels`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
from tqdm import tqdm

from pretrain.config import ConfigError
from pretrain.models.deberta import DebertaConfig

METRICS_FILE = "metrics.jsonl"
PLOTTED = [
    ("loss", "train"),
    ("gen_loss", "train"),
    ("disc_loss", "train"),
    ("gen_acc", "train"),
    ("disc_acc", "train"),
    ("lr", "train"),
    ("grad_norm", "train"),
    ("tokens_per_s", "train"),
    ("gen_acc", "valid"),
    ("disc_acc", "valid"),
    ("disc_auc", "valid"),
    ("gen_loss", "valid"),
]


# Dense bf16 tensor-core peaks from the vendors' spec sheets (SXM parts), FLOP/s. MFU is
# reported against these, as is customary; a measured matmul peak is lower (FACTS: ~790T on H100).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def device_peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def encoder_forward_flops_per_token(c: DebertaConfig, seq_len: int) -> float:
    """Matmul FLOPs of one token through a DeBERTa encoder (2 per multiply-add).

    Per layer: Q, K, V and output projections (8 H A), the FFN (4 H I), content scores and the
    weighted sum (4 L A), and per position term (c2p, p2c) the score against the 2k relative
    rows (2 * 2k A) plus that term's projection of the 2k-row table, shared by the L tokens
    (2 * 2k H A / L).
    """
    h, a, i = c.hidden_size, c.num_attention_heads * c.head_size, c.intermediate_size
    terms = len(c.pos_att_type) if c.relative_attention else 0
    rows = 2 * c.relative_span
    per_layer = (
        8 * h * a
        + 4 * h * i
        + 4 * seq_len * a
        + terms * (2 * rows * a + 2 * rows * h * a / seq_len)
    )
    return c.num_hidden_layers * per_layer


def rtd_train_flops_per_token(
    disc: DebertaConfig, gen: DebertaConfig, seq_len: int, mask_rate: float
) -> float:
    """Model FLOPs of one RTD training step per token: forward and backward (3x forward) of both
    encoders, the MLM head on the masked fraction only, and the RTD head."""
    e = disc.embedding_dim
    mlm = mask_rate * (2 * gen.hidden_size * e + 2 * e * gen.vocab_size)
    rtd = 2 * disc.hidden_size * disc.hidden_size + 2 * disc.hidden_size
    forward = encoder_forward_flops_per_token(gen, seq_len) + encoder_forward_flops_per_token(
        disc, seq_len
    )
    return 3 * (forward + mlm + rtd)


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) identity, ties averaged."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # average the ranks of tied scores
    unique, inverse, counts = torch.unique_consecutive(
        sorted_scores, return_inverse=True, return_counts=True
    )
    if len(unique) < len(scores):
        sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks[order])
        ranks[order] = (sums / counts)[inverse]
    u = ranks[labels].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        wandb_mode: str = "disabled",
        project: str = "pretrain",
        run_name: str = "run",
        config: dict[str, Any] | None = None,
        progress_bar: bool = True,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, start_step)
        self._file = self.path.open("a")
        if wandb_mode != "disabled":
            import wandb

            try:
                self._wandb = wandb.init(
                    project=project,
                    name=run_name,
                    dir=str(run_dir),
                    mode=cast(Any, wandb_mode),
                    config=config,
                    resume="allow",
                    id=_wandb_id(Path(run_dir)),
                )
            except Exception as e:  # wandb raises many types (no API key, no network, ...)
                self._file.close()
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(
                    f"logging.wandb={wandb_mode}: wandb could not start ({first}); run `wandb "
                    "login`, or use logging.wandb=offline (synced later with `wandb sync`)"
                ) from None
        if progress_bar and sys.stderr.isatty():  # in a log file a bar is a heap of fragments
            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="pretrain",
                unit="step",
                dynamic_ncols=True,
            )

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._wandb is not None:
            split = record.get("split", "train")
            self._wandb.log(
                {
                    f"{split}/{k}": v
                    for k, v in record.items()
                    if isinstance(v, int | float) and k != "step"
                },
                step=record["step"],
            )
        if record.get("split") == "valid":
            self.write(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))
        elif self._bar is None:  # no bar to show it (a batch job's log): one line per record
            keys = ("step", "loss", "gen_acc", "disc_acc", "lr", "grad_norm", "tokens_per_s", "mfu")
            self.write(" ".join(f"{k}={_fmt(record[k])}" for k in keys if k in record))

    def advance(self, step: int, record: dict[str, Any]) -> None:
        """Move the progress bar to `step`, showing loss and throughput."""
        if self._bar is None:
            return
        self._bar.n = step
        self._bar.set_postfix(
            {
                k: _fmt(record[k])
                for k in ("loss", "gen_acc", "disc_acc", "tokens_per_s")
                if k in record
            },
            refresh=True,
        )

    def write(self, line: str) -> None:
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(line)

    def close(self, plots: bool = True) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if plots:
            plot(self.path.parent)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _wandb_id(run_dir: Path) -> str:
    """One wandb run per run directory, kept across resumes."""
    path = run_dir / "wandb_id.txt"
    if not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def _truncate_after(path: Path, step: int) -> None:
    """Drop the records a resumed run will write again (and a line torn by a crash)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in kept))


class SampleTrace:
    """`logging.trace_samples`: the global indices of the samples each step trained on, one
    JSON line per step in `samples_rank<r>.jsonl`, for finding the data behind a bad step and
    for checking that a resumed run neither repeats nor skips a sample."""

    def __init__(self, run_dir: str | Path, rank: int, start_step: int, enabled: bool):
        self._file = None
        if enabled:
            path = Path(run_dir) / f"samples_rank{rank:05d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            _truncate_after(path, start_step)
            self._file = path.open("a")

    def log(self, step: int, samples: list[int]) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"step": step, "samples": samples}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class StepProfiler:
    """`logging.profile_steps`: torch's profiler over optimizer steps [first, first + steps)
    (1-based, as logged), CPU and CUDA activity, written per rank as a gzipped chrome trace in
    `<run_dir>/profile/`: what the step runs, and on a GPU where it idles waiting for the
    host (`python bench/trace_gaps.py TRACE`). Steps before `first` are left out: the first
    ones compile, warm the allocator and fill the loader's queue. An evaluation or checkpoint
    save after a profiled step other than the last is in the trace too. A run that starts
    (resumes) past `first` profiles nothing; the trainer says so."""

    def __init__(
        self, run_dir: str | Path, rank: int, ranks: int, first: int, steps: int, cuda: bool
    ):
        self._dir = Path(run_dir) / "profile"
        self._rank, self._ranks, self._cuda = rank, ranks, cuda
        self._first, self._last, self._done = first, first + steps - 1, first - 1
        self._profiler: torch.profiler.profile | None = None
        self._enabled = steps > 0

    @property
    def active(self) -> bool:
        """Whether the profiler is recording (the step just run was profiled)."""
        return self._profiler is not None

    def before(self, step: int) -> None:
        """Called before optimizer step `step` runs."""
        if self._enabled and step == self._first and self._profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self._cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()  # the trace starts with no earlier work in flight
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.__enter__()

    def after(self, step: int) -> str | None:
        """Called after optimizer step `step`; after the last profiled one, writes the trace and
        returns a line saying where."""
        if self._profiler is None:
            return None
        self._done = step
        return self.close() if step >= self._last else None

    def close(self) -> str | None:
        """Stops a profile under way (a run that ended or stopped inside it) and writes what it
        has; returns a line saying where, or None when nothing was profiled."""
        if self._profiler is None:
            return None
        if self._cuda:
            torch.cuda.synchronize()  # the steps' kernels end inside the trace
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        if self._done < self._first:
            return None  # stopped before the first profiled step ended
        self._dir.mkdir(parents=True, exist_ok=True)
        path = self._dir / f"rank{self._rank:05d}_steps{self._first}-{self._done}.json.gz"
        profiler.export_chrome_trace(str(path))
        each = f", one file per rank in {self._dir}" if self._ranks > 1 else ""
        return (
            f"profile of steps {self._first}-{self._done}: {path}{each} (a chrome trace for "
            f"Perfetto or chrome://tracing; where the GPU idles: python bench/trace_gaps.py "
            f"{path})"
        )


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_logged(run_dir: str | Path) -> list[dict[str, Any]]:
    """`read_metrics` for reading a run that may have crashed: [] without a metrics.jsonl, and a
    line a crash tore is left out (as the trainer drops it on resume)."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def job_order(job_dir: Path) -> tuple[bool, str]:
    """Sort key of a sweep's job directories: 0, 1, ..., 10 in number order, other names after."""
    return not job_dir.name.isdigit(), job_dir.name.zfill(12)


def _points(records: list[dict[str, Any]], key: str, split: str) -> list[tuple[Any, Any]]:
    return [
        (r["step"], r[key])
        for r in records
        if r.get("split", "train") == split and isinstance(r.get(key), int | float)
    ]


def _unigram_baseline(records: list[dict[str, Any]], key: str) -> float | None:
    """The last logged best-constant-guess value of `key` (gen_acc's), if any."""
    values = [r[f"{key}_unigram"] for r in records if r.get(f"{key}_unigram") is not None]
    return values[-1] if values else None


def _figure() -> tuple[Any, Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    return plt, fig, ax


def _save(plt: Any, fig: Any, ax: Any, title: str, path: Path) -> Path:
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")  # grows to hold a legend below the axes
    plt.close(fig)
    return path


def plot(run_dir: str | Path) -> list[Path]:
    """Write `plots/<split>_<metric>.png` for each logged curve, and `plots/train_data_share.png`
    (each source's share of the sequences, when the run mixes several); returns the files
    written."""
    from pretrain.data.loader import SHARE_PREFIX

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []
    for key, split in PLOTTED:
        if not (curve := _points(records, key, split)):
            continue
        plt, fig, ax = _figure()
        ax.plot(*zip(*curve, strict=True), marker="." if split == "valid" else None)
        baseline = _unigram_baseline(records, key)
        if split == "valid" and baseline is not None:  # gen_acc: the best constant guess
            ax.axhline(baseline, linestyle="--", color="gray", label="unigram baseline")
            ax.legend()
        title = f"{split} {key}: {run_dir.resolve().name}"
        written.append(_save(plt, fig, ax, title, out / f"{split}_{key}.png"))
    shares = sorted({k for r in records for k in r if k.startswith(SHARE_PREFIX)})
    if shares:
        plt, fig, ax = _figure()
        for key in shares:
            curve = _points(records, key, "train")
            ax.plot(*zip(*curve, strict=True), label=key[len(SHARE_PREFIX) :])
        ax.legend(fontsize="small")
        title = "train: each source's share of the sequences"
        written.append(_save(plt, fig, ax, title, out / "train_data_share.png"))
    return written


def find_runs(paths: list[Path]) -> list[Path]:
    """The run directories named by `paths`: each a run (it holds metrics.jsonl) or a sweep's
    directory, which stands for its job directories (0, 1, ... in number order)."""
    runs = []
    for path in paths:
        if (path / METRICS_FILE).is_file():
            runs.append(path)
            continue
        jobs = [p for p in path.iterdir() if (p / METRICS_FILE).is_file()] if path.is_dir() else []
        if not jobs:
            raise ConfigError(
                f"{path}: no {METRICS_FILE} in it or in its subdirectories; pass run "
                "directories or a sweep's directory"
            )
        runs += sorted(jobs, key=job_order)
    return runs


# Config values that differ between any two runs and say nothing about how they trained.
_NOT_A_DIFFERENCE = {"run_dir", "logging.progress_bar", "logging.plots"}


def _flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree


def config_differences(runs: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Each run's config.yaml, flattened (`rtd.embedding_sharing`: value), and the keys whose
    values not every run shares."""
    import yaml

    configs = []
    for run in runs:
        path = run / "config.yaml"
        tree = yaml.safe_load(path.read_text()) if path.is_file() else {}
        configs.append(dict(_flatten(tree or {})))
    keys = sorted({k for c in configs for k in c} - _NOT_A_DIFFERENCE)
    return configs, [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]


# The settings that choose the held-out sequences, their masks and noise (see
# Trainer.evaluate): runs that differ in one are not measured on one held-out set.
_HELD_OUT_SET = ("data.", "masking.", "trainer.eval_sequences")
_NOT_THE_HELD_OUT_SET = {"data.num_workers"}


def held_out_set_differences(runs: list[Path]) -> list[str]:
    """The config keys, differing among `runs`, that give them different held-out sets."""
    _, differ = config_differences(runs)
    return [k for k in differ if k.startswith(_HELD_OUT_SET) and k not in _NOT_THE_HELD_OUT_SET]


def run_labels(runs: list[Path]) -> dict[Path, str]:
    """Each run's name in a comparison: the values of its config.yaml that not every run
    shares, as overrides (`rtd.embedding_sharing=es trainer.seed=1`); "" where none differ."""
    configs, differ = config_differences(runs)

    def value(v: Any) -> str:
        return json.dumps(v) if isinstance(v, list | dict) else "null" if v is None else str(v)

    return {
        run: " ".join(f"{k}={value(c.get(k))}" for k in differ)
        for run, c in zip(runs, configs, strict=True)
    }


def plot_runs(runs: list[Path], out: Path) -> list[Path]:
    """`out/<split>_<metric>.png` with one line per run, named by `run_labels`."""
    out.mkdir(parents=True, exist_ok=True)
    labels = run_labels(runs)
    records = {run: read_metrics(run) for run in runs}
    written = []
    for key, split in PLOTTED:
        curves = {run: _points(records[run], key, split) for run in runs}
        if not any(curves.values()):
            continue
        plt, fig, ax = _figure()
        for run, curve in curves.items():
            if curve:
                label = f"{run}: {labels[run]}" if labels[run] else str(run)
                marker = "." if split == "valid" else None
                ax.plot(*zip(*curve, strict=True), marker=marker, label=label)
        baselines = {_unigram_baseline(records[run], key) for run in runs} - {None}
        if split == "valid" and len(baselines) == 1:  # one held-out set: one best guess
            ax.axhline(baselines.pop(), linestyle="--", color="gray", label="unigram baseline")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(0, -0.18))
        written.append(_save(plt, fig, ax, f"{split} {key}", out / f"{split}_{key}.png"))
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pretrain.metrics")
    sub = p.add_subparsers(dest="command", required=True)
    plot_args = sub.add_parser(
        "plot",
        help="draw PNG curves: RUN_DIR/plots for one run; with several runs, or a sweep's "
        "directory, one plot per curve with a line per run",
    )
    plot_args.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    plot_args.add_argument(
        "--out", type=Path, help="where several runs' plots go (default: SWEEP_DIR/plots)"
    )
    args = p.parse_args(argv)
    try:
        runs = find_runs(args.runs)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if runs == args.runs[:1] and args.out is None:
        written = plot(runs[0])
    else:
        out = args.out
        if out is None and len(args.runs) == 1:  # a sweep's directory
            out = args.runs[0] / "plots"
        if out is None:
            sys.exit("error: several runs: say where their plots go with --out DIR")
        written = plot_runs(runs, out)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
