"""Chunking: token-id sequences cut into chunks of at most `seq_len`, in three modes.

Pure functions on token ids (numpy only; no tokenizer, no files), so each one is tested
property by property (docs/architecture.md, "Token store"):

- `window_spans` / `chunk_windows` (window): each document alone, framed by the tokenizer's
  specials; every token lands in at least one window and no window exceeds `seq_len`.
- `chunk_truncate` (truncate): one chunk per document, its first `seq_len` tokens with the
  specials; whatever is cut off is counted in `dropped`.
- `Packer` (pack): documents (each ending in EOS) concatenated and cut into full `seq_len`
  chunks; the concatenation of the chunks is the token stream, minus only the final remainder.
- `in_eval`: the deterministic train/eval hold-out by document id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChunkSpec:
    """Everything the chunking functions need, resolved from config and tokenizer.

    `prefix`/`suffix` are the special tokens the tokenizer's post-processor puts around one
    sequence (e.g. [CLS] … [SEP]); empty for causal-lm, whose documents end with `eos_id`.
    Invariant (checked by `chunk_spec.resolve_spec`): `body_len >= 1`.
    """

    mode: str
    seq_len: int
    overlap: int = 0
    min_tail: int = 1
    keep_remainder: bool = False
    eos_id: int | None = None
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()

    @property
    def specials(self) -> int:
        return len(self.prefix) + len(self.suffix)

    @property
    def body_len(self) -> int:
        """Document tokens that fit in one chunk next to the specials."""
        return self.seq_len - self.specials


@dataclass
class ChunkBatch:
    """Chunks ready for `TokenStoreWriter.append`: flat tokens cut by `lengths`.

    Invariant: `sum(lengths) == len(tokens)` and `len(doc_ids) == len(lengths)`.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    doc_ids: np.ndarray
    starts: np.ndarray | None = None  # pack: doc starts inside chunks (flat)
    starts_counts: np.ndarray | None = None  # pack: how many of `starts` per chunk
    dropped: int = 0
    loss_mask: np.ndarray | None = None  # instruction data: True per target token, as tokens
    cut: int = 0  # conversations longer than seq_len, split across chunks

    def __len__(self) -> int:
        return len(self.lengths)


# ------------------------------------------------------------------------------- window
def window_spans(n: int, body_len: int, overlap: int, min_tail: int) -> list[tuple[int, int]]:
    """[start, end) spans covering tokens 0..n in windows of at most `body_len` tokens.

    Starts advance by `body_len - overlap`; a final window of fewer than `min_tail` tokens
    slides back to end at n (a full window overlapping more). An empty document still gets
    one (empty) window so it is represented (classification: specials only).
    """
    if n <= body_len:
        return [(0, n)]
    stride = body_len - overlap
    spans = []
    start = 0
    while start + body_len < n:
        spans.append((start, start + body_len))
        start += stride
    if n - start < min_tail:
        start = n - body_len
    spans.append((start, n))
    return spans


def chunk_windows(
    spec: ChunkSpec, docs: Sequence[Sequence[int]], doc_ids: Sequence[int]
) -> ChunkBatch:
    """Window mode: each document alone, framed by the specials, every token in some window."""
    out: list[int] = []
    lengths: list[int] = []
    owners: list[int] = []
    prefix, suffix, body = list(spec.prefix), list(spec.suffix), spec.body_len
    for ids, doc in zip(docs, doc_ids, strict=True):
        for s, e in window_spans(len(ids), body, spec.overlap, spec.min_tail):
            out += prefix
            out += ids[s:e]
            out += suffix
            lengths.append(e - s + len(prefix) + len(suffix))
            owners.append(doc)
    return ChunkBatch(
        np.array(out, dtype=np.int64), np.array(lengths, np.int64), np.array(owners, np.int64)
    )


# ----------------------------------------------------------------------------- truncate
def chunk_truncate(
    spec: ChunkSpec, docs: Sequence[Sequence[int]], doc_ids: Sequence[int]
) -> ChunkBatch:
    """Truncate mode: one chunk per document, its first tokens up to seq_len with specials."""
    out: list[int] = []
    lengths: list[int] = []
    prefix, suffix, body = list(spec.prefix), list(spec.suffix), spec.body_len
    dropped = 0
    for ids in docs:
        kept = ids[:body]
        dropped += len(ids) - len(kept)
        out += prefix
        out += kept
        out += suffix
        lengths.append(len(kept) + len(prefix) + len(suffix))
    return ChunkBatch(
        np.array(out, dtype=np.int64),
        np.array(lengths, np.int64),
        np.asarray(doc_ids, dtype=np.int64),
        dropped=dropped,
    )


# --------------------------------------------------------------------------------- pack
class Packer:
    """Pack mode: a stream of documents (each already ending in EOS) cut into seq_len chunks.

    Only the carry-over (< seq_len tokens) is kept between batches, so feeding documents in
    any batching gives the same chunks. Each chunk's doc_id is the document of its first token;
    `starts` records where documents begin inside chunks.
    """

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.carry = np.zeros(0, dtype=np.int64)
        self.carry_starts = np.zeros(0, dtype=np.int64)  # offsets in carry where docs begin
        self.carry_docs = np.zeros(0, dtype=np.int64)  # the doc beginning at each of those
        self.head_doc = -1  # doc of carry[0] when it began in an earlier chunk

    def add(self, flat: np.ndarray, lengths: np.ndarray, doc_ids: np.ndarray) -> ChunkBatch:
        """Append documents (concatenated in `flat`, cut by `lengths`); return full chunks."""
        lengths = np.asarray(lengths, dtype=np.int64)
        offsets = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths):
            np.cumsum(lengths[:-1], out=offsets[1:])
        base = len(self.carry)
        tokens = np.concatenate([self.carry, np.asarray(flat, dtype=np.int64)])
        starts = np.concatenate([self.carry_starts, offsets + base])
        docs = np.concatenate([self.carry_docs, np.asarray(doc_ids, dtype=np.int64)])
        return self._cut(tokens, starts, docs, final=False)

    def finish(self) -> tuple[ChunkBatch, int]:
        """(the remainder as one short chunk, its token count); the caller keeps or drops it."""
        n = len(self.carry)
        return self._cut(self.carry, self.carry_starts, self.carry_docs, final=True), n

    def _cut(
        self, tokens: np.ndarray, starts: np.ndarray, docs: np.ndarray, *, final: bool
    ) -> ChunkBatch:
        L = self.seq_len
        n_full = len(tokens) // L
        if final:
            n_full = 1 if len(tokens) else 0
        cut = min(n_full * L, len(tokens))
        chunk_starts = np.arange(n_full, dtype=np.int64) * L
        # Doc of each chunk's first token: the last document start at or before it.
        which = np.searchsorted(starts, chunk_starts, side="right") - 1
        owner = np.concatenate([[self.head_doc], docs])[which + 1]
        inside = int(np.searchsorted(starts, cut, side="left"))
        in_starts = starts[:inside]
        chunk_of = in_starts // L
        batch = ChunkBatch(
            tokens=tokens[:cut],
            lengths=np.minimum(L, cut - chunk_starts).astype(np.int64),
            doc_ids=owner.astype(np.int64),
            starts=(in_starts - chunk_of * L),
            starts_counts=np.bincount(chunk_of, minlength=n_full).astype(np.int64),
        )
        if final:
            self.carry = tokens[:0]
            self.carry_starts = starts[:0]
            self.carry_docs = docs[:0]
            return batch
        # Keep the remainder, and remember which document its first token belongs to.
        if cut < len(tokens):
            w = int(np.searchsorted(starts, cut, side="right")) - 1
            self.head_doc = int(docs[w]) if w >= 0 else self.head_doc
        self.carry = tokens[cut:].copy()
        self.carry_starts = starts[inside:] - cut
        self.carry_docs = docs[inside:].copy()
        return batch


# ------------------------------------------------------------------ pack: conversations
class ConversationPacker:
    """Pack mode for conversations: each one whole in a chunk, never split across two unless it
    is longer than `seq_len`.

    Conversations go in order into the open chunk while they fit; one that does not fit closes
    it (a chunk shorter than seq_len: collate pads it, the padding is counted) and opens the
    next. One longer than seq_len is cut into seq_len pieces, counted in `cut`; its last piece
    stays open for the following conversations. `starts` marks each conversation's first token
    (a piece that continues one has none at 0), so collate restarts positions there.
    Invariant: the concatenation of all chunks is the concatenation of all conversations.
    """

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.parts: list[tuple[np.ndarray, np.ndarray, int, bool]] = []  # ids, mask, doc, starts
        self.fill = 0
        self.chunks: list[list[tuple[np.ndarray, np.ndarray, int, bool]]] = []

    def add(
        self, convs: Sequence[Sequence[int]], masks: Sequence[np.ndarray], doc_ids: Sequence[int]
    ) -> ChunkBatch:
        """Add encoded conversations; returns the chunks they closed."""
        cut = 0
        for ids, mask, doc in zip(convs, masks, doc_ids, strict=True):
            ids, mask = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)
            if self.fill + len(ids) > self.seq_len:
                self._close()
            cut += len(ids) > self.seq_len
            first = True
            while len(ids) > self.seq_len:  # a long conversation alone, seq_len at a time
                self.parts.append((ids[: self.seq_len], mask[: self.seq_len], int(doc), first))
                self.fill, first = self.seq_len, False
                ids, mask = ids[self.seq_len :], mask[self.seq_len :]
                self._close()
            self.parts.append((ids, mask, int(doc), first))
            self.fill += len(ids)
        batch = self._emit()
        batch.cut = cut
        return batch

    def finish(self) -> ChunkBatch:
        """The open chunk, if it holds anything (kept: every chunk is a partial one here)."""
        self._close()
        return self._emit()

    def _close(self) -> None:
        if self.parts:
            self.chunks.append(self.parts)
        self.parts, self.fill = [], 0

    def _emit(self) -> ChunkBatch:
        chunks, self.chunks = self.chunks, []
        pieces = [p for chunk in chunks for p in chunk]
        starts: list[int] = []
        counts: list[int] = []
        for chunk in chunks:
            offsets = np.cumsum([0] + [len(p[0]) for p in chunk[:-1]])
            begun = [int(o) for o, p in zip(offsets, chunk, strict=True) if p[3]]
            starts += begun
            counts.append(len(begun))
        flat = np.concatenate([p[0] for p in pieces]) if pieces else np.zeros(0, np.int64)
        mask = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0, bool)
        return ChunkBatch(
            tokens=flat,
            lengths=np.array([sum(len(p[0]) for p in c) for c in chunks], dtype=np.int64),
            doc_ids=np.array([c[0][2] for c in chunks], dtype=np.int64),
            starts=np.array(starts, dtype=np.int64),
            starts_counts=np.array(counts, dtype=np.int64),
            loss_mask=mask,
        )


def chunk_conversations(
    convs: Sequence[Sequence[int]], masks: Sequence[np.ndarray], doc_ids: Sequence[int]
) -> ChunkBatch:
    """Truncate mode for conversations: one chunk each, whole (a longer one was refused as a
    bad record before it got here)."""
    lengths = np.array([len(c) for c in convs], dtype=np.int64)
    flat = np.concatenate([np.asarray(c, np.int64) for c in convs]) if len(convs) else None
    return ChunkBatch(
        tokens=flat if flat is not None else np.zeros(0, np.int64),
        lengths=lengths,
        doc_ids=np.asarray(doc_ids, dtype=np.int64),
        loss_mask=np.concatenate(masks) if len(masks) else np.zeros(0, bool),
    )


# ------------------------------------------------------------------------ train / eval split
def in_eval(doc_id: str, fraction: float) -> bool:
    """Deterministic hold-out by document id: the same document always lands on the same side."""
    h = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2.0**64
