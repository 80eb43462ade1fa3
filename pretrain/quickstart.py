"""A small RTD pretraining run in plain PyTorch, on synthetic tokens, to show the objective learns.

This is the main job until the Hydra/DeepSpeed trainer lands; it exercises the real model code
(`pretrain.models`) end to end on a CPU in about a minute. The tokens come from a random sparse
Markov chain (each token has a handful of likely successors), so the generator can learn to
predict masked tokens from their neighbours and the discriminator can learn to spot tokens
that break the chain: both accuracies rise well above chance within a few hundred steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pretrain.models.deberta import DebertaConfig
from pretrain.models.rtd import IGNORE_INDEX, SHARING_MODES, RTDConfig, RTDModel

PAD, CLS, SEP, MASK = 0, 1, 2, 4
FIRST_WORD = 5  # ids below are special


class MarkovTokens:
    """Sequences from a fixed random Markov chain over the non-special ids."""

    def __init__(self, vocab_size: int, successors: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        words = vocab_size - FIRST_WORD
        logits = torch.full((words, words), float("-inf"))
        for row in range(words):
            cols = torch.randperm(words, generator=g)[:successors]
            logits[row, cols] = torch.randn(successors, generator=g)
        self.transitions = torch.softmax(logits, -1)
        self.generator = g

    def sample(self, batch: int, length: int) -> torch.Tensor:
        words = self.transitions.shape[0]
        seq = torch.empty(batch, length, dtype=torch.long)
        seq[:, 0] = torch.randint(0, words, (batch,), generator=self.generator)
        for t in range(1, length):
            seq[:, t] = torch.multinomial(
                self.transitions[seq[:, t - 1]], 1, generator=self.generator
            )[:, 0]
        return seq + FIRST_WORD


def masked_batch(tokens: torch.Tensor, rate: float, generator: torch.Generator):
    """[CLS] tokens [SEP], `rate` of the words replaced by [MASK]; labels hold the originals."""
    b = tokens.shape[0]
    ids = torch.cat([torch.full((b, 1), CLS), tokens, torch.full((b, 1), SEP)], dim=1)
    special = ids < FIRST_WORD
    masked = (torch.rand(ids.shape, generator=generator) < rate) & ~special
    labels = torch.where(masked, ids, torch.full_like(ids, IGNORE_INDEX))
    inputs = torch.where(masked, torch.full_like(ids, MASK), ids)
    return inputs, torch.ones_like(ids), labels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--seq-len", type=int, default=64, help="tokens per sequence, [CLS]/[SEP] included"
    )
    p.add_argument("--vocab-size", type=int, default=200)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--sharing", choices=SHARING_MODES, default="gdes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be positive")
    if args.seq_len < 8 or args.seq_len > 512:
        p.error("--seq-len must be in [8, 512] (the model's max_position_embeddings)")
    if args.vocab_size <= FIRST_WORD + 4:
        p.error(f"--vocab-size must exceed {FIRST_WORD + 4}")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    config = DebertaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden_size // 64),
        intermediate_size=4 * args.hidden_size,
        position_buckets=32,
        max_relative_positions=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = RTDModel(config, RTDConfig(embedding_sharing=args.sharing)).to(args.device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01
    )
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / (args.steps - warmup + 1))),
    )
    data = MarkovTokens(args.vocab_size, seed=args.seed)
    mask_rng = torch.Generator().manual_seed(args.seed + 1)
    sample_rng = torch.Generator(device=args.device).manual_seed(args.seed + 2)
    params = sum(p.numel() for p in model.parameters())

    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "metrics.jsonl"
    print(
        f"RTD quick start: {params / 1e6:.2f}M parameters, {args.sharing}, device {args.device}, "
        f"{args.steps} steps of {args.batch_size}x{args.seq_len} tokens -> {log_path}"
    )
    history = []
    start = time.perf_counter()
    with log_path.open("w") as log, tqdm(range(1, args.steps + 1), desc="rtd", unit="step") as bar:
        for step in bar:
            batch = masked_batch(data.sample(args.batch_size, args.seq_len - 2), 0.15, mask_rng)
            ids, attention_mask, labels = (t.to(args.device) for t in batch)
            out = model(ids, attention_mask, labels, sampling_generator=sample_rng)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            record = {k: round(v.item(), 5) for k, v in out.metrics.items()}
            record.update(
                step=step, lr=schedule.get_last_lr()[0], grad_norm=round(grad_norm.item(), 4)
            )
            record["tokens_per_s"] = round(step * ids.numel() / (time.perf_counter() - start), 1)
            history.append(record)
            log.write(json.dumps(record) + "\n")
            bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                gen_acc=f"{record['gen_acc']:.3f}",
                disc_acc=f"{record['disc_acc']:.3f}",
            )
            if step % args.log_every == 0 or step == args.steps:
                tqdm.write(
                    " ".join(
                        f"{k}={record[k]}"
                        for k in (
                            "step",
                            "loss",
                            "gen_loss",
                            "gen_acc",
                            "disc_loss",
                            "disc_acc",
                            "tokens_per_s",
                        )
                    )
                )

    def mean(key: str, rows: list[dict]) -> float:
        return sum(r[key] for r in rows) / len(rows)

    window = max(1, min(20, args.steps // 5))
    summary = {
        f"{phase}_{key}": round(mean(key, rows), 4)
        for phase, rows in (("first", history[:window]), ("last", history[-window:]))
        for key in ("gen_loss", "gen_acc", "disc_loss", "disc_acc")
    }
    summary["chance_gen_acc"] = round(1 / (args.vocab_size - FIRST_WORD), 4)
    print("summary (mean of the first / last steps): " + json.dumps(summary))
    return summary
