"""Chunking logic: property tests of window/pack/truncate on token-id lists, then the stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from chunk_helpers import bpe_tokenizer, doc_names, wordpiece_tokenizer, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st

from llmtrain.config import Config
from llmtrain.data.chunk_spec import special_template
from llmtrain.data.chunking import (
    ChunkSpec,
    Packer,
    chunk_truncate,
    chunk_windows,
    in_eval,
    window_spans,
)
from llmtrain.data.store import TokenStore
from llmtrain.data.store_cache import ensure_stores, store_root
from llmtrain.errors import ConfigError, LLMTrainError


# ----------------------------------------------------------------------------- helpers
def pack_documents(
    docs: list[list[int]], seq_len: int, eos_id: int, *, keep_remainder: bool = False
) -> tuple[list[np.ndarray], list[np.ndarray], list[int], int]:
    """Pack whole documents in one go through `Packer`.

    Returns (chunks, doc starts per chunk, doc_id per chunk, dropped token count).
    """
    packer = Packer(seq_len)
    bodies = [[*d, eos_id] for d in docs]
    flat = np.array([t for b in bodies for t in b], dtype=np.int64)
    batches = [packer.add(flat, np.array([len(b) for b in bodies]), np.arange(len(docs)))]
    tail, n_tail = packer.finish()
    dropped = n_tail
    if keep_remainder and n_tail:
        batches.append(tail)
        dropped = 0
    chunks, starts, owners = [], [], []
    for b in batches:
        offs = np.concatenate([[0], np.cumsum(b.lengths)])
        soffs = np.concatenate([[0], np.cumsum(b.starts_counts)])
        for i in range(len(b)):
            chunks.append(b.tokens[offs[i] : offs[i + 1]])
            starts.append(b.starts[soffs[i] : soffs[i + 1]])
            owners.append(int(b.doc_ids[i]))
    return chunks, starts, owners, dropped


# --------------------------------------------------------------------------- tokenizers
# -------------------------------------------------------------------- window: properties
@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(0, 400),
    seq_len=st.integers(2, 64),
    specials=st.integers(0, 2),
    data=st.data(),
)
def test_window_spans_cover_every_token_contiguously(n, seq_len, specials, data):
    body = seq_len - specials
    if body < 1:
        return
    overlap = data.draw(st.integers(0, body - 1))
    min_tail = data.draw(st.integers(1, seq_len))
    spans = window_spans(n, body, overlap, min_tail)
    covered = np.zeros(n, dtype=bool)
    for s, e in spans:
        assert 0 <= s <= e <= n
        assert e - s + specials <= seq_len  # no window longer than seq_len
        covered[s:e] = True
    assert covered.all()  # every position in at least one window
    assert spans[-1][1] == n and spans[0][0] == 0
    stride = seq_len - overlap - specials
    for k in range(1, len(spans)):
        step = spans[k][0] - spans[k - 1][0]
        if k < len(spans) - 1:
            assert step == stride
        else:  # the last one advances by the stride or slides back to end at n
            assert step == stride or spans[k] == (n - body, n)
        assert spans[k][0] <= spans[k - 1][1]  # contiguous: no gap between windows
    if len(spans) > 1:
        s, e = spans[-1]
        assert e - s >= min(min_tail, body)  # no tiny tail window


def test_window_tail_slides_back():
    # 10 tokens, windows of 4, no overlap: 0-4, 4-8, then a 2-token tail below min_tail 3.
    assert window_spans(10, 4, 0, 3) == [(0, 4), (4, 8), (6, 10)]
    assert window_spans(10, 4, 0, 2) == [(0, 4), (4, 8), (8, 10)]
    assert window_spans(10, 4, 1, 1) == [(0, 4), (3, 7), (6, 10)]
    assert window_spans(3, 4, 0, 1) == [(0, 3)]


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 60), min_size=1, max_size=8),
    seq_len=st.integers(4, 24),
    data=st.data(),
)
def test_chunk_windows_are_contiguous_pieces_with_specials(lengths, seq_len, data):
    # Distinct token values, so a window's position in its document is unambiguous.
    docs = [list(range(1000 * i + 10, 1000 * i + 10 + n)) for i, n in enumerate(lengths)]
    spec = ChunkSpec(
        "window", seq_len, data.draw(st.integers(0, seq_len - 3)), 2, prefix=(1,), suffix=(2,)
    )
    batch = chunk_windows(spec, docs, list(range(len(docs))))
    offs = np.concatenate([[0], np.cumsum(batch.lengths)])
    seen = {i: np.zeros(len(d), bool) for i, d in enumerate(docs)}
    for k in range(len(batch)):
        w = batch.tokens[offs[k] : offs[k + 1]].tolist()
        assert len(w) <= seq_len and w[0] == 1 and w[-1] == 2
        body, doc = w[1:-1], docs[batch.doc_ids[k]]
        # A contiguous piece of its own document.
        starts = [i for i in range(len(doc) - len(body) + 1) if doc[i : i + len(body)] == body]
        assert starts
        seen[batch.doc_ids[k]][starts[0] : starts[0] + len(body)] = True
    assert all(v.all() for v in seen.values())
    assert batch.dropped == 0


def test_chunk_truncate_counts_dropped():
    spec = ChunkSpec("truncate", 5, prefix=(1,), suffix=(2,))
    batch = chunk_truncate(spec, [[10, 11, 12, 13, 14], [20]], [0, 1])
    assert batch.tokens.tolist() == [1, 10, 11, 12, 2, 1, 20, 2]
    assert batch.lengths.tolist() == [5, 3]
    assert batch.dropped == 2


# ---------------------------------------------------------------------- pack: properties
@settings(max_examples=300, deadline=None)
@given(
    docs=st.lists(st.lists(st.integers(1, 50), max_size=40), min_size=1, max_size=30),
    seq_len=st.integers(2, 33),
    keep=st.booleans(),
)
def test_pack_concatenation_and_boundaries(docs, seq_len, keep):
    eos = 0
    chunks, starts, owners, dropped = pack_documents(docs, seq_len, eos, keep_remainder=keep)
    stream = [t for d in docs for t in [*d, eos]]
    got = [t for c in chunks for t in c.tolist()]
    # Chunks concatenated == documents + EOS concatenated, minus only the counted remainder.
    assert got == stream[: len(got)]
    assert len(got) + dropped == len(stream)
    assert dropped < seq_len
    assert not keep or dropped == 0
    assert all(len(c) == seq_len for c in chunks[:-1])
    if chunks and not keep:
        assert len(chunks[-1]) == seq_len
    # Boundaries: the global positions where documents begin, within the stored tokens.
    doc_starts, pos = [], 0
    for d in docs:
        doc_starts.append(pos)
        pos += len(d) + 1
    expected = [p for p in doc_starts if p < len(got)]
    recorded = [k * seq_len + int(o) for k, s in enumerate(starts) for o in s]
    assert recorded == expected
    # Each chunk's doc_id is the document of its first token.
    for k, owner in enumerate(owners):
        first = k * seq_len
        assert owner == max(i for i, p in enumerate(doc_starts) if p <= first)


def test_pack_across_batches_matches_one_shot():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 100, rng.integers(0, 30)).tolist() for _ in range(50)]
    one, one_starts, one_owners, _ = pack_documents(docs, 16, 0)
    packer = Packer(16)
    chunks, owners, starts = [], [], []
    for lo in range(0, 50, 7):  # feed in uneven batches
        part = docs[lo : lo + 7]
        flat = np.array([t for d in part for t in [*d, 0]], dtype=np.int64)
        b = packer.add(flat, np.array([len(d) + 1 for d in part]), np.arange(lo, lo + len(part)))
        offs = np.concatenate([[0], np.cumsum(b.lengths)])
        so = np.concatenate([[0], np.cumsum(b.starts_counts)])
        for i in range(len(b)):
            chunks.append(b.tokens[offs[i] : offs[i + 1]].tolist())
            starts.append(b.starts[so[i] : so[i + 1]].tolist())
            owners.append(int(b.doc_ids[i]))
    assert chunks == [c.tolist() for c in one]
    assert starts == [s.tolist() for s in one_starts]
    assert owners == one_owners


def test_eval_split_is_deterministic_and_near_fraction():
    ids = [f"doc-{i}" for i in range(4000)]
    picked = [i for i in ids if in_eval(i, 0.1)]
    assert picked == [i for i in ids if in_eval(i, 0.1)]
    assert 320 < len(picked) < 480


def test_special_template_follows_the_post_processor():
    assert special_template(wordpiece_tokenizer()) == ((2,), (3,))
    assert special_template(bpe_tokenizer()) == ((), ())


# ---------------------------------------------------------------------------- the stage
def make_cfg(tmp_path: Path, **data) -> Config:
    chunk = data.pop("chunk", {})
    task = data.pop("task", "causal-lm")
    return Config.model_validate(
        {
            "run": {"output_dir": str(tmp_path / "run")},
            "model": {"task": task},
            "data": {"train": {"path": str(tmp_path / "train.jsonl")}, "chunk": chunk, **data},
        }
    )


@pytest.fixture(scope="module")
def bpe():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def wordpiece():
    return wordpiece_tokenizer()


def test_pack_store_holds_the_token_stream(tmp_path, bpe):
    write_jsonl(tmp_path / "train.jsonl", 60)
    cfg = make_cfg(tmp_path, chunk={"seq_len": 32, "remainder": "keep"})
    report = ensure_stores(cfg, bpe, progress=False)
    s = report.stores["train"]
    texts = [json.loads(x)["text"] for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    stream = [
        t for x in texts for t in [*bpe(x, add_special_tokens=False)["input_ids"], bpe.eos_token_id]
    ]
    got = np.concatenate([s[i]["input_ids"] for i in range(len(s))]).tolist()
    assert got == stream
    st_ = report.splits["train"]
    assert st_["tokens_in"] == len(stream) == st_["tokens_out"]
    assert st_["dropped_tokens"] == 0 and st_["documents"] == 60
    assert st_["chunks"] == len(s) == -(-len(stream) // 32)
    assert st_["pad_tokens"] == len(s) * 32 - len(stream)
    # doc_starts give the true document boundaries.
    bounds = np.cumsum(
        [0] + [len(bpe(x, add_special_tokens=False)["input_ids"]) + 1 for x in texts]
    )
    rec = [i * 32 + int(o) for i in range(len(s)) for o in s.doc_starts(i)]
    assert rec == bounds[:-1].tolist()
    assert s.meta["dtype"] == "uint16" and store_root(cfg) == tmp_path / "run" / "store"


def test_window_classification_store(tmp_path, wordpiece):
    write_jsonl(tmp_path / "train.jsonl", 40)
    cfg = make_cfg(
        tmp_path,
        task="sequence-classification",
        chunk={"seq_len": 16, "mode": "window", "overlap": 4},
    )
    report = ensure_stores(cfg, wordpiece, progress=False)
    s = report.stores["train"]
    assert s.label_names == ["a", "b", "c"]
    recs = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    names = doc_names(s)
    for i in range(len(s)):
        item = s[i]
        ids = item["input_ids"].tolist()
        assert ids[0] == wordpiece.cls_token_id and ids[-1] == wordpiece.sep_token_id
        assert len(ids) <= 16
        rec = recs[int(names[item["doc_id"]].rsplit(":", 1)[1]) - 1]
        assert s.label_names[item["label"]] == rec["label"]
    # The windows of one document are exactly its planned spans, framed by [CLS] [SEP].
    doc0 = [s[i]["input_ids"][1:-1].tolist() for i in range(len(s)) if s.doc_ids[i] == 0]
    full = wordpiece(recs[0]["text"], add_special_tokens=False)["input_ids"]
    min_tail = s.meta["chunk"]["min_tail"]
    assert doc0 == [full[a:b] for a, b in window_spans(len(full), 14, 4, min_tail)]
    assert report.splits["train"]["dropped_tokens"] == 0


def test_classification_pack_is_refused(tmp_path, wordpiece):
    write_jsonl(tmp_path / "train.jsonl", 5)
    cfg = make_cfg(tmp_path, task="sequence-classification", chunk={"seq_len": 16})
    with pytest.raises(ConfigError, match="pack"):
        ensure_stores(cfg, wordpiece, progress=False)


def test_eval_fraction_never_shares_documents(tmp_path, bpe):
    write_jsonl(tmp_path / "train.jsonl", 200)
    cfg = make_cfg(tmp_path, eval_fraction=0.2, chunk={"seq_len": 16, "mode": "truncate"})
    report = ensure_stores(cfg, bpe, progress=False)
    train, ev = doc_names(report.stores["train"]), doc_names(report.stores["eval"])
    assert not set(train) & set(ev)
    assert len(train) + len(ev) == 200 and 15 < len(ev) < 70
    assert all(in_eval(n, 0.2) for n in ev)


def test_eval_label_unknown_to_train_is_an_error(tmp_path, wordpiece):
    write_jsonl(tmp_path / "train.jsonl", 10, labels=("a", "b"))
    write_jsonl(tmp_path / "eval.jsonl", 10, labels=("a", "zebra"))
    cfg = make_cfg(
        tmp_path,
        task="sequence-classification",
        eval={"path": str(tmp_path / "eval.jsonl")},
        chunk={"seq_len": 16, "mode": "truncate"},
    )
    with pytest.raises(LLMTrainError, match=r"eval.jsonl:2: label 'zebra'"):
        ensure_stores(cfg, wordpiece, progress=False)
    assert not (tmp_path / "run" / "store" / "eval").exists()


def test_eval_store_uses_train_label_map(tmp_path, wordpiece):
    write_jsonl(tmp_path / "train.jsonl", 12, labels=("x", "a", "m"))
    write_jsonl(tmp_path / "eval.jsonl", 6, labels=("m",))
    cfg = make_cfg(
        tmp_path,
        task="sequence-classification",
        eval={"path": str(tmp_path / "eval.jsonl")},
        chunk={"seq_len": 16, "mode": "truncate"},
    )
    r = ensure_stores(cfg, wordpiece, progress=False)
    assert r.stores["eval"].label_names == ["a", "m", "x"]
    assert set(r.stores["eval"].labels.tolist()) == {1}


def test_deterministic_reuse_and_force(tmp_path, bpe):
    write_jsonl(tmp_path / "train.jsonl", 80)
    cfg = make_cfg(tmp_path, chunk={"seq_len": 24})
    path = store_root(cfg) / "train"
    first = ensure_stores(cfg, bpe, progress=False)
    assert not first.up_to_date
    files = {p.name: p.read_bytes() for p in path.iterdir()}
    again = ensure_stores(cfg, bpe, progress=False)
    assert again.up_to_date and again.splits["train"]["up_to_date"]
    assert again.splits["train"]["chunks"] == first.splits["train"]["chunks"]
    forced = ensure_stores(cfg, bpe, force=True, progress=False)
    assert not forced.up_to_date
    for name in ("tokens.bin", "index.npy", "doc_ids.npy", "starts.npy", "starts_index.npy"):
        assert (path / name).read_bytes() == files[name], name
    # A changed setting makes the store stale: rebuilt, not reused.
    cfg2 = make_cfg(tmp_path, chunk={"seq_len": 20})
    assert not ensure_stores(cfg2, bpe, progress=False).up_to_date
    assert TokenStore.open(path).meta["chunk"]["seq_len"] == 20


def test_damaged_store_is_reported_not_rebuilt(tmp_path, bpe):
    write_jsonl(tmp_path / "train.jsonl", 30)
    cfg = make_cfg(tmp_path, chunk={"seq_len": 24})
    ensure_stores(cfg, bpe, progress=False)
    tokens = store_root(cfg) / "train" / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-6])
    with pytest.raises(LLMTrainError, match=r"tokens\.bin.*--force"):
        ensure_stores(cfg, bpe, progress=False)
    assert not ensure_stores(cfg, bpe, force=True, progress=False).up_to_date


def test_window_overlap_too_large_for_specials(tmp_path, wordpiece):
    write_jsonl(tmp_path / "train.jsonl", 5)
    cfg = make_cfg(
        tmp_path,
        task="sequence-classification",
        chunk={"seq_len": 8, "mode": "window", "overlap": 6},
    )
    with pytest.raises(ConfigError, match=r"data\.chunk\.overlap"):
        ensure_stores(cfg, wordpiece, progress=False)
