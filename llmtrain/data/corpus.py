"""Stream documents out of a corpus: .txt / .jsonl / .csv / .tsv files (and .gz), .parquet
files and Arrow files (`datasets.save_to_disk` folders); single files, folders, globs.

Text files are read in binary, one line at a time, and decoded per line: that keeps memory
flat on any corpus size and lets every error name the exact `file:line`. Parquet and Arrow
files are read a record batch at a time (llmtrain.data.columnar) and errors name `file:row N`.
Only regular files are read: a FIFO or socket inside a corpus folder is skipped and counted
(opening it would block forever). Nothing here tokenizes; the tokenizer trainer and the chunk
stage both consume `iter_documents`.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import json
import os
import stat
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from llmtrain.config import DataConfig, DataSourceConfig
from llmtrain.config.messages import kind_of, show_value
from llmtrain.data.columnar import (
    DATASET_STATE,
    ColumnarFile,
    dataset_dict_splits,
    dataset_files,
)
from llmtrain.data.sft import conversation_problem, parse_conversation
from llmtrain.errors import LLMTrainError

# Extension (after stripping .gz) → reader format. `.json` is read as JSON Lines, the only
# streamable JSON; `.text` and `.md` are plain text.
_FORMATS = {
    ".txt": "txt",
    ".text": "txt",
    ".md": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
_COLUMNAR = ("parquet", "arrow")
_GLOB_CHARS = frozenset("*?[")
# How often (in lines) a .gz reader asks the compressed file for its position: tell() is a
# syscall, and the ETA needs nothing finer.
_GZ_TELL_EVERY = 256


@dataclass(frozen=True, slots=True)
class Document:
    """One document: a stable id, its text, its label (None when the source has none)."""

    doc_id: str
    text: str
    # A string, or an int under strict labels (a task that needs them): 1 and "1" differ.
    label: str | int | None
    where: str  # "file:line" of the record, for messages
    # Instruction data: the conversation as (role, content) turns (a pair is user, assistant);
    # `text` then joins the contents, for a tokenizer trained on the corpus.
    messages: tuple[tuple[str, str], ...] | None = None


@dataclass(slots=True)
class ReadStats:
    """Progress of a read, updated while iterating (bytes are on-disk, i.e. compressed for .gz)."""

    total_bytes: int = 0
    bytes_read: int = 0
    documents: int = 0
    skipped: int = 0
    # Corpus entries that are not regular files (FIFOs, sockets, devices), skipped unread.
    skipped_entries: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ files
def _display(path: Path) -> str:
    """The name used in doc ids and messages: relative to the working directory when inside it."""
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.as_posix()


def file_format(path: Path, source: DataSourceConfig) -> str | None:
    """The reader for `path`: `source.format` when set, else by extension (None: unknown).
    `format: chat` says what a record is; a .parquet/.arrow file keeps its own reader."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    by_extension = _FORMATS.get(os.path.splitext(name)[1])
    if source.format == "chat" and by_extension in _COLUMNAR:
        return by_extension
    if source.format != "auto":
        return source.format
    return by_extension


def _is_corpus_name(name: str) -> bool:
    name = name.lower()[:-3] if name.lower().endswith(".gz") else name.lower()
    return os.path.splitext(name)[1] in _FORMATS


def _regular(path: Path, key: str, skipped: list[str] | None) -> bool:
    """True for a regular file (through symlinks). A dangling symlink is an error naming the
    entry; anything else that is not a regular file (FIFO, socket, device) is refused when
    named directly (`skipped` None), else skipped and recorded: opening a FIFO blocks."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if path.is_symlink():
            raise LLMTrainError(
                f"{key}.path: corpus entry '{_display(path)}' is a symlink to a missing file; "
                "remove the link or restore its target"
            ) from e
        raise LLMTrainError(f"{key}.path: cannot read '{_display(path)}' ({e.strerror})") from e
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return stat.S_ISREG(mode)
    if skipped is None:
        raise LLMTrainError(
            f"{key}.path: '{_display(path)}' is not a regular file ({_kind(mode)}); a corpus "
            "is read from regular files only"
        )
    skipped.append(_display(path))
    return False


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file"


def _folder_entries(folder: Path, key: str) -> list[Path] | None:
    """A `datasets.save_to_disk` folder's shards; None for an ordinary folder. A DatasetDict
    folder (several splits) is refused: silently training on its test split would be worse."""
    splits = dataset_dict_splits(folder)
    if splits is not None:
        shown = ", ".join(f"'{_display(folder / s)}'" for s in splits)
        raise LLMTrainError(
            f"{key}.path: '{_display(folder)}' is a DatasetDict folder with the splits "
            f"{', '.join(splits) or '(none)'}; name one of them: {shown}"
        )
    return dataset_files(folder)


def _known_files(folder: Path, key: str, skipped: list[str] | None) -> list[Path]:
    """Regular files under `folder` (recursive) with a corpus extension, skipping hidden
    entries; a `datasets.save_to_disk` folder contributes its Arrow shards."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        shards = _folder_entries(Path(root), key)
        if shards is not None:
            dirs[:] = []
            found.extend(s for s in shards if _regular(s, key, skipped))
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if f.startswith(".") or not _is_corpus_name(f):
                continue
            if _regular(Path(root, f), key, skipped):
                found.append(Path(root, f))
    return found


def _expand(entry: str, key: str, skipped: list[str] | None) -> list[Path]:
    """The files one `path` entry names: a file, a folder, or a glob."""
    expanded = os.path.expanduser(entry)
    if _GLOB_CHARS & set(expanded):
        hits: list[Path] = []
        for m in sorted(Path(m) for m in glob.glob(expanded, recursive=True)):
            if m.is_dir():
                hits.extend(_known_files(m, key, skipped))
            elif _regular(m, key, skipped):
                hits.append(m)
        if not hits:
            raise LLMTrainError(f"{key}.path: '{entry}' matches no files")
        return hits
    p = Path(expanded)
    if p.is_dir():
        hits = _known_files(p, key, skipped)
        if not hits:
            raise LLMTrainError(
                f"{key}.path: folder '{entry}' holds no .txt/.jsonl/.csv/.tsv(.gz), .parquet "
                "or .arrow files"
            )
        return hits
    if not p.exists() and not p.is_symlink():
        raise LLMTrainError(f"{key}.path: '{entry}' does not exist")
    _regular(p, key, None)
    return [p]


def corpus_files(
    source: DataSourceConfig, *, key: str = "data.train", skipped: list[str] | None = None
) -> list[Path]:
    """The corpus files of `source`: every file, folder and glob expanded, resolved, sorted.

    `key` names the config section in messages (`data.train` or `data.eval`). Entries of a
    folder or glob that are not regular files are appended to `skipped` (when given).
    """
    entries = [source.path] if isinstance(source.path, str) else list(source.path)
    if not entries:
        raise LLMTrainError(f"{key}.path: empty list; give a file, folder or glob")
    files: set[Path] = set()
    sink = skipped if skipped is not None else []
    for entry in entries:
        files.update(h.resolve() for h in _expand(entry, key, sink))
    for f in files:
        if file_format(f, source) is None:
            raise LLMTrainError(
                f"{key}.path: cannot tell the format of '{_display(f)}' from its extension; "
                f"set {key}.format to txt, jsonl, csv, tsv, parquet or arrow"
            )
    # Sorted by path: a save_to_disk folder's shards (data-00000-of-00002.arrow...) sort by
    # their zero-padded number, which is the dataset's own order.
    return sorted(files)


def corpus_fingerprint(source: DataSourceConfig, *, key: str = "data.train") -> str:
    """sha256 over the resolved files (path, size, mtime) and every reader setting.

    Changes whenever a file is added, removed, edited, or read differently, so anything cached
    from the corpus (a trained tokenizer, a token store) can tell it is stale.
    """
    h = hashlib.sha256()
    # weight and name (a mixture source's) say how training draws, not what is read
    settings = source.model_dump(exclude={"path", "weight", "name"})
    h.update(json.dumps(settings, sort_keys=True).encode())
    files = corpus_files(source, key=key)
    # A save_to_disk folder is its shards plus the state.json that orders them.
    states = {f.parent / DATASET_STATE for f in files if f.suffix == ".arrow"}
    for f in [*files, *sorted(s for s in states if s.is_file())]:
        st = f.stat()
        h.update(f"\0{f}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def train_fingerprint(data: DataConfig) -> str | list[list[str]]:
    """data.train's corpus fingerprint: a single source's own (what it was before
    mixtures), or `[name, fingerprint]` per mixture source, in config order."""
    if not data.is_mixture:
        return corpus_fingerprint(data.train_parts[0].source)
    return [[p.name or "", corpus_fingerprint(p.source, key=p.key)] for p in data.train_parts]


# ---------------------------------------------------------------------------------- reading
class _Reader:
    """Per-file reading state: where we are, how to report a bad record, the stats to update."""

    def __init__(self, path: Path, source: DataSourceConfig, stats: ReadStats, key: str, base: int):
        self.path = path
        self.name = _display(path)
        self.source = source
        self.stats = stats
        self.key = key
        self.base = base  # bytes of the files before this one, for stats.bytes_read
        self.decode_errors = source.errors  # "strict" | "replace"
        # Set by iter_documents when the task needs labels: they keep their type and are
        # checked (label_type) instead of turned into strings.
        self.strict_labels = False
        self.rows = False  # a columnar file: records are rows, not lines

    def at(self, n: int) -> str:
        """Where record `n` is: `file:line`, or `file:row N` in a Parquet/Arrow file."""
        return f"{self.name}:row {n}" if self.rows else f"{self.name}:{n}"

    def bad(self, lineno: int, message: str) -> None:
        """A bad record: raise, or (on_error: skip) count it so the caller drops it."""
        self.bad_at(self.at(lineno), message)

    def bad_at(self, where: str, message: str) -> None:
        if self.source.on_error == "skip":
            self.stats.skipped += 1
            return
        raise LLMTrainError(f"{where}: {message} (or set {self.key}.on_error: skip to drop it)")

    def decode(self, raw: bytes, lineno: int) -> str | None:
        """Decode one line; None (after counting a skip) when it is invalid UTF-8 and skipped."""
        try:
            return raw.decode("utf-8", self.decode_errors)
        except UnicodeDecodeError as e:
            # Line number of the bad byte: raw may span lines (split: file).
            line = lineno + raw.count(b"\n", 0, e.start)
            if self.source.on_error == "skip":
                self.stats.skipped += 1
                return None
            raise LLMTrainError(
                f"{self.name}:{line}: invalid UTF-8 (set {self.key}.errors: replace to substitute)"
            ) from e

    def open(self) -> tuple[IO[bytes], IO[bytes]]:
        """(stream to read, underlying file whose tell() is the on-disk position)."""
        raw = open(self.path, "rb")  # noqa: SIM115 - closed by the caller
        if self.path.name.lower().endswith(".gz"):
            return gzip.GzipFile(fileobj=raw, mode="rb"), raw
        return raw, raw

    def lines(self) -> Iterator[tuple[int, bytes]]:
        """(line number, raw line) pairs, keeping stats.bytes_read current."""
        stream, raw = self.open()
        stats, base = self.stats, self.base
        gz = stream is not raw
        try:
            with raw, stream:
                pos = 0
                for lineno, line in enumerate(stream, 1):
                    if gz:
                        if lineno % _GZ_TELL_EVERY == 0:
                            stats.bytes_read = base + raw.tell()
                    else:
                        pos += len(line)
                        stats.bytes_read = base + pos
                    yield lineno, line
        except (OSError, EOFError, zlib.error) as e:
            raise LLMTrainError(f"{self.name}: cannot read ({e})") from e
        stats.bytes_read = base + self.path.stat().st_size

    def read_all(self) -> bytes:
        stream, raw = self.open()
        try:
            with raw, stream:
                data = stream.read()
        except (OSError, EOFError, zlib.error) as e:
            raise LLMTrainError(f"{self.name}: cannot read ({e})") from e
        self.stats.bytes_read = self.base + self.path.stat().st_size
        return data


def _strip_eol(line: str) -> str:
    if line.endswith("\n"):
        line = line[:-2] if line.endswith("\r\n") else line[:-1]
    return line


def _read_txt(r: _Reader) -> Iterator[Document]:
    split = r.source.split
    name = r.name
    if split == "file":
        text = r.decode(r.read_all(), 1)
        if text is not None and text.strip():
            yield Document(name, text, None, f"{name}:1")
        return
    if split == "lines":
        for lineno, raw in r.lines():
            line = r.decode(raw, lineno)
            if line is None or not line.strip():
                continue
            yield Document(f"{name}:{lineno}", _strip_eol(line), None, f"{name}:{lineno}")
        return
    # paragraphs: runs of non-blank lines; a bad line drops its whole paragraph when skipping.
    para: list[str] = []
    start = 0
    broken = False
    for lineno, raw in r.lines():
        line = r.decode(raw, lineno)
        if line is not None and not line.strip():
            if para and not broken:
                yield Document(
                    f"{name}:{start}", _strip_eol("".join(para)), None, f"{name}:{start}"
                )
            para, broken = [], False
            continue
        if not para and not broken:
            start = lineno
        if line is None:
            broken = True
        elif not broken:
            para.append(line)
    if para and not broken:
        yield Document(f"{name}:{start}", _strip_eol("".join(para)), None, f"{name}:{start}")


def _read_jsonl(r: _Reader) -> Iterator[Document]:
    src = r.source
    text_field, label_field, id_field = src.text_field, src.label_field, src.id_field
    loads = json.loads
    for lineno, raw in r.lines():
        if not raw.strip():
            continue
        line = r.decode(raw, lineno)
        if line is None:
            continue
        try:
            rec = loads(line)
        except ValueError as e:
            r.bad(lineno, f"not valid JSON ({e.args[0] if e.args else e})")
            continue
        if type(rec) is not dict:
            r.bad(lineno, f"expected a JSON object, got {type(rec).__name__}")
            continue
        if src.records == "text":
            doc = _record(r, lineno, rec.get, text_field, label_field, id_field)
        else:
            doc = _sft_record(r, lineno, rec.get)
        if doc is not None:
            yield doc


_MISSING = object()


def _sft_record(r: _Reader, lineno: int, get) -> Document | None:
    """A conversation (format: chat) or a prompt/response pair as a Document with `messages`;
    None when the record is bad and skipped (llmtrain.data.sft says what a good one is)."""
    src = r.source
    if src.records == "chat":
        value = get(src.messages_field, _MISSING)
        if value is _MISSING:
            r.bad(lineno, f"missing field '{src.messages_field}' ({r.key}.messages_field)")
            return None
        turns, problem = parse_conversation(value, src.messages_field)
    else:
        fields = {"user": ("prompt_field", src.prompt_field)}
        fields["assistant"] = ("response_field", src.response_field)
        turns, problem = [], None
        for role, (key, field) in fields.items():
            value = get(field, _MISSING)
            if value is _MISSING or type(value) is not str:
                what = "missing" if value is _MISSING else f"not a string ({kind_of(value)}):"
                problem = f"{what} field '{field}' ({r.key}.{key})"
                break
            turns.append((role, value))
        problem = problem or conversation_problem(turns)
    if problem is not None:
        r.bad(lineno, problem)
        return None
    doc_id = r.at(lineno)
    if src.id_field is not None:
        if get(src.id_field, None) is None:
            r.bad(lineno, f"missing field '{src.id_field}' ({r.key}.id_field)")
            return None
        doc_id = str(get(src.id_field, None))
    text = "\n".join(content for _, content in turns)
    return Document(doc_id, text, None, r.at(lineno), messages=tuple(turns))


def _record(
    r: _Reader,
    lineno: int,
    get,
    text_field: str,
    label_field: str | None,
    id_field: str | None,
) -> Document | None:
    """A Document from one record's fields (`get(field, default)`), or None when skipped."""
    text = get(text_field, _MISSING)
    if text is _MISSING:
        r.bad(lineno, f"missing field '{text_field}' ({r.key}.text_field)")
        return None
    if type(text) is not str:
        got = "null" if text is None else type(text).__name__
        r.bad(lineno, f"field '{text_field}' is {got}, expected a string")
        return None
    if id_field is not None:
        doc_id = get(id_field, None)
        if doc_id is None:
            r.bad(lineno, f"missing field '{id_field}' ({r.key}.id_field)")
            return None
        doc_id = str(doc_id)
    else:
        doc_id = r.at(lineno)
    label = get(label_field, None) if label_field is not None else None
    if label is not None and r.strict_labels:
        problem = label_problem(label)
        if problem is not None:
            r.bad(lineno, f"field '{label_field}': {problem}")
            return None
    elif label is not None:
        label = str(label)
    return Document(doc_id, text, label, r.at(lineno))


def label_problem(label: object) -> str | None:
    """Why `label` cannot be a class label, or None. The rule: a label is a string or an
    integer; booleans, floats, lists, mappings are refused rather than turned into strings
    (`[1, 2]`, `true` and `1.0` would each become a class nobody meant)."""
    if isinstance(label, str) or (isinstance(label, int) and not isinstance(label, bool)):
        return None
    return (
        f"the label {show_value(label)} is {kind_of(label)}; a label must be a string or an "
        "integer (quote it to make it a string class)"
    )


def label_kind(label: str | int) -> str:
    """'string' or 'integer': the two label types (one corpus uses one)."""
    return "integer" if isinstance(label, int) else "string"


def _required_columns(src: DataSourceConfig) -> list[tuple[str, str | None]]:
    """(config key, column) pairs a csv/tsv header must have."""
    if src.records == "text":
        return [("text_field", src.text_field)]
    if src.records == "chat":
        return [("messages_field", src.messages_field)]
    return [("prompt_field", src.prompt_field), ("response_field", src.response_field)]


def _read_csv(r: _Reader, delimiter: str) -> Iterator[Document]:
    src, name = r.source, r.name
    # Long documents exceed the csv module's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    lineno = 0

    def text_lines(pairs: Iterable[tuple[int, bytes]]) -> Iterator[str]:
        nonlocal lineno
        for lineno, raw in pairs:  # lineno: read by the caller's errors
            line = r.decode(raw, lineno)
            # A skipped bad line still has to end the record it is in.
            yield "\n" if line is None else line

    reader = csv.reader(text_lines(r.lines()), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return
        columns = {c: i for i, c in enumerate(header)}
        for key, field in _required_columns(src):
            if field not in columns:
                raise LLMTrainError(
                    f"{name}:1: no column '{field}' ({r.key}.{key}); "
                    f"columns are: {', '.join(header)}"
                )
        if src.id_field is not None and src.id_field not in columns:
            raise LLMTrainError(
                f"{name}:1: no column '{src.id_field}' ({r.key}.id_field); "
                f"columns are: {', '.join(header)}"
            )
        ncol = len(header)
        line_start = reader.line_num + 1
        for row in reader:
            start, line_start = line_start, reader.line_num + 1
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != ncol:
                r.bad(start, f"{len(row)} columns, the header has {ncol}")
                continue

            def get(field, default, row=row):
                i = columns.get(field)
                return default if i is None else row[i]

            if src.records == "text":
                doc = _record(r, start, get, src.text_field, src.label_field, src.id_field)
            else:
                doc = _sft_record(r, start, get)
            if doc is not None:
                yield doc
    except csv.Error as e:
        raise LLMTrainError(f"{name}:{lineno}: malformed {r.source.format} row ({e})") from e


def _read_columnar(r: _Reader, fmt: str) -> Iterator[Document]:
    """Rows of a .parquet/.arrow file, checked as JSON Lines records are; a required column
    the file lacks is an error listing the columns it has (on_error cannot skip a file)."""
    src, name = r.source, r.name
    table = ColumnarFile(r.path, fmt, name)
    present = table.columns
    required = [*_required_columns(src), ("id_field", src.id_field)]
    wanted = [column for _, column in required if column is not None]
    for key, column in required:
        if column is not None and column not in present:
            raise LLMTrainError(
                f"{name}: no column '{column}' ({r.key}.{key}); columns are: {', '.join(present)}"
            )
    if src.records == "text" and src.label_field in present:
        wanted.append(src.label_field)
    r.rows = True
    size = r.path.stat().st_size

    def progress(fraction: float) -> None:
        r.stats.bytes_read = r.base + int(size * fraction)

    replace = src.errors == "replace"
    for n, rec in table.rows(list(dict.fromkeys(wanted)), progress, replace=replace):
        if rec is None:
            r.bad(n, f"invalid UTF-8 (set {r.key}.errors: replace to substitute)")
            continue
        if src.records == "text":
            doc = _record(r, n, rec.get, src.text_field, src.label_field, src.id_field)
        else:
            doc = _sft_record(r, n, rec.get)
        if doc is not None:
            yield doc


def check_label_type(doc: Document, first: Document) -> None:
    """One corpus, one label type: `doc`'s label must have the type of `first`'s, or 1 and
    "1" would be two classes (or, turned into strings, silently one)."""
    assert doc.label is not None and first.label is not None
    if label_kind(doc.label) != label_kind(first.label):
        raise LLMTrainError(
            f"{doc.where}: the label {doc.label!r} is {_an(label_kind(doc.label))}, but "
            f"{first.where} has the {label_kind(first.label)} label {first.label!r}; one corpus "
            "uses one label type: write every label as a string, or every label as an integer"
        )


def _an(kind: str) -> str:
    return f"an {kind}" if kind == "integer" else f"a {kind}"


def iter_documents(
    source: DataSourceConfig,
    stats: ReadStats | None = None,
    *,
    require_label: bool = False,
    key: str = "data.train",
) -> Iterator[Document]:
    """Stream the documents of `source`, file by file in sorted order.

    `stats` (optional) is updated as reading goes: total_bytes up front, bytes_read, documents
    and skipped on the way. `require_label` makes a document without a label an error (the
    classification task). A corpus that yields no document at all is an error, raised after
    the last file.
    """
    stats = stats if stats is not None else ReadStats()
    files = corpus_files(source, key=key, skipped=stats.skipped_entries)
    sizes = [f.stat().st_size for f in files]
    stats.total_bytes = sum(sizes)
    if require_label and source.label_field is None:
        raise LLMTrainError(f"{key}.label_field: must be set, the task needs a label per document")
    yielded = 0
    base = 0
    first: Document | None = None  # the first labelled document: its label type is the corpus's
    for path, size in zip(files, sizes, strict=True):
        r = _Reader(path, source, stats, key, base)
        r.strict_labels = require_label
        fmt = file_format(path, source)
        if fmt == "txt":
            if require_label:
                raise LLMTrainError(
                    f"{r.name}: .txt documents carry no label; the task needs labelled "
                    f".jsonl/.csv records ({key}.label_field)"
                )
            docs = _read_txt(r)
        elif fmt in ("jsonl", "chat"):
            docs = _read_jsonl(r)
        elif fmt in _COLUMNAR:
            docs = _read_columnar(r, fmt)
        else:
            docs = _read_csv(r, "\t" if fmt == "tsv" else ",")
        for doc in docs:
            if require_label and doc.label is None:
                r.bad_at(
                    doc.where, f"missing label field '{source.label_field}' ({key}.label_field)"
                )
                continue
            if require_label:
                first = first or doc
                check_label_type(doc, first)
            stats.documents += 1
            yielded += 1
            yield doc
        base += size
        stats.bytes_read = base
    if yielded == 0:
        shown = ", ".join(_display(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise LLMTrainError(f"{key}.path: no documents in {shown}")


__all__ = [
    "Document",
    "ReadStats",
    "corpus_files",
    "corpus_fingerprint",
    "file_format",
    "iter_documents",
]
