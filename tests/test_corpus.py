"""The corpus reader: formats, file selection, ids, labels, and every bad-input message."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from llmtrain.config import DataSourceConfig
from llmtrain.data.corpus import (
    Document,
    ReadStats,
    corpus_files,
    corpus_fingerprint,
    iter_documents,
)
from llmtrain.errors import LLMTrainError


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Doc ids are relative to the working directory: run every test inside tmp_path.
    monkeypatch.chdir(tmp_path)


def src(path: str | list[str], **kw) -> DataSourceConfig:
    return DataSourceConfig(path=path, **kw)


def docs(path: str | list[str], **kw) -> list[Document]:
    return list(iter_documents(src(path, **kw)))


def write(path: str, data: str | bytes) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    if p.name.endswith(".gz"):
        raw = gzip.compress(raw)
    p.write_bytes(raw)
    return p


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


# ------------------------------------------------------------------------------- formats
def test_txt_whole_file_is_one_document() -> None:
    write("a.txt", "line one\n\nline two\n")
    (d,) = docs("a.txt")
    assert d == Document("a.txt", "line one\n\nline two\n", None, "a.txt:1")


def test_txt_split_lines_skips_blank_lines_and_strips_eol() -> None:
    write("a.txt", "first\r\n\n   \nsecond  \nthird")
    got = docs("a.txt", split="lines")
    assert [(d.text, d.doc_id, d.where) for d in got] == [
        ("first", "a.txt:1", "a.txt:1"),
        ("second  ", "a.txt:4", "a.txt:4"),
        ("third", "a.txt:5", "a.txt:5"),
    ]


def test_txt_split_paragraphs() -> None:
    write("a.txt", "\n\np1 l1\np1 l2\n\n\n  \np2\n\np3 l1\np3 l2")
    got = docs("a.txt", split="paragraphs")
    assert [(d.text, d.where) for d in got] == [
        ("p1 l1\np1 l2", "a.txt:3"),
        ("p2", "a.txt:8"),
        ("p3 l1\np3 l2", "a.txt:10"),
    ]


def test_empty_txt_files_yield_nothing_but_others_do() -> None:
    write("c/a.txt", "")
    write("c/b.txt", "  \n\n")
    write("c/c.txt", "hello")
    assert [d.doc_id for d in docs("c")] == ["c/c.txt"]


def test_jsonl_fields_labels_and_ids() -> None:
    write(
        "d.jsonl",
        jsonl(
            {"text": "a", "label": "pos"},
            {"text": "b", "label": 3},
            {"text": "c"},
            "",
            {"text": "d", "label": None},
        ),
    )
    got = docs("d.jsonl")
    assert [(d.doc_id, d.text, d.label, d.where) for d in got] == [
        ("d.jsonl:1", "a", "pos", "d.jsonl:1"),
        ("d.jsonl:2", "b", "3", "d.jsonl:2"),
        ("d.jsonl:3", "c", None, "d.jsonl:3"),
        ("d.jsonl:5", "d", None, "d.jsonl:5"),
    ]


def test_jsonl_custom_fields_and_id_field() -> None:
    write(
        "d.jsonl", jsonl({"body": "x", "cls": "k", "uid": 7}, {"body": "y", "cls": "j", "uid": "u"})
    )
    got = docs("d.jsonl", text_field="body", label_field="cls", id_field="uid")
    assert [(d.doc_id, d.text, d.label) for d in got] == [("7", "x", "k"), ("u", "y", "j")]


def test_csv_and_tsv_with_quoted_multiline_fields() -> None:
    write("a.csv", 'id,text,label\n1,"hello, world",pos\n2,"two\nlines",neg\n\n3,plain,pos\n')
    got = docs("a.csv", id_field="id")
    assert [(d.doc_id, d.text, d.label, d.where) for d in got] == [
        ("1", "hello, world", "pos", "a.csv:2"),
        ("2", "two\nlines", "neg", "a.csv:3"),
        ("3", "plain", "pos", "a.csv:6"),
    ]
    write("b.tsv", "text\tlabel\nx y\t0\nz\t1\n")
    got = docs("b.tsv")
    assert [(d.doc_id, d.text, d.label) for d in got] == [
        ("b.tsv:2", "x y", "0"),
        ("b.tsv:3", "z", "1"),
    ]


def test_csv_without_label_column_gives_none() -> None:
    write("a.csv", "text\nhello\n")
    assert [(d.text, d.label) for d in docs("a.csv")] == [("hello", None)]


@pytest.mark.parametrize(
    ("name", "content", "kw", "texts"),
    [
        ("a.txt.gz", "whole\nfile", {}, ["whole\nfile"]),
        ("a.txt.gz", "l1\nl2\n", {"split": "lines"}, ["l1", "l2"]),
        ("a.jsonl.gz", jsonl({"text": "j1"}, {"text": "j2"}), {}, ["j1", "j2"]),
        ("a.csv.gz", "text\nc1\nc2\n", {}, ["c1", "c2"]),
        ("a.tsv.gz", "text\tlabel\nt1\tx\n", {}, ["t1"]),
    ],
)
def test_gzip_of_each_format(name: str, content: str, kw: dict, texts: list[str]) -> None:
    write(name, content)
    stats = ReadStats()
    got = list(iter_documents(src(name, **kw), stats))
    assert [d.text for d in got] == texts
    assert got[0].doc_id.startswith(name)
    assert stats.total_bytes == stats.bytes_read == os.path.getsize(name)


def test_format_override_reads_unknown_extension() -> None:
    write("data.log", jsonl({"text": "x"}))
    assert [d.text for d in docs("data.log", format="jsonl")] == ["x"]
    with pytest.raises(
        LLMTrainError, match=r"cannot tell the format of 'data.log'.*data.train.format"
    ):
        docs("data.log")


# -------------------------------------------------------------------------- file selection
def test_folder_recursive_sorted_known_extensions_only() -> None:
    write("c/b.txt", "b")
    write("c/a/z.jsonl", jsonl({"text": "z"}))
    write("c/a/y.csv", "text\ny\n")
    write("c/notes.bin", "ignored")
    write("c/.hidden.txt", "ignored")
    write("c/.git/x.txt", "ignored")
    files = corpus_files(src("c"))
    assert [f.relative_to(Path.cwd()).as_posix() for f in files] == [
        "c/a/y.csv",
        "c/a/z.jsonl",
        "c/b.txt",
    ]
    assert all(f.is_absolute() for f in files)
    assert [d.text for d in docs("c")] == ["y", "z", "b"]


def test_glob_and_list_are_deduplicated_and_sorted() -> None:
    for n in ("a", "b", "c"):
        write(f"g/{n}.txt", n)
    write("g/sub/d.txt", "d")
    assert [d.text for d in docs("g/*.txt")] == ["a", "b", "c"]
    assert [d.text for d in docs("g/**/*.txt")] == ["a", "b", "c", "d"]
    assert [d.text for d in docs(["g/c.txt", "g/a.txt", "g/*.txt"])] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("missing.txt", r"data.train.path: 'missing.txt' does not exist"),
        ("g/*.nothing", r"data.train.path: 'g/\*.nothing' matches no files"),
        ("emptydir", r"data.train.path: folder 'emptydir' holds no"),
        (["a.txt", "nope/"], r"'nope/' does not exist"),
    ],
)
def test_nothing_matches_names_the_key_value(path, message: str) -> None:
    write("a.txt", "a")
    Path("emptydir").mkdir()
    Path("g").mkdir()
    with pytest.raises(LLMTrainError, match=message):
        corpus_files(src(path))


def test_zero_documents_overall_is_an_error_and_key_is_used() -> None:
    write("e/a.txt", "")
    write("e/b.jsonl", "\n\n")
    with pytest.raises(LLMTrainError, match=r"data.eval.path: no documents in e/a.txt, e/b.jsonl"):
        list(iter_documents(src("e"), key="data.eval"))


def test_doc_ids_are_stable_across_reads_and_directories(tmp_path: Path, monkeypatch) -> None:
    write("c/x.jsonl", jsonl({"text": "a"}, {"text": "b"}))
    write("c/y.txt", "p1\n\np2\n")
    first = [d.doc_id for d in docs("c")] + [d.doc_id for d in docs("c/y.txt", split="paragraphs")]
    assert first == ["c/x.jsonl:1", "c/x.jsonl:2", "c/y.txt", "c/y.txt:1", "c/y.txt:3"]
    assert [d.doc_id for d in docs(str(tmp_path / "c"))] == first[:3]  # absolute path, same ids


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("name", "content", "kw", "message"),
    [
        ("b.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', {}, "b.jsonl:2: invalid UTF-8"),
        ("b.txt", b"ok\nfine\nbad \xff byte\n", {}, "b.txt:3: invalid UTF-8"),
        ("b.txt", b"ok\n\xc3\n", {"split": "lines"}, "b.txt:2: invalid UTF-8"),
        ("b.csv", b"text\nok\n\xfe\n", {}, "b.csv:3: invalid UTF-8"),
        ("b.jsonl.gz", b'{"text": "a"}\n\xff\n', {}, "b.jsonl.gz:2: invalid UTF-8"),
        ("b.jsonl", jsonl({"text": "a"}, "{not json"), {}, "b.jsonl:2: not valid JSON"),
        (
            "b.jsonl",
            jsonl({"text": "a"}, "[1, 2]"),
            {},
            "b.jsonl:2: expected a JSON object, got list",
        ),
        ("b.jsonl", jsonl({"text": "a"}, {"body": "x"}), {}, "b.jsonl:2: missing field 'text'"),
        ("b.jsonl", jsonl({"text": 5}), {}, "b.jsonl:1: field 'text' is int, expected a string"),
        (
            "b.jsonl",
            jsonl({"text": "a", "i": 1}, {"text": "b"}),
            {"id_field": "i"},
            "b.jsonl:2: missing field 'i'",
        ),
        ("b.csv", "text,label\na,b\nc,d,e\n", {}, "b.csv:3: 3 columns, the header has 2"),
        ("b.csv", "body,label\na,b\n", {}, "b.csv:1: no column 'text'"),
    ],
)
def test_bad_input_names_file_and_line(name: str, content, kw: dict, message: str) -> None:
    write(name, content)
    with pytest.raises(LLMTrainError) as e:
        docs(name, **kw)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_invalid_utf8_message_suggests_errors_replace() -> None:
    write("b.jsonl", b'{"text": "caf\xe9"}\n')
    with pytest.raises(LLMTrainError) as e:
        docs("b.jsonl")
    assert str(e.value) == (
        "b.jsonl:1: invalid UTF-8 (set data.train.errors: replace to substitute)"
    )


def test_errors_replace_substitutes() -> None:
    write("b.jsonl", b'{"text": "caf\xe9!"}\n')
    write("b.txt", b"x\xffy")
    assert [d.text for d in docs("b.jsonl", errors="replace")] == ["caf\ufffd!"]
    assert [d.text for d in docs("b.txt", errors="replace")] == ["x\ufffdy"]


def test_on_error_skip_counts_and_drops_bad_records() -> None:
    write(
        "b.jsonl",
        b'{"text": "a"}\nnot json\n[1]\n{"x": 1}\n{"text": 2}\n'
        b'{"text": "caf\xe9"}\n{"text": "z"}\n',
    )
    stats = ReadStats()
    got = list(iter_documents(src("b.jsonl", on_error="skip"), stats))
    assert [d.where for d in got] == ["b.jsonl:1", "b.jsonl:7"]
    assert (stats.documents, stats.skipped) == (2, 5)


def test_on_error_skip_in_csv_and_paragraphs() -> None:
    write("b.csv", "text,label\na,1\nb,2,3\nc,3\n")
    stats = ReadStats()
    got = list(iter_documents(src("b.csv", on_error="skip"), stats))
    assert [d.text for d in got] == ["a", "c"] and stats.skipped == 1
    write("p.txt", b"p1\n\np2 \xff\np2 more\n\np3\n")
    stats = ReadStats()
    got = list(iter_documents(src("p.txt", split="paragraphs", on_error="skip"), stats))
    assert [d.text for d in got] == ["p1", "p3"] and stats.skipped == 1


def test_require_label() -> None:
    write("l.jsonl", jsonl({"text": "a", "label": "x"}, {"text": "b"}))
    with pytest.raises(LLMTrainError, match=r"^l.jsonl:2: missing label field 'label'"):
        list(iter_documents(src("l.jsonl"), require_label=True))
    stats = ReadStats()
    got = list(iter_documents(src("l.jsonl", on_error="skip"), stats, require_label=True))
    assert [d.label for d in got] == ["x"] and stats.skipped == 1
    write("t.txt", "text")
    with pytest.raises(LLMTrainError, match=r"t.txt: .txt documents carry no label"):
        list(iter_documents(src("t.txt"), require_label=True))
    with pytest.raises(LLMTrainError, match=r"data.train.label_field: must be set"):
        list(iter_documents(src("l.jsonl", label_field=None), require_label=True))


def test_bad_gzip_is_a_clear_error() -> None:
    Path("x.jsonl.gz").write_bytes(b"not gzip at all\n")
    with pytest.raises(LLMTrainError, match=r"^x.jsonl.gz: cannot read"):
        docs("x.jsonl.gz")


# ------------------------------------------------------------------- stats, fingerprint
def test_stats_track_bytes_while_streaming() -> None:
    write("s/a.txt", "a\n" * 10)
    write("s/b.txt", "b\n" * 30)
    stats = ReadStats()
    seen = []
    for _ in iter_documents(src("s", split="lines"), stats):
        seen.append(stats.bytes_read)
    assert stats.total_bytes == 80
    assert seen == sorted(seen) and seen[0] == 2 and seen[9] == 20 and seen[-1] == 80
    assert (stats.documents, stats.skipped) == (40, 0)


def test_iteration_is_lazy() -> None:
    Path("big.txt").write_bytes(b"line\n" * 1000 + b"\xff\n")
    it = iter_documents(src("big.txt", split="lines"))
    assert next(it).text == "line"  # the bad byte at the end is not read yet


def test_fingerprint_changes_with_files_and_settings() -> None:
    write("f/a.txt", "a")
    base = corpus_fingerprint(src("f"))
    assert corpus_fingerprint(src("f")) == base
    assert corpus_fingerprint(src("f", split="lines")) != base
    os.utime("f/a.txt", ns=(1, 1))
    touched = corpus_fingerprint(src("f"))
    assert touched != base
    write("f/b.txt", "b")
    assert corpus_fingerprint(src("f")) != touched
