"""TokenStore: writer → reader round trip, dtypes, labels, atomic replace, damage detection."""

from __future__ import annotations

import json

import numpy as np
import pytest
from chunk_helpers import doc_names

from llmtrain.data.store import TokenStore, TokenStoreWriter
from llmtrain.errors import LLMTrainError


def build(path, vocab_size=1000, labels=("b", "a", None), verify=False):
    """Three chunks from two appends: [1 2 3] [4 5] | [6 7 8 9], with doc starts."""
    w = TokenStoreWriter(path, vocab_size=vocab_size, meta={"fingerprint": "x"})
    d0, d1, d2 = (w.add_document(n) for n in ("doc-0", "doc:1", 'odd "name"\nline'))
    lab = [w.label_id(x) for x in labels]
    w.append(np.array([1, 2, 3, 4, 5]), [3, 2], [d0, d1], lab[:2], [0, 2, 0], [2, 1])
    w.append(np.array([6, 7, 8, vocab_size - 1]), [4], [d2], lab[2:])
    return w.close(stats={"chunks": 3})


def test_round_trip(tmp_path):
    s = build(tmp_path / "st")
    assert len(s) == 3 and s.num_tokens == 9
    assert s[0]["input_ids"].tolist() == [1, 2, 3]
    assert s[0]["input_ids"].dtype == np.int64
    item = s[1]
    assert set(item) == {"input_ids", "doc_id", "label"}
    assert item["doc_id"] == 1 and item["label"] == 0
    assert s[1]["input_ids"].tolist() == [4, 5]
    assert s[2]["input_ids"].tolist() == [6, 7, 8, 999]
    # Labels are remapped to the sorted label set; -1 where there is none.
    assert s.label_names == ["a", "b"]
    assert s.labels.tolist() == [1, 0, -1] and s[2]["label"] == -1
    assert s.lengths.tolist() == [3, 2, 4] and s.doc_ids.tolist() == [0, 1, 2]
    assert s.doc_starts(0).tolist() == [0, 2] and s.doc_starts(1).tolist() == [0]
    assert s.doc_starts(2).tolist() == [0] and s.doc_starts(-1).tolist() == [0]
    assert doc_names(s) == ["doc-0", "doc:1", 'odd "name"\nline']
    assert [s[i]["input_ids"].tolist() for i in (2, 0)] == [[6, 7, 8, 999], [1, 2, 3]]
    assert s.meta["dtype"] == "uint16" and s.meta["stats"] == {"chunks": 3}
    assert (tmp_path / "st" / "tokens.bin").stat().st_size == 9 * 2
    TokenStore.open(tmp_path / "st", verify=True)
    assert not list(tmp_path.glob(".tmp-st-*"))


def test_wide_vocab_uses_uint32(tmp_path):
    s = build(tmp_path / "st", vocab_size=70000)
    assert s.meta["dtype"] == "uint32" and s[2]["input_ids"].tolist()[-1] == 69999


def test_no_labels_gives_none(tmp_path):
    s = build(tmp_path / "st", labels=(None, None, None))
    assert s.label_names is None and s[0]["label"] is None
    assert s.labels.tolist() == [-1, -1, -1]


def test_fixed_label_map_rejects_unknown(tmp_path):
    w = TokenStoreWriter(tmp_path / "st", vocab_size=10)
    w.append(np.array([1]), [1], [w.add_document("d")], [w.label_id("zebra")])
    with pytest.raises(LLMTrainError, match="label 'zebra' does not occur in the training data"):
        w.close(label_names=["cat", "dog"])
    assert not (tmp_path / "st").exists() and not list(tmp_path.iterdir())


def test_replacing_a_store_is_atomic(tmp_path):
    build(tmp_path / "st")
    w = TokenStoreWriter(tmp_path / "st", vocab_size=10)
    w.append(np.array([9, 9]), [2], [w.add_document("new")], [-1])
    # Until close() the old store is what readers see.
    assert len(TokenStore.open(tmp_path / "st")) == 3
    s = w.close()
    assert len(s) == 1 and s[0]["input_ids"].tolist() == [9, 9]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st"]


def test_abort_leaves_old_store(tmp_path):
    build(tmp_path / "st")
    w = TokenStoreWriter(tmp_path / "st", vocab_size=10)
    w.append(np.array([9]), [1], [0], [-1])
    w.abort()
    assert len(TokenStore.open(tmp_path / "st")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st"]


def test_empty_store(tmp_path):
    w = TokenStoreWriter(tmp_path / "st", vocab_size=10)
    s = w.close()
    assert len(s) == 0 and s.num_tokens == 0


def _damage_truncate(p):
    t = p / "tokens.bin"
    t.write_bytes(t.read_bytes()[:-2])


def _damage_meta_count(p):
    (p / ".llmtrain").unlink()  # a store of before marks: only the structural checks
    m = json.loads((p / "meta.json").read_text())
    m["num_chunks"] = 5
    (p / "meta.json").write_text(json.dumps(m))


def _damage_meta_json(p):
    (p / ".llmtrain").unlink()  # a store of before marks: only the structural checks
    (p / "meta.json").write_text("{not json")


def _damage_version(p):
    (p / ".llmtrain").unlink()  # a store of before marks: only the structural checks
    m = json.loads((p / "meta.json").read_text())
    m["format_version"] = 99
    (p / "meta.json").write_text(json.dumps(m))


def _damage_index(p):
    (p / "index.npy").write_bytes(b"garbage" * 20)


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (_damage_truncate, r"tokens\.bin: 16 bytes, meta\.json says 18"),
        (_damage_meta_count, r"index\.npy: shape \(3, 2\), meta\.json implies \(5, 2\)"),
        (_damage_meta_json, r"meta\.json: not valid JSON"),
        (_damage_version, r"format_version 99"),
        (lambda p: (p / "labels.npy").unlink(), r"labels\.npy: missing"),
        (lambda p: (p / "meta.json").unlink(), r"meta\.json: missing"),
        (_damage_index, r"index\.npy: \d+ bytes, meta\.json says"),
    ],
)
def test_damaged_store_is_one_line_error(tmp_path, damage, pattern):
    build(tmp_path / "st")
    damage(tmp_path / "st")
    with pytest.raises(LLMTrainError, match=pattern) as e:
        TokenStore.open(tmp_path / "st")
    assert "\n" not in str(e.value) and str(tmp_path / "st") in str(e.value)


def test_verify_catches_same_size_corruption(tmp_path):
    build(tmp_path / "st")
    t = tmp_path / "st" / "tokens.bin"
    data = bytearray(t.read_bytes())
    data[0] ^= 0xFF
    t.write_bytes(bytes(data))
    TokenStore.open(tmp_path / "st")  # sizes still agree
    with pytest.raises(LLMTrainError, match="checksum mismatch"):
        TokenStore.open(tmp_path / "st", verify=True)


def test_missing_store(tmp_path):
    with pytest.raises(LLMTrainError, match="no token store here"):
        TokenStore.open(tmp_path / "nope")


def test_append_rejects_ids_outside_the_vocabulary(tmp_path):
    w = TokenStoreWriter(tmp_path / "st", vocab_size=100)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        w.append(np.array([5, 100]), [2], [0], [-1])
    with pytest.raises(ValueError, match="lengths sum to 3"):
        w.append(np.array([5, 6]), [3], [0], [-1])
    w.abort()
