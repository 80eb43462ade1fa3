"""The offline default corpus: prose filters, no imports, determinism, licences, CLI errors."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.default_corpus import (
    build_default_corpus,
    clean_prose,
    distribution_licence,
    file_docstrings,
    help_topics,
    runtime_distributions,
    strip_doctests,
)

PROSE = (
    "Return the median of the data, using the common mean of the two middle values when the "
    "number of data points is even. The data may be any sequence or iterable of numbers, and "
    "an error is raised when it is empty."
)


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120
    )


def test_prose_filter() -> None:
    assert clean_prose(PROSE) == PROSE
    assert clean_prose("Return the value.") is None  # too short
    with_example = PROSE + "\n\n>>> median([1, 3, 5])\n3\n>>> median([])\nTraceback\n\nMore prose."
    cleaned = clean_prose(with_example)
    assert cleaned is not None and ">>>" not in cleaned and "Traceback" not in cleaned
    assert cleaned.endswith("More prose.")
    code = "\n".join(["x = f(a[i], b[j]) + {k: v}"] * 10 + [PROSE[:60]])
    assert clean_prose(code) is None
    assert clean_prose(PROSE + " Licensed under the Apache License, Version 2.0.") is None
    assert strip_doctests(">>> 1 + 1\n2\n\nafter") == "\nafter"


def test_docstrings_are_parsed_never_imported(tmp_path: Path) -> None:
    src = tmp_path / "mod.py"
    src.write_text(
        f'"""{PROSE}"""\nraise SystemExit("imported!")\n\n'
        f'class A:\n    """{PROSE} (class)"""\n\n    def f(self):\n        """short"""\n'
    )
    assert file_docstrings(str(src)) == [PROSE, PROSE + " (class)"]
    (tmp_path / "py2.py").write_text('print "python 2"\n')
    assert file_docstrings(str(tmp_path / "py2.py")) == []
    assert file_docstrings(str(tmp_path / "missing.py")) == []


def test_runtime_closure_leaves_out_dev_tools() -> None:
    names = {d.metadata["Name"].lower() for d in runtime_distributions()}
    assert {"torch", "numpy", "sentencepiece", "tqdm"} <= names
    assert "networkx" in names  # a requirement of torch, reached through the closure
    assert not {"transformers", "pytest", "ruff", "pretrain"} & names


def test_licences_come_from_metadata() -> None:
    assert "BSD" in distribution_licence(md.distribution("numpy"))
    meta = md.metadata("tqdm")
    assert distribution_licence(md.distribution("tqdm")) == (
        meta.get("License-Expression") or meta.get("License")
    )
    # wandb pastes its whole licence text into License; the classifier names it instead.
    wandb = distribution_licence(md.distribution("wandb"))
    assert "MIT" in wandb and "\n" not in wandb and len(wandb) <= 80
    assert len(help_topics()) > 50


def test_build_is_deterministic_and_records_sources(tmp_path: Path) -> None:
    reports = []
    for name, workers in (("a", 1), ("b", 2)):
        reports.append(
            build_default_corpus(
                tmp_path / name,
                packages=["tqdm", "packaging"],
                include_stdlib=False,
                workers=workers,
                shard_mb=0.02,
                progress=False,
            )
        )
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files_a:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert len(reports[0].shards) > 1

    docs = [
        json.loads(line)
        for shard in reports[0].shards
        for line in (tmp_path / "a" / shard).read_text().splitlines()
    ]
    assert all(set(d) == {"text", "source"} and len(d["text"]) >= 200 for d in docs)
    assert {d["source"] for d in docs} == {"tqdm", "packaging"}
    assert len({d["text"] for d in docs}) == len(docs)  # exact duplicates written once
    sources = json.loads((tmp_path / "a" / "sources.json").read_text())
    by_name = {s["source"]: s for s in sources["sources"]}
    for name in ("tqdm", "packaging"):
        dist = md.distribution(name)
        assert by_name[name]["version"] == dist.version
        assert by_name[name]["licence"] == distribution_licence(dist)
    assert sources["documents"] == len(docs) == reports[0].documents
    assert sources["text_bytes"] == sum(len(d["text"].encode()) for d in docs)
    assert "| tqdm |" in (tmp_path / "a" / "SOURCES.md").read_text()


def test_stdlib_is_psf_licensed(tmp_path: Path) -> None:
    report = build_default_corpus(tmp_path, packages=[], workers=1, max_mb=0.05, progress=False)
    assert [(s.name, s.licence) for s in report.sources] == [("python-stdlib", "PSF-2.0")]
    assert report.bytes >= 50_000


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    for args, message in (
        (["--out", str(afile)], "not a directory"),
        (["--out", str(tmp_path / "o"), "--packages", "no-such-package-xyz"], "not installed"),
    ):
        r = _run("data_prep.default_corpus", *args, "--quiet")
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], r.stderr


def test_the_size_check_guards_the_default_set_only(tmp_path: Path) -> None:
    """Less than 10 MB from the default packages means a broken install; a few packages that a
    user names are expected to give less, unless --min-mb says otherwise."""
    few = ["--packages", "tqdm", "--no-stdlib", "--quiet"]
    r = _run("data_prep.default_corpus", "--out", str(tmp_path / "a"), *few)
    assert r.returncode == 0 and r.stdout.startswith("wrote "), r.stderr
    r = _run("data_prep.default_corpus", "--out", str(tmp_path / "b"), *few, "--min-mb", "10")
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error: only ") and "below --min-mb 10;" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DATA_PREP_FULL_CORPUS"),
    reason="builds the whole corpus (about a minute); set DATA_PREP_FULL_CORPUS=1",
)
def test_full_default_corpus_is_at_least_10_mb(tmp_path: Path) -> None:
    report = build_default_corpus(tmp_path, progress=False)
    assert report.megabytes >= 10.0


def test_runtime_roots_are_the_projects_dependencies() -> None:
    """From a source checkout (pretrain not installed) the corpus starts at RUNTIME_ROOTS, so it
    must name what pyproject.toml does, or the two ways of running build different corpora."""
    import re

    from data_prep.default_corpus import RUNTIME_ROOTS

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    assert sorted(RUNTIME_ROOTS) == sorted(re.split(r"[<>=!~;\[ ]", d)[0] for d in deps)
