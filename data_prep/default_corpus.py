"""Build a real English default corpus from text every install of this project already holds.

A CPU quick start must pretrain on natural language without a network or a data hub. Every
machine that ran `pip install` of this project holds megabytes of hand-written English prose:
the docstrings of the Python standard library and of the runtime dependencies (torch, numpy,
pandas, sympy, networkx, datasets, deepspeed, ...), the long descriptions in those
distributions' METADATA, and the interactive-help topics of the language reference
(`pydoc_data.topics`). This module collects them:

- source files are parsed with `ast`, never imported, so building the corpus runs no package
  code and works even where a package fails to import;
- only prose is kept: doctest blocks are cut out and docstrings that are short, mostly code, or
  licence boilerplate are dropped; exact duplicates (vendored copies) are written once;
- the distributions are the transitive closure of this project's runtime requirements (extras
  and dev tools such as transformers or pytest are left out), so the result is the same on any
  fresh install of the same versions;
- files are visited in sorted order and documents written in that order, so re-running gives
  byte-identical shards.

Output (`--out DIR`): `default_corpus_NNNNN.jsonl` shards with one `{"text", "source"}` object
per docstring or description, plus `SOURCES.md` and `sources.json` recording, per source, its
version, licence (read from the distribution's metadata), document count and UTF-8 size.

Licences: the texts keep the licences of the packages they come from; all are open-source and
permit redistribution with attribution. The standard library and its help topics are under the
PSF License (PSF-2.0). Read from the metadata in the reference environment: torch declares
`Apache-2.0 AND ... BSD-2-Clause AND BSD-3-Clause AND BSL-1.0 AND MIT`, deepspeed "Apache
Software License 2.0", numpy `BSD-3-Clause AND 0BSD AND MIT AND Zlib AND CC0-1.0`, pandas
`BSD-3-Clause`, sympy and networkx BSD, datasets and huggingface-hub Apache-2.0, wandb MIT, tqdm
`MPL-2.0 AND MIT`. `SOURCES.md` next to the corpus is the authoritative record for the versions
actually used.

Measured in the reference venv (Python 3.11.7, torch 2.13 CPU, 2 cores): 68 sources, 22,814
documents, 18.1 MB of UTF-8 text (torch 4.3, sympy 2.7, pandas 2.2, networkx 1.6, numpy 1.3,
stdlib 1.2, help topics 0.45 MB), in 28-47 s with 2 workers (warm or cold file cache); an 8k
unigram tokenizer trained on it turns it into about 4.2M tokens. The versions pip resolves move:
a later fresh install (pandas 3.1, numpy 2.4) gave 74 sources, 25,306 documents, 20.0 MB, 4.7M
tokens.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata as md
import json
import os
import re
import signal
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, BinaryIO

from data_prep.progress import progress as progress_of
from data_prep.sources import InputError, exit_interrupted, sigint_set_to

# The project's own runtime requirements, used when `pretrain` itself is not installed (running
# from a source checkout). Kept in step with pyproject.toml's `dependencies`.
RUNTIME_ROOTS: tuple[str, ...] = (
    "torch",
    "deepspeed",
    "sentencepiece",
    "datasets",
    "wandb",
    "hydra-core",
    "numpy",
    "tqdm",
    "safetensors",
    "matplotlib",
)
PROJECT_DIST = "pretrain"
STDLIB_SOURCE = "python-stdlib"
TOPICS_SOURCE = "python-help-topics"
STDLIB_LICENCE = "PSF-2.0"

# Directory names never descended into: tests are mostly code and fixtures (some deliberately
# malformed); site-packages under the stdlib path belongs to the base interpreter, not to us.
SKIP_DIRS = frozenset(
    {"test", "tests", "site-packages", "dist-packages", "__pycache__", "idle_test"}
)

_DOCTEST_PROMPT = re.compile(r"^\s*(>>>|\.\.\.)(\s|$)")
_CODE_LINE = re.compile(
    r"^\s*(def |class |import |from \S+ import |return |raise |@\w|#|\$ |In \[\d+\]:|Out\[\d+\]:)"
)
_BOILERPLATE = re.compile(
    r"Licensed under the Apache License|Permission is hereby granted|THE SOFTWARE IS PROVIDED|"
    r"Redistribution and use in source and binary forms|GNU (Lesser )?General Public License|"
    r"Copyright \(c\)|auto-?generated",
    re.IGNORECASE,
)
_FENCE = re.compile(r"^\s*(```|~~~)")
_HTML_TAG = re.compile(r"<[^>\n]{1,300}>")
_MD_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")


@dataclass(frozen=True)
class FilterConfig:
    """What counts as prose; defaults chosen by reading samples of what each rule drops."""

    min_chars: int = 200  # shorter docstrings are one-liners like "Return the value."
    max_code_fraction: float = 0.3  # of non-blank lines that look like code
    min_letter_fraction: float = 0.6  # letters+spaces over all characters


@dataclass
class SourceStats:
    name: str
    version: str
    licence: str
    documents: int = 0
    bytes: int = 0
    files: int = 0


@dataclass
class CorpusReport:
    out_dir: Path
    shards: list[str] = field(default_factory=list)
    sources: list[SourceStats] = field(default_factory=list)
    documents: int = 0
    bytes: int = 0
    duplicates: int = 0
    seconds: float = 0.0

    @property
    def megabytes(self) -> float:
        return self.bytes / 1e6


# --------------------------------------------------------------------------------------------
# Text filters


def strip_doctests(text: str) -> str:
    """Remove doctest examples: prompt lines and the output lines that follow up to a blank."""
    kept: list[str] = []
    in_example = False
    for line in text.splitlines():
        if _DOCTEST_PROMPT.match(line):
            in_example = True
            continue
        if in_example:
            if line.strip():
                continue  # expected output of the example
            in_example = False
        kept.append(line)
    return "\n".join(kept)


def strip_markdown_noise(text: str) -> str:
    """Drop fenced code, images/badges and HTML tags from a README-style description."""
    kept: list[str] = []
    in_fence = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        line = _MD_IMAGE.sub("", line)
        line = _HTML_TAG.sub("", line)
        kept.append(line)
    return "\n".join(kept)


def clean_prose(text: str, cfg: FilterConfig = FilterConfig()) -> str | None:
    """Return the prose of `text` with doctests removed, or None when too little prose is left."""
    text = strip_doctests(text)
    # Collapse runs of blank lines left behind by removed blocks; keep paragraph breaks.
    text = re.sub(r"\n\s*\n(\s*\n)+", "\n\n", text).strip()
    if len(text) < cfg.min_chars or _BOILERPLATE.search(text):
        return None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    code = sum(1 for ln in lines if _CODE_LINE.match(ln) or _looks_like_code(ln))
    if code > cfg.max_code_fraction * len(lines):
        return None
    letters = sum(1 for ch in text if ch.isalpha() or ch == " ")
    if letters < cfg.min_letter_fraction * len(text):
        return None
    return text


def _looks_like_code(line: str) -> bool:
    s = line.strip()
    if len(s) < 8:
        return False
    symbols = sum(1 for ch in s if ch in "()[]{}=<>;:*&|^%$#@\\/+-_'\"`")
    return symbols > 0.25 * len(s)


# --------------------------------------------------------------------------------------------
# Extraction (parse only, never import)


def _docstrings_in_order(tree: ast.AST) -> Iterator[str]:
    """Module, class and function docstrings in source order (depth first)."""
    if isinstance(tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(tree, clean=True)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _docstrings_in_order(child)
        elif isinstance(child, (ast.If, ast.Try, ast.With)):
            # Definitions guarded by `if TYPE_CHECKING:` / `try: import` still document the API.
            yield from _docstrings_in_order(child)


def file_docstrings(path: str, cfg: FilterConfig = FilterConfig()) -> list[str]:
    """Prose docstrings of one Python file; [] for unreadable or unparsable files."""
    try:
        source = Path(path).read_bytes()
        tree = ast.parse(source, filename=path)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError):
        # Python-2 era files, deliberately broken fixtures, odd encodings: nothing to learn here.
        return []
    out: list[str] = []
    for doc in _docstrings_in_order(tree):
        prose = clean_prose(doc, cfg)
        if prose is not None:
            out.append(prose)
    return out


def _worker(args: tuple[str, FilterConfig]) -> list[str]:
    return file_docstrings(*args)


def stdlib_files(stdlib_dir: Path | None = None) -> list[str]:
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorted, pruned in place: the walk order (and so the corpus) is the same everywhere.
        dirnames[:] = sorted(
            d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-")
        )
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return sorted(files)


def help_topics(stdlib_dir: Path | None = None) -> list[tuple[str, str]]:
    """(topic, text) pairs from pydoc_data/topics.py, read with ast.literal_eval."""
    path = Path(stdlib_dir or sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    try:
        tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "topics" for t in node.targets
        ):
            topics = ast.literal_eval(node.value)
            return sorted((str(k), str(v)) for k, v in topics.items())
    return []


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_applies(req: str) -> tuple[str, bool]:
    """Name of a requirement and whether it is a plain runtime one (no extra, marker true)."""
    try:
        from packaging.requirements import Requirement

        parsed = Requirement(req)
        ok = parsed.marker is None or parsed.marker.evaluate({"extra": ""})
        return parsed.name, ok
    except Exception:
        # Without `packaging`: a requirement with any marker mentioning an extra is optional.
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
        marker = req.split(";", 1)[1] if ";" in req else ""
        return (name.group(1) if name else req), "extra" not in marker


def runtime_distributions(roots: Sequence[str] | None = None) -> list[md.Distribution]:
    """Installed distributions in the runtime-requirement closure, sorted by canonical name.

    With `roots=None` the closure starts at this project's own requirements (or RUNTIME_ROOTS
    when it is not installed); the project itself is left out so the corpus does not change
    with every commit here.
    """
    if roots is None:
        try:
            reqs = md.distribution(PROJECT_DIST).requires or []
            roots = [n for n, ok in map(_requirement_applies, reqs) if ok]
        except md.PackageNotFoundError:
            roots = list(RUNTIME_ROOTS)
    found: dict[str, md.Distribution] = {}
    todo = [_canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in found or name == PROJECT_DIST:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional platform-specific requirement that is not installed
        found[name] = dist
        for req in dist.requires or []:
            dep, ok = _requirement_applies(req)
            if ok:
                todo.append(_canonical(dep))
    return [found[k] for k in sorted(found)]


def distribution_licence(dist: md.Distribution) -> str:
    """The licence a distribution declares: SPDX expression, short License field or classifier."""
    meta: Any = dist.metadata  # an email.message.Message in practice
    expr = meta.get("License-Expression")
    if expr:
        return expr.strip()
    text = (meta.get("License") or "").strip()
    # Some packages paste the whole licence text into License; that is not a name.
    if text and "\n" not in text and len(text) <= 80 and text.upper() != "UNKNOWN":
        return text
    classifiers = [
        c.split("::")[-1].strip()
        for c in meta.get_all("Classifier") or []
        if c.startswith("License ::")
    ]
    if classifiers:
        return " AND ".join(sorted(set(classifiers)))
    if text:
        return text.splitlines()[0].strip()[:80]
    return "unknown (see the distribution's files)"


def distribution_files(dist: md.Distribution) -> list[str]:
    """The .py files a distribution installed (from its RECORD), sorted."""
    out: list[str] = []
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if not str(f).endswith(".py") or any(p in SKIP_DIRS for p in parts):
            continue
        if parts and parts[0] == "..":
            continue  # scripts installed outside site-packages (bin/)
        out.append(str(dist.locate_file(f)))
    return sorted(out)


def distribution_description(
    dist: md.Distribution, cfg: FilterConfig = FilterConfig()
) -> str | None:
    meta: Any = dist.metadata
    body = meta.get_payload() or meta.get("Description") or ""
    if not isinstance(body, str):
        return None
    return clean_prose(strip_markdown_noise(body), cfg)


# --------------------------------------------------------------------------------------------
# Writing


class _ShardWriter:
    def __init__(self, out_dir: Path, shard_bytes: int) -> None:
        self.out_dir = out_dir
        self.shard_bytes = shard_bytes
        self.names: list[str] = []
        self._fh: BinaryIO | None = None
        self._size = 0

    def write(self, text: str, source: str) -> None:
        line = json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n"
        data = line.encode("utf-8")
        if self._fh is None or self._size >= self.shard_bytes:
            self._open_next()
        assert self._fh is not None
        self._fh.write(data)
        self._size += len(data)

    def _open_next(self) -> None:
        self.close()
        name = f"default_corpus_{len(self.names):05d}.jsonl"
        self.names.append(name)
        self._fh = open(self.out_dir / name, "wb")  # closed in close()
        self._size = 0

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _doc_streams(
    dists: Sequence[md.Distribution],
    include_stdlib: bool,
    stdlib_dir: Path | None,
) -> list[tuple[SourceStats, list[str], list[str]]]:
    """Per source: stats, files to parse, already extracted extra documents."""
    streams: list[tuple[SourceStats, list[str], list[str]]] = []
    py = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    if include_stdlib:
        streams.append(
            (SourceStats(STDLIB_SOURCE, py, STDLIB_LICENCE), stdlib_files(stdlib_dir), [])
        )
        topics = [text for _, text in help_topics(stdlib_dir)]
        topics = [t for t in (clean_prose(t) for t in topics) if t is not None]
        streams.append((SourceStats(TOPICS_SOURCE, py, STDLIB_LICENCE), [], topics))
    for dist in dists:
        name = _canonical(dist.metadata["Name"] or "unknown")
        stats = SourceStats(name, dist.version, distribution_licence(dist))
        desc = distribution_description(dist)
        streams.append((stats, distribution_files(dist), [desc] if desc else []))
    return streams


def build_default_corpus(
    out_dir: Path | str,
    packages: Sequence[str] | None = None,
    include_stdlib: bool = True,
    workers: int | None = None,
    shard_mb: float = 8.0,
    max_mb: float | None = None,
    stdlib_dir: Path | None = None,
    progress: bool = True,
) -> CorpusReport:
    """Extract the corpus into `out_dir`; `packages` limits it to those distributions (no closure).

    `max_mb` stops after that much text (used by tests for a small real-text sample).
    """
    start = time.perf_counter()
    if packages is None:
        dists = runtime_distributions()
    else:
        dists = []
        for name in sorted({_canonical(p) for p in packages}):
            try:
                dists.append(md.distribution(name))
            except md.PackageNotFoundError:
                raise InputError(f"package {name!r} is not installed") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("default_corpus_*.jsonl"):
        old.unlink()  # a shorter re-run must not leave a stale higher-numbered shard behind

    streams = _doc_streams(dists, include_stdlib, stdlib_dir)
    report = CorpusReport(out_dir=out)
    writer = _ShardWriter(out, int(shard_mb * 1e6))
    seen: set[bytes] = set()
    limit = None if max_mb is None else int(max_mb * 1e6)
    n_files = sum(len(files) for _, files, _ in streams)
    workers = max(1, workers or os.cpu_count() or 1)
    cfg = FilterConfig()

    def emit(stats: SourceStats, docs: Iterable[str]) -> bool:
        for text in docs:
            key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if key in seen:
                report.duplicates += 1
                continue
            seen.add(key)
            writer.write(text, stats.name)
            size = len(text.encode("utf-8"))
            stats.documents += 1
            stats.bytes += size
            report.documents += 1
            report.bytes += size
            if limit is not None and report.bytes >= limit:
                return False
        return True

    # spawn: workers import only this light module, and the parent's threads (tqdm's monitor,
    # torch's pools when called from a test) cannot leave a forked child holding a lock.
    with sigint_set_to(signal.SIG_IGN):
        pool = get_context("spawn").Pool(workers) if workers > 1 else None
    bar = progress_of("docstrings", "file", total=n_files, enabled=progress)
    try:
        going = True
        for stats, files, extra in streams:
            report.sources.append(stats)
            going = emit(stats, extra)
            if not going:
                break
            stats.files = len(files)
            jobs = [(f, cfg) for f in files]
            # imap keeps input order, so the output does not depend on the worker count.
            results = pool.imap(_worker, jobs, chunksize=8) if pool else map(_worker, jobs)
            for docs in results:
                bar.update(1)
                if not emit(stats, docs):
                    going = False
                    break
            if not going:
                break
    finally:
        bar.close()
        writer.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    report.sources = [s for s in report.sources if s.documents > 0]
    report.shards = writer.names
    report.seconds = time.perf_counter() - start
    _write_sources(out, report)
    return report


def _write_sources(out: Path, report: CorpusReport) -> None:
    # No timings or paths in these files: they must be byte-identical across re-runs.
    payload = {
        "format": "default_corpus/1",
        "python": sys.version.split()[0],
        "documents": report.documents,
        "text_bytes": report.bytes,
        "duplicates_dropped": report.duplicates,
        "shards": report.shards,
        "sources": [
            {
                "source": s.name,
                "version": s.version,
                "licence": s.licence,
                "documents": s.documents,
                "text_bytes": s.bytes,
                "files_parsed": s.files,
            }
            for s in report.sources
        ],
    }
    (out / "sources.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    lines = [
        "# Sources of the default corpus",
        "",
        "Docstrings (parsed with `ast`, never imported), distribution descriptions and Python's",
        "help topics, built by `python -m data_prep.default_corpus`. Each text keeps the licence",
        "of the package it comes from, listed here as that package's metadata declares it.",
        "",
        f"Total: {report.documents} documents, {report.bytes / 1e6:.2f} MB of UTF-8 text "
        f"({report.duplicates} exact duplicates dropped), Python {payload['python']}.",
        "",
        "| source | version | licence | documents | MB |",
        "|---|---|---|---:|---:|",
    ]
    for s in sorted(report.sources, key=lambda s: -s.bytes):
        lines.append(
            f"| {s.name} | {s.version} | {s.licence.replace('|', '/')} | {s.documents} "
            f"| {s.bytes / 1e6:.2f} |"
        )
    (out / "SOURCES.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.default_corpus",
        description="Build the offline default corpus (English docstrings and package "
        "descriptions of the stdlib and the runtime dependencies) as jsonl shards.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--packages",
        nargs="+",
        default=None,
        help="only these installed distributions (default: closure of the runtime requirements)",
    )
    parser.add_argument("--no-stdlib", action="store_true", help="leave out the standard library")
    parser.add_argument(
        "--workers", type=int, default=None, help="parser processes (default: all cores)"
    )
    parser.add_argument("--shard-mb", type=float, default=8.0, help="approximate shard size in MB")
    parser.add_argument("--max-mb", type=float, default=None, help="stop after this much text")
    parser.add_argument(
        "--min-mb",
        type=float,
        default=None,
        help="fail when less text than this was found, the sign of a broken install (0 "
        "disables; default 10, or 0 with --packages)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if args.out.exists() and not args.out.is_dir():
        raise SystemExit(f"error: --out {args.out} exists and is not a directory")
    if args.shard_mb <= 0:
        raise SystemExit("error: --shard-mb must be positive")
    try:
        report = build_default_corpus(
            args.out,
            packages=args.packages,
            include_stdlib=not args.no_stdlib,
            workers=args.workers,
            shard_mb=args.shard_mb,
            max_mb=args.max_mb,
            progress=not args.quiet,
        )
    except InputError as exc:
        raise SystemExit(f"error: {exc}") from None
    except OSError as exc:
        raise SystemExit(f"error: cannot write the corpus to {args.out}: {exc}") from None
    except KeyboardInterrupt:
        exit_interrupted(f"the corpus in {args.out} is incomplete; the same command starts over")
    print(
        f"wrote {report.documents} documents, {report.megabytes:.2f} MB of text in "
        f"{len(report.shards)} shard(s) to {args.out} from {len(report.sources)} sources "
        f"in {report.seconds:.1f} s ({report.duplicates} duplicates dropped)"
    )
    min_mb = args.min_mb if args.min_mb is not None else 0.0 if args.packages else 10.0
    if min_mb and report.megabytes < min_mb:
        raise SystemExit(
            f"error: only {report.megabytes:.2f} MB of text found, below --min-mb {min_mb:g}; "
            "install the project's runtime dependencies or pass --min-mb 0"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
