"""The chunk stage: corpus → TokenStore, in pack, window or truncate mode (DESIGN §1, §6).

The chunking itself is pure functions on token-id sequences (`window_spans`, `Packer`,
`chunk_windows`, `chunk_truncate`), tested property-by-property. Around them, `ensure_stores`
streams the corpus through a three-thread pipeline joined by small queues: a reader thread
parses documents into batches, an encoder thread runs the Rust tokenizer on all cores (outside
the GIL), and the calling thread chunks and appends to the store, in input order. Memory is
bounded by a few batches plus the pack carry-over, whatever the corpus size.

Counting, per split (all in tokens):
  tokens_in       what the tokenizer produced, plus the EOS appended to each causal-lm document
  tokens_out      what the store holds (window specials and overlaps included)
  dropped_tokens  tokens_in that are in no chunk (pack remainder, truncate tails)
  pad_tokens      what padding every chunk to seq_len would add: chunks × seq_len − tokens_out
                  (nothing is padded on disk; collate pads, so this is the padding cost)
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmtrain.config import Config, DataSourceConfig
from llmtrain.data.store import FORMAT_VERSION, TokenStore, TokenStoreWriter
from llmtrain.errors import ConfigError, LLMTrainError

if TYPE_CHECKING:  # transformers is only needed by the caller that loads the tokenizer
    from rich.console import Console
    from transformers import PreTrainedTokenizerFast

    from llmtrain.data.corpus import Document

# A batch of documents handed to the tokenizer: large enough that rayon keeps every core busy
# and the per-call overhead vanishes, small enough that memory stays flat (~tens of MB).
BATCH_DOCS = 1000
BATCH_CHARS = 2 << 20


# ------------------------------------------------------------------------ chunk settings
@dataclass(frozen=True)
class ChunkSpec:
    """Everything the pure chunking functions need, resolved from config and tokenizer.

    `prefix`/`suffix` are the special tokens the tokenizer's post-processor puts around one
    sequence (e.g. [CLS] … [SEP]); empty for causal-lm, whose documents end with `eos_id`.
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
    """Chunks ready for `TokenStoreWriter.append`: flat tokens cut by `lengths`."""

    tokens: np.ndarray
    lengths: np.ndarray
    doc_ids: np.ndarray
    starts: np.ndarray | None = None  # pack: doc starts inside chunks (flat)
    starts_counts: np.ndarray | None = None  # pack: how many of `starts` per chunk
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.lengths)


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


def resolve_spec(cfg: Config, tok: Any) -> ChunkSpec:
    """The ChunkSpec for this config and tokenizer; a config that cannot work is a ConfigError."""
    ch = cfg.data.chunk
    task = cfg.model.task
    if task == "sequence-classification":
        if ch.mode == "pack":
            raise ConfigError(
                "data.chunk.mode: pack mixes documents in one chunk, which has no single label; "
                "use window or truncate for sequence-classification"
            )
        prefix, suffix = special_template(tok)
        if not prefix and not suffix and tok.cls_token_id is not None:
            # A post-processor without a template: frame windows like BERT so a [CLS] exists.
            prefix, suffix = (tok.cls_token_id,), (tok.sep_token_id,)
        eos = None
    else:
        prefix, suffix = (), ()
        eos = tok.eos_token_id
        if eos is None:
            raise LLMTrainError("tokenizer: has no eos_token, needed to separate documents")
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


# -------------------------------------------------------------------- pure chunking logic
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


class Packer:
    """Pack mode: a stream of documents (each already ending in EOS) cut into seq_len chunks.

    Only the carry-over (< seq_len tokens) is kept between batches. Each chunk's doc_id is the
    document of its first token; `starts` records where documents begin inside chunks.
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


def pack_documents(
    docs: Sequence[Sequence[int]], seq_len: int, eos_id: int, *, keep_remainder: bool = False
) -> tuple[list[np.ndarray], list[np.ndarray], list[int], int]:
    """Pack whole documents in one go (for tests and small inputs).

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


# ------------------------------------------------------------------------ train / eval split
def in_eval(doc_id: str, fraction: float) -> bool:
    """Deterministic hold-out by document id: the same document always lands on the same side."""
    h = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2.0**64


# ----------------------------------------------------------------------------- the stage
@dataclass
class ChunkReport:
    """What `ensure_stores` built or reused: the open stores and per-split statistics."""

    stores: dict[str, TokenStore]
    splits: dict[str, dict[str, Any]]
    up_to_date: bool = False
    root: Path = field(default_factory=Path)
    fingerprint: str = ""


def store_root(cfg: Config) -> Path:
    """Where the stores live: data.store, or <run.output_dir>/store; splits are subfolders."""
    return Path(cfg.data.store) if cfg.data.store else Path(cfg.run.output_dir) / "store"


def _splits(cfg: Config) -> list[str]:
    return ["train", "eval"] if (cfg.data.eval is not None or cfg.data.eval_fraction) else ["train"]


def stores_fingerprint(cfg: Config, tok_fp: str) -> str:
    """Everything that decides the stores' bytes: corpora, reader settings, tokenizer, chunking."""
    from llmtrain.data.corpus import corpus_fingerprint

    d = cfg.data
    chunk = d.chunk.model_dump(exclude={"aggregate", "cross_doc_attention"})
    payload = {
        "format_version": FORMAT_VERSION,
        "task": cfg.model.task,
        "train": corpus_fingerprint(d.train, key="data.train"),
        "eval": corpus_fingerprint(d.eval, key="data.eval") if d.eval is not None else None,
        "eval_fraction": d.eval_fraction if d.eval is None else None,
        "tokenizer": tok_fp,
        "chunk": chunk,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _reusable(root: Path, names: list[str], fp: str) -> dict[str, TokenStore] | None:
    """The existing stores if every split matches `fp`; None when any is absent or stale.

    A store that exists but is damaged (truncated, edited, missing a file) raises: rebuilding it
    silently would hide the damage, and `--force` is there to replace it on purpose.
    """
    stores = {}
    for name in names:
        path = root / name
        if not path.exists():
            return None
        meta_path = path / "meta.json"
        try:
            meta_fp = json.loads(meta_path.read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            meta_fp = fp  # unreadable: let open() report it precisely
        if meta_fp != fp:
            return None
        try:
            stores[name] = TokenStore.open(path)
        except LLMTrainError as e:
            raise LLMTrainError(f"{e} (or run `llmtrain chunk --force` to rebuild)") from None
    return stores


def _set_workers(workers: int | None) -> None:
    """Size the tokenizer's Rust thread pool (read once, when the pool first starts)."""
    if workers is not None:
        os.environ["RAYON_NUM_THREADS"] = str(workers)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def ensure_stores(
    cfg: Config,
    tokenizer: PreTrainedTokenizerFast,
    *,
    force: bool = False,
    workers: int | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> ChunkReport:
    """Build the train (and eval) TokenStores unless up-to-date ones exist; open and return them."""
    from llmtrain.stages.tokenize import tokenizer_fingerprint

    _set_workers(workers if workers is not None else cfg.data.workers)
    spec = resolve_spec(cfg, tokenizer)
    root = store_root(cfg)
    names = _splits(cfg)
    tok_fp = tokenizer_fingerprint(tokenizer)
    fp = stores_fingerprint(cfg, tok_fp)
    if not force:
        stores = _reusable(root, names, fp)
        if stores is not None:
            splits = {n: {**s.meta.get("stats", {}), "up_to_date": True} for n, s in stores.items()}
            return ChunkReport(stores, splits, up_to_date=True, root=root, fingerprint=fp)
    root.mkdir(parents=True, exist_ok=True)
    if "eval" not in names and (root / "eval").exists():
        shutil.rmtree(root / "eval")  # a stale eval store from an earlier config would mislead
    meta = {
        "fingerprint": fp,
        "tokenizer_fingerprint": tok_fp,
        "task": cfg.model.task,
        "chunk": {**cfg.data.chunk.model_dump(), "min_tail": spec.min_tail},
        "eos_id": spec.eos_id,
        "special_prefix": list(spec.prefix),
        "special_suffix": list(spec.suffix),
    }
    builder = _Builder(cfg, tokenizer, spec, meta, root, progress=progress, console=console)
    stores, splits = builder.run()
    return ChunkReport(stores, splits, up_to_date=False, root=root, fingerprint=fp)


class _SplitWriter:
    """One split being written: its store writer, packer (pack mode) and counters."""

    def __init__(self, name: str, path: Path, spec: ChunkSpec, vocab_size: int, meta: dict):
        self.name = name
        self.spec = spec
        self.writer = TokenStoreWriter(path, vocab_size=vocab_size, meta={**meta, "split": name})
        self.packer = Packer(spec.seq_len) if spec.mode == "pack" else None
        self.documents = 0
        self.tokens_in = 0
        self.dropped = 0
        self.seconds = 0.0

    def add(self, docs: list[Document], ids: list[list[int]], labels: list[int]) -> None:
        spec = self.spec
        doc_ids = [self.writer.add_document(d.doc_id) for d in docs]
        self.documents += len(docs)
        if self.packer is not None:
            eos = spec.eos_id
            flat: list[int] = []
            for x in ids:
                flat += x
                flat.append(eos)
            lens = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
            self.tokens_in += len(flat)
            batch = self.packer.add(np.array(flat, dtype=np.int64), lens, np.asarray(doc_ids))
            self._write(batch, None)
            return
        if spec.eos_id is not None:  # causal-lm window/truncate: each document ends with EOS
            ids = [[*x, spec.eos_id] for x in ids]
        self.tokens_in += sum(len(x) for x in ids)
        if spec.mode == "window":
            batch = chunk_windows(spec, ids, doc_ids)
        else:
            batch = chunk_truncate(spec, ids, doc_ids)
        # Chunk → label through its document (window mode has several chunks per document).
        lab = None
        if labels and len(batch):
            lab = np.asarray(labels, dtype=np.int64)[batch.doc_ids - doc_ids[0]]
        self._write(batch, lab)

    def _write(self, batch: ChunkBatch, labels: Any) -> None:
        self.dropped += batch.dropped
        if not len(batch):
            return
        if labels is None:
            labels = np.full(len(batch), -1, dtype=np.int64)
        self.writer.append(
            batch.tokens, batch.lengths, batch.doc_ids, labels, batch.starts, batch.starts_counts
        )

    def close(self, label_names: list[str] | None) -> TokenStore:
        if self.packer is not None:
            tail, n_tail = self.packer.finish()
            if self.spec.keep_remainder and n_tail:
                self._write(tail, None)
            else:
                self.dropped += n_tail
        w = self.writer
        n_chunks = w.num_chunks
        lengths = w.chunk_lengths() if n_chunks else np.zeros(1)
        stats = {
            "documents": self.documents,
            "tokens_in": self.tokens_in,
            "tokens_out": w.num_tokens,
            "chunks": n_chunks,
            "pad_tokens": n_chunks * self.spec.seq_len - w.num_tokens,
            "dropped_tokens": self.dropped,
            "seq_len": self.spec.seq_len,
            "mode": self.spec.mode,
            "overlap": self.spec.overlap if self.spec.mode == "window" else 0,
            "seconds": round(self.seconds, 3),
            "length_p50": int(np.percentile(lengths, 50)),
            "length_p90": int(np.percentile(lengths, 90)),
            "length_max": int(lengths.max()),
        }
        total = max(1, n_chunks * self.spec.seq_len)
        stats["pad_pct"] = round(100.0 * stats["pad_tokens"] / total, 3)
        stats["dropped_pct"] = round(100.0 * self.dropped / max(1, self.tokens_in), 3)
        stats["tokens_per_s"] = round(self.tokens_in / self.seconds) if self.seconds else None
        store = w.close(label_names=label_names, stats=stats)
        return store


_DONE = object()


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put unless the pipeline was stopped (the consumer is gone); False when stopped."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return _DONE


def _read_batches(docs: Iterator[Document], out: queue.Queue, stop: threading.Event) -> None:
    """Pipeline stage 1 (thread): parse documents and group them into batches."""
    try:
        batch: list[Document] = []
        chars = 0
        for d in docs:
            batch.append(d)
            chars += len(d.text)
            if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
                if not _put(out, batch, stop):
                    return
                batch, chars = [], 0
        if batch and not _put(out, batch, stop):
            return
        _put(out, _DONE, stop)
    except BaseException as e:  # handed down the pipeline; the main thread re-raises it
        _put(out, e, stop)


def _encode_batches(encode: Any, inq: queue.Queue, out: queue.Queue, stop: threading.Event) -> None:
    """Pipeline stage 2 (thread): the Rust tokenizer, on all cores, outside the GIL.

    Running it in its own thread lets batch k+1 encode while the main thread chunks and
    writes batch k, so no core idles during the Python parts.
    """
    try:
        while True:
            item = _get(inq, stop)
            if item is _DONE or isinstance(item, BaseException):
                _put(out, item, stop)
                return
            encs = encode([d.text for d in item], add_special_tokens=False)
            ids = [e.ids for e in encs]
            del encs  # the Encoding objects (strings, offsets...) are far bigger than the ids
            if not _put(out, (item, ids), stop):
                return
    except BaseException as e:
        _put(out, e, stop)


class _Builder:
    """Runs the passes over the corpora and writes every split."""

    def __init__(
        self,
        cfg: Config,
        tok: Any,
        spec: ChunkSpec,
        meta: dict,
        root: Path,
        *,
        progress: bool,
        console: Console | None,
    ):
        self.cfg = cfg
        self.spec = spec
        self.meta = meta
        self.root = root
        self.progress = progress
        self.console = console
        self.classify = cfg.model.task == "sequence-classification"
        self.tok = tok
        self.vocab_size = max(
            len(tok), tok.backend_tokenizer.get_vocab_size(with_added_tokens=True)
        )

    def run(self) -> tuple[dict[str, TokenStore], dict[str, dict]]:
        with raw_backend(self.tok) as backend:
            self.encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            return self._run()

    def _run(self) -> tuple[dict[str, TokenStore], dict[str, dict]]:
        d = self.cfg.data
        writers: dict[str, _SplitWriter] = {}
        try:
            train = writers["train"] = self._writer("train")
            if d.eval is not None:
                self._pass(d.train, "data.train", lambda doc: train)
                train_store = train.close(None)
                ev = writers["eval"] = self._writer("eval")
                self.eval_labels = train_store.label_names
                self._pass(d.eval, "data.eval", lambda doc: ev)
                stores = {"train": train_store, "eval": ev.close(train_store.label_names)}
            elif d.eval_fraction:
                ev = writers["eval"] = self._writer("eval")
                frac = d.eval_fraction
                self._pass(
                    d.train, "data.train", lambda doc: ev if in_eval(doc.doc_id, frac) else train
                )
                train_store = train.close(None)
                stores = {"train": train_store, "eval": ev.close(train_store.label_names)}
            else:
                self._pass(d.train, "data.train", lambda doc: train)
                stores = {"train": train.close(None)}
        except BaseException:
            for w in writers.values():
                w.writer.abort()
            raise
        return stores, {n: {**s.meta["stats"], "up_to_date": False} for n, s in stores.items()}

    eval_labels: list[str] | None = None

    def _writer(self, name: str) -> _SplitWriter:
        return _SplitWriter(name, self.root / name, self.spec, self.vocab_size, self.meta)

    def _pass(self, source: DataSourceConfig, key: str, route) -> None:
        """One streaming pass over a corpus: read → encode → route, chunk, write.

        Three threads joined by small queues (memory stays at a few batches); output order is
        input order since each stage is a single thread.
        """
        from llmtrain.data.corpus import ReadStats, iter_documents

        stats = ReadStats()
        docs = iter_documents(source, stats, require_label=self.classify, key=key)
        q_docs: queue.Queue = queue.Queue(maxsize=1)
        q_ids: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()
        threads = [
            threading.Thread(target=_read_batches, args=(docs, q_docs, stop), daemon=True),
            threading.Thread(
                target=_encode_batches, args=(self.encode, q_docs, q_ids, stop), daemon=True
            ),
        ]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        bar = _Progress(self.progress, self.console, key, stats)
        seen: dict[int, tuple[_SplitWriter, int]] = {}
        try:
            with bar:
                while True:
                    item = _get(q_ids, stop)
                    if item is _DONE:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    bar.update(self._batch(*item, route, seen))
                    item = None  # free this batch while waiting for the next
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=5)
        # The pass's wall time, shared among the splits it fed by their share of tokens.
        dt = time.perf_counter() - t0
        total = sum(w.tokens_in - before for w, before in seen.values()) or 1
        for w, before in seen.values():
            w.seconds += dt * (w.tokens_in - before) / total

    def _batch(self, docs: list[Document], ids: list[list[int]], route, seen: dict) -> int:
        """Route one encoded batch's documents to their splits, chunk and write them."""
        groups: dict[int, tuple[_SplitWriter, list, list, list]] = {}
        for doc, x in zip(docs, ids, strict=True):
            w = route(doc)
            g = groups.get(id(w))
            if g is None:
                g = groups[id(w)] = (w, [], [], [])
                if id(w) not in seen:
                    seen[id(w)] = (w, w.tokens_in)
            g[1].append(doc)
            g[2].append(x)
            if self.classify:
                if (
                    self.eval_labels is not None
                    and w.name == "eval"
                    and doc.label not in self.eval_labels
                ):
                    raise LLMTrainError(
                        f"{doc.where}: label {doc.label!r} does not occur in the training data "
                        f"(known labels: {', '.join(self.eval_labels)})"
                    )
                g[3].append(w.writer.label_id(doc.label))
        for w, gd, gx, gl in groups.values():
            w.add(gd, gx, gl)
        return sum(len(x) for x in ids)


class _Progress:
    """A rich progress bar over bytes read (for the ETA) showing documents and tokens/s."""

    def __init__(self, enabled: bool, console: Console | None, key: str, stats: Any):
        self.enabled = enabled
        self.stats = stats
        self.key = key
        self.console = console
        self.t0 = time.perf_counter()
        self.progress = None
        self.tokens = 0

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TextColumn("{task.fields[docs]} docs"),
                TextColumn("{task.fields[tps]} tok/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task(f"chunk {self.key}", total=None, docs=0, tps="-")
        return self

    def update(self, tokens: int = 0) -> None:
        self.tokens += tokens
        if self.progress is None:
            return
        s = self.stats
        dt = max(1e-9, time.perf_counter() - self.t0)
        self.progress.update(
            self.task,
            total=s.total_bytes or None,
            completed=s.bytes_read,
            docs=f"{s.documents:,}",
            tps=f"{self.tokens / dt:,.0f}",
        )

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            if exc[0] is None:
                self.update()
            self.progress.__exit__(*exc)


# ------------------------------------------------------------------------------- the CLI
def cli_chunk(cfg: Config, *, force: bool, workers: int | None, as_json: bool) -> None:
    """`llmtrain chunk`: build or reuse the stores, then print a table or one JSON object."""
    from llmtrain.console import human_console
    from llmtrain.stages.tokenize import load_tokenizer

    out = human_console(as_json)
    _set_workers(workers if workers is not None else cfg.data.workers)  # before any encode
    tok = load_tokenizer(cfg)
    report = ensure_stores(
        cfg,
        tok,
        force=force,
        workers=workers,
        progress=cfg.log.progress and out.is_terminal,
        console=out,
    )
    if as_json:
        payload = {
            "splits": report.splits,
            "store": str(report.root),
            "up_to_date": report.up_to_date,
        }
        print(json.dumps(payload), flush=True)
        return
    state = "up to date, reused (--force rebuilds)" if report.up_to_date else "built"
    out.print(f"token store {report.root}: {state}", highlight=False, soft_wrap=True)
    # Piped output is not squeezed to 80 columns: the table is meant to be read in logs too.
    if not out.is_terminal:
        from rich.console import Console

        out = Console(file=out.file, width=120, no_color=True)
    out.print(summary_table(report))


def summary_table(report: ChunkReport) -> Any:
    """A rich table: one row per split with counts, pad/dropped shares and length percentiles."""
    from rich import box
    from rich.table import Table

    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in (
        "split",
        "docs",
        "tokens in",
        "tokens out",
        "chunks",
        "pad%",
        "drop%",
        "len p50/p90/max",
        "sec",
    ):
        t.add_column(col, justify="left" if col == "split" else "right", no_wrap=True)
    for name, s in report.splits.items():
        t.add_row(
            name,
            f"{s['documents']:,}",
            f"{s['tokens_in']:,}",
            f"{s['tokens_out']:,}",
            f"{s['chunks']:,}",
            f"{s['pad_pct']:.1f}",
            f"{s['dropped_pct']:.2f}",
            f"{s['length_p50']}/{s['length_p90']}/{s['length_max']}",
            f"{s['seconds']:.1f}",
        )
    return t
