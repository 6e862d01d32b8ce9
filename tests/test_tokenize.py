"""The tokenize stage: local tokenizers, training by config, the cache, special tokens."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llmtrain.config import Config
from llmtrain.data import tokenizer as tokenize
from llmtrain.data.tokenizer import (
    FINGERPRINT_FILE,
    ensure_special_tokens,
    load_tokenizer,
    special_token_ids,
    tokenizer_fingerprint,
)
from llmtrain.errors import LLMTrainError

ROUND_TRIP = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\nand   runs   of  spaces",
    "ünïcödé — naïve café, Größe, ½ ≠ ∞",
    "日本語のテキスト 中文 한국어",
    "emoji 🤖🚀 and a zero-width\u200bjoiner",
    "don't stop . , ; : ' \" ( ) [ ] { }",
    "",
]


def word_corpus(path: Path, n_bytes: int, seed: int = 0) -> Path:
    """A word-like synthetic corpus: random words from a fixed vocabulary, in sentences."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "dan", "tor", "el", "qu"]
    vocab = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)]
    lines, size = [], 0
    while size < n_bytes:
        words = rng.choices(vocab, k=rng.randint(5, 20))
        words[0] = words[0].capitalize()
        line = " ".join(words) + rng.choice([".", "!", "?", ","]) + "\n"
        lines.append(line)
        size += len(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
    return path


def cfg_for(tmp_path: Path, data: str, task: str = "causal-lm", **tok) -> Config:
    return Config.model_validate(
        {
            "run": {"output_dir": str(tmp_path / "run")},
            "model": {"task": task},
            "tokenizer": tok,
            "data": {"train": {"path": data}},
        }
    )


@pytest.fixture(scope="module")
def corpus_1mb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return word_corpus(tmp_path_factory.mktemp("c") / "corpus.txt", 1_000_000)


# ---------------------------------------------------------------------------- training
def test_bpe_trains_under_5s_and_round_trips_exactly(tmp_path: Path, corpus_1mb: Path) -> None:
    cfg = cfg_for(tmp_path, str(corpus_1mb), train={"kind": "bpe", "vocab_size": 4096})
    start = time.perf_counter()
    tok = load_tokenizer(cfg)
    assert time.perf_counter() - start < 5.0
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert 1000 < len(tok) <= 4096  # merges were learned; specials were not added on top
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.eos_token_id != tok.pad_token_id
    sample = corpus_1mb.read_text()[:5000]
    for text in [*ROUND_TRIP, sample]:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        assert tok.decode(ids) == text
    # Learned merges compress the corpus's words: far fewer tokens than bytes.
    assert len(tok(sample)["input_ids"]) < len(sample.encode()) / 3
    # The cached copy round-trips just the same (decode settings are saved too).
    cached = load_tokenizer(cfg)
    assert all(cached.decode(cached(t)["input_ids"]) == t for t in ROUND_TRIP)
    assert tokenizer_fingerprint(cached) == tokenizer_fingerprint(tok)


def test_bpe_for_classification_wraps_with_cls_sep(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    rows = [
        {"text": f"sample number {i} is {'good' if i % 2 else 'bad'}", "label": i % 2}
        for i in range(50)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cfg_for(
        tmp_path, str(data), "sequence-classification", train={"kind": "bpe", "vocab_size": 300}
    )
    tok = load_tokenizer(cfg)
    roles = special_token_ids(tok)
    assert {"cls_token", "sep_token", "pad_token"} <= set(roles)
    assert len(set(roles.values())) == len(roles)
    ids = tok("sample 3")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.decode(ids[1:-1]) == "sample 3"


def test_wordpiece_has_bert_specials(tmp_path: Path) -> None:
    data = word_corpus(tmp_path / "w.txt", 50_000)
    cfg = cfg_for(
        tmp_path,
        str(data),
        "sequence-classification",
        train={"kind": "wordpiece", "vocab_size": 500, "min_frequency": 1},
    )
    tok = load_tokenizer(cfg)
    assert (tok.cls_token, tok.sep_token, tok.pad_token, tok.unk_token, tok.mask_token) == (
        "[CLS]",
        "[SEP]",
        "[PAD]",
        "[UNK]",
        "[MASK]",
    )
    enc = tok("Kalo Mine!")["input_ids"]
    assert enc[0] == tok.cls_token_id and enc[-1] == tok.sep_token_id
    assert tok.decode(enc, skip_special_tokens=True) == "kalo mine!"  # lowercased


def test_wordpiece_for_causal_lm_uses_sep_as_eos(tmp_path: Path) -> None:
    data = word_corpus(tmp_path / "w.txt", 20_000)
    cfg = cfg_for(tmp_path, str(data), train={"kind": "wordpiece", "vocab_size": 300})
    tok = load_tokenizer(cfg)
    assert tok.eos_token == "[SEP]" and tok.pad_token == "[PAD]"


# ------------------------------------------------------------------------------- cache
def test_cache_is_reused_and_retrained_when_inputs_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "c"
    word_corpus(corpus / "a.txt", 30_000, seed=1)
    calls: list[int] = []
    real = tokenize.train_tokenizer

    def counting(cfg, train):
        calls.append(1)
        return real(cfg, train)

    monkeypatch.setattr(tokenize, "train_tokenizer", counting)
    cfg = cfg_for(tmp_path, str(corpus), train={"kind": "bpe", "vocab_size": 400})
    first = load_tokenizer(cfg)
    saved = tmp_path / "run" / "tokenizer"
    assert (saved / "tokenizer.json").is_file() and (saved / FINGERPRINT_FILE).is_file()
    mtime = (saved / "tokenizer.json").stat().st_mtime_ns
    second = load_tokenizer(cfg)
    assert len(calls) == 1
    assert (saved / "tokenizer.json").stat().st_mtime_ns == mtime
    assert tokenizer_fingerprint(second) == tokenizer_fingerprint(first)

    # A new file in the corpus folder: retrained, and the new text shapes the vocabulary.
    (corpus / "b.txt").write_text("zyzzyva quixotic " * 2000)
    third = load_tokenizer(cfg)
    assert len(calls) == 2
    assert "zyzzyva" in "".join(third.convert_ids_to_tokens(third("zyzzyva")["input_ids"]))
    assert len(third("zyzzyva")["input_ids"]) < len(first("zyzzyva")["input_ids"])

    # Different settings or task: retrained; same again: reused.
    load_tokenizer(cfg_for(tmp_path, str(corpus), train={"kind": "bpe", "vocab_size": 500}))
    assert len(calls) == 3
    load_tokenizer(
        cfg_for(
            tmp_path,
            str(corpus),
            "sequence-classification",
            train={"kind": "bpe", "vocab_size": 500},
        )
    )
    assert len(calls) == 4
    load_tokenizer(
        cfg_for(
            tmp_path,
            str(corpus),
            "sequence-classification",
            train={"kind": "bpe", "vocab_size": 500},
        )
    )
    assert len(calls) == 4
    leftovers = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert leftovers == ["tokenizer"]  # no temp dirs, no lock file left behind


def test_damaged_cache_is_retrained(tmp_path: Path) -> None:
    data = word_corpus(tmp_path / "a.txt", 20_000)
    cfg = cfg_for(tmp_path, str(data), train={"kind": "bpe", "vocab_size": 300})
    tok = load_tokenizer(cfg)
    (tmp_path / "run" / "tokenizer" / "tokenizer.json").write_text("{broken")
    again = load_tokenizer(cfg)
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)


# ----------------------------------------------------------------------- local tokenizers
def bare_backend(specials: list[str]) -> Tokenizer:
    vocab = {t: i for i, t in enumerate([*specials, "a", "b", "c", "ab"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    return backend


def test_bare_tokenizer_json_roles_recognised_and_pad_added(tmp_path: Path) -> None:
    bare_backend(["<|endoftext|>"]).save(str(tmp_path / "tokenizer.json"))
    cfg = cfg_for(tmp_path, "unused.txt", path=str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(cfg)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == 5
    assert len(tok) == 6
    assert tok("a b ab")["input_ids"] == [1, 2, 4]


def test_local_directory_gets_missing_specials_per_task(tmp_path: Path) -> None:
    wrapped = PreTrainedTokenizerFast(tokenizer_object=bare_backend(["</s>"]), eos_token="</s>")
    wrapped.save_pretrained(str(tmp_path / "tok"))
    causal = load_tokenizer(cfg_for(tmp_path, "x.txt", path=str(tmp_path / "tok")))
    assert (causal.eos_token, causal.pad_token, len(causal)) == ("</s>", "<|pad|>", 6)
    clf = load_tokenizer(
        cfg_for(tmp_path, "x.txt", "sequence-classification", path=str(tmp_path / "tok"))
    )
    assert (clf.cls_token, clf.sep_token, clf.pad_token) == ("<|cls|>", "<|sep|>", "<|pad|>")
    assert len(clf) == 8
    assert tokenizer_fingerprint(clf) != tokenizer_fingerprint(causal)


def test_ensure_special_tokens_adds_only_what_is_missing() -> None:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bare_backend(["[CLS]", "[SEP]"]), cls_token="[CLS]", sep_token="[SEP]"
    )
    assert ensure_special_tokens(tok, "sequence-classification") == ["pad_token"]
    assert ensure_special_tokens(tok, "sequence-classification") == []
    assert ensure_special_tokens(tok, "causal-lm") == ["eos_token"]
    assert special_token_ids(tok) == {
        "eos_token": 7,
        "pad_token": 6,
        "cls_token": 0,
        "sep_token": 1,
    }


@pytest.mark.parametrize("hub_id", ["gpt2", "openai-community/gpt2"])
def test_hub_id_gets_one_clear_message(tmp_path: Path, hub_id: str, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LLMTrainError) as e:
        load_tokenizer(cfg_for(tmp_path, "x.txt", path=hub_id))
    assert str(e.value) == (
        f"tokenizer.path '{hub_id}' is not a local directory; llmtrain never downloads — point "
        "tokenizer.path at a local directory (e.g. one saved with save_pretrained)"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"^tokenizer.path '.*nope/tok' does not exist$"),
        ("{broken", r"^tokenizer.path '.*tokenizer.json': not a valid tokenizer.json"),
    ],
)
def test_bad_local_paths(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "nope" / "tok"
    if content is not None:
        path = tmp_path / "tokenizer.json"
        path.write_text(content)
    with pytest.raises(LLMTrainError, match=message):
        load_tokenizer(cfg_for(tmp_path, "x.txt", path=str(path)))


def test_directory_without_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(LLMTrainError, match=r"^tokenizer.path '.*empty': cannot load"):
        load_tokenizer(cfg_for(tmp_path, "x.txt", path=str(tmp_path / "empty")))


def test_no_tokenizer_configured(tmp_path: Path) -> None:
    with pytest.raises(LLMTrainError, match=r"set tokenizer.path .* or tokenizer.train"):
        load_tokenizer(cfg_for(tmp_path, "x.txt"))
