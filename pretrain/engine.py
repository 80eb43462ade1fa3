"""DeepSpeed, set up from our config. The only module that imports deepspeed.

It owns process-group start-up (gloo on CPU, nccl on GPU, and the environment a single process
needs when no launcher set it), the DeepSpeed JSON config (ZeRO stage, precision, batch sizes,
clipping), parameter groups with per-family learning-rate multipliers, and the warmup/decay
schedule. The optimizer and schedule are torch's (AdamW, LambdaLR) or DeepSpeed's (LAMB): a
torch LambdaLR keeps each group's multiplier, which DeepSpeed's own schedulers would overwrite.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import math
import os
import re
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.config import BatchSizes, Config, ConfigError
from pretrain.models.rtd import masked_rows_of

# Imported lazily by `init_distributed` so that `import pretrain.engine` stays cheap.
deepspeed: Any = None


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_deepspeed() -> Any:
    global deepspeed
    # DeepSpeed's ZeRO calls torch collectives that torch 2.13 deprecates; the warning came
    # again at every step (each call site), flooding a run's log. Not ours to fix. Set on each
    # call: a test runner restores the filters between tests.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    if deepspeed is None:
        # DeepSpeed probes for libaio by compiling a test program; distutils logs each gcc call
        # at INFO, which Hydra's logging setup would print at the start of every run.
        logging.getLogger("compilers").setLevel(logging.WARNING)
        import deepspeed as ds

        logging.getLogger("DeepSpeed").addFilter(_drop_expected_warnings)
        deepspeed = ds
    return deepspeed


# DeepSpeed warnings that are expected here and say nothing a user can act on.
_EXPECTED_WARNINGS = (
    "MPU is not provided",  # each resume on another number of ranks: we use no tensor parallel
)


def _drop_expected_warnings(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_EXPECTED_WARNINGS)


# What DeepSpeed's bf16 optimizer prints: a memory report around each group's set-up (12
# lines at every start), a debugging line at each load. Not about the run.
_CHATTER = re.compile(
    r"^(begin bf16_optimizer|end bf16_ optimizer|(before|after) initializing group \d+|"
    r"MA [\d.]+ GB .*|CPU Virtual Memory: .*|"
    r"_load_legacy_checkpoint current_rank_sd\[BASE_OPTIMIZER_STATE\])$"
)


@contextlib.contextmanager
def _without_deepspeed_chatter() -> Iterator[None]:
    """Print what DeepSpeed prints inside, but its `_CHATTER` (all of it when it raises)."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    except BaseException:
        print(printed.getvalue(), end="")
        raise
    for line in printed.getvalue().splitlines():
        if not _CHATTER.match(line.strip()):
            print(line)


# Per parameter group, what the config sets and a resume keeps from it (see Engine.load): the
# optim.* settings, and how torch's AdamW runs (a checkpoint saved before it ran fused would
# turn fusing off again).
_GROUP_HYPERPARAMETERS = ("initial_lr", "weight_decay", "betas", "eps", "fused", "foreach")


# True once this process has started a process group: then it leaves by `pretrain.__main__`'s
# os._exit (see _exit there).
GROUP_STARTED = False


def close_process_group() -> None:
    """Shut the process group down. A rank that exits with it open can abort at interpreter
    shutdown, its work done and saved: gloo's threads still hold tensors while Python is torn
    down ("terminate called without an active exception", SIGABRT)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def init_distributed(device: str = "auto") -> World:
    """Start (or join) the process group. Works under torchrun, the deepspeed launcher, SLURM
    via torchrun, or as a plain single process."""
    global GROUP_STARTED
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA GPU is visible; use trainer.device=cpu")
    if "RANK" not in os.environ:  # a plain `python -m pretrain`: be rank 0 of 1
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
        )  # fmt: skip
    if device == "cpu":  # before DeepSpeed's import, which probes for GPUs and warns
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ds = _import_deepspeed()
    if device == "cpu":
        # DeepSpeed would JIT-compile a shared-memory all-reduce op (~50 s) on first use; gloo
        # is fast enough for the CPU runs we do, so skip the build.
        ds.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        ds.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", verbose=False)
        GROUP_STARTED = True
        # At exit, not after each run: the jobs of a Hydra sweep share this process and its
        # group (DeepSpeed keeps references to it).
        atexit.register(close_process_group)
    return World(
        rank=torch.distributed.get_rank(),
        local_rank=local_rank,
        world_size=torch.distributed.get_world_size(),
        device=torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu"),
    )


def convert_to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed's universal checkpoint of `src` in `dst` (optimizer states merged out of their
    ZeRO partitions), so that a run can resume on another number of ranks."""
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(src), "--output_folder", str(dst), "--inject_missing_state",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        raise RuntimeError(f"converting {src} to a universal checkpoint failed: {tail}")


def gather_zero_checkpoint(step_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a ZeRO-1/2/3 checkpoint merged from their partitions, on CPU and
    without a process group (DeepSpeed's zero_to_fp32; ours for its bf16 optimizer's, which
    zero_to_fp32 refuses)."""
    if saved_by_bf16_optimizer(step_dir):
        return gather_bf16_optimizer_checkpoint(step_dir)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    quiet = io.StringIO()  # it prints and draws progress bars
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)


# DeepSpeed names every ZeRO partition file of a bf16 run so, whichever optimizer wrote it.
BF16_PARTITION_PREFIX = "bf16_zero_pp_rank_"


def _load(path: Path) -> Any:
    """A checkpoint file, memory-mapped: only the tensors read are paged in."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def saved_by_bf16_optimizer(step_dir: Path) -> bool:
    """Whether DeepSpeed's bf16 optimizer wrote this checkpoint (its state, unlike the ZeRO
    optimizers', names no ZeRO stage: zero_to_fp32 refuses it for that)."""
    first = next(step_dir.glob(f"{BF16_PARTITION_PREFIX}0_*_optim_states.pt"), None)
    return first is not None and "zero_stage" not in _load(first)["optimizer_state_dict"]


def checkpoint_precision(step_dir: Path) -> str | None:
    """The precision a DeepSpeed checkpoint was trained in, from its files: bf16 runs name
    their ZeRO partitions so, and the model file holds the module in its training dtype."""
    if any(step_dir.glob(f"{BF16_PARTITION_PREFIX}*_optim_states.pt")):
        return "bf16"
    # ZeRO-3's model file has another name; its module holds empty tensors of that dtype.
    files = [step_dir / "mp_rank_00_model_states.pt"]
    files += sorted(step_dir.glob("zero_pp_rank_0_mp_rank_*_model_states.pt"))
    path = next((f for f in files if f.is_file()), None)
    if path is None:
        return None
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    for tensor in (_load(path).get("module") or {}).values():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            return names.get(tensor.dtype)
    return None


def gather_bf16_optimizer_checkpoint(step_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a checkpoint of DeepSpeed's bf16 optimizer. Rank r's file
    holds its slice of each parameter group's flat fp32 tensor; the slices in rank order make
    the whole, which holds the group's parameters one after another in the order of the model
    file's `param_shapes`, then padding."""

    def rank(path: Path) -> int:
        return int(path.name[len(BF16_PARTITION_PREFIX) :].split("_", 1)[0])

    files = sorted(step_dir.glob(f"{BF16_PARTITION_PREFIX}*_optim_states.pt"), key=rank)
    states = [_load(f)["optimizer_state_dict"] for f in files]
    assert [rank(f) for f in files] == list(range(len(files))), files
    assert all(n == len(files) for state in states for n in state["partition_count"]), files
    model = _load(step_dir / "mp_rank_00_model_states.pt")
    slices = [state["single_partition_of_fp32_groups"] for state in states]
    weights: dict[str, torch.Tensor] = {}
    for g, shapes in enumerate(model["param_shapes"]):
        flat = torch.cat([s[g] for s in slices])
        start = 0
        for name, shape in shapes.items():
            n = math.prod(shape)
            weights[name] = flat[start : start + n].view(shape).clone()
            start += n
        assert start <= flat.numel(), (name, start, flat.numel())
    return weights


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        # bf16 where the GPU has it (Ampere on): torch's default check also says yes where bf16
        # is only emulated (V100, T4), slowly. There, fp16 (deepspeed.precision=fp16) is the
        # tensor cores' format.
        native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return "bf16" if native else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("deepspeed.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    return precision


def runs_bf16_optimizer(config: Config, precision: str) -> bool:
    """Whether DeepSpeed runs its bf16 optimizer: bf16 at ZeRO stage 0 or 1, unless
    `deepspeed.extra.data_types.grad_accum_dtype` says otherwise.

    It sums the micro batches' gradients in fp32 (DeepSpeed's other bf16 paths sum them in
    bf16) and its step reads the device twice. DeepSpeed's stage-0 bf16 wrapper reads it once
    per parameter tensor for an overflow check (322 reads per step for our 311 tensors), and
    its step launches 6,243 operators, the ZeRO-1 optimizer's 4,875, nearly all per-tensor
    bookkeeping, against 671 (`python bench/host_ops.py --deepspeed`); the fp32 sums cost two
    operators per tensor per micro batch and a whole fp32 gradient buffer on every rank (2
    bytes per parameter more than bf16 gradients). It partitions the fp32 master weights and
    AdamW's state over the ranks, so stage 0 runs as stage 1.
    """
    extra = config.deepspeed.extra
    accum = (extra.get("data_types") or {}).get("grad_accum_dtype")
    offload = (extra.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return (
        precision == "bf16"
        and config.deepspeed.zero_stage < 2
        and str(accum).lower() in ("none", "fp32", "float32", "float", "torch.float32")
        # DeepSpeed offloads to the CPU with its ZeRO optimizer only
        and str(offload.get("device", "none")).lower() != "cpu"
    )


def zero_stage_run(config: Config, precision: str) -> int:
    """The ZeRO stage DeepSpeed runs (which lays out the checkpoint's optimizer state)."""
    return 1 if runs_bf16_optimizer(config, precision) else config.deepspeed.zero_stage


def deepspeed_config(config: Config, batch: BatchSizes, precision: str) -> dict[str, Any]:
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch.micro,
        "gradient_accumulation_steps": batch.accumulation,
        "train_batch_size": batch.global_,
        "gradient_clipping": config.optim.clip_grad,
        "zero_optimization": {"stage": zero_stage_run(config, precision)},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if runs_bf16_optimizer(config, precision):
        # The gradients are summed in fp32 and all-reduced in fp32 (Megatron's choice for
        # bf16): reduced in bf16, DeepSpeed would round the sum to bf16, even on one rank.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
        ds["communication_data_type"] = "fp32"
    if config.optim.name == "lamb":
        o = config.optim
        ds["optimizer"] = {
            "type": "Lamb",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
            },
        }
    _deep_update(ds, dict(config.deepspeed.extra))
    return ds


def _deep_update(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


_LAYER = re.compile(r"^(generator|discriminator)\.encoder\.layer\.(\d+)\.")


def _steps_where_fused_wants_them(optimizer: Any) -> None:
    """After a load: torch keeps a saved AdamW state's step counts on the CPU unless the saved
    groups ran fused; for groups that run fused now, put them on their parameters' device in
    fp32, as torch's own load does for fused groups."""
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer  # DeepSpeed's wrappers around the torch optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        return
    for group in inner.param_groups:
        if group.get("fused"):
            for p in group["params"]:
                state = inner.state.get(p, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def fused_adamw(device: torch.device) -> bool:
    """Whether torch's AdamW runs fused: one kernel per parameter group (DeepSpeed's ZeRO
    stages and bf16 hand it one flat fp32 tensor per group; plain fp32 stage 0, the model's
    parameters) where the default on CUDA, foreach, launches several per group and reads the
    state more often. On CPU the default loop, whose numbers the README's quick start table
    records."""
    return device.type == "cuda"


def layer_depth(name: str, layers: dict[str, int]) -> int:
    """How many layers sit above parameter `name` in its own encoder: 0 for the heads and the
    top layer's, the layer count + 1 for embeddings. Drives layer-wise lr decay."""
    match = _LAYER.match(name)
    if match:
        return layers[match.group(1)] - 1 - int(match.group(2))
    tower = "generator" if name.startswith(("generator.", "mlm_head.", "emd.")) else "discriminator"
    if ".embeddings." in name or name.endswith("_delta") or ".encoder." in name:
        return layers[tower]  # embeddings and the relative-position table sit below layer 0
    return 0  # heads


def parameter_groups(model: nn.Module, config: Config) -> list[dict[str, Any]]:
    """AdamW groups: (family x decay x depth). Families get the lr multipliers of `optim`;
    biases and LayerNorm weights are not decayed, everything else is, embedding tables and
    GDES's delta included (microsoft/DeBERTa's optimizer groups, as BERT's); with
    `optim.layer_decay` < 1 a parameter d layers below the top gets lr x layer_decay^d."""
    o = config.optim
    layers = {}
    for tower in ("generator", "discriminator"):
        stack = model.get_submodule(f"{tower}.encoder.layer")
        assert isinstance(stack, nn.ModuleList)
        layers[tower] = len(stack)
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    norm_ids = {
        id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()
    }
    groups: dict[tuple[str, bool, int], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding_ids or name.endswith("_delta"):
            family = "embedding"
        elif name.startswith(("generator.", "mlm_head.", "emd.")):
            family = "generator"
        else:
            family = "discriminator"
        decay = not (name.endswith(".bias") or id(p) in norm_ids)
        depth = layer_depth(name, layers) if o.layer_decay != 1.0 else 0
        groups.setdefault((family, decay, depth), []).append(p)
    mult = {
        "embedding": o.embedding_lr_mult,
        "generator": o.generator_lr_mult,
        "discriminator": o.discriminator_lr_mult,
    }
    return [
        {
            "params": params,
            "lr": o.lr * mult[family] * o.layer_decay**depth,
            "weight_decay": o.weight_decay if decay else 0.0,
            "name": f"{family}{'' if decay else '_no_decay'}_depth{depth}",
        }
        for (family, decay, depth), params in sorted(groups.items())
    ]


def lr_lambda(config: Config):
    """Linear warmup to the base lr, then linear decay to 0 at max_steps (or constant)."""
    warmup, total = config.optim.warmup_steps, config.trainer.max_steps
    constant = config.optim.schedule == "constant"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if constant:
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class Engine:
    """A DeepSpeed engine around the RTD model, plus the few things the trainer asks of it."""

    def __init__(self, model: nn.Module, config: Config, world: World):
        ds = _import_deepspeed()
        self.world = world
        t = config.trainer
        # Evaluation only forms no training batch: the global batch is one micro batch per rank.
        global_batch = t.global_batch_size if t.max_steps else t.micro_batch_size * world.world_size
        self.batch = BatchSizes.compute(global_batch, t.micro_batch_size, world.world_size)
        self.precision = resolve_precision(config.deepspeed.precision, world.device)
        self.zero_stage = zero_stage_run(config, self.precision)
        ds_config = deepspeed_config(config, self.batch, self.precision)
        if config.deepspeed.zero_stage == 3:
            # Embedding tables are read as tensors outside their own module's forward (tied MLM
            # decoder, GDES composition, relative-position table), where ZeRO-3 would see them
            # partitioned to shape [0]; registering them on the root keeps them gathered for
            # the whole forward and backward.
            for m in model.modules():
                if isinstance(m, nn.Embedding):
                    ds.zero.register_external_parameter(model, m.weight)
        groups = parameter_groups(model, config)
        optimizer = None
        if config.optim.name == "adamw":
            o = config.optim
            optimizer = torch.optim.AdamW(
                groups,
                lr=o.lr,
                betas=(o.betas[0], o.betas[1]),
                eps=o.eps,
                fused=fused_adamw(world.device),
            )
        elif world.device.type == "cpu":
            raise ConfigError(
                "optim.name=lamb uses DeepSpeed's fused LAMB, which needs a GPU; use adamw on CPU"
            )
        with _without_deepspeed_chatter():
            self.engine, self.optimizer, _, _ = ds.initialize(
                model=model,
                model_parameters=groups if optimizer is None else None,
                optimizer=optimizer,
                lr_scheduler=(
                    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config))
                ),
                config=ds_config,
            )
        self._norm_is_ours = config.deepspeed.zero_stage == 0 and self.precision == "fp32"
        self._grad_norm: float | None = None
        assert self.engine.train_batch_size() == self.batch.global_, (
            "DeepSpeed disagrees on the global batch"
        )
        assert self.engine.gradient_accumulation_steps() == self.batch.accumulation

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def forward(self, batch: dict[str, torch.Tensor]):
        """One micro batch through the model. The sampling noise travels with the batch (keyed
        by sample), so no RNG state decides the corruption. The masked rows are found here, on
        the host, from the loader's CPU labels: found on the GPU they would make the step wait
        for the device's queued work."""
        rows = masked_rows_of(batch["labels"])
        if self.world.device.type == "cuda":  # page-locked, as the loader's batches are
            rows = rows.pin_memory()
        batch = {k: v.to(self.world.device, non_blocking=True) for k, v in batch.items()}
        return self.engine(
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            sampling_noise=batch.get("sampling_noise"),
            masked_rows=rows.to(self.world.device, non_blocking=True),
        )

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """Backward for one micro batch; DeepSpeed steps the optimizer at accumulation ends."""
        self.engine.backward(loss)
        if self._norm_is_ours and self.engine.is_gradient_accumulation_boundary():
            # DeepSpeed reports the norm only for its ZeRO/mixed-precision optimizers; for plain
            # fp32 stage 0 measure it here, after the all-reduce and before clipping, as it does.
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            self._grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else None
        self.engine.step()

    def overflow_skips(self) -> int:
        """Steps DeepSpeed skipped for an fp16 gradient overflow (0 in bf16/fp32)."""
        return int(getattr(self.engine, "skipped_steps", 0) or 0)

    def loss_scale(self) -> float | None:
        """The current fp16 dynamic loss scale, None in bf16/fp32."""
        if self.precision != "fp16":
            return None
        scale = getattr(self.optimizer, "cur_scale", None)
        if scale is None:
            scale = getattr(self.optimizer, "loss_scale", None)
        return None if scale is None else float(scale)

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def grad_norm(self) -> float | None:
        norm = self._grad_norm if self._norm_is_ours else self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, directory: str, tag: str, client_state: dict[str, Any]) -> OSError | None:
        """DeepSpeed's save; returns the first I/O error of this rank instead of raising it.

        The save is collective (barriers, tag checks, ZeRO gathers). A rank whose write fails
        must not leave it early, or the others would wait in its next barrier forever: so its
        writes (state files, directories, recovery scripts) report errors here and the save runs
        to its end on every rank; the caller then decides, with all ranks, what failed."""
        errors: list[OSError] = []

        def deferred(write):
            def call(*args, **kwargs):
                try:
                    return write(*args, **kwargs)
                except OSError as e:
                    errors.append(e)

            return call

        files = self.engine.checkpoint_engine
        patched = {
            (files, "save"): files.save,
            (files, "makedirs"): files.makedirs,
            (self.engine, "_copy_recovery_script"): self.engine._copy_recovery_script,
        }
        for (owner, name), write in patched.items():
            setattr(owner, name, deferred(write))
        try:
            self.engine.save_checkpoint(
                directory, tag=tag, client_state=client_state, save_latest=False
            )
        finally:
            for (owner, name), write in patched.items():
                setattr(owner, name, write)
        return errors[0] if errors else None

    def load(self, directory: str, tag: str) -> dict[str, Any]:
        """Load a checkpoint, keeping this config's optimizer hyper-parameters: the saved
        optimizer and schedule states carry the old run's peak learning rate, weight decay,
        betas and eps, which would silently override a changed `optim.*` (the step count and
        moments are what a resume needs from them)."""
        scheduler = self.engine.lr_scheduler
        ours = [
            {k: g[k] for k in _GROUP_HYPERPARAMETERS if k in g}
            for g in scheduler.optimizer.param_groups
        ]
        with _without_deepspeed_chatter():
            path, client_state = self.engine.load_checkpoint(
                directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {directory}/{tag}")
        groups = scheduler.optimizer.param_groups  # new dicts: loading a state replaces them
        for group, values in zip(groups, ours, strict=True):
            group.update(values)
        _steps_where_fused_wants_them(self.optimizer)
        scheduler.base_lrs = [values["initial_lr"] for values in ours]
        # What LambdaLR's step sets, at the restored step: the rate of the next update.
        lrs = [
            base * schedule(scheduler.last_epoch)
            for base, schedule in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
        for group, lr in zip(groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = lrs
        return client_state or {}
