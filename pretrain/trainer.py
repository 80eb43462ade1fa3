"""The training loop: step, log, evaluate, checkpoint, resume. Nothing else lives here.

`Trainer(config).fit()` builds the data, the RTD model and the DeepSpeed engine, resumes from
the run directory's latest checkpoint when there is one, and trains to `trainer.max_steps`.
An optimizer step is `accumulation` micro batches on every rank; it is logged as the mean of its
micro batches, averaged over ranks. SIGTERM / SIGUSR1 (preemption) and Ctrl-C (SIGINT) finish
the current step, save a checkpoint and exit cleanly; a second Ctrl-C quits without saving.

Faults, and what the loop does about them:
- A micro batch whose loss is not finite on any rank is dropped on every rank before its
  backward (so no NaN reaches a weight) and the next batch takes its place; past
  `trainer.max_nonfinite_skips` the run saves its last good state and stops (`TrainingStopped`).
  The skipped batches stay consumed, so a resumed run does not meet them again.
- A checkpoint that cannot be written (`CheckpointError`) is reported and training goes on, up
  to `trainer.max_save_failures` failures in a row; the final save must succeed.
- Under fp16, DeepSpeed skips overflowing steps and lowers the loss scale; each skip is logged.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from omegaconf import OmegaConf

from pretrain.checkpoint import Checkpointer, CheckpointError, capture_rng, restore_rng
from pretrain.config import Config, ConfigError, ModelConfig
from pretrain.data.loader import (
    NEW_RUN_HINT,
    SHARE_PREFIX,
    EmptyPartitionError,
    LoaderStateError,
    reshard_states,
)
from pretrain.data.pipeline import DataBundle, build_data, held_out_per_partition
from pretrain.data.sources import SourceError
from pretrain.engine import (
    Engine,
    World,
    checkpoint_precision,
    convert_to_universal,
    init_distributed,
    resolve_precision,
    zero_stage_run,
)
from pretrain.metrics import (
    METRICS_FILE,
    MetricsLogger,
    SampleTrace,
    StepProfiler,
    binary_auc,
    device_peak_flops,
    read_logged,
    rtd_train_flops_per_token,
)
from pretrain.models.attention import choose_impl
from pretrain.models.rtd import RTDModel, RTDOutput

TRAIN_KEYS = (
    "loss",
    "gen_loss",
    "gen_acc",
    "disc_loss",
    "disc_acc",
    "disc_precision",
    "disc_recall",
    "replaced_frac",
)

# Why a run's data may have no held-out split.
WHERE_HELD_OUT = (
    "a prepared corpus has one when data_prep.corpus's --valid-fraction put documents in it: "
    "its summary says how many, and a corpus of few documents, such as one per file, wants a "
    "fraction above the default 0.01; a streamed source has none"
)

# Settings a resume applies from its next step and names as changed (None: every key of the
# section). They are what a sweep's jobs differ in (besides `model`, checked for every
# resume): a sweep's job resumed with another value there is another job.
RETUNED_ON_RESUME: dict[str, tuple[str, ...] | None] = {
    "optim": None,
    "rtd": None,
    "masking": None,
    "trainer": ("global_batch_size", "eval_sequences"),
}
# Settings outside `model` that shape the weights or the optimizer state a checkpoint holds
# (the ZeRO stage: how DeepSpeed lays out the optimizer state and weights it saves).
FIXED_ON_RESUME = {
    "rtd": ("embedding_sharing", "generator_depth_ratio", "enhanced_mask_decoder"),
    "optim": ("name",),
    "deepspeed": ("zero_stage",),
}
# Model settings a resumed run may change: they leave the weights' meaning alone (dropout, the
# attention kernel) or only matter at the start (where the initial weights came from).
FREE_ON_RESUME = frozenset(
    {
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "attention_impl",
        "init_from",
        "init_generator_from",
    }
)


QUIT_WITHOUT_SAVING = "interrupted: quit without saving (the last checkpoint, if any, stays)"
# A second SIGINT this soon after the first is the same Ctrl-C reaching the process twice: from
# the terminal (the whole process group) and forwarded by torchrun. Later, it means "quit now".
SAME_CTRL_C_S = 1.0


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite losses); its last good state was saved."""


class Trainer:
    def __init__(
        self,
        config: Config,
        world: World | None = None,
        sweep_job: bool = False,
        swept: tuple[str, ...] = (),
    ):
        """`sweep_job`: this run is a job of a sweep, found again by its number alone, so a
        resume with other hyper-parameters is another job's values and is refused: the
        RETUNED_ON_RESUME ones, and whatever the sweep varies (`swept`, its config keys or
        groups, `config.swept_keys`), micro batch and attention kernel included."""
        self.config = config
        self.sweep_job = sweep_job
        self.swept = swept
        self.world = world or init_distributed(config.trainer.device)
        t = config.trainer
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # the kernel tests, on CPU
        if (
            config.model.attention_impl == "triton"
            and self.world.device.type != "cuda"
            and not interpreted
        ):
            raise ConfigError(
                f"model.attention_impl=triton needs a CUDA GPU (this run is on "
                f"{self.world.device.type}); use model.attention_impl=eager, or auto (the fused "
                "kernel where it can run)"
            )
        self.data: DataBundle = build_data(config, self.world)
        if t.max_steps == 0 and self.data.valid is None:
            raise ConfigError(
                "trainer.max_steps=0 evaluates the starting model on the held-out split, but "
                f"the data has none ({WHERE_HELD_OUT})"
            )
        if (t.eval_every or t.max_steps == 0) and self.data.valid is not None:
            if short := self.data.valid.short_sources():
                name, docs = short[0]
                raise SourceError(
                    f"the held-out split of source {name!r} has {docs} document(s), fewer than "
                    f"data.streams={config.data.streams}, and an evaluation reads from every "
                    "partition: prepare the corpus with a larger --valid-fraction, use fewer "
                    "data.streams, or set trainer.eval_every=0 (no evaluations)"
                )
        if config.model.init_from:
            config = self._shape_from_checkpoint(config)
        model_config = self.data.fit_model_config(config.model)
        self.config = config = dataclasses.replace(config, model=model_config)
        self.checkpointer = Checkpointer(
            config.run_dir,
            t.keep_last,
            self.world.rank,
            barrier=torch.distributed.barrier,
            all_ok=lambda ok: _all_true(ok, self.world),
            broadcast=_broadcast_from_main,
            log=print,
        )
        self.resume_tag = self.checkpointer.latest() if t.resume else None
        if t.max_steps == 0 and self.resume_tag is not None:
            step = self.checkpointer.trainer_state(self.resume_tag)["step"]
            raise ConfigError(
                f"trainer.max_steps=0 evaluates a new run's starting model, but {config.run_dir} "
                f"holds a run trained to step {step}: to evaluate it, export it (python -m "
                f"pretrain.export {config.run_dir} OUT) and give model.init_from=OUT to a new "
                "run (another name= or hydra.run.dir=)"
            )
        self.engine_tag = self.resume_tag
        self.saved_world_size = self.world.world_size
        precision = resolve_precision(config.deepspeed.precision, self.world.device)
        zero_stage = zero_stage_run(config, precision)
        if self.resume_tag is not None:
            saved = self.checkpointer.trainer_state(self.resume_tag)
            self.saved_world_size = int(saved["world_size"])
            self._check_optimizer_layout(saved, precision, zero_stage)
        if self.saved_world_size != self.world.world_size and zero_stage > 0:
            assert self.resume_tag is not None
            self.engine_tag = self.checkpointer.universal_tag(self.resume_tag, convert_to_universal)
            extra = {**config.deepspeed.extra, "checkpoint": {"load_universal": True}}
            config = dataclasses.replace(
                config, deepspeed=dataclasses.replace(config.deepspeed, extra=extra)
            )
        _set_determinism(t.deterministic)
        _seed_everything(t.seed)  # the same initial weights on every rank, for every ZeRO stage
        # Where init_from's parts came from: said by fit() for a new run only (a resume loads
        # the checkpoint over them).
        self._init_notes: list[str] = []
        self.model = self._initial_model(config)
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        if config.trainer.compile:
            self.model.compile_layers()
            # Inductor's own lowering calls a torch helper that torch deprecates (torch 2.13),
            # once per compile: nothing a user can act on.
            warnings.filterwarnings(
                "ignore",
                message=r"`torch\._prims_common\.check` is deprecated",
                category=FutureWarning,
            )
        self.engine = Engine(self.model, config, self.world)
        _seed_everything(t.seed + 7919 * self.world.rank)  # dropout differs across ranks
        self.flops_per_token = rtd_train_flops_per_token(
            config.model,
            self.model.generator_config,
            config.data.seq_len,
            config.masking.probability,
        )
        self.peak_flops = device_peak_flops(self.world.device, config.logging.peak_tflops)
        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_skips = 0  # over the whole run; saved in checkpoints
        self._save_failures = 0  # in a row
        self._fp16_skipped = 0
        self._stop_signal: int | None = None
        self._evaluating = False  # in a held-out evaluation between steps (for the Ctrl-C line)
        self._resume_notes: list[str] = []  # lines for the console once the logger exists
        # Whether this launch has written to the run directory: until then, a refusal leaves
        # it as it was (the entry point also removes Hydra's record of the launch).
        self.wrote_run_dir = False
        self._log = print if self.world.is_main else (lambda _line: None)

    def _shape_from_checkpoint(self, config: Config) -> Config:
        """Continued pretraining: the model's shape is the Hugging Face checkpoint's."""
        from pretrain.export import ExportError, check_init_tokenizer, read_hf_config

        m = config.model
        assert m.init_from is not None
        try:
            unchecked = check_init_tokenizer(m.init_from, self.data.tokenizer_dir)
            shape = read_hf_config(m.init_from)
        except ExportError as e:
            raise ConfigError(f"model.init_from: {e}") from None
        if self.data.vocab_size > shape.vocab_size:
            raise ConfigError(
                f"model.init_from={m.init_from} has {shape.vocab_size} embeddings, fewer than "
                f"the {self.data.vocab_size} ids of data.tokenizer={self.data.tokenizer_dir}: it "
                "was not trained with that tokenizer; use the checkpoint's own, or one that "
                "extends it (python -m data_prep.extend_vocab) with the model grown to it"
            )
        # The shape is the checkpoint's; dropout and the attention kernel stay the run's own
        # choice, as on a resume (FREE_ON_RESUME): published configs say dropout 0.1.
        own = {k: getattr(m, k) for k in FREE_ON_RESUME}
        model = ModelConfig(**{**dataclasses.asdict(shape), **own})
        overridden = [
            f"{f.name} {getattr(shape, f.name)} (model.{f.name}={getattr(m, f.name)})"
            for f in dataclasses.fields(shape)
            if f.name not in own and getattr(shape, f.name) != getattr(m, f.name)
        ]
        if overridden and self.world.is_main:  # e.g. a model.vocab_size meant to match
            print(
                f"warning: model.init_from: the model's shape is that of "
                f"{m.init_from}/config.json, not the model.* settings: {', '.join(overridden)}"
            )
        if unchecked and self.world.is_main:
            print(unchecked)
        config = dataclasses.replace(config, model=model)
        config.validate()  # data.seq_len against the checkpoint's max_position_embeddings
        return config

    def _initial_model(self, config: Config) -> RTDModel:
        if not config.model.init_from:
            return RTDModel(config.model, config.rtd)
        from pretrain.export import ExportError, rtd_from_hf

        self._init_notes.append(f"discriminator from {config.model.init_from}")
        try:
            return rtd_from_hf(
                config.model.init_from,
                config.model.init_generator_from,
                config.rtd,
                log=self._init_notes.append,
            )
        except ExportError as e:
            raise ConfigError(f"model.init_from: {e}") from None

    # ------------------------------------------------------------------ state

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "nonfinite_skips": self.nonfinite_skips,
            "world_size": self.world.world_size,
            # How DeepSpeed laid out the optimizer state: a resume must run the same.
            "deepspeed": {"precision": self.engine.precision, "zero_stage": self.engine.zero_stage},
            "config": _as_dict(self.config),
            "cwd": os.getcwd(),  # what relative paths in the config are relative to (export)
        }

    def save(self) -> str:
        rank_state = {"data": self.data.train.state_dict(), "rng": capture_rng()}
        return self.checkpointer.save(self.engine, self.step, self.trainer_state(), rank_state)

    def _check_optimizer_layout(self, saved: dict[str, Any], precision: str, stage: int) -> None:
        """Refuse, in one line, a resume whose DeepSpeed optimizer differs from the one that
        saved the checkpoint (another precision, or bf16 at stage 0 saved before it ran as
        stage 1): DeepSpeed would fail deep inside its load."""
        assert self.resume_tag is not None
        stage_was = saved.get("config", {}).get("deepspeed", {}).get("zero_stage")
        if stage_was is not None and stage_was != self.config.deepspeed.zero_stage:
            return  # `resume` names the changed setting
        ours = f"{precision} at ZeRO stage {stage}"
        layout = saved.get("deepspeed")
        if layout is not None:  # recorded since bf16 at stage 0 runs as stage 1
            theirs = f"{layout['precision']} at ZeRO stage {layout['zero_stage']}"
            if theirs == ours:
                return
            fix = (
                f"the precision it was saved with (deepspeed.precision={layout['precision']})"
                if layout["precision"] != precision
                else "the deepspeed.extra.data_types it was saved with"
            )
        else:  # saved before it was recorded: its precision and partitioning, from its files
            step_dir = self.checkpointer.root / self.resume_tag
            partitioned = any(step_dir.glob("*optim_states.pt"))
            was = checkpoint_precision(step_dir)
            theirs = f"{was or 'its precision'} at ZeRO stage {'1-3' if partitioned else 0}"
            if was is not None and was != precision:
                fix = f"the precision it was saved with (deepspeed.precision={was})"
            elif partitioned == (stage > 0):
                return
            elif not partitioned and precision == "bf16":  # DeepSpeed's stage-0 wrapper's
                fix = (
                    "+deepspeed.extra.data_types.grad_accum_dtype=bf16 (DeepSpeed's stage-0 "
                    "bf16 optimizer, which saved it: bf16 gradient sums, slower)"
                )
            else:
                fix = "the precision and deepspeed.extra settings it was saved with"
        raise ConfigError(
            f"cannot resume {self.config.run_dir}: its checkpoint holds DeepSpeed's optimizer "
            f"state for {theirs}, this run's would be for {ours} (deepspeed.precision="
            f"{self.config.deepspeed.precision} on {self.world.device.type}); resume with {fix}, "
            f"or {self._new_run_hint()}"
        )

    def resume(self) -> bool:
        tag = self.resume_tag
        if tag is None:
            return False
        trainer_state = self.checkpointer.trainer_state(tag)
        was, ours = trainer_state["config"], _as_dict(self.config)
        fixed = [("model", k) for k in ours["model"] if k not in FREE_ON_RESUME]
        fixed += [(section, k) for section, keys in FIXED_ON_RESUME.items() for k in keys]
        changed = [
            f"{section}.{k}={was[section].get(k)} (now {ours[section][k]})"
            for section, k in fixed
            if was.get(section, {}).get(k, ours[section][k]) != ours[section][k]
        ]
        if changed:
            raise ConfigError(
                f"cannot resume {self.config.run_dir}: it was trained with {', '.join(changed)}, "
                f"which shape its weights or optimizer state; resume with those, or "
                f"{self._new_run_hint()}"
            )
        # Values a resume applies from its next step: optim by Engine.load (the checkpoint's
        # optimizer keeps its moments, not its settings), rtd and masking as read each step,
        # the global batch by the engine, built for this run's.
        retuned = {  # key: (old value, new value)
            f"{section}.{k}": (was[section][k], v)
            for section, keys in RETUNED_ON_RESUME.items()
            for k, v in ours[section].items()
            if (keys is None or k in keys) and k in was.get(section, {}) and was[section][k] != v
        }
        moved = [f"{key}={old} (now {new})" for key, (old, new) in retuned.items()]
        for key in self.swept if self.sweep_job else ():
            before, now = _lookup(was, key), _lookup(ours, key)
            if key == "model" and isinstance(before, dict) and isinstance(now, dict):
                # how the model runs may change on any resume (FREE_ON_RESUME)
                before = {k: v for k, v in before.items() if k not in FREE_ON_RESUME}
                now = {k: v for k, v in now.items() if k not in FREE_ON_RESUME}
            if before != now and key not in retuned:
                scalar = not isinstance(now, dict)
                moved.append(f"{key}={before} (now {now})" if scalar else f"other {key} settings")
        if moved and self.sweep_job:
            raise ConfigError(
                f"sweep job {self.config.run_dir} was trained with {', '.join(moved)}: a sweep "
                "finds its jobs again by number, so resume it with the same values, or give the "
                "new values another hydra.sweep.dir"
            )
        if retuned:
            named = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in retuned.items())
            self._resume_notes.append(f"changed on resume: {named}")
        if self.saved_world_size == self.world.world_size:
            rank_state = self.checkpointer.load(self.engine, tag, self.engine_tag)
            self._load_data_state(rank_state["data"])
            restore_rng(rank_state["rng"])
        else:  # another number of ranks: each data partition moves to its new owner
            assert self.engine_tag is not None
            self.engine.load(str(self.checkpointer.root), self.engine_tag)
            saved = [s["data"] for s in self.checkpointer.all_rank_states(tag)]
            try:
                states = reshard_states(saved, self.world.world_size)
            except ValueError as e:
                raise ConfigError(
                    f"cannot resume {self.config.run_dir} on {self.world.world_size} ranks: {e}"
                ) from None
            self._load_data_state(states[self.world.rank])
            converted = (
                f" from its universal form ({self.engine_tag}, kept beside it until it is pruned)"
                if self.engine_tag != tag
                else ""
            )
            self._resume_notes.append(
                f"saved on {self.saved_world_size} rank(s), resumed on {self.world.world_size}: "
                f"weights and optimizer state loaded{converted}, each data partition moved to "
                "its new rank; dropout draws from fresh random streams (the masks and sampled "
                "replacements are keyed by sample, so unchanged)"
            )
        self.step = trainer_state["step"]
        self.tokens_seen = trainer_state["tokens_seen"]
        self.nonfinite_skips = int(trainer_state.get("nonfinite_skips", 0))
        return True

    def _new_run_hint(self) -> str:
        """What to do instead of a refused resume: a sweep job's directory is its number in
        hydra.sweep.dir, so name= and hydra.run.dir= do not apply there."""
        return "give the new values another hydra.sweep.dir" if self.sweep_job else NEW_RUN_HINT

    def _load_data_state(self, state: dict[str, Any]) -> None:
        """The loader's refusals, naming this run's directory and this launch's way out."""
        try:
            self.data.train.load_state_dict(state)
        except LoaderStateError as e:
            message = str(e).replace("cannot resume:", f"cannot resume {self.config.run_dir}:", 1)
            raise LoaderStateError(message.replace(NEW_RUN_HINT, self._new_run_hint())) from None

    def _save_or_carry_on(self, final: bool = False) -> None:
        """A periodic save that fails is reported and training goes on (its state is intact in
        memory and the previous checkpoint is kept), up to trainer.max_save_failures in a row;
        a final save must succeed."""
        try:
            self.save()
        except CheckpointError as e:
            self._save_failures += 1
            limit = self.config.trainer.max_save_failures
            if final or self._save_failures > limit:
                raise
            self._log(
                f"warning: step {self.step}: {e}; training goes on and retries at the next save "
                f"({self._save_failures} of trainer.max_save_failures={limit} in a row)"
            )
        else:
            self._save_failures = 0

    # ------------------------------------------------------------------ loop

    def fit(self, until_step: int | None = None) -> list[dict[str, Any]]:
        """Train to max_steps (or stop, save and return at `until_step`, for staged runs);
        returns the records logged by this call (rank 0)."""
        c, t = self.config, self.config.trainer
        last = t.max_steps if until_step is None else min(until_step, t.max_steps)
        resumed = self.resume()
        earlier = None if resumed else self._clear_earlier_run()
        run_dir = Path(c.run_dir)
        found = set(run_dir.iterdir()) if run_dir.is_dir() else set()
        refused: ConfigError | None = None
        try:
            logger = MetricsLogger(
                c.run_dir,
                enabled=self.world.is_main,
                total_steps=t.max_steps,
                start_step=self.step,
                wandb_mode=c.logging.wandb,
                project=c.logging.project,
                run_name=c.name,
                config=_as_dict(c),
                progress_bar=c.logging.progress_bar and t.max_steps > 0,
            )
        except ConfigError as e:  # wandb could not start: a refused launch, so leave no trace
            refused = e
            for path in set(run_dir.iterdir()) - found:  # the new log and wandb's files
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        # Rank 0 alone starts wandb: the others must not go on to wait for it in a collective.
        if not _all_true(refused is None, self.world):
            raise refused or ConfigError(
                f"logging.wandb={c.logging.wandb}: wandb could not start on rank 0"
            )
        if self.world.is_main and not (resumed and self.step >= last):  # not if nothing to do
            self.wrote_run_dir = True
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(c)))
        if resumed:
            logger.write(f"resumed from step {self.step} in {c.run_dir}")
            for line in self._resume_notes:
                logger.write(line)
        self._log = logger.write if self.world.is_main else self._log
        for line in self._start_lines(resumed, last) + ([] if resumed else self._init_notes):
            self._log(line)
        if earlier:
            self._log(earlier)
        if resumed and self.step >= last:  # a finished run run again: nothing to redo
            logger.close(plots=False)
            return []
        if t.max_steps == 0:  # evaluation only: no training, no checkpoint
            record = self.evaluate()
            logger.log(record)
            logger.close(plots=False)
            if self.world.world_size > 1:
                # Every rank done before any exits, as a training run's final save does. (It
                # made a gloo abort at exit rarer; its cause, C++ teardown racing gloo's
                # threads, is avoided by pretrain.__main__._exit.)
                torch.distributed.barrier()
            return [record]
        trace = SampleTrace(c.run_dir, self.world.rank, self.step, c.logging.trace_samples)
        profiler = StepProfiler(
            c.run_dir, self.world.rank, self.world.world_size, c.logging.profile_from,
            c.logging.profile_steps, self.world.device.type == "cuda",
        )  # fmt: skip
        history: list[dict[str, Any]] = []
        if not resumed and t.eval_every and self.data.valid is not None:
            record = self.evaluate()  # the untrained baseline that later evaluations improve on
            logger.log(record)
            history.append(record)
        if c.logging.profile_steps and c.logging.profile_from <= self.step:
            self._log(
                f"warning: logging.profile_from={c.logging.profile_from} is not after step "
                f"{self.step}, where this run starts: nothing is profiled"
            )
        elif c.logging.profile_steps and c.logging.profile_from > last:
            self._log(
                f"warning: logging.profile_from={c.logging.profile_from} is past step {last}, "
                "where this run stops: nothing is profiled"
            )
        batches = iter(self.data.train)
        window_start, window_tokens = time.perf_counter(), 0
        previous_handlers = self._install_signal_handlers()
        stopped = False  # by a signal (on any rank), after saving
        try:
            while self.step < last:
                step_start = time.perf_counter()
                profiler.before(self.step + 1)
                sums, samples = self._train_step(batches)
                stop = sums.pop("stop") > 0  # any rank was signalled: all stop after this step
                self.step += 1
                profiled_step = profiler.active
                profiled = profiler.after(self.step)
                if profiled:
                    self._log(profiled)
                trace.log(self.step, samples)
                self._note_fp16_overflow()
                tokens = int(sums.pop("tokens"))
                self.tokens_seen += tokens
                if profiled_step:  # its time, the profiler's cost included, leaves tokens_per_s
                    window_start += time.perf_counter() - step_start
                else:
                    window_tokens += tokens
                if self.step % t.log_every == 0 or self.step == last:
                    elapsed = time.perf_counter() - window_start
                    # None when every step of the window was profiled: no rate to give
                    rate = window_tokens / max(elapsed, 1e-9) if window_tokens else None
                    record = self._train_record(sums, rate)
                    window_start, window_tokens = time.perf_counter(), 0
                    logger.log(record)
                    logger.advance(self.step, record)
                    history.append(record)
                if t.eval_every and self.step % t.eval_every == 0 and self.data.valid is not None:
                    self._evaluating = True
                    record = self.evaluate()
                    self._evaluating = False
                    logger.log(record)
                    history.append(record)
                    # A signal during the evaluation: save this step, not after one more. Every
                    # rank asks, so all agree (one small collective per evaluation).
                    stop = stop or not _all_true(self._stop_signal is None, self.world)
                if stop:
                    why = (
                        signal.Signals(self._stop_signal).name  # SIGTERM, not "signal 15"
                        if self._stop_signal
                        else "another rank's stop signal"
                    )
                    logger.write(f"{why}: saving step {self.step} and exiting")
                    self._save_or_carry_on(final=True)
                    stopped = True
                    break
                if t.save_every and self.step % t.save_every == 0:
                    self._save_or_carry_on()
            else:
                final = self.step == t.max_steps
                if (
                    final
                    and t.eval_every
                    and self.data.valid is not None
                    and self.step % t.eval_every
                ):
                    record = self.evaluate()
                    logger.log(record)
                    history.append(record)
                saved = t.save_every and self.step % t.save_every == 0 and not self._save_failures
                if not saved:
                    self._save_or_carry_on(final=True)
        finally:
            # The loader's workers stop while the handlers still stand: a Ctrl-C forwarded late
            # (torchrun's, a loaded machine's) would otherwise raise KeyboardInterrupt inside
            # the generator's shutdown, where it can only print a traceback.
            getattr(batches, "close", lambda: None)()
            # Put back for the next job of a sweep, or a test; after a stop signal the process
            # exits (a sweep too), and ours keep treating that Ctrl-C's late echo as the same.
            for sig, previous in previous_handlers.items() if self._stop_signal is None else ():
                signal.signal(sig, previous)
            trace.close()
            try:  # a run that ended inside the profiled steps: what it has
                profiled = profiler.close()
            except Exception as e:  # a device fault, say: the logger still closes, the error
                profiled = f"warning: the profile was not written: {type(e).__name__}: {e}"
            if profiled:
                self._log(profiled)
            logger.close(plots=c.logging.plots)
        latest = self.checkpointer.latest()
        if latest is not None and (self.step >= last or stopped):
            self._log(
                f"step {self.step}: checkpoint {Path(c.run_dir) / 'checkpoints' / latest}; to load it "
                f"in transformers: python -m pretrain.export {c.run_dir} OUT_DIR"
            )
        return history

    def _clear_earlier_run(self) -> str | None:
        """With trainer.resume=false in the directory of an earlier run: start over. Its
        metrics are cleared (two histories in one file would read as one run); its checkpoints
        are replaced as this run saves. Returns the warning to show, if there was such a run."""
        run = Path(self.config.run_dir)
        pointer, metrics = run / "checkpoints" / "latest", run / METRICS_FILE
        logged = metrics.is_file() and metrics.stat().st_size > 0
        if self.config.trainer.max_steps == 0 and not pointer.is_file() and logged:
            records = read_logged(run)
            if all(r.get("step") == 0 and r.get("split") == "valid" for r in records):
                # An earlier evaluation-only run's directory (or a run that stopped before its
                # first step): its config.yaml is rewritten for this one, so its record goes too.
                if self.world.is_main:
                    metrics.unlink(missing_ok=True)
                return (
                    f"replacing the earlier evaluation in {metrics} "
                    f"({len(records)} record{'s' * (len(records) != 1)})"
                )
        if self.config.trainer.max_steps == 0 and (pointer.is_file() or logged):
            raise ConfigError(
                f"trainer.max_steps=0 (evaluation only) in {run}, the directory of an earlier "
                "run, would clear its metrics.jsonl: give the evaluation a directory of its own "
                "(another name= or hydra.run.dir=)"
            )
        if self.world.is_main:
            metrics.unlink(missing_ok=True)
        if not (pointer.is_file() or logged):  # none, or one that failed before its first record
            return None
        if not self.config.trainer.resume:
            latest = pointer.read_text().strip() if pointer.is_file() else "none"
            return (
                f"warning: trainer.resume=false: starting over in {run}; the earlier run's "
                f"metrics.jsonl is cleared and its checkpoints (latest: {latest}) are replaced as "
                "this run saves"
            )
        return f"warning: no checkpoint to resume from in {run}: starting over (metrics cleared)"

    @property
    def _held_out_sequences(self) -> int:
        """What an evaluation reads: trainer.eval_sequences rounded up to whole partitions."""
        streams = self.config.data.streams
        return held_out_per_partition(self.config.trainer.eval_sequences, streams) * streams

    def _start_lines(self, resumed: bool, last: int) -> list[str]:
        """What this run is, before its first step; warnings for settings that waste it."""
        c, t, o = self.config, self.config.trainer, self.config.optim
        if resumed and self.step >= last:
            past = f", past trainer.max_steps={t.max_steps}" if self.step > t.max_steps else ""
            return [
                f"nothing to train: the run is at step {self.step}{past} (raise "
                "trainer.max_steps to go on)"
            ]
        b, w = self.engine.batch, self.world
        s = "s" if w.world_size > 1 else ""
        lines = [] if resumed else [f"new run in {c.run_dir}"]
        lines.append(
            f"{self.num_parameters / 1e6:.2f}M parameters (generator and discriminator), "
            f"{w.world_size} rank{s} on {w.device.type} ({self.engine.precision}, attention "
            f"{choose_impl(c.model.attention_impl, w.device, c.model.head_size)}), "
            + (
                f"evaluation only (trainer.max_steps=0): {self._held_out_sequences} held-out "
                f"sequences of {c.data.seq_len} tokens, in micro batches of {b.micro}"
                if t.max_steps == 0
                else f"global batch {b.global_} = micro {b.micro} x accumulation "
                f"{b.accumulation} x {w.world_size} rank{s} of {c.data.seq_len} tokens, "
                f"to step {last}"
            )
        )
        if t.max_steps == 0 and c.model.init_from:
            lines += self._untrained_heads_warnings()
        evaluates = t.eval_every or t.max_steps == 0
        if 0 < t.max_steps <= o.warmup_steps:
            lines.append(
                f"warning: optim.warmup_steps={o.warmup_steps} >= trainer.max_steps={t.max_steps}: "
                f"the learning rate never reaches optim.lr={o.lr:g}"
            )
        if t.eval_every and self.data.valid is None:
            lines.append(
                f"warning: trainer.eval_every={t.eval_every} but the data has no held-out split, "
                "so there are no evaluations and a sweep's objective is the last training "
                "generator loss "
                f"({WHERE_HELD_OUT})"
            )
        if (
            evaluates
            and self.data.valid is not None
            and self._held_out_sequences != t.eval_sequences
        ):
            lines.append(
                f"note: trainer.eval_sequences={t.eval_sequences} reads {self._held_out_sequences} "
                f"held-out sequences, a whole number from each of the data.streams="
                f"{c.data.streams} partitions"
            )
        held_out = self.data.valid.num_tokens if self.data.valid is not None else None
        read = self._held_out_sequences * c.data.seq_len
        if evaluates and held_out is not None and held_out < read:
            lines.append(
                f"warning: the held-out split has {held_out} tokens, but an evaluation reads "
                f"{read} ({self._held_out_sequences} sequences x data.seq_len): it reads the "
                "same sequences again, so its numbers are noisier than they look; prepare the "
                "corpus with a larger --valid-fraction, or lower trainer.eval_sequences"
            )
        unused = c.model.vocab_size - self.data.vocab_size
        if unused > max(128, c.model.vocab_size // 100):
            lines.append(
                f"warning: model.vocab_size={c.model.vocab_size} but the tokenizer has "
                f"{self.data.vocab_size} ids: {unused} embedding rows are never used (set "
                f"model.vocab_size={self.data.vocab_size})"
            )
        return lines

    def _untrained_heads_warnings(self) -> list[str]:
        """Evaluation only, of a model.init_from: the figures that a newly initialised head
        leaves meaningless, where they would read as the checkpoint's."""
        from pretrain.export import RTD_HEAD_FILE

        m, lines = self.config.model, []
        assert m.init_from
        if not m.init_generator_from:
            lines.append(
                "warning: evaluation only, without model.init_generator_from: the MLM head is "
                "new, so gen_loss and gen_acc (and a sweep's objective) measure an untrained "
                "generator, and the discriminator is scored on its random replacements; give "
                "the checkpoint's generator, or an export's own directory as model.init_from "
                "(its discriminator/ and generator/ both load)"
            )
        if not (Path(m.init_from).expanduser() / RTD_HEAD_FILE).is_file():
            lines.append(
                f"warning: evaluation only, {m.init_from} has no {RTD_HEAD_FILE}, so the RTD "
                "head is new and disc_acc and disc_auc measure an untrained discriminator head"
            )
        return lines

    def _train_step(
        self, batches: Iterator[dict[str, torch.Tensor]]
    ) -> tuple[dict[str, float], list[int]]:
        """One optimizer step; returns its rank-averaged metrics and this rank's sample indices."""
        self.engine.module.train()
        sums: dict[str, float] = {k: 0.0 for k in TRAIN_KEYS}
        tokens = 0
        samples: list[int] = []
        for _ in range(self.engine.batch.accumulation):
            batch = self._next_batch(batches)
            out = self.engine.forward(batch)
            loss, metrics = _read_off_device(out)
            while not _all_true(math.isfinite(loss), self.world):
                self._skip_nonfinite(loss, batch)
                batch = self._next_batch(batches)
                out = self.engine.forward(batch)
                loss, metrics = _read_off_device(out)
            self.engine.backward_and_step(out.loss)
            for k in TRAIN_KEYS:
                sums[k] += metrics[k]
            tokens += int(batch["attention_mask"].sum())
            samples += batch["sample_index"].tolist()
        n = self.engine.batch.accumulation
        means = {k: v / n for k, v in sums.items()}
        means["tokens"] = tokens
        # Rides on the step's all-reduce: ranks signalled a step apart must still stop together,
        # or one would wait in the checkpoint barrier while the others wait in the next step.
        means["stop"] = float(self._stop_signal is not None)
        return _all_reduce_mean(means, self.world, sum_keys=("tokens", "stop")), samples

    def _next_batch(
        self, batches: Iterator[dict[str, torch.Tensor]], where: str = ""
    ) -> dict[str, torch.Tensor]:
        """The next micro batch; if any rank cannot read its data, a `SourceError` on every rank
        (a rank left to go on alone would wait in its next collective forever)."""
        error: SourceError | None = None
        try:
            batch = next(batches)
        except SourceError as e:
            error = e
        if not _all_true(error is None, self.world):
            if isinstance(error, EmptyPartitionError) and where:  # in the held-out split
                raise SourceError(
                    f"{where}, held-out split: {error}; or prepare the corpus with a larger "
                    "--valid-fraction, or set trainer.eval_every=0 (no evaluations)"
                ) from None
            raise error or SourceError(
                f"{where or f'step {self.step + 1}'}: another rank could not read its data"
            )
        return batch

    def _skip_nonfinite(self, loss: float, batch: dict[str, torch.Tensor]) -> None:
        """Drop a micro batch whose loss is not finite on some rank, or stop the run."""
        self.nonfinite_skips += 1
        limit = self.config.trainer.max_nonfinite_skips
        index = batch["sample_index"].tolist()
        where = (
            f"step {self.step + 1}: non-finite loss ({loss} on rank {self.world.rank}'s "
            f"samples {index[0]}..{index[-1]}, or on another rank)"
        )
        if self.nonfinite_skips <= limit:
            self._log(
                f"warning: {where}; micro batch skipped "
                f"({self.nonfinite_skips} of trainer.max_nonfinite_skips={limit})"
            )
            return
        # The weights are still those of the last good step: no non-finite loss was backpropagated.
        self.save()
        raise TrainingStopped(
            f"{where}: more than trainer.max_nonfinite_skips={limit} non-finite losses; the last "
            f"good state is saved as checkpoint step {self.step}. Lower optim.lr or raise "
            "optim.warmup_steps, check the data near those samples, then rerun to resume (if "
            "the loss was climbing before, go back to an earlier checkpoint: python -m "
            f"pretrain.checkpoint list {self.config.run_dir} shows them, rewind "
            f"{self.config.run_dir} STEP picks one)"
        )

    def _note_fp16_overflow(self) -> None:
        skipped = self.engine.overflow_skips()
        if skipped > self._fp16_skipped:
            self._log(
                f"step {self.step}: fp16 gradient overflow, DeepSpeed skipped the update "
                f"(loss scale now {self.engine.loss_scale()})"
            )
        self._fp16_skipped = skipped

    def _train_record(self, means: dict[str, float], tokens_per_s: float | None) -> dict[str, Any]:
        record: dict[str, Any] = {"step": self.step, "split": "train"}
        record.update({k: round(v, 6) for k, v in means.items()})
        record["lr"] = self.engine.lr()
        norm = self.engine.grad_norm()
        record["grad_norm"] = None if norm is None else round(norm, 6)
        if tokens_per_s is not None:
            record["tokens_per_s"] = round(tokens_per_s, 1)
        if self.peak_flops and tokens_per_s is not None:
            # tokens_per_s counts every rank, so divide by all their peaks
            mfu = tokens_per_s * self.flops_per_token / (self.peak_flops * self.world.world_size)
            record["mfu"] = round(mfu, 4)
        record["tokens_seen"] = self.tokens_seen
        record["nonfinite_skips"] = self.nonfinite_skips
        if self.engine.precision == "fp16":
            record["loss_scale"] = self.engine.loss_scale()
        record["padding_frac"] = round(self.data.train.padding_fraction, 6)
        if len(self.config.data.sources) > 1:  # realised mixture, this rank's share per source
            shares = self.data.train.metrics()
            record.update({k: round(v, 6) for k, v in shares.items() if k.startswith(SHARE_PREFIX)})
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out generator accuracy and discriminator accuracy / AUC. The held-out sequences,
        their masks and sampling noise are the same at every evaluation, and in every run of
        the corpus with the same trainer.eval_sequences and data settings, whatever its
        trainer.seed (`HELD_OUT_SEED`), micro batch or number of ranks: only the model moves."""
        assert self.data.valid is not None
        module = self.engine.module
        module.eval()
        totals = {
            "gen_correct": 0.0,
            "gen_loss_sum": 0.0,
            "masked": 0.0,
            "disc_correct": 0.0,
            "valid": 0.0,
        }
        scores, labels = [], []
        # How often each token is the answer at the masked positions: the best constant guess
        # (a unigram model that knew these very positions) scores max(counts) / sum(counts).
        answers = torch.zeros(self.data.vocab_size, dtype=torch.float64)
        batches = self.data.valid_batches()
        for _ in range(self.data.valid_batch_count):
            # A read error stops every rank, as in training.
            batch = self._next_batch(batches, f"evaluation at step {self.step}")
            out = self.engine.forward(batch)
            valid = batch["attention_mask"].to(self.world.device).bool()
            masked = float((batch["labels"] != -100).sum())
            totals["gen_correct"] += out.metrics["gen_acc"].item() * masked
            totals["gen_loss_sum"] += out.metrics["gen_loss"].item() * masked
            totals["masked"] += masked
            answers += torch.bincount(
                batch["labels"][batch["labels"] != -100], minlength=answers.numel()
            ).double()
            totals["disc_correct"] += out.metrics["disc_acc"].item() * float(valid.sum())
            totals["valid"] += float(valid.sum())
            scores.append(out.disc_logits[valid].float().cpu())
            labels.append(out.replaced[valid].cpu())
        getattr(batches, "close", lambda: None)()  # stops the loader's workers now
        module.train()
        totals = _all_reduce_mean(totals, self.world, sum_keys=tuple(totals))
        if self.world.world_size > 1:
            answers = answers.to(self.world.device)
            torch.distributed.all_reduce(answers)
        unigram = float(answers.max() / answers.sum().clamp(min=1))
        # AUC ranks every held-out position against every other: gathered, not averaged.
        pairs = torch.stack([torch.cat(scores), torch.cat(labels).float()], dim=1)
        gathered = _all_gather_rows(pairs, self.world)
        auc = binary_auc(gathered[:, 0], gathered[:, 1].bool())
        return {
            "step": self.step,
            "split": "valid",
            "gen_loss": round(totals["gen_loss_sum"] / max(totals["masked"], 1), 6),
            "gen_acc": round(totals["gen_correct"] / max(totals["masked"], 1), 6),
            "gen_acc_unigram": round(unigram, 6),  # the baseline gen_acc must beat
            "disc_acc": round(totals["disc_correct"] / max(totals["valid"], 1), 6),
            "disc_auc": round(auc, 6),
        }

    @property
    def stop_signal(self) -> int | None:
        """The signal that stopped the last fit early (after saving), if one did."""
        return self._stop_signal

    def _install_signal_handlers(self) -> dict[int, Any]:
        """Returns the handlers they replace, to put back when the loop ends."""
        main_pid = os.getpid()
        previous: dict[int, Any] = {}

        stopping_since = [0.0]  # when the first signal came (monotonic seconds)

        def handler(signum, _frame):
            if os.getpid() != main_pid:  # a forked data-loader worker: the main process decides
                return
            if self._stop_signal is not None:  # already stopping; the first signal says why
                if signum != signal.SIGINT or time.monotonic() - stopping_since[0] < SAME_CTRL_C_S:
                    return  # e.g. the same Ctrl-C, forwarded: torchrun passes on what it got too
                # Ctrl-C again: quit now. Not by raising KeyboardInterrupt: raised inside library
                # code (OmegaConf, during the save) it came out as another error, with a
                # traceback. Checkpoints publish atomically, so a save cut short is never used.
                if self.world.is_main:
                    _write_stderr(f"\n{QUIT_WITHOUT_SAVING}\n")
                os._exit(130)
            self._stop_signal, stopping_since[0] = signum, time.monotonic()
            if signum == signal.SIGINT and self.world.is_main:
                doing = (
                    f"the evaluation of step {self.step}"
                    if self._evaluating
                    else f"step {self.step + 1}"
                )
                _write_stderr(
                    f"\ninterrupted: finishing {doing}, then saving and exiting "
                    "(Ctrl-C again to quit without saving)\n"
                )

        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. under a test runner thread)
                pass
        return previous


def _write_stderr(text: str) -> None:
    """From a signal handler: a write it interrupted may refuse a reentrant one."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except RuntimeError:
        pass


def _as_dict(dataclass_config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-able containers (for checkpoints, wandb, comparisons)."""
    return cast(dict[str, Any], OmegaConf.to_container(OmegaConf.structured(dataclass_config)))


def _set_determinism(on: bool) -> None:
    """Set either way, so one job of a sweep (run in one process) does not leak into the next."""
    if on:
        # cuBLAS's reduction order depends on its workspace; a fixed one makes it repeatable.
        # Read when the first cuBLAS handle is made, which is after this on a fresh process.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if on or torch.are_deterministic_algorithms_enabled():  # else there is nothing to undo,
        # and the call imports dynamo (2 s) ahead of a refusal of model.init_from's checkpoint
        torch.use_deterministic_algorithms(on, warn_only=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _read_off_device(out: RTDOutput) -> tuple[float, dict[str, float]]:
    """A micro batch's loss (the one to backpropagate) and `TRAIN_KEYS`, copied off the device
    in one transfer. On one rank it is the micro batch's only wait for the device, and it comes
    before the backward: reading the metrics after the backward would make the CPU wait for
    the backward and the optimizer step before it could queue the next micro batch, idling the
    GPU."""
    read = torch.stack([out.loss.detach().float()] + [out.metrics[k].float() for k in TRAIN_KEYS])
    loss, *metrics = read.tolist()
    return loss, dict(zip(TRAIN_KEYS, metrics, strict=True))


def _lookup(config: dict[str, Any], key: str) -> Any:
    """A dotted key's value (`optim.lr`; a group, `masking`, is its section) in a config dict;
    None where it has none."""
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _all_reduce_mean(
    values: dict[str, float], world: World, sum_keys: tuple[str, ...] = ()
) -> dict[str, float]:
    """Mean over ranks (sum for `sum_keys`); a no-op on one rank."""
    if world.world_size == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=world.device)
    torch.distributed.all_reduce(t)
    return {k: t[i].item() / (1 if k in sum_keys else world.world_size) for i, k in enumerate(keys)}


def _all_gather_rows(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's rows of `tensor` (their numbers may differ), concatenated in rank order."""
    if world.world_size == 1:
        return tensor
    n = torch.tensor([len(tensor)], dtype=torch.int64, device=world.device)
    sizes = [torch.zeros_like(n) for _ in range(world.world_size)]
    torch.distributed.all_gather(sizes, n)
    lengths = [int(x) for x in sizes]
    padded = tensor.new_zeros((max(lengths), *tensor.shape[1:]), device=world.device)
    padded[: len(tensor)] = tensor.to(world.device)
    parts = [torch.empty_like(padded) for _ in lengths]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:k] for p, k in zip(parts, lengths, strict=True)]).cpu()


def _all_true(flag: bool, world: World) -> bool:
    """True when `flag` is true on every rank; a no-op on one rank."""
    if world.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=world.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def _broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank; a no-op without a process group."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
