"""The DeBERTa-v2/v3 encoder in one file: config, embeddings, disentangled attention, encoder.

Read top to bottom and you have the backbone. It knows nothing about parallelism or training;
the RTD pair in `rtd.py` composes two of these. Config keys and their meanings are those of
Hugging Face's `DebertaV2Config`, so exporting is a rename of parameters (`to_hf_state_dict`
below), never a translation of semantics. The numerics mirror `transformers.DebertaV2Model`
exactly (the parity tests hold us to 1e-5 in fp32), including its quirks: the score scale counts
the position terms listed in `pos_att_type`, and a padding query row softmaxes over a row of
`finfo.min`, giving uniform weights that the embedding mask later zeroes.

The attention core (scores, softmax, context) is `pretrain.models.attention`: eager torch, or a
fused Triton kernel with the same numerics (`attention_impl`; by default the kernel on a GPU
and eager elsewhere), which is a runtime
choice, not part of the checkpoint's shape, and so is never exported.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.attention import (
    IMPLS,
    choose_impl,
    disentangled_attention,
    index_steps,
    packed_disentangled_attention,
)

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "tanh": torch.tanh,
    "silu": F.silu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    # transformers' other names for the same functions (published configs use them)
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_python": F.gelu,
    "swish": F.silu,
}
POSITION_TERMS = ("c2p", "p2c")


@dataclass
class DebertaConfig:
    """The backbone's shape. Field names and meanings follow `transformers.DebertaV2Config`.

    Defaults are DeBERTa-v3-base; `PRESETS` holds the other published sizes.
    """

    vocab_size: int = 128100
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-7
    relative_attention: bool = True
    max_relative_positions: int = -1
    position_buckets: int = 256
    pad_token_id: int = 0
    position_biased_input: bool = False
    pos_att_type: list[str] = field(default_factory=lambda: ["p2c", "c2p"])
    share_att_key: bool = True
    norm_rel_ebd: str = "layer_norm"
    conv_kernel_size: int = 0
    conv_groups: int = 1
    conv_act: str = "tanh"
    # None means "same as hidden_size" (HF omits the key in that case).
    embedding_size: int | None = None
    attention_head_size: int | None = None
    # Not a DebertaV2Config key: how attention runs, not what it computes. eager | triton (the
    # fused kernel; needs CUDA; its dropout draws its own mask) | auto (triton on CUDA when it
    # is installed and the heads are at most 128 wide, eager otherwise).
    attention_impl: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.pos_att_type, str):  # HF also accepts "p2c|c2p"
            self.pos_att_type = [
                t.strip() for t in self.pos_att_type.lower().split("|") if t.strip()
            ]
        self.pos_att_type = list(self.pos_att_type or [])
        self.validate()

    def validate(self) -> None:
        """Reject shapes the model cannot build, with the field named, before any tensor exists."""
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        for name in positive + ("intermediate_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.attention_head_size is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be a multiple of "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )
        head_size = self.attention_head_size
        if head_size is not None and head_size * self.num_attention_heads != self.hidden_size:
            # transformers' DebertaV2 maps the heads' output back with a hidden x hidden layer:
            # another width would train here and export a checkpoint it cannot load.
            raise ValueError(
                f"model.attention_head_size ({self.attention_head_size}) x "
                f"model.num_attention_heads ({self.num_attention_heads}) must equal "
                f"model.hidden_size ({self.hidden_size}), as transformers' DebertaV2 needs"
            )
        unknown = [t for t in self.pos_att_type if t not in POSITION_TERMS]
        if unknown:
            raise ValueError(f"model.pos_att_type may hold only {POSITION_TERMS}, got {unknown}")
        for name in ("hidden_act", "conv_act"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ValueError(
                    f"model.{name}={getattr(self, name)!r}; choose {', '.join(sorted(ACTIVATIONS))}"
                )
        if self.norm_rel_ebd not in ("none", "layer_norm"):
            raise ValueError(
                f"model.norm_rel_ebd must be 'none' or 'layer_norm', got {self.norm_rel_ebd!r}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.attention_impl not in IMPLS:
            raise ValueError(
                f"model.attention_impl must be one of {IMPLS}, got {self.attention_impl!r}"
            )

    @property
    def head_size(self) -> int:
        return self.attention_head_size or self.hidden_size // self.num_attention_heads

    @property
    def embedding_dim(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def relative_span(self) -> int:
        """Half the number of rows of the relative-position table (HF's `pos_ebd_size`)."""
        if self.position_buckets > 0:
            return self.position_buckets
        return (
            self.max_relative_positions
            if self.max_relative_positions > 0
            else self.max_position_embeddings
        )

    @property
    def max_relative_distance(self) -> int:
        """The distance at which the log buckets saturate (HF's resolved `max_relative_positions`)."""
        return (
            self.max_relative_positions
            if self.max_relative_positions > 0
            else self.max_position_embeddings
        )

    def to_hf_dict(self) -> dict:
        """Every DebertaV2Config key written explicitly, for `DebertaV2Config(**d)` or config.json."""
        d = dataclasses.asdict(self)
        del d["attention_impl"]  # ours only, a runtime choice
        d["embedding_size"] = self.embedding_dim
        d["attention_head_size"] = self.head_size
        d["pos_att_type"] = list(self.pos_att_type)
        d["model_type"] = "deberta-v2"
        return d


# Published DeBERTa-v3 shapes (He et al. 2021, Table 8 and the released configs).
PRESETS: dict[str, dict] = {
    "xsmall": dict(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536
    ),
    "small": dict(
        hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072
    ),
    "base": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),
    "large": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
}


def preset(name: str, **overrides) -> DebertaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return DebertaConfig(**{**PRESETS[name], **overrides})


# --------------------------------------------------------------------------------------------
# Relative positions
# --------------------------------------------------------------------------------------------


def log_bucket_position(
    relative_pos: torch.Tensor, bucket_size: int, max_position: int
) -> torch.Tensor:
    """Map relative distances to buckets: exact within +-bucket_size/2, logarithmic beyond.

    Distances up to `mid` keep their value; larger ones are compressed so that `max_position`
    lands on bucket `bucket_size - 1`.
    """
    sign = torch.sign(relative_pos)
    mid = bucket_size // 2
    # Inside the exact band the log is never used; give it a harmless argument.
    near = (relative_pos < mid) & (relative_pos > -mid)
    abs_pos = torch.where(near, torch.full_like(relative_pos, mid - 1), relative_pos.abs())
    log_pos = torch.ceil(torch.log(abs_pos / mid) / _log_base(max_position, mid) * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, relative_pos.to(log_pos.dtype), log_pos * sign).long()


@functools.cache
def _log_base(max_position: int, mid: int) -> float:
    """log((max_position - 1) / mid) in float32, on the CPU, as transformers computes it: a
    float64 log moves a few distances across a bucket boundary (the ceil in
    `log_bucket_position`), which would break parity with exported checkpoints. A Python
    number, so that no host value is copied to the GPU (a copy that waits for the device)."""
    return torch.log(torch.tensor((max_position - 1) / mid, dtype=torch.float32)).item()


@functools.lru_cache(maxsize=64)
def relative_index_table(
    length: int, buckets: int, max_distance: int, span: int, device: torch.device
) -> torch.Tensor:
    """The [2L - 1] relative index (`relative_index`) of a length and position setup, made once
    per process on the device it is read on, from the 2L - 1 distances alone (rather than an
    [L, L] table every forward). How it rises with i - j, which the fused attention kernels
    need to know, is found here once (`attention.index_steps` keeps it on the table), so no
    forward reads the device for it. Read-only: every caller shares it."""
    with torch.inference_mode(False):  # a table made in inference mode could not train later
        distances = _bucketed(torch.arange(-(length - 1), length, device=device), buckets,
                              max_distance)  # fmt: skip
        index = (distances + span).clamp(0, 2 * span - 1).to(torch.int32)
    index_steps(index)
    return index


def _bucketed(distances: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """Relative distances in log buckets where the setup has them, else as they are."""
    if buckets > 0 and max_distance > 0:
        return log_bucket_position(distances, buckets, max_distance)
    return distances


def relative_positions(length: int, config: DebertaConfig, device: torch.device) -> torch.Tensor:
    """[L, L] long tensor of (query position - key position), bucketed when configured: the
    whole matrix, as transformers builds it (the tests hold `relative_index_table`, which the
    model reads, to it)."""
    ids = torch.arange(length, device=device)
    return _bucketed(ids[:, None] - ids[None, :], config.position_buckets,
                     config.max_relative_distance)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


class DebertaEmbeddings(nn.Module):
    """Word (+ optional absolute position, token type) embeddings -> projection -> LayerNorm.

    `word_weight` / `position_weight` in forward let the RTD pair substitute tables it composes
    from the generator's (GDES, ES); with `own_tables=False` the module holds no such tables.
    """

    def __init__(self, config: DebertaConfig, own_tables: bool = True):
        super().__init__()
        self.config = config
        dim = config.embedding_dim
        self.word_embeddings = (
            nn.Embedding(config.vocab_size, dim, padding_idx=config.pad_token_id)
            if own_tables
            else None
        )
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, dim)
            if config.position_biased_input and own_tables
            else None
        )
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, dim) if config.type_vocab_size > 0 else None
        )
        self.embed_proj = (
            nn.Linear(dim, config.hidden_size, bias=False) if dim != config.hidden_size else None
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        word_weight: torch.Tensor | None = None,
        position_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if word_weight is None:
            assert self.word_embeddings is not None, "a table-less embedding needs word_weight"
            word_weight = self.word_embeddings.weight
        x = F.embedding(input_ids, word_weight, padding_idx=self.config.pad_token_id)
        if self.config.position_biased_input:
            if position_weight is None:
                assert self.position_embeddings is not None, (
                    "a table-less embedding needs position_weight"
                )
                position_weight = self.position_embeddings.weight
            x = x + position_weight[: input_ids.shape[1]].unsqueeze(0)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = self.norm(x) * attention_mask.unsqueeze(-1).to(x.dtype)
        return self.dropout(x)


# --------------------------------------------------------------------------------------------
# Disentangled attention
# --------------------------------------------------------------------------------------------


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., L, heads*d] -> [..., heads, L, d]"""
    x = x.unflatten(-1, (heads, -1))
    return x.transpose(-3, -2)


def _joint_projection(x: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
    """torch.cat([m(x) for m in linears], -1) as one matmul (`_joint_linear`)."""
    weight = torch.cat([m.weight for m in linears])
    bias = torch.cat([m.bias for m in linears])
    return F.linear(x, weight, bias)


def _joint_linear(x: torch.Tensor, linears: list[nn.Linear]) -> list[torch.Tensor]:
    """Several projections of one input as one matmul: [m(x) for m in linears], as views of
    one output. One GEMM (and one backward GEMM for x's gradient, summing the projections'
    contributions inside it) instead of one each, and under autocast one cast of x. The weights
    stay separate parameters, as transformers names them."""
    if len(linears) == 1:
        return [linears[0](x)]
    y = _joint_projection(x, linears)
    return list(y.split([m.out_features for m in linears], dim=-1))


class DisentangledSelfAttention(nn.Module):
    """Attention whose score is content->content + content->position + position->content.

    score(i, j) = [q_i.k_j + q_i.Kr[d(i,j)] + k_j.Qr[d(j,i)]] / sqrt(head_size * (1 + #terms))
    where d is the (bucketed) relative distance and Kr / Qr are the relative-position embeddings
    projected by the key / query projections (`share_att_key`) or by their own projections.
    This module makes q, k, v and the projected tables; `disentangled_attention` does the rest.
    """

    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.config = config
        self.heads = config.num_attention_heads
        inner = self.heads * config.head_size
        self.query_proj = nn.Linear(config.hidden_size, inner)
        self.key_proj = nn.Linear(config.hidden_size, inner)
        self.value_proj = nn.Linear(config.hidden_size, inner)
        self.terms = list(config.pos_att_type)
        self.span = config.relative_span
        uses_positions = config.relative_attention and not config.share_att_key
        self.pos_key_proj = (
            nn.Linear(config.hidden_size, inner) if uses_positions and "c2p" in self.terms else None
        )
        self.pos_query_proj = (
            nn.Linear(config.hidden_size, inner) if uses_positions and "p2c" in self.terms else None
        )
        self.pos_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        # HF counts the listed terms even when relative attention is off; so do we, for parity.
        self.scale = 1.0 / math.sqrt(config.head_size * (1 + len(self.terms)))

    def forward(
        self,
        hidden: torch.Tensor,
        token_mask: torch.Tensor,
        rel_index: torch.Tensor | None,
        rel_embeddings: torch.Tensor | None,
        query_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden: [B, L, H]; token_mask: [B, L] bool, True for real tokens; rel_index: [2L - 1]
        (`relative_index`, made once per forward by `DebertaEncoder.attention_inputs`);
        returns [B, L, H]."""
        pos_k = pos_q = None
        if self.config.relative_attention and self.terms:
            assert rel_index is not None and rel_embeddings is not None
            pos_k, pos_q = self._position_tables(rel_embeddings)
        dropout_p = self.dropout.p if self.training else 0.0
        impl = choose_impl(self.config.attention_impl, hidden.device, self.config.head_size)
        args = (pos_k, pos_q, rel_index, token_mask, self.scale, dropout_p)
        if query_states is None:  # q, k, v as one tensor: one gradient back for the three
            qkv = _joint_projection(hidden, [self.query_proj, self.key_proj, self.value_proj])
            context = packed_disentangled_attention(qkv, self.heads, *args, impl=impl)
        else:  # the enhanced mask decoder's queries
            q = self.query_proj(query_states)
            k, v = _joint_linear(hidden, [self.key_proj, self.value_proj])
            q, k, v = (_split_heads(x, self.heads) for x in (q, k, v))  # [B, h, L, d]
            context = disentangled_attention(q, k, v, *args, impl=impl)  # [B, h, L, d]
        return context.transpose(1, 2).flatten(2)

    def _position_tables(
        self, rel_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The relative-position table projected for c2p (pos_k) and p2c (pos_q): [h, 2*span, d]."""
        table = self.pos_dropout(rel_embeddings[: 2 * self.span])  # [2*span, H]
        share = self.config.share_att_key
        linears = []
        if "c2p" in self.terms:
            linears.append(self.key_proj if share else self.pos_key_proj)
        if "p2c" in self.terms:
            linears.append(self.query_proj if share else self.pos_query_proj)
        assert all(m is not None for m in linears)
        tables = iter(_joint_linear(table, linears))  # type: ignore[arg-type]
        pos_k = _split_heads(next(tables), self.heads) if "c2p" in self.terms else None
        pos_q = _split_heads(next(tables), self.heads) if "p2c" in self.terms else None
        return pos_k, pos_q


class DebertaLayer(nn.Module):
    """Post-LayerNorm transformer block: attention -> add & norm -> FFN -> add & norm."""

    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.attention = DisentangledSelfAttention(config)
        self.attention_out = nn.Linear(
            config.num_attention_heads * config.head_size, config.hidden_size
        )
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(
        self,
        hidden: torch.Tensor,
        token_mask: torch.Tensor,
        rel_index: torch.Tensor | None,
        rel_embeddings: torch.Tensor | None,
        query_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden if query_states is None else query_states
        context = self.attention(hidden, token_mask, rel_index, rel_embeddings, query_states)
        x = self.attention_norm(self.dropout(self.attention_out(context)) + residual)
        return self.ffn_norm(self.dropout(self.ffn_out(self.act(self.ffn_in(x)))) + x)


class ConvLayer(nn.Module):
    """DeBERTa-v2's n-gram convolution, added to the first layer's output (masked, then normed)."""

    def __init__(self, config: DebertaConfig):
        super().__init__()
        k = config.conv_kernel_size
        self.conv = nn.Conv1d(
            config.hidden_size,
            config.hidden_size,
            k,
            padding=(k - 1) // 2,
            groups=config.conv_groups,
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.act = ACTIVATIONS[config.conv_act]

    def forward(
        self, embeddings: torch.Tensor, layer_out: torch.Tensor, token_mask: torch.Tensor
    ) -> torch.Tensor:
        keep = token_mask.unsqueeze(-1).to(layer_out.dtype)
        out = self.conv(embeddings.transpose(1, 2)).transpose(1, 2) * keep
        out = self.act(self.dropout(out))
        return self.norm(layer_out + out) * keep


# --------------------------------------------------------------------------------------------
# Encoder and model
# --------------------------------------------------------------------------------------------


class DebertaEncoder(nn.Module):
    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(DebertaLayer(config) for _ in range(config.num_hidden_layers))
        self.rel_embeddings = (
            nn.Embedding(2 * config.relative_span, config.hidden_size)
            if config.relative_attention
            else None
        )
        self.rel_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            if config.norm_rel_ebd == "layer_norm"
            else None
        )
        self.conv = ConvLayer(config) if config.conv_kernel_size > 0 else None

    def relative_table(self) -> torch.Tensor | None:
        if self.rel_embeddings is None:
            return None
        table = self.rel_embeddings.weight
        return self.rel_norm(table) if self.rel_norm is not None else table

    def attention_inputs(
        self, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What every layer's attention reads, made once per forward rather than per layer: the
        [B, L] bool token mask and the [2L - 1] relative index (`relative_index`; None without
        relative attention)."""
        index = None
        if self.config.relative_attention:
            config = self.config
            index = relative_index_table(
                attention_mask.shape[1], config.position_buckets, config.max_relative_distance,
                config.relative_span, attention_mask.device,
            )  # fmt: skip
        return attention_mask.bool(), index

    def forward(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Returns [embeddings, layer 1 output, ..., layer n output], as HF's hidden_states;
        the generator's enhanced mask decoder needs the second to last."""
        token_mask, rel_index = self.attention_inputs(attention_mask)
        rel_table = self.relative_table()
        hidden = embeddings
        outputs = [embeddings]
        for i, layer in enumerate(self.layer):
            hidden = layer(hidden, token_mask, rel_index, rel_table)
            if i == 0 and self.conv is not None:
                hidden = self.conv(embeddings, hidden, attention_mask)
            outputs.append(hidden)
        return outputs


class DebertaModel(nn.Module):
    """The backbone: ids -> hidden states. `forward` returns the last layer's states."""

    def __init__(self, config: DebertaConfig, own_embedding_tables: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = DebertaEmbeddings(config, own_tables=own_embedding_tables)
        self.encoder = DebertaEncoder(config)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # BERT-style initialisation, as DeBERTa and HF use.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Conv1d):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward_layers(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        word_weight: torch.Tensor | None = None,
        position_weight: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embeddings(input_ids, attention_mask, token_type_ids, word_weight, position_weight)
        return self.encoder(x, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        word_weight: torch.Tensor | None = None,
        position_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.forward_layers(
            input_ids, attention_mask, token_type_ids, word_weight, position_weight
        )[-1]


# --------------------------------------------------------------------------------------------
# Hugging Face parameter names. The one place the two naming schemes meet; export and the
# parity tests both go through it.
# --------------------------------------------------------------------------------------------

_OURS_TO_HF: Sequence[tuple[str, str]] = (
    (r"^embeddings\.norm\.", "embeddings.LayerNorm."),
    (r"^encoder\.rel_norm\.", "encoder.LayerNorm."),
    (r"^encoder\.conv\.norm\.", "encoder.conv.LayerNorm."),
    (r"^encoder\.layer\.(\d+)\.attention\.(\w+_proj)\.", r"encoder.layer.\1.attention.self.\2."),
    (r"^encoder\.layer\.(\d+)\.attention_out\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^encoder\.layer\.(\d+)\.attention_norm\.", r"encoder.layer.\1.attention.output.LayerNorm."),
    (r"^encoder\.layer\.(\d+)\.ffn_in\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^encoder\.layer\.(\d+)\.ffn_out\.", r"encoder.layer.\1.output.dense."),
    (r"^encoder\.layer\.(\d+)\.ffn_norm\.", r"encoder.layer.\1.output.LayerNorm."),
)
_HF_TO_OURS: Sequence[tuple[str, str]] = (
    (r"^embeddings\.LayerNorm\.", "embeddings.norm."),
    (r"^encoder\.LayerNorm\.", "encoder.rel_norm."),
    (r"^encoder\.conv\.LayerNorm\.", "encoder.conv.norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.(\w+_proj)\.", r"encoder.layer.\1.attention.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"encoder.layer.\1.attention_out."),
    (
        r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.",
        r"encoder.layer.\1.attention_norm.",
    ),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"encoder.layer.\1.ffn_in."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"encoder.layer.\1.ffn_out."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"encoder.layer.\1.ffn_norm."),
)


def _rename(key: str, rules: Sequence[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    return key


def to_hf_state_dict(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Our backbone's state dict -> `DebertaV2Model` names (with `prefix`, e.g. "deberta.")."""
    return {prefix + _rename(k, _OURS_TO_HF): v for k, v in state.items()}


def from_hf_state_dict(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """`DebertaV2Model` names (keys under `prefix`) -> our backbone's; other keys are dropped."""
    return {
        _rename(k[len(prefix) :], _HF_TO_OURS): v
        for k, v in state.items()
        if k.startswith(prefix) and not k.endswith("position_ids")
    }
