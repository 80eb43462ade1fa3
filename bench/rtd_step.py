"""One full RTD training step, ours vs the same step built on transformers' DebertaV2, one run.

    python bench/rtd_step.py [--preset base] [--seq-len 512 2048] [--batch 32 8] [--steps N]
                             [--warmup N] [--device auto|cpu|cuda]
                             [--attention eager|triton|auto ...] [--compile off|on|both]
                             [--compile-mode default|reduce-overhead|max-autotune-no-cudagraphs]
                             [--precision autocast|bf16|fp32 ...] [--profile]

A step is generator + discriminator forward, backward and an AdamW step (fused on CUDA), for
both sides alike in each `--precision`: bf16 autocast over fp32 weights (the CUDA default, what
transformers' Trainer does with bf16=True), bf16 weights with fp32 master copies that AdamW
updates (what our trainer's DeepSpeed bf16 does), or fp32 (the CPU default). Both see the
same random ids, the same 15% of positions replaced by [MASK], and the same shapes; each side
is built fresh, warmed up, then timed. Prints tokens/s, step time, peak memory and MFU per side and the ratios ours/HF.
Ours runs once per variant (each `--attention` impl, compiled or not per `--compile`), each
against the one HF row of the same length.

The HF side is what a user would assemble from transformers' public classes: the generator is
`DebertaV2ForMaskedLM` (full-vocabulary logits at every position, its own MLM loss), the
replacements are drawn with `torch.multinomial` from its softmax at the masked rows, and the
discriminator is `DebertaV2Model` fed `inputs_embeds` looked up in `E_gen.detach() + E_delta`
(GDES written the straightforward way), with an RTD head of the same shape as ours.

MFU counts the same model FLOPs for both sides (`rtd_train_flops_per_token`: MLM head on the
masked rows only), so work HF does beyond that (logits at every position) shows as lower MFU.
Defaults: on CUDA the v3-base shape at L=512/B=32 and L=2048/B=8; on CPU conf/model/tiny.yaml
with an 8k vocabulary at L=128/B=8, which takes well under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import math
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from pretrain.metrics import device_peak_flops, rtd_train_flops_per_token
from pretrain.models.deberta import PRESETS, DebertaConfig, preset
from pretrain.models.rtd import (
    IGNORE_INDEX,
    SHARING_MODES,
    RTDConfig,
    RTDModel,
    generator_config,
    masked_rows_of,
)

try:
    import transformers
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM, DebertaV2Model
    from transformers.activations import ACT2FN
except ImportError:  # a dev dependency; the project itself runs without it
    raise SystemExit(
        "error: bench/rtd_step.py needs transformers; pip install -e '.[dev]'"
    ) from None

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"
MASK_RATE = 0.15
PAD_ID = 0
FIRST_TOKEN_ID = 4  # ids 0-3 are [PAD] [CLS] [SEP] [UNK]; [MASK] is the last id, as ours


class UsageError(Exception):
    """A bad command line; printed as one line."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def model_config(
    name: str, vocab_size: int | None, attention: str | None, attention_dropout: float | None
) -> DebertaConfig:
    """A preset of `PRESETS` or a conf/model/<name>.yaml, with the bench's overrides."""
    overrides: dict = {}
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    if attention_dropout is not None:
        overrides["attention_probs_dropout_prob"] = attention_dropout
    if attention is not None:
        # A recent field; on a checkout without it only the eager attention exists.
        if "attention_impl" in {f.name for f in dataclasses.fields(DebertaConfig)}:
            overrides["attention_impl"] = attention
        elif attention != "eager":
            raise UsageError(
                f"--attention {attention}: this checkout's DebertaConfig has no attention_impl "
                "field, so only the eager attention exists; use --attention eager"
            )
    try:
        if name in PRESETS:
            return preset(name, **overrides)
        path = CONF_MODEL / f"{name}.yaml"
        if path.is_file():
            shape = OmegaConf.to_container(OmegaConf.load(path))
            assert isinstance(shape, dict)
            return DebertaConfig(**{**shape, **overrides})
    except (TypeError, ValueError) as e:
        raise UsageError(f"--preset {name}: {e}") from None
    choices = sorted(set(PRESETS) | {p.stem for p in CONF_MODEL.glob("*.yaml")})
    raise UsageError(f"--preset {name!r} is unknown; choose from {choices}")


def our_attention(config: DebertaConfig, device: torch.device) -> str:
    """What our model will run in training, e.g. "auto -> eager"."""
    requested = getattr(config, "attention_impl", None)
    if requested is None:
        return "eager (no attention_impl field)"
    try:
        from pretrain.models.attention import choose_impl
    except ImportError:
        return requested
    chosen = choose_impl(requested, device, config.head_size)
    return requested if chosen == requested else f"{requested} -> {chosen}"


def hf_config(config: DebertaConfig) -> DebertaV2Config:
    return DebertaV2Config(**config.to_hf_dict())


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L], masked positions hold [MASK]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], original id at masked positions, IGNORE_INDEX elsewhere
    sampling_noise: torch.Tensor  # [B, L] uniforms, ours draws its replacements from them
    # Ours: the masked rows' flat indices, found on the host as the trainer's engine finds them
    # (no wait for the device in the step); None: ours finds them on the device (a wait).
    masked_rows: torch.Tensor | None

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def mask_rate(self) -> float:
        return float((self.labels != IGNORE_INDEX).sum()) / max(1, self.tokens)


def make_batch(
    batch: int,
    seq_len: int,
    vocab: int,
    padding: float,
    seed: int,
    device: torch.device,
    host_rows: bool = True,
) -> Batch:
    """Random ids; row lengths uniform in [(1 - padding) L, L]; 15% of real tokens masked."""
    g = torch.Generator().manual_seed(seed)
    original = torch.randint(FIRST_TOKEN_ID, vocab - 1, (batch, seq_len), generator=g)
    shortest = max(1, math.ceil((1.0 - padding) * seq_len))
    lengths = torch.randint(shortest, seq_len + 1, (batch,), generator=g)
    lengths[0] = seq_len  # at least one full row, so L is the padded length
    valid = torch.arange(seq_len)[None, :] < lengths[:, None]
    masked = (torch.rand(batch, seq_len, generator=g) < MASK_RATE) & valid
    masked[:, 0] = True  # never an empty mask
    original = original.masked_fill(~valid, PAD_ID)
    labels = original.masked_fill(~masked, IGNORE_INDEX)
    return Batch(
        input_ids=original.masked_fill(masked, vocab - 1).to(device),
        attention_mask=valid.long().to(device),
        labels=labels.to(device),
        sampling_noise=torch.rand(batch, seq_len, generator=g).to(device),
        masked_rows=masked_rows_of(labels).to(device) if host_rows else None,
    )


# --------------------------------------------------------------------------------------------
# The HF-based RTD step
# --------------------------------------------------------------------------------------------


class HFRTD(nn.Module):
    """ELECTRA/DeBERTa-v3 RTD from transformers' public classes, written as a user would."""

    def __init__(self, config: DebertaConfig, rtd: RTDConfig):
        super().__init__()
        self.rtd = rtd
        gen = generator_config(config, rtd.generator_depth_ratio)
        # Legacy head: dense -> act -> LayerNorm -> decoder tied to the word embeddings (+ bias),
        # the same computation as our MLMHead, but applied at every position.
        self.generator = DebertaV2ForMaskedLM(hf_config(gen))
        self.discriminator = DebertaV2Model(hf_config(config))
        h = config.hidden_size
        # DeBERTa's RTD head, as ours: LayerNorm(h + h_[CLS]) -> dense -> act -> one logit.
        self.rtd_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.rtd_head = nn.Sequential(nn.Linear(h, h), ACT2FN[config.hidden_act], nn.Linear(h, 1))
        for linear in (self.rtd_head[0], self.rtd_head[2]):  # as ours, so first losses compare
            assert isinstance(linear, nn.Linear)
            nn.init.normal_(linear.weight, std=config.initializer_range)
            nn.init.zeros_(linear.bias)
        self.word_delta: nn.Parameter | None = None
        if rtd.embedding_sharing != "nes":
            # The discriminator embeds through `inputs_embeds`; drop its unused table so the
            # memory column compares like with like.
            self.discriminator.set_input_embeddings(None)
        if rtd.embedding_sharing == "gdes":
            self.word_delta = nn.Parameter(torch.zeros(config.vocab_size, config.embedding_dim))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # 1. Generator: HF's MLM loss (cross-entropy over every position, -100 ignored).
        out = self.generator(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        mlm_loss = out.loss
        masked = labels != IGNORE_INDEX

        # 2. Sample replacements at the masked positions, no gradient.
        with torch.no_grad():
            probs = torch.softmax(out.logits[masked].float() / self.rtd.temperature, dim=-1)
            sampled = torch.multinomial(probs, 1).squeeze(1)
            original = torch.where(masked, labels, input_ids)
            disc_ids = original.clone()
            disc_ids[masked] = sampled
            valid = attention_mask.bool()
            replaced = (disc_ids != original) & valid

        # 3. Discriminator on the corrupted ids, embeddings per sharing mode.
        gen_embedding = self.generator.get_input_embeddings()
        assert isinstance(gen_embedding, nn.Embedding)
        gen_table = gen_embedding.weight
        if self.rtd.embedding_sharing == "nes":
            hidden = self.discriminator(input_ids=disc_ids, attention_mask=attention_mask)
        else:
            if self.word_delta is not None:  # GDES
                table = gen_table.detach() + self.word_delta
            else:  # ES
                table = gen_table
            embeds = F.embedding(disc_ids, table, padding_idx=PAD_ID)
            hidden = self.discriminator(inputs_embeds=embeds, attention_mask=attention_mask)
        states = hidden.last_hidden_state
        logits = self.rtd_head(self.rtd_norm(states + states[:, :1])).squeeze(-1)
        scores = logits[valid].float()
        rtd_loss = F.binary_cross_entropy_with_logits(scores, replaced[valid].float())
        return mlm_loss + self.rtd.rtd_weight * rtd_loss, mlm_loss, rtd_loss


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

Losses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # total, mlm, rtd


PRECISIONS = ("autocast", "bf16", "fp32")
PRECISION_NAMES = {
    "autocast": "bf16 autocast (fp32 weights)",
    "bf16": "bf16 weights (fp32 master weights for AdamW)",
    "fp32": "fp32",
}


class MasterWeights:
    """DeepSpeed's bf16 mode in small, as our trainer runs it: the model holds bf16 weights and
    gradients; AdamW updates one flat fp32 master copy of them, and the model's weights are
    then copied back from it, rounded to bf16. A parameter without a gradient gets zeros (so
    weight decay still moves it), as in DeepSpeed's flat buffers. Only its `zero_grad` and
    `step` are used."""

    def __init__(self, params: list[nn.Parameter], fused: bool, **hyper: Any):
        assert len({p.dtype for p in params}) == 1, "one dtype for all the model's weights"
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.master = nn.Parameter(torch.cat([p.detach().float().flatten() for p in params]))
        self.optimizer = torch.optim.AdamW([self.master], fused=fused, **hyper)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
        self.master.grad = torch.cat([g.flatten() for g in grads]).float()
        self.optimizer.step()
        with torch.no_grad():
            # Rounded in one cast, then copied into the weights by a same-dtype foreach copy.
            rounded = self.master.detach().to(self.params[0].dtype).split(self.sizes)
            views = [r.view_as(p) for r, p in zip(rounded, self.params, strict=True)]
            torch._foreach_copy_([p.data for p in self.params], views)


@dataclass
class Row:
    impl: str
    seq_len: int
    batch: int
    precision: str = "fp32"
    status: str = "ok"  # ok | OOM
    params: int = 0
    step_ms: float = float("nan")
    tokens_per_s: float = float("nan")
    peak_bytes: int | None = None
    mfu: float | None = None
    first_losses: tuple[float, float, float] | None = None  # total, mlm, rtd


# torch.compile's mode for our compiled rows (--compile-mode; None: its default, what
# trainer.compile=true runs).
COMPILE_MODE: str | None = None


def build(
    impl: str, config: DebertaConfig, rtd: RTDConfig, compile_ours: bool = False
) -> tuple[nn.Module, Callable]:
    """The model and a closure `(batch) -> (loss, mlm, rtd)` for it."""
    if impl == "ours":
        ours = RTDModel(config, rtd)
        if compile_ours:
            ours.compile_layers(COMPILE_MODE)  # what trainer.compile=true does

        def run_ours(b: Batch) -> Losses:
            out = ours(
                b.input_ids,
                b.attention_mask,
                b.labels,
                sampling_noise=b.sampling_noise,
                masked_rows=b.masked_rows,
            )
            return out.loss, out.gen_loss, out.disc_loss

        return ours, run_ours
    hf = HFRTD(config, rtd)
    return hf, lambda b: hf(b.input_ids, b.attention_mask, b.labels)


def measure(
    impl: str,
    config: DebertaConfig,
    rtd: RTDConfig,
    batch: Batch,
    device: torch.device,
    warmup: int,
    steps: int,
    compile_ours: bool = False,
    profile: bool = False,
    trace_dir: Path | None = None,
    precision: str = "fp32",
) -> Row:
    cuda = device.type == "cuda"
    b, seq_len = batch.input_ids.shape
    row = Row(impl, seq_len, b, precision=precision)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)  # same init and dropout/multinomial streams on every run
    model, forward = build(impl, config, rtd, compile_ours)
    model.to(device).train()  # built on the CPU: the plain route, ties survive `.to`
    params = [p for p in model.parameters() if p.requires_grad]
    row.params = sum(p.numel() for p in params)
    hyper: dict[str, Any] = dict(lr=1e-4, weight_decay=0.01)
    optimizer: torch.optim.Optimizer | MasterWeights
    if precision == "bf16":
        model.to(torch.bfloat16)
        optimizer = MasterWeights(params, fused=cuda, **hyper)
    else:
        optimizer = torch.optim.AdamW(params, fused=cuda, **hyper)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "autocast"
        else contextlib.nullcontext()
    )

    def step() -> Losses:
        if compile_ours and COMPILE_MODE == "reduce-overhead":
            # A new iteration of the layers' CUDA graphs: the last step's outputs are dead.
            torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            losses = forward(batch)
        losses[0].backward()
        optimizer.step()
        return losses

    first = step()  # the first warm-up step also supplies the sanity check
    row.first_losses = (first[0].item(), first[1].item(), first[2].item())
    del first
    for _ in range(warmup - 1):
        step()

    if cuda:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize(device)
        total_s = start.elapsed_time(end) / 1e3
        row.peak_bytes = torch.cuda.max_memory_allocated(device)
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        total_s = time.perf_counter() - t0
    row.step_ms = total_s / steps * 1e3
    row.tokens_per_s = batch.tokens * steps / total_s
    if profile:
        variant = f" {config.attention_impl}" if impl == "ours" else ""
        compiled = f" compiled {COMPILE_MODE or ''}".rstrip() if compile_ours else ""
        label = f"{impl}{variant} L={seq_len} B={b}{compiled}{precision_label(precision, device)}"
        print_profile(label, step, cuda, row.step_ms, trace_dir)
    peak = device_peak_flops(device)
    if peak:
        gen = generator_config(config, rtd.generator_depth_ratio)
        flops = rtd_train_flops_per_token(config, gen, seq_len, batch.mask_rate)
        row.mfu = row.tokens_per_s * flops / peak
    return row


def print_profile(
    label: str, step: Callable[[], Losses], cuda: bool, step_ms: float, trace_dir: Path | None
) -> None:
    """Where one step's time goes: torch profiler's busiest kernels (operators on CPU), then
    the busiest operators by input shape (which copies, which matmuls). On CUDA, also how much
    of the (unprofiled) step time the GPU was busy: the rest it waited for the host, which
    then bounds the step, not the kernels; and its device time summed by kind
    (`gpu_time_by_kind`), which the operators' tables, counting a compiled graph's kernels
    twice, do not give. With a trace_dir, the step's chrome trace is
    written there (gzipped) and bench/trace_gaps.py's account of the GPU's idle gaps printed."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"\nprofile: {label}, one step", flush=True)
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))
    print(f"profile: {label}, one step, by input shape", flush=True)
    by_shape = prof.key_averages(group_by_input_shape=True)
    print(by_shape.table(sort_by=key, row_limit=25, max_name_column_width=40))
    gaps = _load_sibling("trace_gaps")
    if cuda:
        device = [
            e
            for e in prof.events()
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        ]  # kernels, copies and fills; a user annotation's span may cover idle gaps
        busy = gaps.covered_us([(e.time_range.start, e.time_range.end) for e in device]) / 1e3
        print(
            f"profile: {label}: GPU busy {busy:.1f} ms (kernels and copies, union of their "
            f"spans) of the timed {step_ms:.1f} ms step: "
            f"{max(0.0, 1 - busy / step_ms):.0%} of the step it waits for the host",
            flush=True,
        )
        work = [(e.name, (e.time_range.end - e.time_range.start) / 1e3) for e in device]
        for line in gpu_time_by_kind(work):
            print(f"profile: {label}: {line}", flush=True)
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        path = trace_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", label) + ".json.gz")
        prof.export_chrome_trace(str(path))  # gzipped, for the .gz
        print(f"profile: {label}: chrome trace {path}", flush=True)
        if cuda:
            try:
                lines = gaps.summary(gaps.analyse(gaps.load(path)))
            except Exception as e:  # the row's timing stands; the trace is there to read
                lines = [f"trace_gaps failed: {type(e).__name__}: {e}"]
            for line in lines:
                print(f"profile: {label}: {line}", flush=True)


# What each device activity of a step is, by its name; the first pattern that matches names
# its kind. The operators' table counts a kernel both as itself and inside each range that
# launched it (a compiled graph's "## Call CompiledFxGraph" row holds its Triton kernels), so
# its rows do not add up; these sums count every kernel once.
KINDS: tuple[tuple[str, str], ...] = (
    ("attention forward kernel", r"^_forward_kernel$"),
    ("attention backward kernels", r"^_(backward|backward_dq|row_dot)_kernel$"),
    ("MLM head kernel", r"^_mlm_\w*kernel$"),
    ("matmuls (cuBLAS, CUTLASS)", r"nvjet|cutlass|gemm|gemv|xmma|splitK|cublas"),
    ("compiled layers' fused kernels (inductor)", r"^triton_"),
    ("optimizer (multi-tensor)", r"multi_tensor_apply"),
    ("copies, casts and fills", r"^Memcpy|^Memset|direct_copy|copy_kernel|Fill"),
    ("reductions", r"reduce_kernel|softmax|norm"),
)


def gpu_time_by_kind(work: list[tuple[str, float]], top_others: int = 6) -> list[str]:
    """Lines of the device time (ms) of one step's kernels, copies and fills, summed by
    `KINDS`, largest first, each kernel counted once; then the largest of the rest by name."""
    by_kind: dict[str, float] = {}
    others: dict[str, float] = {}
    for name, ms in work:
        kind = next((k for k, pattern in KINDS if re.search(pattern, name)), None)
        if kind is None:
            others[name] = others.get(name, 0.0) + ms
        else:
            by_kind[kind] = by_kind.get(kind, 0.0) + ms
    total = sum(ms for _, ms in work)
    if not total:
        return []
    by_kind["other kernels"] = sum(others.values())
    lines = [f"GPU time by kind, {total:.1f} ms summed over {len(work)} kernels and copies:"]
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {ms:8.2f} ms {ms / total:6.1%}  {kind}")
    for name, ms in sorted(others.items(), key=lambda kv: -kv[1])[:top_others]:
        lines.append(f"  {ms:8.2f} ms {ms / total:6.1%}    other: {name[:90]}")
    return lines


def _load_sibling(name: str) -> Any:
    """bench/<name>.py as a module (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def measure_or_oom(
    impl: str,
    config: DebertaConfig,
    rtd: RTDConfig,
    batch: Batch,
    device: torch.device,
    warmup: int,
    steps: int,
    compile_ours: bool = False,
    profile: bool = False,
    trace_dir: Path | None = None,
    precision: str = "fp32",
) -> Row:
    """`measure`, with an out-of-memory or any other failure (a compile or kernel error in one
    variant) reported as a row, so the other rows still come; the memory freed for the next."""
    b, seq_len = batch.input_ids.shape
    row = Row(impl, seq_len, b, precision=precision, status="OOM")
    try:
        row = measure(
            impl, config, rtd, batch, device, warmup, steps, compile_ours, profile, trace_dir,
            precision,
        )  # fmt: skip
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError since 2.5
        pass  # freed below, once the handler has dropped the traceback and its frames
    except Exception as e:
        row = Row(impl, seq_len, b, precision=precision, status="failed")
        print(f"error: {impl} L={seq_len} B={b}: {type(e).__name__}: {e}"[:2000], flush=True)
    if compile_ours:
        torch._dynamo.reset()  # drop the compiled graphs (and what they hold) before the next row
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt_row(r: Row) -> list[str]:
    if r.status != "ok":
        return [r.impl, str(r.seq_len), str(r.batch), "-", r.status, r.status, "-", "-", "-"]
    mem = f"{r.peak_bytes / 2**30:.2f} GiB" if r.peak_bytes is not None else "n/a"
    mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
    assert r.first_losses is not None
    loss = "{:.3f} = {:.3f} + w*{:.4f}".format(*r.first_losses)
    return [
        r.impl,
        str(r.seq_len),
        str(r.batch),
        f"{r.params / 1e6:.2f}M",
        f"{r.tokens_per_s:,.0f}",
        f"{r.step_ms:.1f}",
        mem,
        mfu,
        loss,
    ]


def progress_line(r: Row) -> str:
    """One row as soon as it is measured, so a run cut short still reports what it did."""
    done = f"{r.tokens_per_s:,.0f} tokens/s, {r.step_ms:.1f} ms" if r.status == "ok" else r.status
    mem = f", peak {r.peak_bytes / 2**30:.2f} GiB" if r.peak_bytes is not None else ""
    return f"measured {r.impl} L={r.seq_len} B={r.batch}: {done}{mem}"


def print_table(rows: list[Row]) -> None:
    header = [
        "impl",
        "L",
        "B",
        "params",
        "tokens/s",
        "step ms",
        "peak mem",
        "MFU",
        "first loss (mlm + w*rtd)",
    ]
    cells = [header] + [_fmt_row(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for n, c in enumerate(cells):
        print(" | ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)).rstrip())
        if n == 0:
            print("-+-".join("-" * w for w in widths))


def precision_label(precision: str, device: torch.device) -> str:
    """What a row's name adds for its precision: nothing for the device's default."""
    if precision == "bf16":
        return " bf16-weights"
    default = "autocast" if device.type == "cuda" else "fp32"
    return "" if precision == default else f" {precision}"


def ratio_line(ours: Row, hf: Row) -> str:
    """Ours against HF, HF's precision named where it differs from ours and its label is
    silent on it."""
    hf_name = "HF" + hf.impl.removeprefix("hf")
    if hf.precision != ours.precision and hf_name == "HF":
        hf_name += f" {hf.precision}"
    where = f"{ours.impl}/{hf_name} L={ours.seq_len} B={ours.batch}"
    if ours.status != "ok" or hf.status != "ok":
        return f"{where}: n/a (ours {ours.status}, HF {hf.status})"
    speed = f"speed-up x{hf.step_ms / ours.step_ms:.2f} (step time HF / ours)"
    if ours.peak_bytes is not None and hf.peak_bytes:
        mem = f"memory x{ours.peak_bytes / hf.peak_bytes:.2f} (peak ours / HF)"
    else:
        mem = "memory n/a"
    return f"{where}: {speed}, {mem}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, torch threads: {torch.get_num_threads()}"


@dataclass(frozen=True)
class KernelFlag:
    """A command-line flag that sets module-level settings of the fused attention kernel."""

    flag: str
    dest: str  # its argparse destination; the flag is given when that is neither None nor False
    sets: Callable[[argparse.Namespace], dict[str, Any]]  # fused's names -> their values
    says: Callable[[argparse.Namespace], str]  # the run's line about it


KERNEL_FLAGS = (
    KernelFlag(
        "--no-uniform-tiles", "no_uniform_tiles",
        lambda a: {"UNIFORM_TILES": False},
        lambda a: "every tile's position terms gathered (UNIFORM_TILES off)",
    ),
    KernelFlag(
        "--no-row-lanes", "no_row_lanes",
        lambda a: {"ROW_LANES": False},
        lambda a: "the gathers' lanes as Triton picks them (ROW_LANES off)",
    ),
    KernelFlag(
        "--fused-position-grads", "fused_position_grads",
        lambda a: {"FUSED_POSITION_GRADS": True},
        lambda a: "position gradients by one kernel (FUSED_POSITION_GRADS on)",
    ),
    KernelFlag(
        "--zero-in-kernel", "zero_in_kernel",
        lambda a: {"ZERO_IN_KERNEL": True},
        lambda a: "position-gradient rows zeroed by their programs (ZERO_IN_KERNEL on)",
    ),
    KernelFlag(
        "--fused-warps", "warps",  # parsed by resolve() from args.fused_warps
        lambda a: {"FORWARD_WARPS": a.warps[0], "BACKWARD_WARPS": a.warps[1]},
        lambda a: f"{a.warps[0]} warps forward, {a.warps[1]} backward",
    ),
)  # fmt: skip


def kernel_flags_given(args: argparse.Namespace) -> list[KernelFlag]:
    return [k for k in KERNEL_FLAGS if getattr(args, k.dest, None) not in (None, False)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--preset", help="a model preset or conf/model/<name>.yaml (CUDA: base, CPU: tiny)"
    )
    p.add_argument("--vocab-size", type=int, help="override the preset's (CPU default: 8000)")
    p.add_argument("--seq-len", type=int, nargs="+", help="CUDA: 512 2048, CPU: 128")
    p.add_argument("--batch", type=int, nargs="+", help="one per --seq-len (CUDA: 32 8, CPU: 8)")
    p.add_argument("--steps", type=int, help="timed steps (CUDA: 10, CPU: 3)")
    p.add_argument("--warmup", type=int, help="untimed steps first, >= 1 (CUDA: 3, CPU: 1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--attention",
        choices=["eager", "triton", "auto"],
        nargs="+",
        help="our DebertaConfig.attention_impl, one row of ours each (default here eager, the "
        "model's own default is auto; the field must exist); HF is always eager",
    )
    p.add_argument(
        "--attention-dropout",
        type=float,
        help="attention-probability dropout of both sides (default: the preset's, 0.1; "
        "0 with --attention triton|auto, the form the README's main table times)",
    )
    p.add_argument(
        "--compile",
        choices=["off", "on", "both"],
        default="off",
        help="torch.compile our layers, as trainer.compile=true; both: a row each (HF: eager)",
    )
    p.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        default="default",
        help="torch.compile's mode for the compiled rows (reduce-overhead: each layer's compiled "
        "work replayed as CUDA graphs, the fused attention between them; trainer.compile=true "
        "runs the default)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        nargs="+",
        help="rows of both sides for each (CUDA default: autocast, CPU: fp32): autocast = bf16 "
        "autocast over fp32 weights (transformers' Trainer with bf16=True); bf16 = bf16 weights "
        "and fp32 master weights for AdamW (our trainer's DeepSpeed bf16); with autocast and "
        "bf16 both, ours in bf16 weights (as our trainer runs) is also compared with HF in "
        "autocast (as transformers' Trainer runs without DeepSpeed)",
    )
    p.add_argument("--sharing", choices=SHARING_MODES, default="gdes")
    p.add_argument("--padding", type=float, default=0.0, help="pad up to this fraction of a row")
    p.add_argument(
        "--threads", type=int, default=1, help="CPU threads (default 1: per-core figures)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", choices=["both", "ours", "hf"], default="both")
    p.add_argument(
        "--no-uniform-tiles",
        action="store_true",
        help="the fused kernels gather the position terms of every tile, also of those whose "
        "pairs share one position index (pretrain.models.attention.fused.UNIFORM_TILES off; "
        "on by default)",
    )
    p.add_argument(
        "--no-row-lanes",
        action="store_true",
        help="the fused kernels' per-pair position gathers and atomics take the lanes Triton "
        "picks, not one table row per warp (pretrain.models.attention.fused.ROW_LANES off; on "
        "by default)",
    )
    p.add_argument(
        "--fused-position-grads",
        action="store_true",
        help="the fused attention's position-product gradients become those of q, k and the "
        "tables in one kernel each, not a cast, a GEMM and an add "
        "(pretrain.models.attention.fused.FUSED_POSITION_GRADS on; off by default)",
    )
    p.add_argument(
        "--zero-in-kernel",
        action="store_true",
        help="the fused backward's programs zero the rows of the fp32 position gradients that "
        "they alone write, instead of a fill of the whole tensor before the kernel "
        "(pretrain.models.attention.fused.ZERO_IN_KERNEL on; off by default)",
    )
    p.add_argument(
        "--fused-warps",
        metavar="FWD/BWD",
        help="warps per program of the fused forward / backward kernels, each 4, 8 or 16 "
        "(pretrain.models.attention.fused.FORWARD_WARPS / BACKWARD_WARPS; 8/8 by default)",
    )
    p.add_argument(
        "--mlm-torch",
        action="store_true",
        help="our MLM head reduces its logits with torch ops (pretrain.models.heads.MLM_IMPL "
        "= 'torch') instead of its Triton kernel, the default on CUDA",
    )
    p.add_argument(
        "--mlm-chunk-elements",
        type=int,
        metavar="N",
        help="our MLM head's logits per chunk (pretrain.models.heads.MLM_CHUNK_ELEMENTS, "
        "2^26 by default), e.g. 268435456 (2^28)",
    )
    p.add_argument(
        "--device-rows",
        action="store_true",
        help="ours finds the masked rows on the device, a wait for it each step, instead of "
        "taking them found on the host with the batch (as the trainer's engine does)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after each row's timed steps, torch profiler's table of one more step's kernels",
    )
    p.add_argument(
        "--trace",
        type=Path,
        metavar="DIR",
        help="with --profile: write each profiled step's chrome trace to DIR (gzipped) and, on "
        "CUDA, print where the GPU idles in it (bench/trace_gaps.py)",
    )
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> torch.device:
    """Fill the device-dependent defaults in place; returns the device."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda:
        defaults = dict(
            preset="base", seq_len=[512, 2048], batch=[32, 8], steps=10, warmup=3,
            precision=["autocast"],
        )  # fmt: skip
    else:
        defaults = dict(
            preset="tiny", vocab_size=8000, seq_len=[128], batch=[8], steps=3, warmup=1,
            precision=["fp32"],
        )  # fmt: skip
    explicit_preset = args.preset is not None
    for key, value in defaults.items():
        if key == "vocab_size" and explicit_preset:
            continue  # an explicit preset keeps its own vocabulary unless asked
        if getattr(args, key) is None:
            setattr(args, key, value)
    if len(args.batch) == 1:
        args.batch = args.batch * len(args.seq_len)
    if len(args.batch) != len(args.seq_len):
        raise UsageError("--batch takes one value, or one per --seq-len")
    if args.steps < 1 or args.warmup < 1:
        raise UsageError("--steps and --warmup must be >= 1")
    if not 0.0 <= args.padding < 1.0:
        raise UsageError("--padding must be in [0, 1)")
    if args.threads < 1:
        raise UsageError("--threads must be >= 1")
    args.precision = list(dict.fromkeys(args.precision))  # each once, in the order given
    if args.trace is not None and not args.profile:
        raise UsageError("--trace writes the profiled step's trace: add --profile")
    args.warps = None if args.fused_warps is None else parse_warps(args.fused_warps)
    if args.mlm_chunk_elements is not None and args.mlm_chunk_elements < 1:
        raise UsageError("--mlm-chunk-elements must be >= 1")
    args.attention = args.attention or ["eager"]
    fused = {"triton", "auto"} & set(args.attention)
    if fused and args.attention_dropout is None:
        args.attention_dropout = 0.0  # the README's main table; every row gets it
    if "triton" in args.attention and not cuda:
        raise UsageError("--attention triton needs CUDA; use eager or auto on CPU")
    fused_runs = "triton" in args.attention or ("auto" in args.attention and cuda)
    for k in kernel_flags_given(args):
        if not fused_runs:
            raise UsageError(f"{k.flag} is a setting of the fused kernel: add --attention triton")
    if args.compile_mode != "default" and args.compile == "off":
        raise UsageError("--compile-mode applies to compiled rows: add --compile on or both")
    return torch.device("cuda" if cuda else "cpu")


def parse_warps(text: str) -> tuple[int, int]:
    """--fused-warps FWD/BWD: two of 4, 8, 16."""
    parts = text.split("/")
    if len(parts) != 2 or not all(p in ("4", "8", "16") for p in parts):
        raise UsageError(f"--fused-warps {text}: write FWD/BWD, each 4, 8 or 16, e.g. 16/8")
    return int(parts[0]), int(parts[1])


def main(argv: list[str] | None = None) -> int:
    command = "python bench/rtd_step.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        device = resolve(args)
        configs = {
            a: model_config(args.preset, args.vocab_size, a, args.attention_dropout)
            for a in args.attention
        }
        config = configs[args.attention[0]]
        rtd = RTDConfig(embedding_sharing=args.sharing)
        for seq_len in args.seq_len:
            if config.position_biased_input and seq_len > config.max_position_embeddings:
                raise UsageError(
                    f"--seq-len {seq_len} exceeds the preset's absolute positions "
                    f"({config.max_position_embeddings})"
                )
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # Oversubscribed cores (other jobs, more threads than cores) make CPU timings
        # meaningless, so one thread by default: per-core figures, as bench/data.py gives.
        torch.set_num_threads(args.threads)
    settings = contextlib.ExitStack()
    kernel_options = {n: v for k in kernel_flags_given(args) for n, v in k.sets(args).items()}
    if kernel_options:
        from pretrain.models.attention import fused

        for name, value in kernel_options.items():
            settings.enter_context(mock.patch.object(fused, name, value))
    if args.mlm_torch or args.mlm_chunk_elements is not None:
        from pretrain.models import heads

        if args.mlm_torch:
            settings.enter_context(mock.patch.object(heads, "MLM_IMPL", "torch"))
        if args.mlm_chunk_elements is not None:
            chunk = args.mlm_chunk_elements
            settings.enter_context(mock.patch.object(heads, "MLM_CHUNK_ELEMENTS", chunk))
    global COMPILE_MODE
    COMPILE_MODE = None if args.compile_mode == "default" else args.compile_mode
    try:
        with settings:
            return run(args, command, device, configs, rtd)
    finally:
        torch.set_num_threads(threads)


def run(
    args: argparse.Namespace,
    command: str,
    device: torch.device,
    configs: dict[str, DebertaConfig],
    rtd: RTDConfig,
) -> int:
    """configs: our model's config per attention impl (the same shape, HF uses the first)."""
    config = next(iter(configs.values()))
    gen = generator_config(config, rtd.generator_depth_ratio)
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    variants = [(a, c) for a in configs for c in compiles]  # ours: (attention, compiled)
    print(f"command: {command}")
    print(
        f"device: {device_name(device)} | torch {torch.__version__} | "
        f"transformers {transformers.__version__} | "
        + ", ".join(PRECISION_NAMES[p] for p in args.precision)
        + f" | AdamW{' fused' if device.type == 'cuda' else ''}"
    )
    print(
        f"model: {args.preset}, discriminator {config.num_hidden_layers}x{config.hidden_size}, "
        f"generator {gen.num_hidden_layers}x{gen.hidden_size}, vocab {config.vocab_size}, "
        f"sharing {rtd.embedding_sharing}, rtd weight w={rtd.rtd_weight:g}, "
        f"dropout {config.hidden_dropout_prob:g} hidden / "
        f"{config.attention_probs_dropout_prob:g} attention (both sides); "
        "attention: ours "
        + ", ".join(our_attention(c, device) for c in configs.values())
        + f", HF eager; compiled layers: ours {args.compile}"
        + (f" ({args.compile_mode})" if args.compile_mode != "default" else "")
        + ", HF off"
    )
    for k in kernel_flags_given(args):
        print(f"fused attention: {k.says(args)}")
    if args.mlm_torch:
        print("our MLM head: logits reduced by torch ops (heads.MLM_IMPL = 'torch')")
    if args.mlm_chunk_elements is not None:
        print(f"our MLM head: chunks of {args.mlm_chunk_elements:,} logits")
    if args.device_rows:
        print("ours: masked rows found on the device in the step (a wait for it), not given")
    if config.position_biased_input and rtd.embedding_sharing != "nes":
        print("note: HF side shares word embeddings only; its absolute position table is its own")
    print(
        f"steps: {args.warmup} warm-up + {args.steps} timed; tokens/s counts non-padding tokens; "
        "peak mem is torch.cuda.max_memory_allocated (n/a on CPU); MFU against "
        "rtd_train_flops_per_token (MLM head on masked rows only), the same FLOPs for both sides"
    )
    print()

    rows: list[Row] = []
    ratios: list[str] = []
    for seq_len, b in zip(args.seq_len, args.batch, strict=True):
        batch = make_batch(
            b, seq_len, config.vocab_size, args.padding, args.seed, device, not args.device_rows
        )
        # HF first, and each ratio as soon as its row is in: a run cut short by a time limit
        # still has the comparison for every row it measured.
        hf_rows: dict[str, Row] = {}
        for precision in args.precision:
            weights = precision_label(precision, device)
            hf: Row | None = None
            if args.impl in ("both", "hf"):
                hf = measure_or_oom(
                    "hf", config, rtd, batch, device, args.warmup, args.steps, False,
                    args.profile, args.trace, precision,
                )  # fmt: skip
                hf.impl += weights
                hf_rows[precision] = hf
                print(progress_line(hf), flush=True)
                rows.append(hf)
            if args.impl not in ("both", "ours"):
                continue
            for attention, compiled in variants:
                row = measure_or_oom(
                    "ours", configs[attention], rtd, batch, device, args.warmup, args.steps,
                    compiled, args.profile, args.trace, precision,
                )  # fmt: skip
                mode = f"({args.compile_mode})" if args.compile_mode != "default" else ""
                row.impl = f"ours {attention}{'+compile' + mode if compiled else ''}{weights}"
                print(progress_line(row), flush=True)
                rows.append(row)
                # Against HF in the same precision and, for ours in bf16 weights, against HF
                # in autocast too (ours as our trainer runs, HF as transformers' Trainer runs
                # without DeepSpeed).
                against = [hf] + ([hf_rows.get("autocast")] if precision == "bf16" else [])
                for other in against:
                    if other is not None:
                        ratios.append(ratio_line(row, other))
                        print(ratios[-1], flush=True)
        del batch
    print_table(rows)
    print()
    for line in ratios:
        print(line)
    # At init both sides should sit near ln(V) + w ln 2 (uniform MLM, undecided discriminator).
    print(
        f"expected first loss near ln(V) + w*ln2 = {math.log(config.vocab_size):.3f} + "
        f"{rtd.rtd_weight:g}*{math.log(2):.4f} = "
        f"{math.log(config.vocab_size) + rtd.rtd_weight * math.log(2):.3f}"
    )
    bad = [
        r
        for r in rows
        if r.first_losses is not None and not all(map(math.isfinite, r.first_losses))
    ]
    for r in bad:
        print(f"error: {r.impl} L={r.seq_len} B={r.batch}: non-finite first-step loss")
    failed = [r for r in rows if r.status == "failed"]
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
