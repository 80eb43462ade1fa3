"""The two task heads of RTD pretraining, and the generator's enhanced mask decoder.

- `MLMHead`: dense -> activation -> LayerNorm -> decoder tied to the word embeddings (+ bias).
  It is called on the masked rows only, so the vocabulary-sized matmul costs ~15% of a
  full-sequence head; the tied table is passed in, because which table it is depends on the
  embedding-sharing mode that `rtd.py` owns.
- `EnhancedMaskDecoder`: DeBERTa's EMD. Absolute positions enter the generator only here: the
  last layer is re-run with queries `H_{n-1} + P` over keys/values `H_{n-1}`.
- `RTDHead`: one logit per token, "was this token replaced?".
"""

from __future__ import annotations

import torch
from torch import nn

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

    def forward(self, hidden: torch.Tensor, word_weight: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] (masked rows only); word_weight: [V, E]; returns logits [N, V]."""
        return torch.matmul(self.norm(self.act(self.dense(hidden))), word_weight.t()) + self.bias


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
                "generator.enhanced_mask_decoder needs model.position_biased_input=false: "
                "with absolute positions already in the input, EMD has nothing to add"
            )
        if steps < 1:
            raise ValueError(f"generator.emd_steps must be >= 1, got {steps}")
        self.steps = steps
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        nn.init.normal_(self.position_embeddings.weight, std=config.initializer_range)

    def forward(
        self, previous: torch.Tensor, attention_mask: torch.Tensor, encoder: DebertaEncoder
    ) -> torch.Tensor:
        """previous: the output of the encoder's second-to-last layer (its input when it has
        one layer); returns the states the MLM head decodes, [B, L, H]."""
        pair_mask, rel_pos = encoder.attention_inputs(attention_mask)
        rel_table = encoder.relative_table()
        last = encoder.layer[-1]
        query = previous + self.position_embeddings.weight[: previous.shape[1]].unsqueeze(0)
        for _ in range(self.steps):
            query = last(previous, pair_mask, rel_pos, rel_table, query_states=query)
        return query


class RTDHead(nn.Module):
    """dense -> activation -> LayerNorm -> one logit, as DeBERTa's replaced-token detector."""

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
        """hidden: [B, L, H] -> logits [B, L]."""
        return self.classifier(self.norm(self.act(self.dense(hidden)))).squeeze(-1)
