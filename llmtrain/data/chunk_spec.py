"""The ChunkSpec of a run: chunk settings from the config plus the tokenizer's special tokens.

`resolve_spec` is the one place a chunk config meets a tokenizer: it reads the special-token
template off the tokenizer's own post-processor (classification) or its EOS (causal-lm), and
refuses settings that cannot work with a ConfigError (docs/architecture.md, "Token store").
The tokenizer is duck-typed, so this module never imports transformers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from llmtrain.config import Config
from llmtrain.data.chunking import ChunkSpec
from llmtrain.errors import ConfigError, LLMTrainError


@contextmanager
def raw_backend(tok: Any) -> Iterator[Any]:
    """The tokenizer's Rust backend with truncation and padding off, restored on exit.

    Chunking must never truncate or pad (some tokenizer.json files ship with truncation and
    padding at 128 or 512). Toggling them in place is what transformers itself does on every
    call, and is free, where copying the backend costs a serialisation round trip.
    """
    backend = tok.backend_tokenizer
    truncation, padding = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        yield backend
    finally:
        if truncation is not None:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**padding)


def special_template(tok: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prefix, suffix) special ids the tokenizer adds around a single sequence.

    Read off the tokenizer's own post-processor (encode a probe text with and without
    specials), so it is right for BERT's [CLS] x [SEP], RoBERTa's <s> x </s>, Llama's <s> x ...
    """
    probe = "hello world 1 2 3"
    with raw_backend(tok) as backend:
        plain = backend.encode(probe, add_special_tokens=False).ids
        full = backend.encode(probe, add_special_tokens=True).ids
    n = len(plain)
    for i in range(len(full) - n + 1):
        if full[i : i + n] == plain:
            return tuple(full[:i]), tuple(full[i + n :])
    raise LLMTrainError("tokenizer: cannot locate the text inside its special-token template")


def _framing(cfg: Config, tok: Any) -> tuple[tuple[int, ...], tuple[int, ...], int | None]:
    """(prefix, suffix, eos_id): specials around each classification chunk, or the EOS that
    ends each causal-lm document (then no prefix/suffix)."""
    if cfg.model.task == "sequence-classification":
        if cfg.data.chunk.mode == "pack":
            raise ConfigError(
                "data.chunk.mode: pack mixes documents in one chunk, which has no single label; "
                "use window or truncate for sequence-classification"
            )
        prefix, suffix = special_template(tok)
        if not prefix and not suffix and tok.cls_token_id is not None:
            # A post-processor without a template: frame windows like BERT so a [CLS] exists.
            prefix, suffix = (tok.cls_token_id,), (tok.sep_token_id,)
        return prefix, suffix, None
    if tok.eos_token_id is None:
        raise LLMTrainError("tokenizer: has no eos_token, needed to separate documents")
    return (), (), tok.eos_token_id


def resolve_spec(cfg: Config, tok: Any) -> ChunkSpec:
    """The ChunkSpec for this config and tokenizer; a config that cannot work is a ConfigError.

    Guarantees `body_len >= 1`, and in window mode `overlap < body_len` (windows advance).
    """
    ch = cfg.data.chunk
    prefix, suffix, eos = _framing(cfg, tok)
    spec = ChunkSpec(
        mode=ch.mode,
        seq_len=ch.seq_len,
        overlap=ch.overlap,
        min_tail=ch.min_tail if ch.min_tail is not None else max(1, ch.seq_len // 4),
        keep_remainder=ch.remainder == "keep",
        eos_id=eos,
        prefix=prefix,
        suffix=suffix,
    )
    if spec.body_len < 1:
        raise ConfigError(
            f"data.chunk.seq_len: {ch.seq_len} leaves no room next to the tokenizer's "
            f"{spec.specials} special tokens"
        )
    if ch.mode == "window" and ch.overlap >= spec.body_len:
        raise ConfigError(
            f"data.chunk.overlap: {ch.overlap} must be below seq_len minus special tokens "
            f"({ch.seq_len} - {spec.specials} = {spec.body_len}) so windows advance"
        )
    return spec
