"""The typed schema behind the Hydra YAML, and the one place a run's settings are validated.

Hydra composes `conf/` on top of `Config` (registered in the ConfigStore as `schema`), so a
misspelt key or a wrong type fails at start-up with the key's name (command-line keys are
checked first by `unknown_override_key`, with the nearest known ones, and their values by
`bad_override_value`). Component configs are the
components' own dataclasses (`DebertaConfig`, `RTDConfig`, `MaskingConfig`) wherever they exist;
`to_config` builds them, which runs their `__post_init__` checks, and then checks the relations
between groups (batch sizes, sequence length against the model) in `Config.validate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from pretrain.data.masking import MaskingConfig
from pretrain.models.deberta import DebertaConfig
from pretrain.models.rtd import RTDConfig


class ConfigError(ValueError):
    """A user-fixable configuration problem; the CLI prints its message as one line."""


@dataclass
class ModelConfig(DebertaConfig):
    """The backbone's shape, plus where to start from when continuing pretraining."""

    # A local Hugging Face DebertaV2 directory (e.g. our export's discriminator/): its
    # config.json sets the shape and its weights initialise the discriminator. An export's
    # own directory stands for its discriminator/ and generator/ (see `resolve_export_root`).
    init_from: str | None = None
    # Its generator (a DebertaV2ForMaskedLM directory); without it the generator starts from
    # the discriminator's embeddings and lower layers.
    init_generator_from: str | None = None


@dataclass
class SourceConfig:
    """One entry of `data.sources`: a prepared shard corpus, or raw text streamed by `datasets`
    and tokenized on the fly (with `data.tokenizer`)."""

    name: str | None = None  # names the source in the mix, the logs and the loader state
    corpus: str | None = None  # a directory from `python -m data_prep.corpus`, or "default"
    dataset: str | None = None  # a hub name, or a builder ("json", "parquet", "text") ...
    data_files: list[str] = field(default_factory=list)  # ... with local files
    split: str = "train"
    text_field: str = "text"
    weight: float | None = None  # sampling weight; give all or none (then data.mixing_alpha)
    num_tokens: int | None = None  # size estimate of a text stream, for temperature mixing
    # dataset "text" only: a record (a document) per line (datasets' default), per
    # blank-line-separated paragraph, or per file ("line" | "paragraph" | "document")
    sample_by: str | None = None


@dataclass
class DataConfig:
    # "default" builds (once, cached) the bundled default corpus: docstrings and package
    # descriptions that ship with Python and the installed packages. Otherwise a directory
    # prepared by `python -m data_prep.corpus`.
    corpus: str = "default"
    # Tokenizer directory; None takes the one the corpus was prepared with (default corpus: its
    # own tokenizer, trained on first use).
    tokenizer: str | None = None
    # Several sources at once (languages, domains, general + domain text); replaces `corpus`.
    sources: list[SourceConfig] = field(default_factory=list)
    # Without weights, source i is drawn with p ~ n_i ** mixing_alpha (n = tokens; 1 = by size,
    # 0 = uniform, 0.3 as in multilingual pretraining).
    mixing_alpha: float | None = None
    seq_len: int = 128
    packing: str = "packed"  # packed | single
    num_workers: int = 1
    # Partitions of the corpus, fixed for the run: each rank reads streams / world_size of them.
    # Keep it a multiple of every world size you may run or resume on.
    streams: int = 8
    shuffle: bool = True
    cache_dir: str = "~/.cache/pretrain"
    # Default-corpus tokenizer size (only used when the default corpus is built).
    default_vocab_size: int = 8000


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | lamb (DeepSpeed's, for large global batches)
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "linear"  # warmup then linear decay to 0 | constant (after warmup)
    clip_grad: float = 1.0
    # Learning-rate multipliers per parameter family (1.0 = the base lr).
    generator_lr_mult: float = 1.0
    discriminator_lr_mult: float = 1.0
    embedding_lr_mult: float = 1.0
    # Layer-wise lr decay: lr x layer_decay^(layers above). 1.0 (off) for pretraining.
    layer_decay: float = 1.0


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | fp16
    # Passed through to DeepSpeed's JSON config last, for anything the schema does not name.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # 0: evaluate the starting model on the held-out split, train nothing
    global_batch_size: int = 32  # sequences per optimizer step, all ranks and accumulation
    micro_batch_size: int = 32  # sequences per forward on one rank
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    eval_every: int = 200  # 0 disables periodic evaluation
    # Held-out sequences per evaluation, all ranks together: the first
    # ceil(eval_sequences / data.streams) of each partition, whatever the micro batch and ranks.
    eval_sequences: int = 640
    save_every: int = 500  # 0 saves only at the end (and on preemption)
    keep_last: int = 3
    resume: bool = True  # continue from the run directory's latest checkpoint if there is one
    # Micro batches with a non-finite loss that may be skipped (with a warning) over the run;
    # one more stops it with a checkpoint of the last good state. 0 stops at the first.
    max_nonfinite_skips: int = 5
    # Failed checkpoint writes (full disk, unwritable dir) tolerated in a row before stopping;
    # training goes on in between, keeping the last good checkpoint. The final save must work.
    max_save_failures: int = 2
    # torch.compile each transformer layer (RTDModel.compile_layers): faster steps after a
    # compile of tens of seconds at start-up, and after each change of shape or train/eval.
    compile: bool = False
    # Repeatable runs on a GPU: torch.use_deterministic_algorithms (warning about any op that
    # has no deterministic kernel), a fixed cuBLAS workspace, and the fused attention kernel's
    # backward without atomics. Slower; CPU runs are repeatable anyway.
    deterministic: bool = False


@dataclass
class LoggingConfig:
    wandb: str = "disabled"  # disabled | offline | online
    project: str = "pretrain"
    progress_bar: bool = True
    plots: bool = True  # PNG curves in the run directory at the end
    # For MFU on GPUs missing from metrics.PEAK_BF16_FLOPS (or to use a measured peak).
    peak_tflops: float | None = None
    # Append each step's sample indices to samples_rank<5-digit rank>.jsonl (data debugging).
    trace_samples: bool = False
    # torch's profiler over profile_steps optimizer steps from step profile_from (1-based): a
    # chrome trace per rank in <run_dir>/profile/ (metrics.StepProfiler). 0: off.
    profile_steps: int = 0
    profile_from: int = 10


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    rtd: RTDConfig = field(default_factory=RTDConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_dir: str = "runs/default"
    name: str = "default"

    def validate(self) -> None:
        """Relations between groups; each group's own fields were checked when it was built."""
        d, t, o, ds = self.data, self.trainer, self.optim, self.deepspeed
        m = self.model
        for key, path, part in (
            ("init_from", m.init_from, "discriminator"),
            ("init_generator_from", m.init_generator_from, "generator"),
        ):
            hf_dir = Path(path).expanduser() if path is not None else None
            if hf_dir is None:
                continue
            if (hf_dir / "config.json").is_file():
                # An export's generator where its discriminator belongs (or the two swapped).
                other = hf_dir.parent / "discriminator"
                if key == "init_from" and hf_dir.name == "generator" and other.is_dir():
                    raise ConfigError(
                        f"model.init_from={path} is the generator of an export; the model to "
                        f"continue is its discriminator: model.init_from={other} (and "
                        f"model.init_generator_from={path})"
                    )
                continue
            if (hf_dir / part / "config.json").is_file():  # an export's root
                raise ConfigError(
                    f"model.{key}={path} is an export's directory; pass its {part}: "
                    f"model.{key}={hf_dir / part}"
                )
            if not hf_dir.exists():
                raise ConfigError(
                    f"model.{key}={path}: no such directory; pass a Hugging Face DebertaV2 "
                    f"directory (such as the {part}/ that `python -m pretrain.export` writes)"
                )
            # A run directory, its checkpoints/ or one checkpoint: what pretrain.export reads.
            run_files = ("checkpoints", "metrics.jsonl", "latest", "trainer_state.json")
            if any((hf_dir / name).exists() for name in run_files):
                # The export's own directory continues both halves (resolve_export_root).
                export = "OUT_DIR" if key == "init_from" else f"OUT_DIR/{part}"
                raise ConfigError(
                    f"model.{key}={path} is a training run, not a Hugging Face directory; export "
                    f"it first with `python -m pretrain.export {path} OUT_DIR` and pass "
                    f"model.{key}={export}"
                )
            raise ConfigError(
                f"model.{key}={path}: no config.json there (a Hugging Face DebertaV2 directory)"
            )
        if m.init_generator_from is not None and m.init_from is None:
            raise ConfigError("model.init_generator_from needs model.init_from (the discriminator)")
        if self.rtd.enhanced_mask_decoder and m.position_biased_input:
            raise ConfigError(
                "rtd.enhanced_mask_decoder=true needs model.position_biased_input=false: with "
                "absolute positions already in the input, the decoder has nothing to add"
            )
        if t.compile and ds.zero_stage == 3:
            raise ConfigError(
                "trainer.compile=true with deepspeed.zero_stage=3 is not supported (ZeRO-3 "
                "gathers parameters in hooks that compiled layers would have to trace); "
                "use zero_stage 0-2 or trainer.compile=false"
            )
        if d.seq_len < 8 or d.seq_len > self.model.max_position_embeddings:
            raise ConfigError(
                f"data.seq_len={d.seq_len} must be in [8, model.max_position_embeddings="
                f"{self.model.max_position_embeddings}]"
            )
        for i, s in enumerate(d.sources or [SourceConfig(corpus=d.corpus)]):
            where = f"data.sources[{i}]" if d.sources else "data"
            if (s.corpus is None) == (s.dataset is None):
                raise ConfigError(
                    f"{where}: give exactly one of corpus (shards) or dataset (raw text)"
                )
            if (
                s.corpus not in (None, "default")
                and not (Path(s.corpus).expanduser() / "manifest.json").is_file()
            ):
                raise ConfigError(
                    f"{where}.corpus={s.corpus}: no manifest.json there; prepare a corpus with "
                    "`python -m data_prep.corpus --input ... --tokenizer ... --out DIR` or use data.corpus=default"
                )
            for pattern in s.data_files:
                local = "://" not in pattern  # hf://, s3://... are for datasets to resolve
                if local and not glob.glob(str(Path(pattern).expanduser()), recursive=True):
                    raise ConfigError(f"{where}.data_files: no file matches {pattern}")
            if s.sample_by is not None and (
                s.dataset != "text" or s.sample_by not in ("line", "paragraph", "document")
            ):
                raise ConfigError(
                    f"{where}.sample_by={s.sample_by}: with dataset: text only, and one of line "
                    "(a document per line), paragraph (per blank-line-separated block), "
                    "document (per file)"
                )
            if s.dataset is not None and d.tokenizer is None:
                raise ConfigError(
                    f"{where}.dataset={s.dataset} is raw text: set data.tokenizer to tokenize it"
                )
        if d.tokenizer is not None:
            from data_prep.tokenizer import HF_TOKENIZER_FILE, MODEL_FILE, no_spm_model_hint

            tokenizer = Path(d.tokenizer).expanduser()
            if not (tokenizer / MODEL_FILE).is_file():
                problem = f"no {MODEL_FILE} there" if tokenizer.is_dir() else "no such directory"
                if tokenizer.is_file():
                    problem = "a file, not the tokenizer directory"
                    if (tokenizer.parent / MODEL_FILE).is_file():
                        problem += f" (data.tokenizer={Path(d.tokenizer).parent} holds it)"
                hint = "pass the directory that `python -m data_prep.tokenizer --out DIR` wrote"
                if (tokenizer / HF_TOKENIZER_FILE).is_file():  # a checkpoint transformers saved
                    hint = no_spm_model_hint(tokenizer)
                raise ConfigError(f"data.tokenizer={d.tokenizer}: {problem}; {hint}")
        weighted = [s.weight is not None for s in d.sources]
        if any(weighted) and not all(weighted):
            raise ConfigError("data.sources: give a weight to every source or to none")
        if any(weighted) and d.mixing_alpha is not None:
            raise ConfigError("data.sources: give weights or data.mixing_alpha, not both")
        if len(d.sources) > 1 and not any(weighted):  # temperature mixing: p ~ size^alpha
            for i, s in enumerate(d.sources):
                if s.dataset is not None and s.num_tokens is None:
                    raise ConfigError(
                        f"data.sources[{i}] is streamed ({s.dataset}) and has no num_tokens: "
                        "mixing by size (data.mixing_alpha, 1 when unset) needs every source's "
                        "size; give it num_tokens=<estimate>, or give every source a weight"
                    )
        names = [s.name or s.corpus or s.dataset for s in d.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: names must be unique, got {names}; set name=")
        if d.packing not in ("packed", "single"):
            raise ConfigError(f"data.packing={d.packing!r}; choose packed or single")
        if d.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {d.num_workers}")
        for name in (
            "global_batch_size",
            "micro_batch_size",
            "log_every",
            "eval_sequences",
            "keep_last",
        ):
            if getattr(t, name) < 1:
                raise ConfigError(f"trainer.{name} must be >= 1, got {getattr(t, name)}")
        # max_steps=0: evaluate the starting model on the held-out split, and train nothing.
        for name in (
            "max_steps",
            "eval_every",
            "save_every",
            "max_nonfinite_skips",
            "max_save_failures",
        ):
            if getattr(t, name) < 0:
                raise ConfigError(f"trainer.{name} must be >= 0, got {getattr(t, name)}")
        if t.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"trainer.device={t.device!r}; choose auto, cpu or cuda")
        if o.name not in ("adamw", "lamb"):
            raise ConfigError(f"optim.name={o.name!r}; choose adamw or lamb")
        if o.schedule not in ("linear", "constant"):
            raise ConfigError(f"optim.schedule={o.schedule!r}; choose linear or constant")
        if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}")
        if not 0.0 < o.layer_decay <= 1.0:
            raise ConfigError(f"optim.layer_decay must be in (0, 1], got {o.layer_decay}")
        if not 0 < o.lr < math.inf:  # also refuses nan, which compares false to everything
            raise ConfigError(f"optim.lr must be a finite number > 0, got {o.lr}")
        if not (o.warmup_steps >= 0 and 0 <= o.clip_grad < math.inf):
            raise ConfigError("optim.warmup_steps and optim.clip_grad must be finite and >= 0")
        if ds.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {ds.zero_stage}")
        if ds.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(
                f"deepspeed.precision={ds.precision!r}; choose auto, fp32, bf16 or fp16"
            )
        if self.logging.wandb not in ("disabled", "offline", "online"):
            raise ConfigError(
                f"logging.wandb={self.logging.wandb!r}; choose disabled, offline or online"
            )
        if self.logging.profile_steps < 0 or self.logging.profile_from < 1:
            raise ConfigError(
                "logging.profile_steps must be >= 0 and logging.profile_from >= 1 (the first "
                "profiled optimizer step, counted from 1)"
            )


@dataclass(frozen=True)
class BatchSizes:
    """Micro batch, accumulation, world size and global batch: computed once, here."""

    micro: int
    accumulation: int
    world_size: int

    @property
    def global_(self) -> int:
        return self.micro * self.accumulation * self.world_size

    @classmethod
    def compute(cls, global_batch: int, micro_batch: int, world_size: int) -> BatchSizes:
        per_step = micro_batch * world_size
        if global_batch % per_step:
            # The largest micro batch below this one that fits, e.g. on more GPUs than planned.
            fits = [
                m for m in range(micro_batch - 1, 0, -1) if global_batch % (m * world_size) == 0
            ]
            hint = f"trainer.micro_batch_size={fits[0]} or " if fits else ""
            raise ConfigError(
                f"trainer.global_batch_size={global_batch} is not a multiple of "
                f"trainer.micro_batch_size={micro_batch} x world size {world_size} = {per_step}; "
                f"use {hint}a global batch that divides evenly"
            )
        return cls(micro_batch, global_batch // per_step, world_size)


def to_config(cfg: DictConfig | Config) -> Config:
    """Hydra's composed DictConfig -> a validated `Config` of real dataclasses."""
    if isinstance(cfg, Config):
        config = cfg
    else:
        try:
            config = cast(
                Config, OmegaConf.to_object(cfg)
            )  # builds the dataclasses, runs their checks
        except ValueError as e:
            raise ConfigError(str(e).splitlines()[0]) from None
    assert isinstance(config, Config)
    config = resolve_export_root(config)
    config.validate()
    return config


def resolve_export_root(config: Config) -> Config:
    """`model.init_from=EXPORT` (what `python -m pretrain.export RUN EXPORT` wrote) continues
    the pair: EXPORT/discriminator, and EXPORT/generator unless model.init_generator_from
    names another. One value per checkpoint, so a sweep over exports (null, the untrained
    baseline, included) needs no interpolation."""
    m = config.model
    if m.init_from is None:
        return config
    given = Path(m.init_from)
    if not (given.expanduser() / "discriminator" / "config.json").is_file():
        return config
    generator = m.init_generator_from
    if generator is None and (given.expanduser() / "generator" / "config.json").is_file():
        generator = str(given / "generator")
    model = dataclasses.replace(
        m, init_from=str(given / "discriminator"), init_generator_from=generator
    )
    return dataclasses.replace(config, model=model)


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)


# What a schema value's type accepts, in the words of a one-line error.
_WANTED = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_WANTED_LIST = {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}


def bad_override_value(overrides: list[str], groups: set[str]) -> str | None:
    """The first `key=value` command-line override whose value its schema type refuses (a word
    or `1e3` for an integer, `maybe` for a bool, `null` for a required value, `abc` for a list),
    as one line that names the type wanted; None when all fit. Each value of a sweep (`a,b`,
    `range(...)`) is checked too. OmegaConf decides, as it would in Hydra's merge, which reports
    the same refusal in six lines (and, in a sweep, ends it before its first job). Unknown keys
    are `unknown_override_key`'s; intervals, deletions, groups and keys below a dict or list of
    dataclasses are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf.errors import ValidationError

    parser = OverridesParser.create()
    schema = OmegaConf.structured(Config)
    for arg in overrides:
        wanted = _schema_type(arg, groups)
        if wanted is None:
            continue
        try:
            (override,) = parser.parse_overrides([arg])
            if override.is_delete():
                continue
            # (raw text, parsed value) of each value the override sets
            raw = arg.split("=", 1)[1]
            if override.is_sweep_override():
                values = _sweep_values(raw, list(override.sweep_iterator()))
            else:
                values = [(raw, override.value())]
        except Exception:  # a syntax error (Hydra reports its own), or an interval
            continue
        for text, value in values:
            try:
                OmegaConf.update(schema, override.key_or_group, value, merge=False)
            except ValidationError:
                return f"{override.key_or_group} takes {_type_words(wanted)}, not {text!r}"
    return None


def swept_keys(overrides: list[str]) -> tuple[str, ...]:
    """The config keys (or groups) a multirun command line sweeps (`optim.lr=1e-3,3e-3`,
    `masking=span,token`, an interval for a sweeper): the values that tell its jobs apart."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    keys = []
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except Exception:  # Hydra reports its own syntax errors
            continue
        if override.is_sweep_override() and not override.key_or_group.startswith("hydra"):
            keys.append(override.key_or_group)
    return tuple(keys)


def unparsable_config_file(overrides: list[str], conf_dir: Path) -> str | None:
    """The first config file of this launch that is not valid YAML, or holds a `data.sources`
    entry with a key `SourceConfig` does not have, as one line naming the file and the place
    (or the key and the nearest known ones); None when all parse. Hydra would report it in a
    traceback of about 90 lines, for a file a user wrote (conf/data/my_mix.yaml) as for ours.
    The files read: config.yaml, the group options the command line selects (`data=my_mix`,
    each value of a sweep), and the options their defaults lists select, recursively; a file
    no launch selects is not read."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    todo = [conf_dir / "config.yaml"]
    for arg in overrides:
        group, _, options = arg.lstrip("+").partition("=")
        if options and (conf_dir / group).is_dir():
            todo += [conf_dir / group / f"{option}.yaml" for option in options.split(",")]
    seen: set[Path] = set()
    while todo:
        path = todo.pop(0)
        if path in seen or not path.is_file():
            continue  # a missing option is Hydra's to report (it lists the ones there are)
        seen.add(path)
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            return f"{path} is not valid YAML: {e.problem or e.context}{where}"
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            return f"{path} is not valid YAML: {e}"
        # data.sources entries: Hydra would name the key in several lines, without the nearest.
        # A data option holds them at its top level; a global one (an experiment) under data.
        if isinstance(data, dict):
            scope = data if path.parent.name == "data" else data.get("data")
            if isinstance(scope, dict) and (
                message := _unknown_key_in_entries(
                    scope.get("sources"), "data.sources", SourceConfig
                )
            ):
                return f"{path}: {message}"
        defaults = data.get("defaults") if isinstance(data, dict) else None
        for entry in defaults if isinstance(defaults, list) else []:
            for key, option in entry.items() if isinstance(entry, dict) else ():
                group = str(key).removeprefix("override ").strip().lstrip("/")
                if isinstance(option, str):
                    todo.append(conf_dir / group / f"{option}.yaml")
    return None


def bad_sweep_value(overrides: list[str], conf_dir: Path) -> str | None:
    """The first value of a grid sweep (`-m key=a,b`, the basic sweeper) that the config's own
    checks refuse (`rtd.embedding_sharing=GDES`), as one line; None when every value passes.
    Each value is composed with the other overrides (other sweeps at their first value) and
    checked as a job would check it at its start, so a bad value stops the sweep before its
    first job instead of failing its own job hours later. Checks that need the job's ranks or
    data (batch divisibility, the corpus) are still each job's."""
    if not {"-m", "--multirun"} & set(overrides) or any(
        o.startswith("hydra/sweeper=") for o in overrides
    ):
        return None
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    fixed, sweeps = [], []
    for arg in overrides:
        if arg.startswith("-"):
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except Exception:  # Hydra reports its own syntax errors
            return None
        if not override.is_sweep_override():
            fixed.append(arg)
            continue
        try:
            values = _sweep_values(arg.split("=", 1)[1], list(override.sweep_iterator()))
        except Exception:  # an interval or another sweep that is not a list of values
            return None
        typed = [text for text, _ in values]
        if any(c in text for text in typed for c in "'\"()[]{}") or not typed:
            return None  # not safely written back as overrides: left to each job
        sweeps.append((override.key_or_group, typed))
    firsts = [f"{key}={typed[0]}" for key, typed in sweeps]

    def refusal(job: list[str]) -> str | None:
        try:
            to_config(compose("config", overrides=[*job, "run_dir=/sweep-value-check"]))
        except ConfigError as e:
            return str(e)
        except Exception:  # composition errors: Hydra reports them in the job
            pass
        return None

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        if message := refusal([*fixed, *firsts]):  # the first job: every job would say it
            return message
        for i, (key, typed) in enumerate(sweeps):
            for text in typed[1:]:
                if message := refusal([*fixed, *firsts[:i], f"{key}={text}", *firsts[i + 1 :]]):
                    return f"the sweep's value {key}={text}: {message}"
    return None


def _sweep_values(raw: str, parsed: list[Any]) -> list[tuple[str, Any]]:
    """(text as typed, parsed value) of each value of a sweep: `a,b` or `choice(a,b)` split
    where no quote or bracket makes that ambiguous, else the parsed value's text. A sweep
    nested in a choice (`range(0,3),5`) is left to Hydra."""
    from hydra.core.override_parser.types import QuotedString, Sweep

    inner = raw.strip()
    if inner.startswith("choice(") and inner.endswith(")"):
        inner = inner[len("choice(") : -1]
    typed = [text.strip() for text in inner.split(",")]
    if len(typed) != len(parsed) or any(c in inner for c in "'\"()[]{}"):
        typed = [v.text if isinstance(v, QuotedString) else str(v) for v in parsed]
    return [
        (text, value.text if isinstance(value, QuotedString) else value)
        for text, value in zip(typed, parsed, strict=True)
        if not isinstance(value, Sweep)
    ]


def _type_words(wanted: Any) -> str:
    """int -> "an integer", float | None -> "a number or null", list[float] -> "a list of
    numbers"."""
    args = typing.get_args(wanted)
    if typing.get_origin(wanted) is list:
        return f"a list of {_WANTED_LIST[args[0]]}"
    words = [_WANTED[a] for a in args or (wanted,) if a is not type(None)]
    return " or ".join(words) + (" or null" if type(None) in args else "")


def _schema_type(arg: str, groups: set[str]) -> Any:
    """The schema's type for a plain `key=value` override's key: a scalar, an optional one or a
    list of scalars; None for anything else."""
    key = arg.split("=", 1)[0]
    if "=" not in arg or arg.startswith(("-", "~", "+")) or "/" in key or "@" in key:
        return None
    parts = key.split(".")
    if parts[0] == "hydra" or (len(parts) == 1 and key in groups):
        return None
    node: Any = Config
    for part in parts:
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return None  # below a dict or list
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None  # unknown: unknown_override_key's
        node = hints[part]
    scalars = {int, float, bool, str}
    origin, args = typing.get_origin(node), set(typing.get_args(node))
    if node in scalars or (origin is list and args <= scalars):
        return node
    if origin in (typing.Union, types.UnionType) and args <= scalars | {type(None)}:
        return node
    return None  # a dataclass, a dict, a list of dataclasses


# Keys that were renamed, with what to write instead (said instead of "did you mean").
RENAMED_KEYS = {
    "trainer.eval_batches": (
        "trainer.eval_sequences: held-out sequences per evaluation, all ranks together (it "
        "was eval_batches x micro batch x ranks), the same set whatever the micro batch and ranks"
    ),
}


def unknown_override_key(overrides: list[str], groups: set[str]) -> str | None:
    """The first `key=value` command-line override whose key the schema does not have, as a
    one-line message with the nearest keys; None when all are known. Hydra would refuse it too,
    but suggests `+key=value`, which the schema refuses as well. Keys below a dict or list field
    (`deepspeed.extra.*`, `data.sources.0.*`), Hydra's own (`hydra.*`, `-m`, `--cfg`), deletions
    (`~key`) and config groups (`experiment=...`, `hydra/launcher=...`) are left to Hydra."""
    for arg in overrides:
        key = arg.split("=", 1)[0].lstrip("+")
        if "=" not in arg or arg.startswith(("-", "~")) or "/" in key or "@" in key:
            continue
        parts = key.split(".")
        if parts[0] == "hydra" or (len(parts) == 1 and key in groups):
            continue
        if key in RENAMED_KEYS:
            return f"config key {key!r} is now {RENAMED_KEYS[key]}"
        node: Any = Config
        for depth, part in enumerate(parts):
            hints = typing.get_type_hints(node)
            if part not in hints:
                where = ".".join(parts[:depth])
                known = sorted(hints)
                hint = _nearest_hint(part, known)
                scope = f"{where} has" if where else "the top level has"
                return f"unknown config key {key!r}{hint} ({scope}: {', '.join(known)})"
            node = hints[part]
            if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
                if depth == len(parts) - 1 and (message := _unknown_entry_key(arg, key, node)):
                    return message
                break  # a value, or below a dict or list: Hydra checks
    return None


def _unknown_entry_key(arg: str, key: str, node: Any) -> str | None:
    """For a list-of-dataclasses field set whole (`data.sources=[{...}, ...]`): the first entry
    key its dataclass does not have, as `unknown_override_key` says it (Hydra's own message
    spans lines and suggests `+data.sources=...`, which fails the same way)."""
    args = typing.get_args(node)
    if typing.get_origin(node) is not list or not args or not dataclasses.is_dataclass(args[0]):
        return None
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        value = OverridesParser.create().parse_override(arg).value()
    except Exception:  # not one list (a sweep, a syntax error): Hydra's to report
        return None
    return _unknown_key_in_entries(value, key, args[0])


def _unknown_key_in_entries(entries: Any, key: str, schema: Any) -> str | None:
    """The first key of a dict in the list `entries` (the value of field `key`) that the
    dataclass `schema` has no field for, as one line with the nearest; None if all are known
    (or entries is no list)."""
    known = sorted(f.name for f in dataclasses.fields(schema))
    for i, entry in enumerate(entries if isinstance(entries, list) else ()):
        for name in entry if isinstance(entry, dict) else ():
            if name not in known:
                hint = _nearest_hint(str(name), known)
                return (
                    f"unknown key {name!r} in entry {i} of {key}{hint} (an entry has: "
                    f"{', '.join(known)})"
                )
    return None


def _nearest_hint(name: str, known: list[str]) -> str:
    """`; did you mean a, b?` with the known keys nearest a misspelt one (close spellings,
    then keys that contain it), or "" when none is near."""
    close = difflib.get_close_matches(name, known, n=3)
    close += [k for k in known if name in k and k not in close][:2]
    return f"; did you mean {', '.join(close)}?" if close else ""
