"""The Hydra config: composes, validates, and fails early and by name on bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from pretrain.config import (
    BatchSizes,
    Config,
    ConfigError,
    bad_override_value,
    register_schema,
    to_config,
    unknown_override_key,
    unparsable_config_file,
)
from pretrain.models.deberta import PRESETS

CONF = Path(__file__).resolve().parents[2] / "conf"
register_schema()


def composed(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["run_dir=/tmp/unused", *overrides])
    return to_config(cfg)


def test_defaults_compose_to_v3_base() -> None:
    c = composed()
    assert (c.model.hidden_size, c.model.num_hidden_layers, c.model.vocab_size) == (768, 12, 128100)
    assert c.rtd.embedding_sharing == "gdes" and c.rtd.rtd_weight == 10.0
    assert c.masking.strategy == "span" and c.masking.probability == 0.15
    assert c.optim.eps == 1e-6 and c.optim.weight_decay == 0.01 and c.optim.clip_grad == 1.0


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes_without_plus(name: str) -> None:
    c = composed(f"experiment={name}")
    assert c.name == name


def test_quickstart_is_cpu_sized() -> None:
    c = composed("experiment=quickstart")
    assert c.model.hidden_size == 128 and c.model.num_hidden_layers == 4
    assert c.data.corpus == "default" and c.trainer.max_steps <= 600


@pytest.mark.parametrize("size", sorted(PRESETS))
def test_model_yaml_matches_python_presets(size: str) -> None:
    assert yaml.safe_load((CONF / "model" / f"{size}.yaml").read_text()) == PRESETS[size]
    c = composed(f"model={size}")
    assert all(getattr(c.model, k) == v for k, v in PRESETS[size].items())


def test_misspelt_key_fails_naming_it() -> None:
    with pytest.raises(ConfigCompositionException) as e:
        composed("trainer.max_step=5")
    assert "max_step" in str(e.value.__cause__ or e.value)
    assert isinstance(e.value.__cause__, ConfigKeyError | ConfigAttributeError)


GROUPS = {p.name for p in CONF.iterdir() if p.is_dir()}


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("trainer.max_step=5", "'trainer.max_step'; did you mean max_steps? (trainer has: "),
        ("+trainer.foo=1", "'trainer.foo' (trainer has: compile,"),
        ("model.hiden_size=64", "did you mean hidden_size"),
        (
            "rtd.sharing=es",
            "did you mean embedding_sharing?",
        ),  # a field of the component's own dataclass
        ("masking.probabilty=0.1", "did you mean probability?"),
        ("trainr.seed=1", "'trainr.seed'; did you mean trainer? (the top level has: data,"),
        (  # a key inside an entry of a list of dataclasses
            "data.sources=[{name: a, corpus: x}, {name: b, corpus: y, wieght: 2.0}]",
            "unknown key 'wieght' in entry 1 of data.sources; did you mean weight? (an entry "
            "has: corpus, data_files,",
        ),
        (  # a renamed key says what replaced it
            "trainer.eval_batches=8",
            "config key 'trainer.eval_batches' is now trainer.eval_sequences: held-out "
            "sequences per evaluation, all ranks together (it was eval_batches x micro batch x ",
        ),
    ],
)
def test_unknown_override_key_names_it_and_the_nearest(override: str, fragment: str) -> None:
    message = unknown_override_key(["experiment=quickstart", override], GROUPS)
    assert message is not None and fragment in message and "\n" not in message
    # Known keys before it, a value and a list of entries, do not hide it.
    before = ["trainer.seed=1", "data.sources=[{corpus: x}]"]
    assert unknown_override_key(before + [override], GROUPS) == message
    if override.startswith("+"):  # Hydra adds it and the dataclass drops it: a silent no-op
        assert "foo" not in str(composed(override).trainer)
    else:  # Hydra refuses it too, but hints at `+key=value`
        with pytest.raises(ConfigCompositionException):
            composed(override)


@pytest.mark.parametrize(
    "override",
    [
        "trainer.max_steps=5",  # known keys at every depth
        "model.init_from=/x",  # a field ModelConfig adds to DebertaConfig
        "+experiment=quickstart",  # groups, with and without +
        "masking=span",
        "hydra/launcher=basic",
        "hydra.run.dir=/tmp/x",  # Hydra's own keys
        "~trainer.seed",  # deletions
        "+deepspeed.extra.wall_clock_breakdown=true",  # below a dict: Hydra checks
        "data.sources=[{corpus: x}]",
        "data.sources=[{corpus: x, weight: 1}],[{corpus: y}]",  # a sweep: Hydra's
        "data.sources=[]",
        "--config-name=config",  # flags
        "trainer.seed=1,2",  # sweeps
    ],
)
def test_known_overrides_pass_the_key_check(override: str) -> None:
    assert unknown_override_key([override], GROUPS) is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_steps=many", "trainer.max_steps takes an integer, not 'many'"),
        ("trainer.max_steps=1e3", "trainer.max_steps takes an integer, not '1e3'"),
        ("trainer.max_steps=null", "trainer.max_steps takes an integer, not 'null'"),
        ("trainer.compile=maybe", "trainer.compile takes true or false, not 'maybe'"),
        ("optim.lr=fast", "optim.lr takes a number, not 'fast'"),
        ("logging.peak_tflops=x", "logging.peak_tflops takes a number or null, not 'x'"),
        ("model.hidden_size=wide", "model.hidden_size takes an integer, not 'wide'"),
        ("optim.betas=abc", "optim.betas takes a list of numbers, not 'abc'"),
        ("optim.betas=[0.9,abc]", "optim.betas takes a list of numbers, not '[0.9,abc]'"),
    ],
)
def test_a_wrong_value_type_is_one_line_naming_the_type(override: str, message: str) -> None:
    assert bad_override_value(["experiment=quickstart", override], GROUPS) == message
    with pytest.raises(ConfigCompositionException) as e:  # Hydra refuses it too, in six lines
        composed(override)
    assert isinstance(e.value.__cause__, ValidationError)


@pytest.mark.parametrize(
    "override",
    [
        "trainer.max_steps=1_000",  # what OmegaConf converts, the check lets through
        "trainer.compile=yes",
        "optim.lr=1",
        "optim.lr=.5e-3",
        "model.init_from=null",  # optional
        "logging.peak_tflops=989",
        "trainer.max_steps=${trainer.log_every}",  # interpolations resolve later
        "name=12",  # a number is a fine string
        "optim.betas=[0.9,0.99]",
    ],
)
def test_values_hydra_accepts_pass_the_value_check(override: str) -> None:
    assert bad_override_value([override], GROUPS) is None
    composed(override)


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.seed=1,x", "trainer.seed takes an integer, not 'x'"),
        ("optim.lr=1e-3,fast", "optim.lr takes a number, not 'fast'"),
        ("trainer.compile=true,maybe", "trainer.compile takes true or false, not 'maybe'"),
        # Quoted as typed, not as parsed ('1000.0').
        ("trainer.max_steps=210, 1e3", "trainer.max_steps takes an integer, not '1e3'"),
        ("trainer.seed=choice(1, 2e3)", "trainer.seed takes an integer, not '2e3'"),
        ("trainer.seed=1,'x y'", "trainer.seed takes an integer, not 'x y'"),
        ("trainer.seed=range(0,3),'x'", "trainer.seed takes an integer, not 'x'"),
    ],
)
def test_each_value_of_a_sweep_is_checked(override: str, message: str) -> None:
    # Hydra refuses these too, in six lines, before the sweep's first job.
    assert bad_override_value(["-m", override], GROUPS) == message


def test_a_sweep_value_the_config_refuses_stops_the_sweep_before_its_first_job() -> None:
    from pretrain.config import bad_sweep_value

    base = ["-m", "experiment=quickstart"]
    sweep = "rtd.embedding_sharing=gdes,es,GDES"
    assert bad_sweep_value([*base, sweep, "trainer.seed=0,1"], CONF) == (
        "the sweep's value rtd.embedding_sharing=GDES: rtd.embedding_sharing='GDES'; choose "
        "gdes, es or nes"
    )
    # The second sweep's values are checked with the first's first value.
    assert bad_sweep_value([*base, "trainer.seed=0,1", "optim.lr=1e-3,-1"], CONF) == (
        "the sweep's value optim.lr=-1: optim.lr must be a finite number > 0, got -1.0"
    )
    # A setting bad for every job is said as a job would say it, not blamed on a value.
    assert bad_sweep_value([*base, "optim.lr=-1", "trainer.seed=0,1"], CONF) == (
        "optim.lr must be a finite number > 0, got -1.0"
    )
    good = [*base, "rtd.embedding_sharing=gdes,es,nes", "optim.lr=choice(1e-3, 2e-3)"]
    assert bad_sweep_value(good, CONF) is None
    assert bad_sweep_value([sweep], CONF) is None  # not a multirun: no sweep
    # Another sweeper's search space is its own (Optuna's interval(...), tag(...)).
    assert bad_sweep_value(["-m", "hydra/sweeper=optuna_lr", sweep], CONF) is None


@pytest.mark.parametrize(
    "override",
    [
        "trainer.seed=0,1",
        "trainer.seed=range(0,3)",
        "optim.lr=interval(1e-4,1e-2)",  # Optuna's: no values to check
        "~trainer.seed",  # deletions
        "data.sources=[{corpus: x}]",
        "data.sources=[{corpus: x, weight: 1}],[{corpus: y}]",  # a sweep: Hydra's
        "data.sources=[]",  # a list of dataclasses: Hydra checks
    ],
)
def test_good_sweeps_deletions_and_structured_lists_pass(override: str) -> None:
    assert bad_override_value([override], GROUPS) is None


def test_wrong_type_fails_naming_key() -> None:
    with pytest.raises(ConfigCompositionException) as e:
        composed("trainer.max_steps=many")
    assert isinstance(e.value.__cause__, ValidationError)
    assert "max_steps" in str(e.value.__cause__)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.hidden_size=100", "num_attention_heads"),
        (  # a shape transformers' DebertaV2 could not load once exported
            "model.attention_head_size=32",
            "model.attention_head_size (32) x model.num_attention_heads (12) must equal "
            "model.hidden_size (768), as transformers' DebertaV2 needs",
        ),
        ("rtd.embedding_sharing=shared", "embedding_sharing"),
        ("masking.strategy=words", "masking.strategy='words'; choose span, whole_word or token"),
        ("trainer.save_every=-1", "trainer.save_every must be >= 0, got -1"),
        ("trainer.eval_sequences=0", "trainer.eval_sequences must be >= 1, got 0"),
        ("data.seq_len=4096", "data.seq_len"),
        ("deepspeed.zero_stage=4", "zero_stage"),
        ("optim.name=sgd", "optim.name"),
        ("trainer.device=tpu", "trainer.device"),
        ("model.attention_impl=fast", "attention_impl"),
        ("trainer.max_nonfinite_skips=-1", "trainer.max_nonfinite_skips"),
        ("trainer.max_steps=-1", "trainer.max_steps must be >= 0, got -1"),
        ("rtd.emd_steps=0", "rtd.emd_steps must be >= 1"),
        ("optim.lr=nan", "optim.lr must be a finite number > 0, got nan"),
        ("optim.lr=inf", "optim.lr must be a finite number > 0, got inf"),
        ("logging.profile_from=0", "logging.profile_from >= 1"),
        ("logging.profile_steps=-2", "logging.profile_steps must be >= 0"),
        (
            "rtd.enhanced_mask_decoder=true model.position_biased_input=true",
            "rtd.enhanced_mask_decoder=true needs model.position_biased_input=false",
        ),
    ],
)
def test_invalid_values_fail_with_one_line_naming_the_field(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        composed(*override.split())
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_batch_sizes_are_computed_once_and_checked() -> None:
    b = BatchSizes.compute(global_batch=256, micro_batch=8, world_size=4)
    assert (b.micro, b.accumulation, b.world_size, b.global_) == (8, 8, 4, 256)
    with pytest.raises(ConfigError, match="not a multiple"):
        BatchSizes.compute(global_batch=100, micro_batch=8, world_size=4)


def test_batch_and_stream_refusals_say_what_fits() -> None:
    """The v3-base preset (global 256, micro 32) on 2 nodes x 8 GPUs: each refusal names the
    setting that works."""
    from pretrain.data.pipeline import streams_per_rank

    with pytest.raises(ConfigError, match=r"use trainer.micro_batch_size=16 or a global batch"):
        BatchSizes.compute(global_batch=256, micro_batch=32, world_size=16)
    with pytest.raises(ConfigError, match=r"size 32 = 256; use a global batch"):  # none fits
        BatchSizes.compute(global_batch=8, micro_batch=8, world_size=32)
    with pytest.raises(ConfigError, match=r"world size 16: a run with it starts or resumes on "
                       r"1, 2, 4 or 8 ranks; data.streams=16 serves those and 16 "):  # fmt: skip
        streams_per_rank(8, 16, 1)
    with pytest.raises(ConfigError, match=r"size 3: .* 1, 2, 4 or 8 ranks; data.streams=24 serves"):
        streams_per_rank(8, 3, 1)  # the least that also keeps every world size 8 allowed
    with pytest.raises(ConfigError, match=r"on 1 rank; data.streams=2 serves those and 2 "):
        streams_per_rank(1, 2, 1)
    assert streams_per_rank(64, 16, 2) == 4


def test_readme_names_every_key_of_the_schema() -> None:
    """Docs that match the code: each key of every group but `model` (Hugging Face's
    DebertaV2Config keys, plus ours, named one by one) appears in the README's configuration
    section as `key`, and so do the keys of a `data.sources` entry."""
    import dataclasses

    from pretrain.config import ModelConfig, SourceConfig
    from pretrain.models.deberta import DebertaConfig

    readme = (CONF.parent / "README.md").read_text()
    section = readme[readme.index("## Configuration") : readme.index("## Several processes")]
    missing = []
    for group in dataclasses.fields(Config):
        schema = group.default_factory() if callable(group.default_factory) else None
        if schema is None:
            names = [group.name]
        elif group.name == "model":
            names = [f.name for f in dataclasses.fields(ModelConfig)]
            names = [
                n for n in names if n not in {f.name for f in dataclasses.fields(DebertaConfig)}
            ]
            names.append("attention_impl")
        else:
            names = [f.name for f in dataclasses.fields(schema)]
        missing += [f"{group.name}.{n}" for n in names if f"`{n}`" not in section]
    missing += [
        f"sources.{f.name}"
        for f in dataclasses.fields(SourceConfig)
        if f"`{f.name}`" not in section
    ]
    assert not missing, f"README's Configuration section does not name {missing}"


def test_tokenizer_must_be_a_tokenizer_directory(tmp_path: Path) -> None:
    """Checked at start-up: a missing path, a directory without spm.model, and the model file
    itself (training could read it, but the export looks for the run's tokenizer directory)."""
    tok = tmp_path / "tok"
    tok.mkdir()
    do = "; pass the directory that `python -m data_prep.tokenizer --out DIR` wrote"
    with pytest.raises(ConfigError) as e:
        composed(f"data.tokenizer={tmp_path / 'tokz'}")
    assert str(e.value) == f"data.tokenizer={tmp_path / 'tokz'}: no such directory{do}"
    with pytest.raises(ConfigError) as e:
        composed(f"data.tokenizer={tok}")
    assert str(e.value) == f"data.tokenizer={tok}: no spm.model there{do}"
    (tok / "spm.model").write_bytes(b"")
    with pytest.raises(ConfigError) as e:
        composed(f"data.tokenizer={tok / 'spm.model'}")
    assert str(e.value) == (
        f"data.tokenizer={tok / 'spm.model'}: a file, not the tokenizer directory "
        f"(data.tokenizer={tok} holds it){do}"
    )
    assert composed(f"data.tokenizer={tok}").data.tokenizer == str(tok)


def test_init_from_names_what_is_there_instead(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=r"init_from=.*/nowhere: no such directory; pass a Hug"):
        composed(f"model.init_from={missing}")
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    (run / "checkpoints" / "step_00000002" / "trainer_state.json").write_text("{}")
    for given in (run, run / "checkpoints" / "step_00000002"):
        with pytest.raises(ConfigError) as e:
            composed(f"model.init_from={given}")
        assert str(e.value) == (
            f"model.init_from={given} is a training run, not a Hugging Face directory; export "
            f"it first with `python -m pretrain.export {given} OUT_DIR` and pass "
            "model.init_from=OUT_DIR"
        )
    hf = tmp_path / "hf"
    for part in ("discriminator", "generator"):
        (hf / part).mkdir(parents=True)
        (hf / part / "config.json").write_text("{}")
    # The export's own directory stands for its pair; a generator named beside it wins.
    pair = composed(f"model.init_from={hf}").model
    assert (pair.init_from, pair.init_generator_from) == (
        str(hf / "discriminator"), str(hf / "generator"),
    )  # fmt: skip
    other = tmp_path / "other_generator"
    (other / "config.json").parent.mkdir()
    (other / "config.json").write_text("{}")
    pair = composed(f"model.init_from={hf}", f"model.init_generator_from={other}").model
    assert (pair.init_from, pair.init_generator_from) == (str(hf / "discriminator"), str(other))
    with pytest.raises(ConfigError) as e:  # an export's root where its generator belongs
        composed(f"model.init_from={hf / 'discriminator'}", f"model.init_generator_from={hf}")
    assert str(e.value) == (
        f"model.init_generator_from={hf} is an export's directory; pass its generator: "
        f"model.init_generator_from={hf / 'generator'}"
    )
    with pytest.raises(ConfigError, match="no config.json there"):
        composed(f"model.init_from={tmp_path}")
    # The export's generator given as the model to continue, alone or swapped.
    for swapped in ([], [f"model.init_generator_from={hf / 'discriminator'}"]):
        with pytest.raises(ConfigError) as e:
            composed(f"model.init_from={hf / 'generator'}", *swapped)
        assert str(e.value) == (
            f"model.init_from={hf / 'generator'} is the generator of an export; the model to "
            f"continue is its discriminator: model.init_from={hf / 'discriminator'} (and "
            f"model.init_generator_from={hf / 'generator'})"
        )
    with pytest.raises(
        ConfigError, match=r"export it first .* model.init_generator_from=OUT_DIR/gen"
    ):
        composed(f"model.init_from={hf / 'discriminator'}", f"model.init_generator_from={run}")
    assert composed(f"model.init_from={hf / 'discriminator'}").model.init_from is not None


def test_mixing_by_size_needs_the_size_of_a_streamed_source(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "manifest.json").write_text("{}")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "spm.model").write_bytes(b"")
    (tmp_path / "x.jsonl").write_text("{}")
    streamed = f"{{name: legal, dataset: json, data_files: ['{tmp_path}/x.jsonl']}}"
    sources = f"data.sources=[{{name: general, corpus: '{corpus}'}}, {streamed}]"
    with pytest.raises(
        ConfigError, match=r"data.sources\[1\] is streamed \(json\) and has no num_tokens"
    ):
        composed(sources, f"data.tokenizer={tok}", "data.mixing_alpha=0.5")
    sized = sources.replace("dataset: json", "dataset: json, num_tokens: 1000")
    assert composed(sized, f"data.tokenizer={tok}").data.sources[1].num_tokens == 1000


def test_sample_by_is_for_text_sources_only(tiny_corpus: dict, tmp_path: Path) -> None:
    from pretrain.data.pipeline import build_sources

    tok = tiny_corpus["tokenizer"]
    (tmp_path / "x.txt").write_text("a\n")
    text = f"{{dataset: text, data_files: ['{tmp_path}/x.txt'], sample_by: paragraph}}"
    config = composed(f"data.sources=[{text}]", f"data.tokenizer={tok}")
    (source,), *_ = build_sources(config, True, lambda: None)
    assert source.load_kwargs == {"sample_by": "paragraph"}  # what datasets is given
    for bad in (text.replace("paragraph", "block"), text.replace("dataset: text", "dataset: json")):
        with pytest.raises(ConfigError, match=r"data.sources\[0\].sample_by=\w+: with dataset"):
            composed(f"data.sources=[{bad}]", f"data.tokenizer={tok}")


def test_data_files_that_match_nothing_are_named(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "spm.model").write_bytes(b"")
    (tmp_path / "a.jsonl").write_text("{}")
    source = "data.sources=[{{name: x, dataset: json, data_files: ['{}']}}]"
    with pytest.raises(
        ConfigError, match=r"data.sources\[0\].data_files: no file matches .*/b\*.jsonl"
    ):
        composed(source.format(tmp_path / "b*.jsonl"), f"data.tokenizer={tok}")
    assert composed(source.format(tmp_path / "a*.jsonl"), f"data.tokenizer={tok}").data.sources


def test_swept_keys_are_what_tells_a_sweeps_jobs_apart() -> None:
    from pretrain.config import swept_keys

    argv = [
        "-m", "experiment=quickstart", "optim.lr=1e-3,3e-3", "trainer.micro_batch_size=16,32",
        "masking=span,token", "trainer.max_steps=40", "hydra.sweep.dir=/tmp/s",
        "optim.warmup_steps=range(10,30,10)", "+model.hidden_size=64",
    ]  # fmt: skip
    assert swept_keys(argv) == (
        "optim.lr", "trainer.micro_batch_size", "masking", "optim.warmup_steps",
    )  # fmt: skip
    assert swept_keys(["trainer.max_steps=4"]) == ()


def test_a_tokenizer_directory_with_tokenizer_json_alone_says_what_is_missing(
    tmp_path: Path,
) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")  # what transformers 5 saves
    with pytest.raises(ConfigError) as e:
        composed(f"data.tokenizer={tmp_path}")
    assert str(e.value) == (
        f"data.tokenizer={tmp_path}: no spm.model there; it holds tokenizer.json only (as "
        "transformers 5 saves a tokenizer): this project tokenizes with the SentencePiece model, "
        "so put the checkpoint's original spm.model beside it"
    )


def test_a_config_file_that_does_not_parse_is_one_line_naming_it(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    assert unparsable_config_file(["experiment=quickstart", "-m", "optim.lr=1,2"], conf) is None
    (conf / "data/broken.yaml").write_text("sources:\n  - {name: a, corpus: x\n")
    # Selected by no launch: not read.
    assert unparsable_config_file(["experiment=quickstart"], conf) is None
    expected = (
        f"{conf / 'data/broken.yaml'} is not valid YAML: did not find expected ',' or '}}' at "
        "line 3, column 1"
    )
    assert unparsable_config_file(["data=broken"], conf) == expected
    assert unparsable_config_file(["-m", "data=default,broken"], conf) == expected
    # Selected by an experiment's defaults list.
    (conf / "experiment/mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /data: broken\n"
    )
    assert unparsable_config_file(["experiment=mine"], conf) == expected
    (conf / "data/latin1.yaml").write_bytes(b"seq_len: 128 # caf\xe9\n")
    assert unparsable_config_file(["data=latin1"], conf).startswith(  # type: ignore[union-attr]
        f"{conf / 'data/latin1.yaml'} is not valid YAML: 'utf-8' codec can't decode byte 0xe9"
    )


def test_an_unknown_key_in_a_config_files_sources_entry_is_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    # A data option holds the sources at its top level; an experiment (global) under data.
    (conf / "data/mix.yaml").write_text(
        "sources:\n  - {name: a, corpus: x, weight: 1}\n  - {name: b, corpus: y, wieght: 2}\n"
    )
    (conf / "experiment/mine.yaml").write_text(
        "# @package _global_\ndata:\n  sources:\n    - {corpus: x, text_feild: body}\n"
    )
    message = unparsable_config_file(["data=mix"], conf)
    assert message == (
        f"{conf / 'data/mix.yaml'}: unknown key 'wieght' in entry 1 of data.sources; did you "
        "mean weight? (an entry has: corpus, data_files, dataset, name, num_tokens, sample_by, "
        "split, text_field, weight)"
    )
    message = unparsable_config_file(["experiment=mine"], conf)
    assert message is not None and message.startswith(
        f"{conf / 'experiment/mine.yaml'}: unknown key 'text_feild' in entry 0 of data.sources; "
        "did you mean text_field?"
    )
    # Hydra refuses both too, in several lines.
    for override in ("data=mix", "experiment=mine"):
        with pytest.raises(ConfigCompositionException):
            with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
                compose("config", overrides=[override])
    (conf / "data/mix.yaml").write_text("sources:\n  - {name: a, corpus: x, weight: 1}\n")
    assert unparsable_config_file(["data=mix"], conf) is None


# microsoft/DeBERTa's experiments/language_model: rtd.sh (lr, warmup, batch, 1M steps, seq
# 512), rtd_{xsmall,base,large}.json (shapes), and the code defaults rtd.sh runs with (Adam
# betas (0.9, 0.999), eps 1e-6, weight decay 0.01, clip 1.0, rtd_lambda 10, and single tokens
# masked at 15%, all [MASK]: rtd_task.py's NGramMaskGenerator(max_gram=1, keep_prob=0,
# mask_prob=1)). Small has no from-scratch run there: it takes xsmall's lr and batch.
PUBLISHED_RTD = {
    "xsmall": ((384, 12, 6, 1536), 3e-4, 64),
    "small": ((768, 6, 12, 3072), 3e-4, 64),
    "base": ((768, 12, 12, 3072), 1e-4, 256),
    "large": ((1024, 24, 16, 4096), 1e-4, 256),
}


@pytest.mark.parametrize("size", sorted(PUBLISHED_RTD))
def test_the_deberta_v3_recipes_are_rtd_sh(size: str) -> None:
    (shape, lr, batch) = PUBLISHED_RTD[size]
    c = composed(f"experiment=deberta_v3_{size}")
    m, o, t = c.model, c.optim, c.trainer
    assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.intermediate_size) == shape
    assert (m.vocab_size, m.position_buckets, m.max_position_embeddings) == (128100, 256, 512)
    assert (o.lr, t.global_batch_size, o.warmup_steps, t.max_steps) == (lr, batch, 10000, 10**6)
    assert (tuple(o.betas), o.eps, o.weight_decay, o.clip_grad) == ((0.9, 0.999), 1e-6, 0.01, 1.0)
    assert o.schedule == "linear" and c.data.seq_len == 512
    assert (c.masking.strategy, c.masking.probability, c.masking.replacement) == (
        "token",
        0.15,
        "mask",
    )
    assert (c.rtd.embedding_sharing, c.rtd.rtd_weight, c.rtd.generator_depth_ratio) == (
        "gdes",
        10.0,
        0.5,
    )
