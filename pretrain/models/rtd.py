"""ELECTRA-style replaced-token detection with DeBERTa-v3's embedding sharing modes.

One module holds the generator (a shallower DeBERTa + MLM head) and the discriminator (a full
DeBERTa + RTD head). `RTDModel.forward` is the whole pretraining objective:

  1. the generator predicts the original tokens at the masked positions (MLM loss);
  2. replacements are sampled from its softmax, with no gradient through the sampling;
  3. the discriminator reads the corrupted sequence and labels each token replaced or not
     (a sampled token equal to the original counts as *not* replaced);
  4. loss = MLM + rtd_weight * RTD.

How the discriminator's word embeddings relate to the generator's is the sharing mode, written
out in `discriminator_embedding_weights` so a reader sees it in a few lines:

  gdes  E_disc = stop_gradient(E_gen) + E_delta, E_delta zero-initialised (DeBERTa-v3): the MLM
        loss alone updates E_gen, the RTD loss alone updates E_delta.
  es    E_disc = E_gen: one table updated by both losses (ELECTRA).
  nes   two independent tables.

The same applies to absolute position embeddings when the model has them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.deberta import DebertaConfig, DebertaModel
from pretrain.models.heads import (
    EnhancedMaskDecoder,
    MLMHead,
    RTDHead,
    at_least_fp32,
    mlm_objective,
)
from pretrain.models.heads import sample_replacements as sample_replacements  # its old home

SHARING_MODES = ("gdes", "es", "nes")
IGNORE_INDEX = -100


@dataclass
class RTDConfig:
    embedding_sharing: str = "gdes"
    rtd_weight: float = 10.0  # lambda in DeBERTa-v3 / ELECTRA
    generator_depth_ratio: float = 0.5  # generator layers = round(ratio * discriminator layers)
    temperature: float = 1.0  # sampling temperature of the generator's softmax
    exclude_original: bool = False  # never sample the original token (always a real replacement)
    enhanced_mask_decoder: bool = False  # generator decodes through DeBERTa's EMD
    emd_steps: int = 2

    def __post_init__(self) -> None:
        if self.embedding_sharing not in SHARING_MODES:
            raise ValueError(
                f"rtd.embedding_sharing={self.embedding_sharing!r}; choose gdes, es or nes"
            )
        if not 0.0 < self.generator_depth_ratio <= 1.0:
            raise ValueError(
                f"rtd.generator_depth_ratio must be in (0, 1], got {self.generator_depth_ratio}"
            )
        if self.temperature <= 0:
            raise ValueError(f"rtd.temperature must be > 0, got {self.temperature}")
        if self.rtd_weight < 0:
            raise ValueError(f"rtd.rtd_weight must be >= 0, got {self.rtd_weight}")
        if self.emd_steps < 1:
            raise ValueError(f"rtd.emd_steps must be >= 1, got {self.emd_steps}")


def generator_config(discriminator: DebertaConfig, depth_ratio: float) -> DebertaConfig:
    """The generator is the discriminator's shape at a fraction of its depth (same width, so
    embeddings can be shared). Derived, never configured separately."""
    layers = max(1, round(discriminator.num_hidden_layers * depth_ratio))
    return dataclasses.replace(discriminator, num_hidden_layers=layers)


class RTDOutput(NamedTuple):
    # A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 hooks backward through the tensors of a
    # module's output and traverses tuples and dicts only.
    loss: torch.Tensor  # gen_loss + rtd_weight * disc_loss; the only tensor to backpropagate
    gen_loss: torch.Tensor
    disc_loss: torch.Tensor
    metrics: dict[str, torch.Tensor]  # detached scalars for logging
    disc_logits: torch.Tensor  # [B, L], for evaluation (AUC)
    disc_ids: torch.Tensor  # [B, L], the corrupted sequence the discriminator read
    replaced: torch.Tensor  # [B, L] bool, the discriminator's labels


class RTDModel(nn.Module):
    def __init__(self, config: DebertaConfig, rtd: RTDConfig | None = None):
        super().__init__()
        self.config = config
        self.rtd = rtd = rtd or RTDConfig()
        self.generator_config = gen_config = generator_config(config, rtd.generator_depth_ratio)

        self.generator = DebertaModel(gen_config)
        self.mlm_head = MLMHead(gen_config)
        self.emd = (
            EnhancedMaskDecoder(gen_config, rtd.emd_steps) if rtd.enhanced_mask_decoder else None
        )

        # Only NES gives the discriminator tables of its own; GDES and ES compose them in forward.
        self.discriminator = DebertaModel(
            config, own_embedding_tables=rtd.embedding_sharing == "nes"
        )
        self.rtd_head = RTDHead(config)

        self.word_embeddings_delta: nn.Parameter | None = None
        self.position_embeddings_delta: nn.Parameter | None = None
        if rtd.embedding_sharing == "gdes":
            self.word_embeddings_delta = nn.Parameter(
                torch.zeros(config.vocab_size, config.embedding_dim)
            )
            if config.position_biased_input:
                self.position_embeddings_delta = nn.Parameter(
                    torch.zeros(config.max_position_embeddings, config.embedding_dim)
                )

    def compile_layers(self, mode: str | None = None) -> None:
        """torch.compile every transformer layer of both towers, in place (parameter names
        and checkpoints unchanged). The layers are the repeated block and nearly all the
        work, and compiling them region by region keeps compile time to one layer's.

        Static shapes: each batch shape gets its own graph. By default a second shape (the
        held-out set's short last batch) makes dynamo recompile with a symbolic batch size,
        and the training step's graph, compiled after the first evaluation, would then be the
        symbolic one too, with generic kernels. There are few shapes: training, evaluation
        and its last batch, each twice with the enhanced mask decoder (its extra pass gives the
        layers query states), 6 graphs shared by all layers of one width, under dynamo's
        limit of 8 per function (past it, new shapes would run eagerly).

        `mode` is torch.compile's (None: its default); "reduce-overhead" replays each layer's
        compiled work as CUDA graphs (on CUDA only; the fused attention, kept out of the graph,
        splits each layer into three and launches between them)."""
        for tower in (self.generator, self.discriminator):
            for layer in tower.encoder.layer:
                layer.compile(dynamic=False, mode=mode)

    def generator_embedding_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(word, position) tables of the generator: E_gen, tied to its MLM decoder."""
        gen = self.generator.embeddings
        assert gen.word_embeddings is not None
        return gen.word_embeddings.weight, (
            gen.position_embeddings.weight if gen.position_embeddings is not None else None
        )

    def discriminator_embedding_weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(word, position) tables the discriminator embeds with; None means its own (NES)."""
        gen_word, gen_pos = self.generator_embedding_weights()
        mode = self.rtd.embedding_sharing
        if mode == "gdes":
            assert self.word_embeddings_delta is not None
            word = gen_word.detach() + self.word_embeddings_delta
            pos = None
            if gen_pos is not None:
                assert self.position_embeddings_delta is not None
                pos = gen_pos.detach() + self.position_embeddings_delta
            return word, pos
        if mode == "es":
            return gen_word, gen_pos
        return None, None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        sampling_generator: torch.Generator | None = None,
        sampling_noise: torch.Tensor | None = None,
        masked_rows: torch.Tensor | None = None,
    ) -> RTDOutput:
        """input_ids: [B, L] with masked positions already corrupted (usually [MASK]);
        labels: [B, L] original ids at the masked positions, IGNORE_INDEX elsewhere;
        sampling_noise: [B, L] uniforms that decide the replacements (else `sampling_generator`);
        masked_rows: `masked_rows_of(labels)` on labels' device, made on the host beforehand
        (as `Engine.forward` does), or None to find them here."""
        # The masked rows' flat indices. Found here on a GPU, they are the step's one wait for
        # the device (their count sets shapes); given, the step has none. Every later selection
        # indexes with them or multiplies by a mask, so the host can queue the whole step (and
        # the next) while the GPU works.
        masked = labels != IGNORE_INDEX
        rows = masked_rows_of(labels) if masked_rows is None else masked_rows
        targets = labels.flatten()[rows]

        # 1. Generator: MLM at the masked rows only. `mlm_objective` decodes them in chunks and
        #    also does step 2's sampling, so the [N, V] logits never exist whole.
        gen_states = self.generator.forward_layers(input_ids, attention_mask, token_type_ids)
        if self.emd is not None:
            gen_hidden = self.emd(gen_states[-2], attention_mask, self.generator.encoder)
        else:
            gen_hidden = gen_states[-1]
        gen_word, _ = self.generator_embedding_weights()
        if sampling_noise is not None:
            uniforms = sampling_noise.flatten()[rows]
        else:
            uniforms = torch.rand(len(targets), generator=sampling_generator, device=labels.device)
        mlm = mlm_objective(
            self.mlm_head.transform(gen_hidden.flatten(0, 1)[rows]),
            gen_word,
            self.mlm_head.bias,
            targets,
            uniforms,
            self.rtd.temperature,
            self.rtd.exclude_original,
        )
        # Sum / count rather than mean, so a batch with nothing masked gives 0, not NaN. The
        # count is the rows' (a host number, no reduction on the device).
        gen_loss = mlm.loss_sum / max(len(rows), 1)

        # 2. Corrupt with the replacements sampled from the generator's softmax (inverse CDF,
        #    see `sample_replacements`); nothing flows back through this.
        with torch.no_grad():
            original = torch.where(masked, labels, input_ids)
            disc_ids = original.clone(memory_format=torch.contiguous_format)  # for view(-1)
            disc_ids.view(-1)[rows] = mlm.sampled
            valid = attention_mask.bool()
            replaced = (disc_ids != original) & valid

        # 3. Discriminator with the embeddings of the sharing mode.
        word, pos = self.discriminator_embedding_weights()
        disc_hidden = self.discriminator(disc_ids, attention_mask, token_type_ids, word, pos)
        disc_logits = self.rtd_head(disc_hidden)
        disc_scores = at_least_fp32(disc_logits)
        per_token = F.binary_cross_entropy_with_logits(
            disc_scores, replaced.to(disc_scores.dtype), reduction="none"
        )
        disc_loss = (per_token * valid).sum() / valid.sum().clamp(min=1)

        loss = gen_loss + self.rtd.rtd_weight * disc_loss
        metrics = rtd_metrics(mlm.predicted, targets, disc_logits, replaced, valid, masked)
        metrics.update(gen_loss=gen_loss.detach(), disc_loss=disc_loss.detach(), loss=loss.detach())
        return RTDOutput(
            loss, gen_loss, disc_loss, metrics, disc_logits.detach(), disc_ids, replaced
        )


def masked_rows_of(labels: torch.Tensor) -> torch.Tensor:
    """The flat indices (row-major, int64 [N]) of the masked positions of labels [B, L]: the
    rows the MLM head decodes. On a GPU, finding them waits for the device; found on the host
    from a batch's CPU labels and copied over with the batch, they cost the step no wait."""
    return (labels != IGNORE_INDEX).flatten().nonzero().squeeze(1)


@torch.no_grad()
def rtd_metrics(
    gen_predicted: torch.Tensor,
    targets: torch.Tensor,
    disc_logits: torch.Tensor,
    replaced: torch.Tensor,
    valid: torch.Tensor,
    masked: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Scalar diagnostics. `replaced_frac` is replaced / masked tokens: how often the generator
    fools the corruption (falls as the generator learns)."""

    def ratio(num: torch.Tensor, den: torch.Tensor | int) -> torch.Tensor:
        if isinstance(den, int):  # a host number stays one: copied to a GPU, it would wait
            return num.float() / max(den, 1)
        return num.float() / den.float().clamp(min=1)

    predicted = (disc_logits > 0) & valid
    true_pos = (predicted & replaced).sum()
    return {
        "gen_acc": ratio((gen_predicted == targets).sum(), targets.numel()),
        "disc_acc": ratio((((disc_logits > 0) == replaced) & valid).sum(), valid.sum()),
        "disc_precision": ratio(true_pos, predicted.sum()),
        "disc_recall": ratio(true_pos, replaced.sum()),
        "replaced_frac": ratio(replaced.sum(), masked.sum()),
        "mask_frac": ratio(masked.sum(), valid.sum()),
    }
