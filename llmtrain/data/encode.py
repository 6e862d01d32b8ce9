"""Corpus → TokenStoreWriter: the streaming encode pipeline behind `build_stores`.

Each pass over a corpus runs three threads joined by queues of one item: a reader thread
parses documents into batches, an encoder thread runs the Rust tokenizer on all cores (outside
the GIL), and the calling thread routes each document to its split, chunks it
(`llmtrain.data.chunking`) and appends to that split's store, in input order. Memory is bounded
by a few batches plus the pack carry-over, whatever the corpus size (docs/architecture.md,
"Token store").

Counting, per split (all in tokens):
  tokens_in       what the tokenizer produced, plus the EOS appended to each causal-lm document
  tokens_out      what the store holds (window specials and overlaps included)
  dropped_tokens  tokens_in that are in no chunk (pack remainder, truncate tails)
  pad_tokens      what padding every chunk to seq_len would add: chunks × seq_len − tokens_out
                  (nothing is padded on disk; collate pads, so this is the padding cost)
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmtrain.config import Config, DataSourceConfig
from llmtrain.data.chunk_spec import raw_backend
from llmtrain.data.chunking import (
    ChunkBatch,
    ChunkSpec,
    ConversationPacker,
    Packer,
    chunk_conversations,
    chunk_truncate,
    chunk_windows,
    in_eval,
)
from llmtrain.data.corpus import Document, ReadStats, iter_documents, label_kind
from llmtrain.data.sft import ChatEncoder, conversation_encoder
from llmtrain.data.store import TokenStore, TokenStoreWriter, split_folder
from llmtrain.errors import LLMTrainError
from llmtrain.util.atomic import is_out_of_space, no_space

if TYPE_CHECKING:
    from rich.console import Console

# A batch of documents handed to the tokenizer: large enough that rayon keeps every core busy
# and the per-call overhead vanishes, small enough that memory stays flat (~tens of MB).
BATCH_DOCS = 1000
BATCH_CHARS = 2 << 20


def document_batches(
    docs: Iterable[Document], max_docs: int = BATCH_DOCS, max_chars: int | None = None
) -> Iterator[list[Document]]:
    """Documents in lists of `max_docs` (or fewer once `max_chars` of text are in): the
    tokenizer takes batches, which crosses into Rust less often. The chunk stage, the
    tokenizer trainer and `encode_input` all batch through here."""
    batch: list[Document] = []
    chars = 0
    for d in docs:
        batch.append(d)
        chars += len(d.text)
        if len(batch) >= max_docs or (max_chars is not None and chars >= max_chars):
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


@dataclass
class SplitBatch:
    """The part of one encoded batch that goes to one split: its documents, their token ids,
    label ids (classification) and loss masks (instruction data), in step."""

    writer: SplitWriter
    docs: list[Document] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    masks: list[np.ndarray] | None = None


# What the tokenizers library reads as "off" in TOKENIZERS_PARALLELISM (its utils/parallelism).
_ENV_OFF = {"", "off", "false", "f", "no", "n", "0"}
# What set_workers itself wrote into os.environ: a later call in the same process (tests, a
# notebook) must not report its own earlier setting as the user's environment.
_written: dict[str, str] = {}


def _from_user(name: str) -> str | None:
    """os.environ[name] unless set_workers wrote that value itself."""
    value = os.environ.get(name)
    return None if value is None or _written.get(name) == value else value


def set_workers(workers: int | None) -> str | None:
    """Size the tokenizer's Rust thread pool; returns a note when the environment forces a
    single thread. The pool reads this once, when it first starts, so call it before anything
    encodes (or trains a tokenizer).

    An explicit count (--workers, data.workers) wins over the environment, including a
    TOKENIZERS_PARALLELISM=false left in the user's shell; without one the environment is
    honoured, and a forced single thread is reported instead of passing unnoticed.
    """
    if workers is not None:
        _written.update(RAYON_NUM_THREADS=str(workers), TOKENIZERS_PARALLELISM="true")
        os.environ.update(_written)
        return None
    parallelism = _from_user("TOKENIZERS_PARALLELISM")
    if parallelism is not None and parallelism.strip().lower() in _ENV_OFF:
        return (
            f"TOKENIZERS_PARALLELISM={parallelism} in the environment: tokenizing on one "
            "thread (--workers N or data.workers sets the count)"
        )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if (_from_user("RAYON_NUM_THREADS") or "").strip() == "1":
        return (
            "RAYON_NUM_THREADS=1 in the environment: tokenizing on one thread "
            "(--workers N or data.workers sets the count)"
        )
    return None


# ------------------------------------------------------------------------ one split
class SplitWriter:
    """One split being written: its store writer, packer (pack mode) and counters."""

    def __init__(
        self,
        name: str,
        path: Path,
        spec: ChunkSpec,
        vocab_size: int,
        meta: dict,
        *,
        sft: bool = False,
    ):
        self.name = name
        self.spec = spec
        self.sft = sft  # instruction data: conversations with loss masks
        self.writer = TokenStoreWriter(
            path, vocab_size=vocab_size, meta={**meta, "split": name}, loss_mask=sft
        )
        pack = spec.mode == "pack"
        self.packer = Packer(spec.seq_len) if pack and not sft else None
        self.conversations = ConversationPacker(spec.seq_len) if pack and sft else None
        self.cut = 0  # conversations longer than seq_len, split across chunks
        self.documents = 0
        self.tokens_in = 0
        self.dropped = 0
        self.seconds = 0.0
        self.skipped_records = 0  # bad records of this split's corpus dropped (on_error: skip)
        self.skipped_entries: list[str] = []  # corpus entries not read: not regular files
        self.label_type: str | None = None  # "string" | "integer" once a label was written

    def add(
        self,
        docs: list[Document],
        ids: list[list[int]],
        labels: list[int],
        masks: list[np.ndarray] | None = None,
    ) -> None:
        """Chunk and write encoded documents; `labels` (classification) holds one per doc,
        `masks` (instruction data) one loss mask per conversation."""
        spec = self.spec
        doc_ids = [self.writer.add_document(d.doc_id) for d in docs]
        self.documents += len(docs)
        if masks is not None:
            self._add_conversations(ids, masks, doc_ids)
            return
        if self.packer is not None:
            self._add_packed(ids, doc_ids)
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

    def _add_packed(self, ids: list[list[int]], doc_ids: list[int]) -> None:
        eos = self.spec.eos_id
        flat: list[int] = []
        for x in ids:
            flat += x
            flat.append(eos)
        lens = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
        self.tokens_in += len(flat)
        batch = self.packer.add(np.array(flat, dtype=np.int64), lens, np.asarray(doc_ids))
        self._write(batch, None)

    def _add_conversations(
        self, ids: list[list[int]], masks: list[np.ndarray], doc_ids: list[int]
    ) -> None:
        """Instruction data: no EOS is appended (the template ends each turn itself)."""
        self.tokens_in += sum(len(x) for x in ids)
        if self.conversations is not None:
            batch = self.conversations.add(ids, masks, doc_ids)
        else:
            batch = chunk_conversations(ids, masks, doc_ids)
        self.cut += batch.cut
        self._write(batch, None)

    def _write(self, batch: ChunkBatch, labels: Any) -> None:
        self.dropped += batch.dropped
        if not len(batch):
            return
        if labels is None:
            labels = np.full(len(batch), -1, dtype=np.int64)
        if self.sft and batch.loss_mask is None:  # text documents in a masked store: all targets
            batch.loss_mask = np.ones(len(batch.tokens), dtype=bool)
        self.writer.append(
            batch.tokens,
            batch.lengths,
            batch.doc_ids,
            labels,
            batch.starts,
            batch.starts_counts,
            loss_mask=batch.loss_mask,
        )

    def close(self, label_names: list[str] | None) -> TokenStore:
        """Flush the pack remainder (kept or dropped), then finalise the store with its stats.

        Integer labels are ordered as numbers (2 before 10), string labels as strings; either
        way meta.json names them as strings, with `label_type` saying which they were.
        """
        if self.packer is not None:
            tail, n_tail = self.packer.finish()
            if self.spec.keep_remainder and n_tail:
                self._write(tail, None)
            else:
                self.dropped += n_tail
        if self.conversations is not None:  # every chunk is a partial one: the last is kept
            self._write(self.conversations.finish(), None)
        if label_names is None and self.label_type == "integer":
            label_names = sorted(self.writer.seen_labels(), key=int)
        self.writer.extra_meta["label_type"] = self.label_type
        return self.writer.close(label_names=label_names, stats=self._stats())

    def _stats(self) -> dict[str, Any]:
        w, spec = self.writer, self.spec
        n_chunks = w.num_chunks
        lengths = w.chunk_lengths() if n_chunks else np.zeros(1)
        stats = {
            "documents": self.documents,
            "tokens_in": self.tokens_in,
            "tokens_out": w.num_tokens,
            "chunks": n_chunks,
            "pad_tokens": n_chunks * spec.seq_len - w.num_tokens,
            "dropped_tokens": self.dropped,
            "seq_len": spec.seq_len,
            "mode": spec.mode,
            "overlap": spec.overlap if spec.mode == "window" else 0,
            "seconds": round(self.seconds, 3),
            "skipped_records": self.skipped_records,
            "skipped_entries": self.skipped_entries,
            **({"conversations_cut": self.cut} if self.sft else {}),
            "length_p50": int(np.percentile(lengths, 50)),
            "length_p90": int(np.percentile(lengths, 90)),
            "length_max": int(lengths.max()),
        }
        total = max(1, n_chunks * spec.seq_len)
        stats["pad_pct"] = round(100.0 * stats["pad_tokens"] / total, 3)
        stats["dropped_pct"] = round(100.0 * self.dropped / max(1, self.tokens_in), 3)
        stats["tokens_per_s"] = round(self.tokens_in / self.seconds) if self.seconds else None
        return stats


# ------------------------------------------------------------------- pipeline threads
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
    """The next item, or _DONE once the pipeline was stopped."""
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return _DONE


def _read_batches(docs: Iterator[Document], out: queue.Queue, stop: threading.Event) -> None:
    """Pipeline stage 1 (thread): parse documents and group them into batches."""
    try:
        for batch in document_batches(docs, BATCH_DOCS, BATCH_CHARS):
            if not _put(out, batch, stop):
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
            if isinstance(encode, ChatEncoder):  # instruction data: (ids, mask) or a problem
                if not _put(out, (item, encode.encode([d.messages for d in item])), stop):
                    return
                continue
            encs = encode([d.text for d in item], add_special_tokens=False)
            ids = [e.ids for e in encs]
            del encs  # the Encoding objects (strings, offsets...) are far bigger than the ids
            if not _put(out, (item, ids), stop):
                return
    except BaseException as e:
        _put(out, e, stop)


# ------------------------------------------------------------------------ the builder
Route = Callable[[Document], SplitWriter]


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
        self.eval_labels: list[str] | None = None  # train's labels, once train is closed
        self.train_label_type: str | None = None  # and their type: string | integer

    def run(self) -> tuple[dict[str, TokenStore], dict[str, dict]]:
        with raw_backend(self.tok) as backend:
            self.encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            self.chat = self._chat_encoder(backend)
            return self._run()

    def _chat_encoder(self, backend: Any) -> ChatEncoder | None:
        """The renderer of instruction data, when a corpus holds some; in truncate mode a
        conversation that renders longer than seq_len is a bad record."""
        d = self.cfg.data
        if all(s.records == "text" for _, s in d.sources()):
            return None
        max_len = self.spec.seq_len if self.spec.mode == "truncate" else None
        return conversation_encoder(self.tok, backend, d.sft, max_len=max_len)

    def _run(self) -> tuple[dict[str, TokenStore], dict[str, dict]]:
        """Every training source into its store (a mixture's one each), then eval: held out
        of the training documents as they pass (eval_fraction), or its own corpus read once
        the training labels are known."""
        d = self.cfg.data
        parts = d.train_parts
        frac = d.eval_fraction if d.eval is None else None
        writers: dict[str, SplitWriter] = {}
        try:
            for p in parts:
                writers[p.store] = self._writer(p.store, p.source)
            trains = list(writers.values())
            held = None  # eval_fraction: held out of every training source as it passes
            if frac:
                held = writers["eval"] = self._writer("eval", parts[0].source)
            for p, w in zip(parts, trains, strict=True):
                # A bad record has no id to route by: its count goes to its training source.
                self._pass(p.source, p.key, self._route(w, held, frac), w)
            labels = _mixture_labels(trains)
            stores = {p.store: w.close(labels) for p, w in zip(parts, trains, strict=True)}
            first = stores[parts[0].store]
            if held is not None:
                stores["eval"] = held.close(first.label_names)
            if d.eval is not None:
                self.eval_labels = first.label_names
                self.train_label_type = trains[0].label_type
            for split, source in d.eval_sets.items():  # one, or each named set
                ev = writers[split] = self._writer(split, source)
                self._pass(source, "data." + split.replace("/", "."), lambda doc, ev=ev: ev, ev)
                stores[split] = ev.close(first.label_names)
        except BaseException as e:
            wrote = sum(w.writer.num_tokens * w.writer.dtype.itemsize for w in writers.values())
            for w in writers.values():
                w.writer.abort()
            if isinstance(e, Exception) and is_out_of_space(e):
                raise no_space(self.root, "the token store", None, wrote) from e
            raise
        return stores, {n: {**s.meta["stats"], "up_to_date": False} for n, s in stores.items()}

    @staticmethod
    def _route(train: SplitWriter, ev: SplitWriter | None, frac: float | None) -> Route:
        if ev is None or not frac:
            return lambda doc: train
        return lambda doc: ev if in_eval(doc.doc_id, frac) else train

    def _writer(self, name: str, source: DataSourceConfig) -> SplitWriter:
        sft = source.records != "text"
        path = self.root / split_folder(name)
        return SplitWriter(name, path, self.spec, self.vocab_size, self.meta, sft=sft)

    def _pass(self, source: DataSourceConfig, key: str, route: Route, owner: SplitWriter) -> None:
        """One streaming pass over a corpus: read → encode → route, chunk, write.

        Three threads joined by small queues (memory stays at a few batches); output order is
        input order since each stage is a single thread. `owner` reports the bad records the
        pass skipped (on_error: skip).
        """
        stats = ReadStats()
        docs = iter_documents(source, stats, require_label=self.classify, key=key)
        sft = source.records != "text"
        encoder = self.chat if sft else self.encode
        q_docs: queue.Queue = queue.Queue(maxsize=1)
        q_ids: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()
        threads = [
            threading.Thread(target=_read_batches, args=(docs, q_docs, stop), daemon=True),
            threading.Thread(
                target=_encode_batches, args=(encoder, q_docs, q_ids, stop), daemon=True
            ),
        ]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        bar = _Progress(self.progress, self.console, key, stats)
        seen: dict[int, tuple[SplitWriter, int]] = {}
        try:
            with bar:
                while True:
                    item = _get(q_ids, stop)
                    if item is _DONE:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    masks = None
                    if sft:  # instruction data: drop (or refuse) what could not be encoded
                        *item, masks = _good_records(*item, source, key, owner)
                    bar.update(self._batch(*item, route, seen, masks))
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
        owner.skipped_records += stats.skipped
        owner.skipped_entries += stats.skipped_entries

    def _batch(
        self,
        docs: list[Document],
        ids: list[list[int]],
        route: Route,
        seen: dict,
        masks: list[np.ndarray] | None = None,
    ) -> int:
        """Route one encoded batch's documents to their splits, chunk and write them."""
        groups: dict[int, SplitBatch] = {}
        for i, (doc, x) in enumerate(zip(docs, ids, strict=True)):
            w = route(doc)
            g = groups.get(id(w))
            if g is None:
                g = groups[id(w)] = SplitBatch(w, masks=[] if masks is not None else None)
                if id(w) not in seen:
                    seen[id(w)] = (w, w.tokens_in)
            g.docs.append(doc)
            g.ids.append(x)
            if self.classify:
                g.labels.append(self._label_id(w, doc))
            if g.masks is not None and masks is not None:
                g.masks.append(masks[i])
        for g in groups.values():
            g.writer.add(g.docs, g.ids, g.labels, g.masks)
        return sum(len(x) for x in ids)

    def _label_id(self, w: SplitWriter, doc: Document) -> int:
        """The document's provisional label id in its split; an eval label train never had, or
        of the other type (1 against "1"), is an error naming the line, before anything of it
        is written. Labels reach the writer as strings; their type is kept in `label_type`."""
        assert doc.label is not None  # iter_documents(require_label=True)
        kind = label_kind(doc.label)
        if self.eval_labels is not None and w.name != "train":
            if self.train_label_type is not None and kind != self.train_label_type:
                raise LLMTrainError(
                    f"{doc.where}: the label {doc.label!r} is {'an' if kind == 'integer' else 'a'} "
                    f"{kind}, but data.train's labels "
                    f"are {self.train_label_type}s; one corpus uses one label type: write "
                    "every label as a string, or every label as an integer"
                )
            if str(doc.label) not in self.eval_labels:
                raise LLMTrainError(
                    f"{doc.where}: label {doc.label!r} does not occur in the training data "
                    f"(known labels: {', '.join(self.eval_labels)})"
                )
        w.label_type = kind
        return w.writer.label_id(str(doc.label))


def _mixture_labels(trains: list[SplitWriter]) -> list[str] | None:
    """One label map for every source of a mixture (their stores are read as one): the
    union of their labels, integers ordered as numbers; None for a single source or no
    labels (each store then orders its own, as `SplitWriter.close` does)."""
    if len(trains) < 2:
        return None
    seen = {label for w in trains for label in w.writer.seen_labels()}
    if not seen:
        return None
    kinds = {w.label_type for w in trains if w.label_type is not None}
    if len(kinds) > 1:
        raise LLMTrainError(
            "data.train: the sources' labels are of different types (strings in some, "
            "integers in others); one mixture uses one label type: write every label as a "
            "string, or every label as an integer"
        )
    return sorted(seen, key=int) if kinds == {"integer"} else sorted(seen)


def _good_records(
    docs: list[Document], encoded: list, source: DataSourceConfig, key: str, owner: SplitWriter
) -> tuple[list[Document], list[list[int]], list[np.ndarray]]:
    """Instruction data: split the encoder's answers into (docs, ids, masks); a record it
    could not encode is an error naming its file:line, or skipped and counted in `owner`."""
    good: list[Document] = []
    ids: list[list[int]] = []
    masks: list[np.ndarray] = []
    for doc, enc in zip(docs, encoded, strict=True):
        if isinstance(enc, str):
            if source.on_error == "skip":
                owner.skipped_records += 1
                continue
            raise LLMTrainError(f"{doc.where}: {enc} (or set {key}.on_error: skip to drop it)")
        good.append(doc)
        ids.append(enc[0])
        masks.append(enc[1])
    return good, ids, masks


def build_stores(
    cfg: Config,
    tok: Any,
    spec: ChunkSpec,
    meta: dict,
    root: Path,
    *,
    progress: bool,
    console: Console | None,
) -> tuple[dict[str, TokenStore], dict[str, dict]]:
    """Write every split of `cfg` under `root` (each atomically); return the open stores and
    their stats. On any error every half-written split is removed and the old ones stay."""
    return _Builder(cfg, tok, spec, meta, root, progress=progress, console=console).run()


# ----------------------------------------------------------------------- progress
class _Progress:
    """A rich progress bar over bytes read (for the ETA) showing documents and tokens/s.

    It lives with the pipeline, not the CLI, because `fit` shows it too (through
    `ensure_stores(progress=True)`); disabled, it only counts.
    """

    def __init__(self, enabled: bool, console: Console | None, key: str, stats: ReadStats):
        self.enabled = enabled
        self.stats = stats
        self.key = key
        self.console = console
        self.t0 = time.perf_counter()
        self.progress: Any = None
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
