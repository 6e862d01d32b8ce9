"""Tokenizers trained in memory, a labelled JSONL corpus and a store's document names, shared
by the chunking, store, inputs and SFT tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llmtrain.data.store import TokenStore

WORDS = "the cat sat on a mat while dogs ran far away from home and the sun set slowly".split()  # noqa: SIM905


def doc_names(store: TokenStore) -> list[str]:
    """Corpus ids of a store's documents, indexed by doc_id (doc_names.txt, one JSON a line)."""
    with open(store.path / "doc_names.txt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with an end-of-text token, as a causal LM would use."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece whose post-processor frames a sequence as [CLS] x [SEP]."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    # A shipped truncation/padding setting must not leak into chunking.
    tok.enable_truncation(8)
    tok.enable_padding(length=8)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )


def write_jsonl(path: Path, n: int, *, labels=("a", "b", "c"), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = rng.choice(WORDS, size=int(rng.integers(1, 120)))
            rec = {"id": f"d{i}", "text": " ".join(words), "label": labels[i % len(labels)]}
            f.write(json.dumps(rec) + "\n")
    return path
