"""Parquet and Arrow corpora (datasets.save_to_disk folders): reading, errors, chunking,
fingerprints; and corpus folders holding what is not a regular file (FIFOs, dangling links)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_chunk import bpe_tokenizer, write_jsonl

from llmtrain.config import Config, DataSourceConfig
from llmtrain.data.corpus import ReadStats, corpus_files, corpus_fingerprint, iter_documents
from llmtrain.data.store_cache import ensure_stores
from llmtrain.errors import LLMTrainError


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # doc ids and messages are relative to the working directory


@pytest.fixture(autouse=True)
def _no_hang():
    """A read that opens a FIFO blocks forever: fail the test instead."""

    def hang(*_):
        raise TimeoutError("blocked: a FIFO was opened")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def docs(path, **kw):
    return list(iter_documents(DataSourceConfig(path=path, **kw)))


def write_parquet(path: str, columns: dict, **kw) -> Path:
    pq.write_table(pa.table(columns), path, **kw)
    return Path(path)


def write_arrow(path: str, columns: dict, *, stream: bool = True) -> Path:
    table = pa.table(columns)
    opener = pa.ipc.new_stream if stream else pa.ipc.new_file
    with pa.OSFile(path, "wb") as sink, opener(sink, table.schema) as w:
        for batch in table.to_batches(max_chunksize=2):
            w.write_batch(batch)
    return Path(path)


# ------------------------------------------------------------------------------ reading
@pytest.mark.parametrize("kind", ["parquet", "arrow-stream", "arrow-file"])
def test_columnar_rows_read_like_jsonl_records(kind: str) -> None:
    cols = {"text": ["one", "two", "three"], "label": ["a", "b", "a"], "extra": [1, 2, 3]}
    recs = [{"text": t, "label": lab} for t, lab in zip(cols["text"], cols["label"], strict=True)]
    Path("c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if kind == "parquet":
        write_parquet("c.parquet", cols)
    else:
        write_arrow("c.arrow", cols, stream=kind == "arrow-stream")
    name = "c.parquet" if kind == "parquet" else "c.arrow"
    got = docs(name)
    want = docs("c.jsonl")
    assert [(d.text, d.label) for d in got] == [(d.text, d.label) for d in want]
    assert [d.where for d in got] == [f"{name}:row {i}" for i in (1, 2, 3)]
    assert [d.doc_id for d in got] == [d.where for d in got]


def test_parquet_integer_labels_and_ids_keep_their_types() -> None:
    write_parquet("c.parquet", {"body": ["x", "y"], "y": [1, 10], "uid": ["u1", "u2"]})
    src = DataSourceConfig(path="c.parquet", text_field="body", label_field="y", id_field="uid")
    got = list(iter_documents(src, require_label=True))
    assert [(d.doc_id, d.label) for d in got] == [("u1", 1), ("u2", 10)]


def test_parquet_is_read_in_batches_not_at_once() -> None:
    """Flat memory: the reader converts a record batch at a time, so progress after the first
    document is a fraction of the file (a whole-file read would report it all)."""
    n = 5000
    write_parquet("big.parquet", {"text": [f"doc {i}" for i in range(n)]}, row_group_size=500)
    stats = ReadStats()
    it = iter_documents(DataSourceConfig(path="big.parquet"), stats)
    next(it)
    assert stats.bytes_read < stats.total_bytes / 2
    assert sum(1 for _ in it) == n - 1 and stats.bytes_read == stats.total_bytes


# VmHWM, the peak RSS of this process image (ru_maxrss would carry pytest's own peak over
# the fork and exec).
MEASURE_PEAK = """
import re, sys
from llmtrain.config import DataSourceConfig
from llmtrain.data.corpus import iter_documents
import pyarrow.parquet
def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
before = peak()
n = sum(1 for _ in iter_documents(DataSourceConfig(path=sys.argv[1])))
print(n, peak() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM")
def test_a_large_row_group_is_streamed_not_loaded() -> None:
    """100 MB of text in one row group: the reader's peak memory grows by well under half of
    it (measured ~30 MB, fixed; reading the column chunk whole costs ~150 MB)."""
    n, text = 100_000, "word " * 200
    texts = [f"{text}{i}" for i in range(n)]
    write_parquet(
        "big.parquet", {"text": texts}, row_group_size=n, compression="none", use_dictionary=False
    )
    assert Path("big.parquet").stat().st_size > 100e6
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", MEASURE_PEAK, "big.parquet"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.split()
    assert int(out[0]) == n and int(out[1]) < 50e6, out


def test_messages_column_of_structs_is_a_conversation() -> None:
    conv = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    write_parquet("chat.parquet", {"messages": conv})
    (d,) = docs("chat.parquet", format="chat")
    assert d.messages == (("user", "hi"), ("assistant", "hello"))
    write_parquet("pairs.parquet", {"q": ["2+2?"], "a": ["4"]})
    (p,) = docs("pairs.parquet", prompt_field="q", response_field="a")
    assert p.messages == (("user", "2+2?"), ("assistant", "4"))


# ------------------------------------------------------------------------------- errors
def test_missing_column_lists_the_columns_present() -> None:
    write_parquet("c.parquet", {"body": ["x"], "y": ["a"]})
    with pytest.raises(LLMTrainError) as e:
        docs("c.parquet", on_error="skip")  # a missing column is the file's fault, not a row's
    assert str(e.value) == (
        "c.parquet: no column 'text' (data.train.text_field); columns are: body, y"
    )
    write_parquet("m.parquet", {"text": ["x"]})
    with pytest.raises(LLMTrainError, match=r"no column 'messages' .*columns are: text"):
        docs("m.parquet", format="chat")


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"text": ["ok", None, "ok"]}, "c.parquet:row 2: field 'text' is null, expected a string"),
        ({"text": [1, 2, 3]}, "c.parquet:row 1: field 'text' is int, expected a string"),
        (
            {"text": ["ok", "ok", "ok"], "label": [1.5, 2.0, 1.0]},
            "c.parquet:row 1: field 'label': the label 1.5 is a float",
        ),
    ],
)
def test_bad_values_name_file_and_row(columns: dict, message: str) -> None:
    write_parquet("c.parquet", columns)
    with pytest.raises(LLMTrainError) as e:
        list(iter_documents(DataSourceConfig(path="c.parquet"), require_label="label" in columns))
    assert str(e.value).startswith(message)
    assert "on_error: skip" in str(e.value) and "\n" not in str(e.value)


def test_on_error_skip_drops_and_counts_bad_rows() -> None:
    write_parquet("c.parquet", {"text": ["a", None, "c", None]})
    stats = ReadStats()
    got = list(iter_documents(DataSourceConfig(path="c.parquet", on_error="skip"), stats))
    assert [d.text for d in got] == ["a", "c"] and stats.skipped == 2


@pytest.mark.parametrize("ext", ["parquet", "arrow"])
def test_invalid_utf8_names_the_row_and_honours_errors_replace(ext: str) -> None:
    raw = pa.array([b"ok", b"bad \xff", b"fine"], pa.binary())
    text = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())  # unchecked UTF-8
    name = f"c.{ext}"
    if ext == "parquet":
        write_parquet(name, {"text": text})
    else:
        write_arrow(name, {"text": text})
    with pytest.raises(LLMTrainError) as e:
        docs(name)
    assert str(e.value).startswith(f"{name}:row 2: invalid UTF-8 (set data.train.errors: replace")
    assert [d.text for d in docs(name, errors="replace")] == ["ok", "bad \ufffd", "fine"]
    assert [d.text for d in docs(name, on_error="skip")] == ["ok", "fine"]


def test_unreadable_file_is_one_line() -> None:
    Path("bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(LLMTrainError, match=r"^bad\.parquet: cannot read as parquet \(") as e:
        docs("bad.parquet")
    assert "\n" not in str(e.value)


def test_without_pyarrow_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    write_parquet("c.parquet", {"text": ["x"]})
    for name in ("pyarrow", "pyarrow.ipc", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(LLMTrainError) as e:
        docs("c.parquet")
    assert str(e.value) == (
        "reading .parquet/.arrow corpora needs pyarrow: pip install 'llmtrain[parquet]'"
    )


# ---------------------------------------------------------------- save_to_disk folders
needs_datasets = pytest.mark.skipif(
    importlib.util.find_spec("datasets") is None, reason="datasets is not installed"
)


@needs_datasets
def test_save_to_disk_folder_is_a_corpus(tmp_path: Path) -> None:
    import datasets

    texts = [f"text number {i}" for i in range(7)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk("ds", num_shards=2)
    assert {"state.json", "dataset_info.json"} <= set(os.listdir("ds"))
    files = corpus_files(DataSourceConfig(path="ds"))
    assert [f.name for f in files] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert [d.text for d in docs("ds")] == texts  # the json files beside them are not corpora
    assert [d.text for d in docs("ds/*.arrow")] == texts
    # A folder holding it (and other corpora) reads its shards too.
    Path("more.txt").write_text("more")
    assert [d.text for d in docs(str(tmp_path))] == [*texts, "more"]


@needs_datasets
def test_dataset_dict_folder_asks_for_a_split() -> None:
    import datasets

    d = datasets.Dataset.from_dict({"text": ["a"]})
    datasets.DatasetDict({"train": d, "test": d}).save_to_disk("dd")
    with pytest.raises(LLMTrainError) as e:
        docs("dd")
    assert "'dd' is a DatasetDict folder with the splits train, test; name one" in str(e.value)
    assert [x.text for x in docs("dd/train")] == ["a"]


@needs_datasets
def test_fingerprint_covers_columnar_files_and_state_json() -> None:
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk("ds")
    write_parquet("c.parquet", {"text": ["x"]})
    src = DataSourceConfig(path=["ds", "c.parquet"])
    fp = corpus_fingerprint(src)
    assert corpus_fingerprint(src) == fp
    write_parquet("c.parquet", {"text": ["x", "y"]})
    fp2 = corpus_fingerprint(src)
    assert fp2 != fp
    state = Path("ds/state.json")
    state.write_text(state.read_text() + " ")
    assert corpus_fingerprint(src) != fp2


# ------------------------------------------------------------------------------ chunking
def _cfg(tmp_path: Path, path: str) -> Config:
    return Config.model_validate(
        {
            "run": {"output_dir": str(tmp_path / f"run-{Path(path).name}")},
            "model": {"task": "causal-lm"},
            "data": {"train": {"path": path}, "chunk": {"seq_len": 32, "remainder": "keep"}},
        }
    )


def _tokens(store) -> list[int]:
    return np.concatenate([store[i]["input_ids"] for i in range(len(store))]).tolist()


@needs_datasets
def test_chunk_parquet_and_arrow_match_jsonl_token_for_token(tmp_path: Path) -> None:
    import datasets

    write_jsonl(tmp_path / "c.jsonl", 80)
    recs = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    cols = {k: [r[k] for r in recs] for k in ("id", "text", "label")}
    write_parquet("c.parquet", cols, row_group_size=16)
    datasets.Dataset.from_dict(cols).save_to_disk("ds", num_shards=3)
    tok = bpe_tokenizer()
    want = ensure_stores(_cfg(tmp_path, "c.jsonl"), tok, progress=False)
    for path in ("c.parquet", "ds"):
        got = ensure_stores(_cfg(tmp_path, path), tok, progress=False)
        assert _tokens(got.stores["train"]) == _tokens(want.stores["train"])
        assert got.splits["train"]["documents"] == 80


def test_edited_parquet_rebuilds_the_store(tmp_path: Path) -> None:
    write_parquet("c.parquet", {"text": ["alpha beta"] * 4})
    tok = bpe_tokenizer()
    cfg = _cfg(tmp_path, "c.parquet")
    first = ensure_stores(cfg, tok, progress=False)
    assert ensure_stores(cfg, tok, progress=False).up_to_date
    write_parquet("c.parquet", {"text": ["gamma delta"] * 5})
    again = ensure_stores(cfg, tok, progress=False)
    assert not again.up_to_date and again.splits["train"]["documents"] == 5
    assert _tokens(again.stores["train"]) != _tokens(first.stores["train"])


# ----------------------------------------------------- what is not a regular file (#22)
def test_fifo_in_a_corpus_folder_is_skipped_and_counted(tmp_path: Path) -> None:
    Path("c").mkdir()
    Path("c/a.txt").write_text("alpha beta")
    os.mkfifo("c/pipe.txt")  # opening it would block chunk forever
    stats = ReadStats()
    assert [d.text for d in iter_documents(DataSourceConfig(path="c"), stats)] == ["alpha beta"]
    assert stats.skipped_entries == ["c/pipe.txt"]
    report = ensure_stores(_cfg(tmp_path, "c"), bpe_tokenizer(), progress=False)
    assert report.notes == [
        "warning: data.train: 1 corpus entry skipped, not regular files (FIFOs, sockets, "
        "devices): c/pipe.txt"
    ]
    assert [d.text for d in docs("c/*.txt")] == ["alpha beta"]  # a glob skips it too


def test_fifo_named_directly_is_refused() -> None:
    os.mkfifo("pipe.txt")
    with pytest.raises(LLMTrainError) as e:
        docs("pipe.txt")
    assert str(e.value) == (
        "data.train.path: 'pipe.txt' is not a regular file (a FIFO); a corpus is read from "
        "regular files only"
    )


@pytest.mark.parametrize("path", ["c", "c/*.txt", "c/gone.txt"])
def test_dangling_symlink_names_the_corpus_entry(path: str) -> None:
    Path("c").mkdir()
    Path("c/a.txt").write_text("alpha")
    os.symlink("/nonexistent/target.txt", "c/gone.txt")
    with pytest.raises(LLMTrainError) as e:
        docs(path)
    assert str(e.value) == (
        "data.train.path: corpus entry 'c/gone.txt' is a symlink to a missing file; remove "
        "the link or restore its target"
    )
