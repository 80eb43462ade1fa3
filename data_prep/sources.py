"""Read raw documents from files, directories or a `datasets` source, and clean their text.

Shared by tokenizer training and corpus preparation so both see exactly the same documents
and the same normalisation: the tokenizer's vocabulary is learnt on the text the model will be
fed. Inputs are visited in a fixed order (arguments in order, directory contents sorted), so
every run over the same inputs yields the same document sequence.

Bad inputs a user can cause are handled at this boundary: a missing path raises `InputError`
with one line saying what to do; binary or undecodable files and malformed records are skipped
and counted in `ReadStats`, never fatal, because real crawls always contain a few.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import io
import itertools
import json
import os
import re
import signal
import sys
import threading
import unicodedata
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn


class InputError(ValueError):
    """A problem with the user's input (path, format, field name) -- reported in one line."""


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    binary_files: int = 0
    undecodable_files: int = 0
    blank_files: int = 0  # plain-text files with no document (empty, or only whitespace)
    bad_records: int = 0  # jsonl lines that are not JSON objects or lack the text field
    skipped_files: list[str] = field(default_factory=list)  # binary or undecodable, in order
    # Files read with a few invalid UTF-8 bytes dropped: "path (N bytes, first at byte B)".
    repaired_files: list[str] = field(default_factory=list)
    # Input files named for a dataset split, per split ("train-00000-of-00002.parquet").
    split_files: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def warnings(self) -> list[str]:
        """What a CLI says about the files it skipped or repaired, naming them, and about
        inputs that mix the files of several splits."""
        out = file_warnings(
            self.binary_files, self.undecodable_files, self.skipped_files, self.repaired_files
        )
        return out + ([line] if (line := split_files_warning(self.split_files)) else [])


def split_files_warning(split_files: dict[str, int]) -> str | None:
    """Inputs that hold the files of several splits (a hub-layout folder given as --input) are
    read as one text: held-out text would be trained on."""
    if len(split_files) < 2:
        return None
    counts = ", ".join(f"{n} {split}" for split, n in split_files.items())
    return (
        f"the inputs hold the files of several splits ({counts}), read as one text, held-out "
        "ones included: give only the training files, or the folder as --dataset DIR with "
        "--split"
    )


# A file named for a split, as the hub's layout names them: "validation-00000-of-00001.parquet".
_SPLIT_FILE = re.compile(r"(train|validation|valid|dev|test)(?=[-_.\d])", re.IGNORECASE)
_SPLIT_NAMES = {"valid": "validation", "dev": "validation"}


def count_split_files(files: Sequence[Path]) -> dict[str, int]:
    """How many of `files` are named for each split (only files whose names begin with one)."""
    counts: dict[str, int] = {}
    for path in files:
        if m := _SPLIT_FILE.match(path.name):
            split = _SPLIT_NAMES.get(m.group(1).lower(), m.group(1).lower())
            counts[split] = counts.get(split, 0) + 1
    return counts


def file_warnings(
    binary: int, undecodable: int, skipped: Sequence[str], repaired: Sequence[str]
) -> list[str]:
    out = []

    def named(files: Sequence[str]) -> str:
        return ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")

    if skipped:
        out.append(
            f"skipped {binary} binary and {undecodable} undecodable file(s) (not UTF-8 text): "
            f"{named(skipped)}"
        )
    if repaired:
        out.append(f"dropped invalid UTF-8 bytes from {len(repaired)} file(s): {named(repaired)}")
    return out


JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}  # a header row names the columns
# Metadata this package writes next to data; skipped when walking a directory so that pointing
# --input at a corpus directory reads only the corpus.
OWN_METADATA = frozenset(
    {"SOURCES.md", "sources.json", "manifest.json", "special_tokens.json", "training.json"}
)
# Sniff this many leading bytes for NUL, the cheap and reliable mark of a binary file.
_SNIFF_BYTES = 8192
# A text file with at most this share of invalid UTF-8 bytes (a corrupted byte here and there)
# is read with them dropped; more means another encoding, and the file is skipped.
_MAX_INVALID_SHARE = 1e-3
# What one document of a plain-text file is: a blank-line-separated block, a line, the file.
DOC_UNITS = ("block", "line", "file")

# Control characters other than whitespace carry no text; removing them keeps them from
# turning into [UNK] tokens. U+FEFF is the byte-order mark some editors prepend.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x84\x86-\x9f\ufeff]")
# Unicode White_Space, the set Rust's regex `\s` matches in transformers' normaliser. Python's
# `\s` also matches U+001C..U+001F, which would make us disagree on those characters.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# transformers' DeBERTa-v2 rule: a run of two or more, or any tab or newline, becomes one space.
WHITESPACE_RUN = re.compile(f"[{WHITESPACE}]{{2,}}|[\n\r\t]")
WHITESPACE_CHARS = "".join(
    ch for ch in map(chr, range(0x3001)) if re.fullmatch(f"[{WHITESPACE}]", ch)
)


def clean_text(text: str) -> str:
    """Canonical form of a document: NFC, control characters dropped, whitespace runs collapsed
    to one space as transformers' DeBERTa-v2 tokenizer does, ends stripped.

    It is the form transformers gives the same text at fine-tuning time (that tokenizer applies
    NFC and the same whitespace rule, nothing more), so the model is trained on the pieces it
    will meet there. NFKC would fold ligatures, full-width and presentation forms into plain
    letters and save vocabulary, but transformers does not fold them: a model trained on folded
    text then sees those characters for the first time after export. Collapsing whitespace runs
    also makes duplicate detection robust to re-wrapping.
    """
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    text = WHITESPACE_RUN.sub(" ", text)
    return text.strip(WHITESPACE_CHARS)


def error_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for one-line reports of errors raised by libraries
    (datasets, pyarrow) whose messages run to several lines."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def exit_interrupted(outcome: str) -> NoReturn:
    """Ctrl-C in a data_prep command: one line saying what was left, exit status 130 (a
    shell's for SIGINT), not a KeyboardInterrupt traceback."""
    print(f"interrupted: {outcome}", file=sys.stderr)
    raise SystemExit(130)


@contextmanager
def sigint_set_to(handler: Any) -> Iterator[None]:
    """SIGINT's handler inside the block (the main thread's only; elsewhere left as it is).
    - SIG_IGN, around starting pool workers: they ignore it from birth (an ignored signal
      stays ignored across exec, and Python leaves it so). Ctrl-C reaches the whole process
      group; the parent alone handles it and stops the pool, and no worker prints a traceback.
    - SIG_DFL, around minutes in C++ that run no Python signal handler: Ctrl-C stops the
      process at once instead of when the call returns."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files named by `inputs`: directories walked recursively in sorted order, skipping hidden
    files and our own metadata (OWN_METADATA); files named explicitly are always kept."""
    if not inputs:
        raise InputError("no input given; pass --input FILE_OR_DIR ... or --dataset NAME_OR_PATH")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise InputError(f"input not found: {path} (check the path passed to --input)")
        if is_saved_dataset(path):
            raise InputError(
                f"{path} is a dataset saved by `datasets` (save_to_disk): pass it as --dataset "
                f"{path}"
            )
        if path.is_dir():
            files.extend(sorted(_walk(path)))
        else:
            files.append(path)
    return files


def _walk(root: Path) -> Iterator[Path]:
    """The files below `root`, through symlinked folders too (a corpus assembled from links
    is common), each folder once: a link back up the tree or a second link to a folder
    already read is not followed again. Hidden files and folders and OWN_METADATA are left."""
    seen: set[str] = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))  # a fixed order
        for name in names:
            p = Path(folder, name)
            if not name.startswith(".") and name not in OWN_METADATA and p.is_file():
                yield p


def _open_binary(path: Path) -> IO[bytes]:
    # Callers use the result in a with-statement.
    if path.suffix.lower() == ".gz":
        return gzip.GzipFile(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _base_suffix(path: Path) -> str:
    """Suffix ignoring a trailing .gz, lower-cased: data.jsonl.gz -> .jsonl."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def first_undecodable(patterns: Sequence[str]) -> str | None:
    """The first local file matched by `patterns` (globs, in sorted order) that is not clean
    UTF-8, as "PATH (why)"; None when all are. For an error message that must name the file
    (datasets' own names none); a read of every file up to it."""
    for pattern in patterns:
        if "://" in pattern:
            continue
        for name in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)):
            stats = ReadStats()
            if Path(name).is_file() and _check_utf8_text(Path(name), stats) != "strict":
                # "PATH (N bytes, first at byte K)" for a few bad bytes, else the path alone
                return stats.repaired_files[0] if stats.repaired_files else f"{name} (not UTF-8)"
    return None


def _check_utf8_text(path: Path, stats: ReadStats) -> str | None:
    """How to decode the file: "strict" for UTF-8 text, "ignore" for UTF-8 text with a few
    corrupted bytes (dropped, and the file listed in `stats.repaired_files`), None for a binary
    or undecodable file (counted and skipped).

    Validated in a first streaming pass so a file is either used whole or not at all, without
    holding multi-GB inputs in memory.
    """
    invalid: list[int] = []  # offsets of invalid bytes, counted by the error handler

    def count(exc: UnicodeDecodeError) -> tuple[str, int]:
        invalid.append(offset + exc.start)
        return "", exc.start + 1

    decoder = codecs.getincrementaldecoder("utf-8")(errors=_COUNTING)
    offset = size = 0  # bytes read so far; offset: where the current decode call's input starts
    _counters.append(count)
    try:
        with _open_binary(path) as fh:
            head = fh.read(_SNIFF_BYTES)
            if b"\x00" in head:
                stats.binary_files += 1
                stats.skipped_files.append(str(path))
                return None
            chunk = head
            while chunk:
                offset = size - len(decoder.getstate()[0])  # where the bytes decoded next start
                decoder.decode(chunk)
                size += len(chunk)
                chunk = fh.read(1 << 20)
            offset = size - len(decoder.getstate()[0])
            decoder.decode(b"", final=True)
    except (OSError, EOFError, zlib.error):
        invalid.append(-1)  # a truncated gzip or unreadable file: as unusable as undecodable
    finally:
        _counters.pop()
    if not invalid:
        return "strict"
    if invalid[0] >= 0 and len(invalid) <= _MAX_INVALID_SHARE * size:
        stats.repaired_files.append(f"{path} ({len(invalid)} bytes, first at byte {invalid[0]})")
        return "ignore"
    stats.undecodable_files += 1
    stats.skipped_files.append(str(path))
    return None


# The innermost _check_utf8_text's counter; codecs error handlers are registered by name, once.
_COUNTING = "pretrain-count-invalid"
_counters: list[Any] = []
codecs.register_error(_COUNTING, lambda exc: _counters[-1](exc))


# `datasets` builders that read data_files as text; their files are checked before streaming.
TEXT_BUILDERS = ("text", "json", "csv")
# Builders that read files they are given: without data_files they would read the current
# directory, whatever is in it.
FILE_BUILDERS = (*TEXT_BUILDERS, "parquet", "arrow", "pandas")


def check_data_files(builder: str, data_files: Any) -> None:
    """Local `data_files` of a text builder must be UTF-8 text, and not all empty.

    Streaming would otherwise fail at the first batch, deep in a loader worker and without the
    file's name, or train on nothing. Only each file's head is read, so this stays cheap on
    multi-GB inputs; a decode error further in is reported when the stream reaches it.
    """
    if builder not in TEXT_BUILDERS:
        return
    if isinstance(data_files, dict):  # {split: files}
        data_files = [f for v in data_files.values() for f in ([v] if isinstance(v, str) else v)]
    names = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
    files = [Path(f) for f in names if Path(f).is_file()]  # globs and URLs are left to datasets
    empty = 0
    for path in files:
        try:
            with _open_binary(path) as fh:
                head = fh.read(_SNIFF_BYTES)
        except (OSError, EOFError, zlib.error) as exc:  # e.g. a .gz that is not gzip
            raise InputError(f"cannot read {path}: {exc}; give UTF-8 text files") from None
        why = "a binary file: it holds NUL bytes" if b"\x00" in head else None
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head)  # not final: head may cut a char
        except UnicodeDecodeError as exc:
            why = why or f"invalid UTF-8 at byte {exc.start}"
        if why:
            raise InputError(
                f"{path} is not UTF-8 text ({why}); remove it from data_files or convert it to text"
            )
        empty += len(head) < _SNIFF_BYTES and not head.strip()
    if files and empty == len(files):
        shown = ", ".join(map(str, files[:3])) + (" ..." if len(files) > 3 else "")
        raise InputError(f"data_files are empty ({shown}); give files that hold documents")


def _iter_lines(path: Path, errors: str = "strict", ends: bool = False) -> Iterator[str]:
    """The file's lines, newlines made "\n" and dropped (kept with `ends`: csv needs them)."""
    with (
        _open_binary(path) as raw,
        io.TextIOWrapper(raw, encoding="utf-8-sig", errors=errors, newline=None) as fh,
    ):
        for line in fh:
            yield line if ends else line.rstrip("\n")


def iter_text_file(path: Path, stats: ReadStats, doc_unit: str = "block") -> Iterator[str]:
    """Plain text: one document per blank-line-separated block, per line, or per file (see
    DOC_UNITS). A blank document is none."""
    if (errors := _check_utf8_text(path, stats)) is None:
        return
    stats.files += 1
    before = stats.documents
    block: list[str] = []
    for line in _iter_lines(path, errors):
        if doc_unit == "line":
            # Blank lines separate nothing in this mode; they are not documents.
            if line.strip():
                stats.documents += 1
                yield line
        elif doc_unit == "file" or line.strip():
            block.append(line)
        elif block:
            stats.documents += 1
            yield "\n".join(block)
            block = []
    if any(line.strip() for line in block):
        stats.documents += 1
        yield "\n".join(block)
    if stats.documents == before:
        stats.blank_files += 1


def iter_jsonl_file(path: Path, stats: ReadStats, text_field: str = "text") -> Iterator[str]:
    """JSON Lines; a `.json` file holding one JSON array is read as its elements (objects with
    the text field, or strings), loaded whole."""
    if (errors := _check_utf8_text(path, stats)) is None:
        return
    stats.files += 1
    found, fields = 0, set[str]()  # documents of this file; the fields of its records
    for record in _json_records(path, errors, stats):
        if isinstance(record, str):
            found += 1
            stats.documents += 1
            yield record
            continue
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            stats.bad_records += 1
            fields.update(record if isinstance(record, dict) and len(fields) < 50 else ())
            continue
        found += 1
        stats.documents += 1
        yield value
    # JSON Lines whose objects all lack the field: a wrong --text-field. (A .json file in a
    # walked directory may be a config file, not data: skipped as bad records, as before.)
    line_delimited = path.name.lower().removesuffix(".gz").endswith((".jsonl", ".ndjson"))
    if not found and fields and line_delimited:
        raise InputError(
            f"{path}: no record has a string field {text_field!r} (fields: "
            f"{', '.join(sorted(fields)[:20])}); pass the right --text-field"
        )


def iter_csv_file(path: Path, stats: ReadStats, text_field: str = "text") -> Iterator[str]:
    """CSV or TSV with a header row: the text field's column, a document per row."""
    if (errors := _check_utf8_text(path, stats)) is None:
        return
    csv.field_size_limit(sys.maxsize)  # a document may be longer than csv's 128 KB default
    rows = csv.DictReader(
        _iter_lines(path, errors, ends=True), delimiter=CSV_DELIMITERS[_base_suffix(path)]
    )
    try:
        columns = rows.fieldnames or []
        if text_field not in columns:
            raise InputError(
                f"{path}: no column {text_field!r} (columns: {', '.join(columns[:20])}); pass "
                "the right --text-field"
            )
        stats.files += 1
        for row in rows:
            value = row.get(text_field)
            if not isinstance(value, str):  # a short row
                stats.bad_records += 1
                continue
            stats.documents += 1
            yield value
    except csv.Error as exc:
        raise InputError(f"{path}: not valid CSV ({exc}, line {rows.line_num})") from None


def _json_records(path: Path, errors: str, stats: ReadStats) -> Iterator[Any]:
    lines = _iter_lines(path, errors)
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        return
    if _base_suffix(path) == ".json" and first.lstrip().startswith("["):
        text = "\n".join([first, *lines])
        try:
            array = json.loads(text)
        except json.JSONDecodeError:
            stats.bad_records += 1
            return
        for record in array if isinstance(array, list) else [array]:
            if isinstance(record, str):
                yield record  # a document, not a record: the caller counts it
            elif isinstance(record, dict):
                yield record
            else:
                stats.bad_records += 1
        return
    for line in itertools.chain([first], lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            stats.bad_records += 1


def iter_parquet_file(path: Path, stats: ReadStats, text_field: str = "text") -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException):
        stats.undecodable_files += 1
        stats.skipped_files.append(str(path))
        return
    if text_field not in pf.schema_arrow.names:
        raise InputError(
            f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
            "pass --text-field"
        )
    stats.files += 1
    # Batches keep memory flat on multi-GB files.
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if not isinstance(value, str):
                stats.bad_records += 1
                continue
            stats.documents += 1
            yield value


def iter_file_documents(
    path: Path, stats: ReadStats, text_field: str = "text", doc_unit: str = "block"
) -> Iterator[str]:
    suffix = _base_suffix(path)
    if suffix in JSONL_SUFFIXES:
        yield from iter_jsonl_file(path, stats, text_field)
    elif suffix in PARQUET_SUFFIXES:
        yield from iter_parquet_file(path, stats, text_field)
    elif suffix in CSV_DELIMITERS:
        yield from iter_csv_file(path, stats, text_field)
    else:
        yield from iter_text_file(path, stats, doc_unit)


def open_dataset(
    name_or_path: str,
    split: str = "train",
    text_field: str = "text",
    data_files: Any = None,
    **load_kwargs: Any,
) -> Any:
    """A `datasets` source: a saved dataset directory, or anything `load_dataset` accepts
    (streamed). Data preparation and the trainer's streaming sources both open datasets here.

    Opened eagerly so that a wrong name, split, file or field is reported, in one line, before
    any work starts.
    """
    import datasets

    path = Path(name_or_path)
    if data_files is not None:
        check_data_files(name_or_path, data_files)
    elif name_or_path in FILE_BUILDERS and not path.exists():
        raise InputError(
            f"dataset {name_or_path!r} is a `datasets` builder that reads files, and no files "
            "were given (it would read the current directory): give data_files in a source, or "
            "the files as --input to data_prep"
        )
    elif path.is_file():
        raise InputError(
            f"dataset {name_or_path!r} is a file; a dataset is a name or a directory: read a "
            "file with its builder (dataset: parquet, json, csv or text, with data_files) or as "
            "--input to data_prep"
        )
    try:
        if data_files is None and is_saved_dataset(path):
            ds = _load_saved(path, split)
        else:
            ds = datasets.load_dataset(
                name_or_path, data_files=data_files, split=split, streaming=True, **load_kwargs
            )
    except InputError:
        raise
    except Exception as exc:  # datasets raises many types; all mean "cannot use this source"
        files = "" if data_files is None else f" (data_files={data_files!r})"
        hint = "" if path.exists() else " (a hub name needs the network or a local cache)"
        raise InputError(
            f"cannot stream dataset {name_or_path!r}{files} split {split!r}: "
            f"{error_line(exc)}{hint}"
        ) from None
    names = getattr(ds, "column_names", None)
    if names is None and data_files is not None:  # json, csv: known from the first record
        try:
            names = list(next(iter(ds), {}))
        except Exception:  # a bad file: reported, naming it, where the stream meets it
            names = None
    if names is not None and text_field not in names:
        raise InputError(
            f"dataset {name_or_path!r} has no field {text_field!r} (fields: {', '.join(names)}); "
            "set the text field"
        )
    feature = (getattr(ds, "features", None) or {}).get(text_field)
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise InputError(
            f"dataset {name_or_path!r}: field {text_field!r} holds {feature}, not text; set the "
            "text field to a column of strings"
        )
    return ds


# What `save_to_disk` writes: a Dataset's dataset_info.json and state.json, a DatasetDict's
# dataset_dict.json (and a Dataset's files in a folder per split).
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder that `datasets`' save_to_disk wrote."""
    return path.is_dir() and any((path / f).is_file() for f in SAVED_DATASET_FILES)


def _load_saved(path: Path, split: str) -> Any:
    """A `save_to_disk` directory: a Dataset (one split, whatever `split` says, so only the
    default is accepted) or a DatasetDict (the split named)."""
    import datasets

    # A Dataset saved with no records has no data file, and load_from_disk fails on it with an
    # IndexError; a DatasetDict keeps each split's Dataset in a folder of its own.
    one = path / split if (path / "dataset_dict.json").is_file() else path
    state = one / "state.json"
    if state.is_file() and not json.loads(state.read_text()).get("_data_files", [None]):
        raise InputError(f"dataset {str(path)!r} is empty (a saved dataset with no records)")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(
                f"dataset {str(path)!r} has no split {split!r} (splits: {', '.join(ds)}); "
                "choose one of them"
            )
        ds = ds[split]
    elif split != "train":
        raise InputError(
            f"dataset {str(path)!r} is a single saved Dataset, with no splits to choose from: "
            f"drop the split ({split!r}), or save a DatasetDict"
        )
    if len(ds) == 0:
        raise InputError(f"dataset {str(path)!r} is empty (a saved dataset with no records)")
    return ds


def iter_dataset_documents(ds: Any, stats: ReadStats, text_field: str = "text") -> Iterator[str]:
    stats.files += 1
    records = iter(ds)
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as exc:  # a bad file met mid-stream: pyarrow, json, decode errors
            raise InputError(
                f"cannot read the dataset after {stats.documents} documents: "
                f"{error_line(exc)}; fix or remove the bad file"
            ) from None
        value = record.get(text_field)
        if not isinstance(value, str):
            stats.bad_records += 1
            continue
        stats.documents += 1
        yield value


def iter_documents(
    inputs: Sequence[str | Path] = (),
    stats: ReadStats | None = None,
    text_field: str = "text",
    doc_unit: str = "block",
    dataset: str | None = None,
    split: str = "train",
) -> Iterator[str]:
    """Raw documents of all inputs in a fixed order: files first (as given), then the dataset.
    `doc_unit` says what one document of a plain-text file is (DOC_UNITS).

    Paths are checked here, before anything is read, so a typo fails at once and in one line.
    """
    if doc_unit not in DOC_UNITS:
        raise InputError(
            f"a plain-text document is one of {', '.join(DOC_UNITS)}, not {doc_unit!r}"
        )
    stats = stats if stats is not None else ReadStats()
    files = expand_inputs(inputs) if inputs or dataset is None else []
    stats.split_files = count_split_files(files)
    ds = open_dataset(dataset, split, text_field) if dataset is not None else None
    return _iter_all(files, stats, text_field, doc_unit, ds)


def _iter_all(
    files: list[Path],
    stats: ReadStats,
    text_field: str,
    doc_unit: str,
    ds: Any,
) -> Iterator[str]:
    for path in files:
        yield from iter_file_documents(path, stats, text_field, doc_unit)
    if ds is not None:
        yield from iter_dataset_documents(ds, stats, text_field)


def add_input_arguments(parser: Any) -> None:
    """The input options every data_prep command reads text with (see `iter_documents`)."""
    parser.add_argument(
        "--input", nargs="+", default=[], help="text/jsonl/json/parquet/csv/tsv files or dirs"
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="a `datasets` name, a dataset folder (save_to_disk's, or data files in a hub "
        "layout); not a file (give files to --input)",
    )
    parser.add_argument("--split", default="train", help="dataset split to read (default: train)")
    parser.add_argument(
        "--text-field",
        default="text",
        help="jsonl/parquet/csv/dataset text field (a top-level one: no dotted paths)",
    )
    add_doc_unit_arguments(parser)


def add_doc_unit_arguments(parser: Any) -> None:
    """--doc-per-line / --doc-per-file: what one document of a plain-text file is (`doc_unit`)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--doc-per-line",
        dest="doc_unit",
        action="store_const",
        const="line",
        default="block",
        help="plain text: one document per line (default: per blank-line-separated block)",
    )
    group.add_argument(
        "--doc-per-file",
        dest="doc_unit",
        action="store_const",
        const="file",
        help="plain text: one document per file (source code, whose functions are separated "
        "by blank lines; default: per blank-line-separated block). Cleaning still turns each "
        "whitespace run into one space, so code loses its indentation and line breaks",
    )
