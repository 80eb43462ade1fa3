"""How many operators the host launches for one RTD training step, counted on CPU.

    python bench/host_ops.py [--precision autocast bf16] [--batch 2] [--seq-len 64]

A GPU step can be bound by its host: every operator the dispatcher runs is a kernel launch
(or several) that Python and the dispatcher must issue, and when they take longer than the
kernels, the GPU waits. This counts, at the dispatcher, the non-view operators of one step
(forward, backward, the AdamW step) of the v3-base architecture at toy widths (12 + 6 layers,
hidden 64, 4 heads, 8 buckets over 16 positions, 8k vocabulary), so it runs in seconds on any
CPU: ours with the fused attention (its Triton kernels stubbed out, so only the glue around
them counts; on CPU there is nothing else to run them on) and transformers' HF-based step
(bench/rtd_step.py's), in bf16 autocast over fp32 weights and with bf16 weights, as chosen.

Counts, not times: a CPU operator may be a different number of GPU kernels (a CPU dropout is
four operators, CUDA's fused one), so compare rows with each other, not with a GPU profile.

    python bench/host_ops.py --deepspeed [--accumulation 2]

counts instead what our trainer's DeepSpeed engine adds: one optimizer step (its micro batches'
backward and `step` calls, AdamW fused as on a GPU) of the same toy model under each bf16 setup
DeepSpeed offers, with the device reads among them (`.item()` and the like: on a GPU each waits
for all queued work, after which the GPU idles until the host has queued more).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]

VIEWS = {
    "view", "_unsafe_view", "transpose", "t", "permute", "expand", "unsqueeze", "squeeze",
    "detach", "slice", "select", "alias", "as_strided", "unflatten", "diagonal", "split",
    "split_with_sizes", "reshape", "lift_fresh", "unbind", "chunk", "narrow",
}  # fmt: skip


class Count(TorchDispatchMode):
    """Non-view operators per phase."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket.__name__ not in VIEWS:
            self.ops[self.phase] += 1
        return func(*args, **(kwargs or {}))


class _Stub:
    """A `kernel[grid](...)` launch that does nothing."""

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def fused_glue_only() -> Any:
    """Ours takes the fused attention on CPU, with its kernels stubbed out."""
    from pretrain.models import deberta
    from pretrain.models.attention import _kernels, fused

    with contextlib.ExitStack() as stack:
        for name in (
            "_forward_kernel",
            "_backward_kernel",
            "_backward_dq_kernel",
            "_row_dot_kernel",
        ):
            stack.enter_context(mock.patch.object(_kernels, name, _Stub()))
        stack.enter_context(
            mock.patch.object(fused, "_launch_settings", lambda q: fused._tile_settings(q, True))
        )
        stack.enter_context(mock.patch.object(deberta, "choose_impl", lambda *a, **k: "triton"))
        yield


@functools.cache
def _rtd_step() -> Any:
    """bench/rtd_step.py as a module (bench/ is no package), loaded once."""
    spec = importlib.util.spec_from_file_location(
        "rtd_step", Path(__file__).with_name("rtd_step.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["rtd_step"] = module
    spec.loader.exec_module(module)
    return module


# The v3-base architecture (12 + 6 layers, its heads and embeddings) at toy widths: the model
# both counts build.
VOCAB = 8000
TOY_WIDTHS = dict(
    hidden_size=64, num_attention_heads=4, intermediate_size=128, position_buckets=8,
    max_relative_positions=16,
)  # fmt: skip


def count(impl: str, precision: str, batch: int, seq_len: int) -> dict[str, int]:
    """Operators per phase of one step (after a warm-up step) of ours or HF."""
    rs = _rtd_step()
    from pretrain.models.rtd import RTDConfig

    config = rs.model_config("base", VOCAB, "triton" if impl == "ours" else "eager", 0.0)
    config = dataclasses.replace(config, **TOY_WIDTHS)
    data = rs.make_batch(batch, seq_len, config.vocab_size, 0.0, 0, torch.device("cpu"))
    torch.manual_seed(0)
    model, forward = rs.build(impl, config, RTDConfig())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if precision == "bf16":
        model.to(torch.bfloat16)
        optimizer: Any = rs.MasterWeights(params, fused=True, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "autocast"
        else contextlib.nullcontext()
    )

    def step(counter: Count | None = None) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = forward(data)[0]
        if counter is not None:
            counter.phase = "backward"
        loss.backward()
        if counter is not None:
            counter.phase = "optimizer"
        optimizer.step()

    step()
    with Count() as counter:
        step(counter)
    ops = dict(counter.ops)
    return {**ops, "total": sum(ops.values())}


class Reads(Count):
    """`Count`, plus the device reads per phase."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket.__name__ == "_local_scalar_dense":
            self.reads[self.phase] += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


# What each row sets; the first two are DeepSpeed's bf16 paths that our trainer no longer takes
# by default (`grad_accum_dtype=bf16` picks them), the last is fp32 for reference.
DEEPSPEED_SETUPS = {
    "bf16, stage 0: DeepSpeed's stage-0 wrapper": (
        "deepspeed=zero0", "deepspeed.precision=bf16",
        "+deepspeed.extra.data_types.grad_accum_dtype=bf16",
    ),
    "bf16, stage 1: DeepSpeed's ZeRO-1 optimizer": (
        "deepspeed=zero1", "deepspeed.precision=bf16",
        "+deepspeed.extra.data_types.grad_accum_dtype=bf16",
    ),
    "bf16, stage 0 or 1: its bf16 optimizer (ours)": ("deepspeed=zero0", "deepspeed.precision=bf16"),
    "fp32, stage 0": ("deepspeed=zero0", "deepspeed.precision=fp32"),
}  # fmt: skip


def count_deepspeed(setup: tuple[str, ...], accumulation: int) -> dict[str, int]:
    """Operators and device reads of one optimizer step of our trainer's engine, after one
    warm-up step: its micro batches' backward, and the step calls."""
    from hydra import compose, initialize_config_dir

    import pretrain.engine
    from pretrain.config import register_schema, to_config
    from pretrain.models.rtd import RTDModel

    rs = _rtd_step()
    register_schema()
    overrides = [
        "model=base", f"model.vocab_size={VOCAB}",
        *(f"model.{key}={value}" for key, value in TOY_WIDTHS.items()),
        "model.attention_probs_dropout_prob=0", "model.hidden_dropout_prob=0",
        "trainer.micro_batch_size=2", f"trainer.global_batch_size={2 * accumulation}",
        "run_dir=unused", *setup,
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        config = to_config(compose("config", overrides=overrides))
    world = pretrain.engine.init_distributed("cpu")
    torch.manual_seed(0)
    with mock.patch.object(pretrain.engine, "fused_adamw", lambda device: True):
        engine = pretrain.engine.Engine(RTDModel(config.model, config.rtd), config, world)
    data = rs.make_batch(2, 64, config.model.vocab_size, 0.0, 0, torch.device("cpu"))
    batch = {k: getattr(data, k) for k in ("input_ids", "attention_mask", "labels")}
    batch["sampling_noise"] = data.sampling_noise

    def step(counter: Reads) -> None:
        for _ in range(accumulation):
            loss = engine.forward(batch).loss
            with counter:
                counter.phase = "backward"
                engine.engine.backward(loss)
                counter.phase = "step"
                engine.engine.step()

    step(Reads())  # the first step builds the optimizer's state: not counted
    counter = Reads()
    step(counter)
    params = sum(1 for p in engine.module.parameters() if p.requires_grad)
    return {
        "backward": counter.ops["backward"], "step": counter.ops["step"],
        "reads": sum(counter.reads.values()), "parameters": params,
        "optimizer": type(engine.optimizer).__name__,  # type: ignore[dict-item]
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--precision", choices=["autocast", "bf16"], nargs="+", default=["autocast", "bf16"]
    )
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument(
        "--deepspeed", action="store_true", help="count our trainer's DeepSpeed step instead"
    )
    p.add_argument(
        "--accumulation", type=int, default=2, help="micro batches per step (--deepspeed)"
    )
    args = p.parse_args(argv)
    if args.deepspeed:
        print(
            f"our trainer's DeepSpeed engine, one optimizer step of {args.accumulation} micro "
            "batches (B=2, L=64): operators (non-view, at the dispatcher) and device reads"
        )
        print(f"{'setup':<48}{'backward':>9}{'step':>7}{'reads':>7}  optimizer")
        for label, setup in DEEPSPEED_SETUPS.items():
            row = count_deepspeed(setup, args.accumulation)
            print(
                f"{label:<48}{row['backward']:>9}{row['step']:>7}{row['reads']:>7}  "
                f"{row['optimizer']} ({row['parameters']} parameters)"
            )
        return 0
    print(f"operators per step (non-view, at the dispatcher), B={args.batch} L={args.seq_len}")
    print(f"{'step':<34}{'forward':>9}{'backward':>10}{'optimizer':>11}{'total':>8}")
    for precision in args.precision:
        for impl in ("hf", "ours"):
            with fused_glue_only() if impl == "ours" else contextlib.nullcontext():
                ops = count(impl, precision, args.batch, args.seq_len)
            label = f"{'ours, fused glue' if impl == 'ours' else 'transformers'}, {precision}"
            print(
                f"{label:<34}{ops.get('forward', 0):>9}{ops.get('backward', 0):>10}"
                f"{ops.get('optimizer', 0):>11}{ops['total']:>8}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
