"""The two task heads of RTD pretraining, and the generator's enhanced mask decoder.

- `MLMHead`: dense -> activation -> LayerNorm -> decoder tied to the word embeddings (+ bias).
  It is called on the masked rows only, so the vocabulary-sized matmul costs ~15% of a
  full-sequence head; the tied table is passed in, because which table it is depends on the
  embedding-sharing mode that `rtd.py` owns.
- `mlm_objective`: the decoder, its cross-entropy, the argmax and the sampling of replacements
  in one pass over row chunks, so the [N, V] logits (V = 128k for v3) never exist whole; see
  `_ChunkedMLM` for why its gradients are made in the forward.
- `EnhancedMaskDecoder`: DeBERTa's EMD. Absolute positions enter the generator only here: the
  last layer is re-run with queries `H_{n-1} + P` over keys/values `H_{n-1}`.
- `RTDHead`: one logit per token, "was this token replaced?".
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from pretrain.models.attention import triton_available
from pretrain.models.deberta import ACTIVATIONS, DebertaConfig, DebertaEncoder


class MLMHead(nn.Module):
    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.embedding_dim)
        self.act = ACTIVATIONS[config.hidden_act]
        self.norm = nn.LayerNorm(config.embedding_dim, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        nn.init.normal_(self.dense.weight, std=config.initializer_range)
        nn.init.zeros_(self.dense.bias)

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] -> the states the tied decoder reads, [N, E]."""
        return self.norm(self.act(self.dense(hidden)))

    def forward(self, hidden: torch.Tensor, word_weight: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] (masked rows only); word_weight: [V, E]; returns logits [N, V].
        Training goes through `mlm_objective` instead, which never holds all N rows."""
        return torch.matmul(self.transform(hidden), word_weight.t()) + self.bias


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Losses in fp32 under bf16/fp16 autocast, but never downcast a float64 model."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def sample_replacements(
    logits: torch.Tensor,
    temperature: float = 1.0,
    exclude: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row of `logits` [N, V] from softmax(logits / temperature), by inverse CDF.

    One uniform per row decides the draw: `uniforms` [N] when given (the data pipeline keys them
    by sample, so the corruption does not depend on rank count or batch layout), else drawn from
    `generator`. `exclude` [N] removes one token per row (the original, when configured).
    Callers run it under no_grad: sampling is not differentiable.
    """
    scaled = at_least_fp32(logits) / temperature
    if exclude is not None:
        scaled = scaled.scatter(1, exclude.unsqueeze(1), float("-inf"))
    cdf = torch.softmax(scaled, dim=-1).cumsum(dim=-1)
    if uniforms is None:
        uniforms = torch.rand(scaled.shape[0], generator=generator, device=scaled.device)
    # Scale by the last cdf entry (1 up to rounding) so rounding never favours the last token.
    u = uniforms.to(cdf.dtype).unsqueeze(1) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)


# Logit values per chunk in `mlm_objective`: 2^26 fp32 values are 256 MiB, and a chunk holds a
# handful of such buffers (logits, probabilities, the sampler's cdf), so the head's transient
# memory is about 1 GiB at any vocabulary, against 5 GiB for v3-base's 128k vocabulary at
# B=32, L=512 when all ~2,500 masked rows are decoded at once. Rows per chunk = this // V.
MLM_CHUNK_ELEMENTS = 2**26

# How `mlm_objective` reduces each chunk's rows by default: "torch"; "triton", one kernel
# that reads the logits twice where torch makes about fifteen fp32 passes over them
# (`mlm_kernel`); or "auto", the kernel on CUDA and torch elsewhere. On an H100 the head
# (forward + backward + sampling, v3-base at B=32, L=512) took 14.0 ms with the kernel against
# 23.7 ms with torch ops (`bench/mlm_head.py`; docs/speed.md).
MLM_IMPL = "auto"


class MLMOutput(NamedTuple):
    loss_sum: torch.Tensor  # summed (not averaged) cross-entropy over the rows, fp32 or wider
    sampled: torch.Tensor  # [N] replacements drawn from softmax(logits / temperature)
    predicted: torch.Tensor  # [N] argmax of the logits


def _matmul_dtype(states: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give the decoder's matmuls (bf16 in mixed precision); the
    logits are then made at least fp32, as `MLMHead.forward` + cross_entropy would do."""
    device = states.device.type
    if states.dtype == torch.float64 or not torch.is_autocast_enabled(device):
        return states.dtype  # autocast leaves float64 alone
    return torch.get_autocast_dtype(device)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums over rows and chunks: fp32, or float64 for a float64 model."""
    return torch.promote_types(dtype, torch.float32)


class _ChunkedMLM(torch.autograd.Function):
    """The loop behind `mlm_objective`: loss_sum, argmax and samples chunk by chunk, and, when
    a gradient is wanted, the gradients too, made during the forward.

    The backward of a softmax cross-entropy needs the softmax, i.e. the [N, V] logits again.
    Saving them is what this avoids; recomputing them would cost a third vocabulary matmul.
    So each chunk's d(loss)/d(logits) = softmax - one_hot is turned into d_states and summed
    into d_weight and d_bias at once, and the backward only scales those by the incoming
    gradient: the same three vocabulary matmuls as autograd, with [N, E] + [V, E] saved
    instead of [N, V]. d_weight and d_bias are summed in fp32 (or wider), not in bf16. Without
    grad mode (evaluation) or for an input that needs none, that work is skipped.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        states: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        targets: torch.Tensor,
        uniforms: torch.Tensor,
        temperature: float,
        exclude_original: bool,
        chunk_rows: int,
        grad_enabled: bool,
        kernel: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device, dtype = states.device.type, _matmul_dtype(states)
        wide = _accumulate_dtype(dtype)
        need_states, need_weight, need_bias = (grad_enabled and n for n in ctx.needs_input_grad[:3])
        d_states = (
            torch.empty(states.shape, dtype=dtype, device=states.device) if need_states else None
        )
        d_weight = (
            torch.zeros(weight.shape, dtype=wide, device=weight.device) if need_weight else None
        )
        d_bias = torch.zeros(bias.shape, dtype=wide, device=bias.device) if need_bias else None
        n = states.shape[0]
        loss_sum = torch.zeros((), dtype=wide, device=states.device)
        sampled = torch.empty(n, dtype=torch.long, device=states.device)
        predicted = torch.empty(n, dtype=torch.long, device=states.device)
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            want_grad = bool(need_states or need_weight or need_bias)
            rows_of = _chunk_rows_kernel if kernel else _chunk_rows_torch
            for start in range(0, n, chunk_rows):
                rows = slice(start, start + chunk_rows)
                x, t = states[rows].to(dtype), targets[rows]
                loss_rows, predicted[rows], sampled[rows], d_logits, d_bias_rows = rows_of(
                    torch.matmul(x, w.t()), bias, t, uniforms[rows], temperature,
                    exclude_original, want_grad,
                )  # fmt: skip
                loss_sum += loss_rows.sum()
                if d_logits is None:
                    continue
                if d_bias is not None:
                    assert d_bias_rows is not None
                    d_bias += d_bias_rows
                d_logits = d_logits.to(dtype)
                if d_states is not None:
                    d_states[rows] = torch.matmul(d_logits, w)
                if d_weight is not None:
                    d_weight += torch.matmul(d_logits.t(), x)
        ctx.save_for_backward(d_states, d_weight, d_bias)  # None where no gradient is needed
        ctx.dtypes = (states.dtype, weight.dtype, bias.dtype)
        ctx.mark_non_differentiable(sampled, predicted)
        return loss_sum, sampled, predicted

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, d_loss: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        grads = [
            None if g is None else (g * d_loss).to(dtype)
            for g, dtype in zip(ctx.saved_tensors, ctx.dtypes, strict=True)
        ]
        return (*grads, None, None, None, None, None, None, None)


# Per-row loss, argmax and draws, then (None without a gradient) d(CE)/d(logits) and its sum
# over the rows, the bias gradient, in fp32 or wider.
ChunkRows = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None
]


def _chunk_rows_torch(
    products: torch.Tensor,
    bias: torch.Tensor,
    targets: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
    exclude_original: bool,
    want_grad: bool,
) -> ChunkRows:
    """One chunk's rows from the decoder's matmul output [R, V] (before the bias): per-row
    cross-entropy, argmax, draws, and d(CE)/d(logits) = softmax - one_hot (at least fp32) with
    its sum over rows (both None unless want_grad)."""
    logits = at_least_fp32(products + bias)
    lse = torch.logsumexp(logits, dim=-1)
    loss = lse - logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    predicted = logits.argmax(-1)
    exclude = targets if exclude_original else None
    sampled = sample_replacements(logits, temperature, exclude, uniforms=uniforms)
    if not want_grad:
        return loss, predicted, sampled, None, None
    d_logits = torch.exp(logits - lse.unsqueeze(1))
    d_logits[torch.arange(len(targets), device=targets.device), targets] -= 1.0
    return loss, predicted, sampled, d_logits, d_logits.sum(0)


def _chunk_rows_kernel(*args: Any) -> ChunkRows:
    """`_chunk_rows_torch` as one Triton kernel (`mlm_kernel`); d(CE)/d(logits) comes in the
    matmul's dtype, its row sum in fp32. Imported at first use, as the attention kernels are."""
    from pretrain.models.mlm_kernel import mlm_rows

    return mlm_rows(*args)


def mlm_objective(
    states: torch.Tensor,
    word_weight: torch.Tensor,
    bias: torch.Tensor,
    targets: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float = 1.0,
    exclude_original: bool = False,
    chunk_rows: int | None = None,
    impl: str | None = None,
) -> MLMOutput:
    """Decode `states` [N, E] against the tied table `word_weight` [V, E] (+ `bias` [V]) and
    return the summed cross-entropy against `targets` [N], the argmax, and one replacement per
    row drawn with `uniforms` [N] (see `sample_replacements`; `exclude_original` never draws the
    target). Equal to `MLMHead.forward`'s logits fed to cross_entropy(reduction="sum"), argmax
    and `sample_replacements`, without ever holding more than `chunk_rows` rows of logits
    (default: MLM_CHUNK_ELEMENTS // V).

    impl: how each chunk's rows are reduced, "torch", "triton" (one kernel, `mlm_kernel`:
    CUDA, or Triton's interpreter in the tests; it computes in fp32, so a float64 model
    reduces in torch) or "auto" (the kernel on CUDA); None takes `MLM_IMPL`."""
    if chunk_rows is None:
        chunk_rows = max(1, MLM_CHUNK_ELEMENTS // word_weight.shape[0])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    impl = MLM_IMPL if impl is None else impl
    if impl not in ("torch", "triton", "auto"):
        raise ValueError(f"impl must be 'torch', 'triton' or 'auto', got {impl!r}")
    if impl == "auto":  # Triton installs on Linux only
        impl = "triton" if states.device.type == "cuda" and triton_available() else "torch"
    loss_sum, sampled, predicted = _ChunkedMLM.apply(
        states, word_weight, bias, targets, uniforms, temperature, exclude_original, chunk_rows,
        torch.is_grad_enabled(), impl == "triton" and _matmul_dtype(states) != torch.float64,
    )  # fmt: skip
    return MLMOutput(loss_sum, sampled, predicted)


class EnhancedMaskDecoder(nn.Module):
    """Re-runs the encoder's last layer `steps` times with position-aware queries.

    DeBERTa (He et al. 2020, sec. 3.2) keeps absolute positions out of the encoder and adds
    them just before decoding masked tokens. Keys and values stay `H_{n-1}` on every step; the
    query is updated with each step's output. The layer's weights are the encoder's own.
    """

    def __init__(self, config: DebertaConfig, steps: int = 2):
        super().__init__()
        if config.position_biased_input:
            raise ValueError(
                "rtd.enhanced_mask_decoder needs model.position_biased_input=false: "
                "with absolute positions already in the input, EMD has nothing to add"
            )
        if steps < 1:
            raise ValueError(f"rtd.emd_steps must be >= 1, got {steps}")
        self.steps = steps
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        nn.init.normal_(self.position_embeddings.weight, std=config.initializer_range)

    def forward(
        self, previous: torch.Tensor, attention_mask: torch.Tensor, encoder: DebertaEncoder
    ) -> torch.Tensor:
        """previous: the output of the encoder's second-to-last layer (its input when it has
        one layer); returns the states the MLM head decodes, [B, L, H]."""
        token_mask, rel_index = encoder.attention_inputs(attention_mask)
        rel_table = encoder.relative_table()
        last = encoder.layer[-1]
        query = previous + self.position_embeddings.weight[: previous.shape[1]].unsqueeze(0)
        for _ in range(self.steps):
            query = last(previous, token_mask, rel_index, rel_table, query_states=query)
        return query


class RTDHead(nn.Module):
    """DeBERTa-v3's replaced-token detector (microsoft/DeBERTa's LMMaskPredictionHead): each
    token's state plus the sequence's first ([CLS]) state, LayerNorm, dense, activation, one
    logit. The [CLS] term gives every token the sequence's context; the norm comes first."""

    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, 1)
        for linear in (self.dense, self.classifier):
            nn.init.normal_(linear.weight, std=config.initializer_range)
            nn.init.zeros_(linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, L, H], position 0 each sequence's [CLS] -> logits [B, L]."""
        states = self.norm(hidden + hidden[:, :1])
        return self.classifier(self.act(self.dense(states))).squeeze(-1)
