"""The on-disk TokenStore: a flat memory-mapped token file plus a small index.

Layout of one store directory (one split)::

    tokens.bin        every chunk's tokens back to back (uint16 when vocab < 65,536, else uint32)
    index.npy         int64 (chunks, 2): offset into tokens.bin and length, per chunk
    doc_ids.npy       int64 per chunk: the document the chunk's first token belongs to
    labels.npy        int32 per chunk: label id, -1 where there is none
    starts.npy        int32, flat: offsets inside each chunk where a document begins
    starts_index.npy  int64 (chunks + 1): chunk i's starts are starts[si[i]:si[i + 1]]
    doc_names.txt     one JSON string per line: the corpus id of document i (doc_ids → names)
    loss_mask.bin     only in stores of instruction data: uint8 per token, 1 = a target
    meta.json         format version, fingerprint, tokenizer, chunk settings, counts, labels,
                      and size + sha256 + sampled sha256 of every file above

The writer streams (tokens go straight to disk; only per-chunk index entries stay in memory,
1/seq_len of the tokens) into the temporary sibling `.tmp-<dir>-<pid>` and renames it into
place with `llmtrain.util.atomic`, so a crash never leaves a half-written store where a reader
would find it. The reader checks sizes and shapes against meta.json on open, so a truncated or
edited store is a one-line error, not a numpy crash (docs/architecture.md, "Token store").

Content is checked on request (`open(verify=...)`, which the store cache does on every reuse):
`full` re-hashes every file; `sampled` hashes 64 blocks of 64 KiB spread over each file
(first and last included), a few MB whatever the store's size: it catches truncation, a
replaced or rewritten file and most edits, not every flipped bit; `auto` is full up to
FULL_VERIFY_MAX_BYTES and sampled above.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmtrain.errors import LLMTrainError
from llmtrain.util.atomic import replace_dir, temp_sibling
from llmtrain.util.owned import check_replaceable, mark, read_mark

FORMAT_VERSION = 1
META = "meta.json"
TOKENS = "tokens.bin"
INDEX_FILES = ("index.npy", "doc_ids.npy", "labels.npy", "starts.npy", "starts_index.npy")
NAMES = "doc_names.txt"
ALL_FILES = (TOKENS, *INDEX_FILES, NAMES)
MASK = "loss_mask.bin"  # optional: present when the store was written with loss_mask=True
# The sampled checksum: SAMPLE_BLOCKS blocks of SAMPLE_BLOCK bytes, evenly spread.
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK = 1 << 16
# verify="auto": a store up to this size is re-hashed whole, above it sampled (the full hash
# reads every byte on each reuse; the sampled one reads at most 4 MiB per file).
FULL_VERIFY_MAX_BYTES = 1 << 30


def split_folder(split: str) -> str:
    """The folder of a split's store under the store root: train, eval, eval-<name> for the
    named eval set eval/<name>."""
    return split.replace("/", "-")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every token id of this vocabulary."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _sampled_sha256(path: Path, size: int) -> str:
    """sha256 of the size and SAMPLE_BLOCKS blocks spread evenly over the file, the first and
    the last included; of the whole file when it is no bigger than the blocks together."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK:
            h.update(f.read())
            return h.hexdigest()
        last = size - SAMPLE_BLOCK
        for i in range(SAMPLE_BLOCKS):
            f.seek(i * last // (SAMPLE_BLOCKS - 1))
            h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()


class TokenStoreWriter:
    """Append chunks to a new store; `close()` finalises it and renames it into place.

    Label strings are interned in order of appearance while writing and remapped at close, so
    ids can follow the sorted label set (train) or a given map (eval) without a second pass.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        vocab_size: int,
        meta: dict[str, Any] | None = None,
        loss_mask: bool = False,
    ):
        self.path = Path(path)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.extra_meta = dict(meta or {})
        # Replaces only a store of llmtrain's own, never a folder that merely has its name.
        check_replaceable(self.path, "store", (META,), "point data.store at an empty folder")
        self.tmp = temp_sibling(self.path)
        shutil.rmtree(self.tmp, ignore_errors=True)  # this pid's own leftover, if any
        self._tokens = self._names = self._mask = None
        try:
            self.tmp.mkdir(parents=True)
            self._tokens = open(self.tmp / TOKENS, "wb")  # noqa: SIM115 (closed in close/abort)
            self._names = open(self.tmp / NAMES, "w", encoding="utf-8")  # noqa: SIM115
            # Instruction data: one byte per token (1 = a target), written beside the tokens.
            self._mask = open(self.tmp / MASK, "wb") if loss_mask else None  # noqa: SIM115
        except BaseException:
            self.abort()
            raise
        self._hash = hashlib.sha256()
        self._mask_hash = hashlib.sha256()
        self.num_tokens = 0
        self._lengths = array("q")
        self._doc_ids = array("q")
        self._labels = array("q")
        self._starts = array("q")
        self._starts_index = array("q", [0])
        self._label_ids: dict[str, int] = {}
        self.num_documents = 0

    # ------------------------------------------------------------------ documents and labels
    def add_document(self, name: str) -> int:
        """Register a document by its corpus id; returns the integer doc_id chunks refer to."""
        self._names.write(json.dumps(name, ensure_ascii=False) + "\n")
        self.num_documents += 1
        return self.num_documents - 1

    def label_id(self, label: str | None) -> int:
        """Provisional id of a label string (remapped at close); -1 for no label."""
        if label is None:
            return -1
        lid = self._label_ids.get(label)
        if lid is None:
            lid = self._label_ids[label] = len(self._label_ids)
        return lid

    def seen_labels(self) -> list[str]:
        """The label strings met so far, in order of appearance."""
        return list(self._label_ids)

    @property
    def num_chunks(self) -> int:
        return len(self._lengths)

    def chunk_lengths(self) -> np.ndarray:
        """Lengths of the chunks appended so far (a copy)."""
        return np.array(self._lengths, dtype=np.int64)

    # ------------------------------------------------------------------------------- chunks
    def append(
        self,
        tokens: np.ndarray,
        lengths: Sequence[int] | np.ndarray,
        doc_ids: Sequence[int] | np.ndarray,
        labels: Sequence[int] | np.ndarray,
        starts: Sequence[int] | np.ndarray = (),
        starts_counts: Sequence[int] | np.ndarray | None = None,
        loss_mask: np.ndarray | None = None,
    ) -> None:
        """Append a batch of chunks: `tokens` is their concatenation, `lengths` cut it.

        `starts` (flat) and `starts_counts` (per chunk) give the document starts inside each
        chunk; omitted, every chunk starts one document at offset 0 (window/truncate modes).
        `loss_mask` (one bool per token) is required by, and only accepted by, a writer made
        with loss_mask=True.
        """
        if (loss_mask is None) != (self._mask is None):
            raise ValueError("loss_mask must be given exactly when the writer keeps one")
        if loss_mask is not None:
            if len(loss_mask) != len(tokens):
                raise ValueError(f"{len(loss_mask)} loss-mask entries for {len(tokens)} tokens")
            mask = memoryview(np.ascontiguousarray(loss_mask, dtype=np.uint8)).cast("B")
            self._mask.write(mask)
            self._mask_hash.update(mask)
        n = len(lengths)
        tokens = np.asarray(tokens)
        if int(np.sum(lengths)) != len(tokens):
            raise ValueError(
                f"chunk lengths sum to {int(np.sum(lengths))}, got {len(tokens)} tokens"
            )
        if len(tokens) and (int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0):
            # Would wrap silently in the narrow dtype.
            raise ValueError(f"token id outside the vocabulary [0, {self.vocab_size})")
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        buf = memoryview(data).cast("B")
        self._tokens.write(buf)
        self._hash.update(buf)
        self.num_tokens += len(data)
        self._lengths.extend(np.asarray(lengths, dtype=np.int64).tolist())
        self._doc_ids.extend(np.asarray(doc_ids, dtype=np.int64).tolist())
        self._labels.extend(np.asarray(labels, dtype=np.int64).tolist())
        if starts_counts is None:
            self._starts.extend([0] * n)
            counts = np.ones(n, dtype=np.int64)
        else:
            self._starts.extend(np.asarray(starts, dtype=np.int64).tolist())
            counts = np.asarray(starts_counts, dtype=np.int64)
        self._starts_index.extend((self._starts_index[-1] + np.cumsum(counts)).tolist())

    # -------------------------------------------------------------------------- finalising
    def _close_files(self) -> None:
        """Close the open files; a flush that fails (a full disk) is the caller's to report,
        after the others are closed too."""
        failed: OSError | None = None
        for f in (self._tokens, self._names, self._mask):
            try:
                if f is not None:
                    f.close()
            except OSError as e:
                failed = failed or e
        if failed is not None:
            raise failed

    def abort(self) -> None:
        """Drop the half-written store (the old one, if any, is untouched). Its files are
        closed without flushing what a full disk refused: they are deleted anyway."""
        with contextlib.suppress(OSError):
            self._close_files()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def close(
        self, *, label_names: list[str] | None = None, stats: dict | None = None
    ) -> TokenStore:
        """Finalise: remap labels, write index and meta.json, rename into place atomically.

        `label_names` fixes the label↔id map (eval uses train's); by default it is the sorted
        set of labels seen. A label missing from a given map is an LLMTrainError naming it.
        """
        try:
            self._close_files()
            return self._finalise(label_names, stats or {})
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def _finalise(self, label_names: list[str] | None, stats: dict) -> TokenStore:
        lengths = np.frombuffer(self._lengths, dtype=np.int64)
        offsets = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths):
            np.cumsum(lengths[:-1], out=offsets[1:])
        labels = np.frombuffer(self._labels, dtype=np.int64).astype(np.int32)
        if self._label_ids:
            if label_names is None:
                label_names = sorted(self._label_ids)
            final = {name: i for i, name in enumerate(label_names)}
            unknown = [name for name in self._label_ids if name not in final]
            if unknown:
                raise LLMTrainError(
                    f"{self.path}: label {unknown[0]!r} does not occur in the training data "
                    f"(known labels: {', '.join(label_names)})"
                )
            remap = np.array([final[name] for name in self._label_ids], dtype=np.int32)
            labels = np.where(labels >= 0, remap[np.maximum(labels, 0)], -1).astype(np.int32)
        starts = np.frombuffer(self._starts, dtype=np.int64)
        arrays = {
            "index.npy": np.stack([offsets, lengths], axis=1).reshape(-1, 2),
            "doc_ids.npy": np.frombuffer(self._doc_ids, dtype=np.int64),
            "labels.npy": labels,
            "starts.npy": starts.astype(np.int32),
            "starts_index.npy": np.frombuffer(self._starts_index, dtype=np.int64),
        }
        files: dict[str, dict[str, Any]] = {
            TOKENS: {
                "size": self.num_tokens * self.dtype.itemsize,
                "sha256": self._hash.hexdigest(),
            }
        }
        for name, arr in arrays.items():
            np.save(self.tmp / name, np.ascontiguousarray(arr), allow_pickle=False)
        for name in (*INDEX_FILES, NAMES):
            p = self.tmp / name
            files[name] = {"size": p.stat().st_size, "sha256": _sha256(p)}
        if self._mask is not None:
            files[MASK] = {"size": self.num_tokens, "sha256": self._mask_hash.hexdigest()}
        for name, entry in files.items():
            entry["sample_sha256"] = _sampled_sha256(self.tmp / name, entry["size"])
        meta = {
            "format_version": FORMAT_VERSION,
            **self.extra_meta,
            "vocab_size": self.vocab_size,
            "dtype": self.dtype.name,
            "num_chunks": len(lengths),
            "num_tokens": self.num_tokens,
            "num_documents": self.num_documents,
            "num_doc_starts": len(starts),
            "label_names": label_names if self._label_ids else None,
            "stats": stats,
            "files": files,
        }
        text = (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        (self.tmp / META).write_bytes(text)
        # meta.json gives the files their meaning (label_names, counts, dtype): its own
        # checksum sits in the mark, and in each run that trains on the store.
        mark(self.tmp, "store", meta_sha256=hashlib.sha256(text).hexdigest())
        replace_dir(self.tmp, self.path)
        return TokenStore.open(self.path)


class TokenStore:
    """Read side: memory-mapped tokens, index arrays in memory (they are small).

    `s[i]` returns a fresh int64 array (torch-friendly; uint16 tensors are not), its doc_id
    and label id (None where the store has no labels).
    """

    def __init__(self, path: Path, meta: dict[str, Any], tokens: np.ndarray, arrays: dict):
        self.path = path
        self.meta = meta
        self._tokens = tokens
        index = arrays["index.npy"]
        self.offsets: np.ndarray = index[:, 0]
        self.lengths: np.ndarray = index[:, 1]
        self.doc_ids: np.ndarray = arrays["doc_ids.npy"]
        self.labels: np.ndarray = arrays["labels.npy"]
        self._starts: np.ndarray = arrays["starts.npy"]
        self._starts_index: np.ndarray = arrays["starts_index.npy"]
        self.label_names: list[str] | None = meta.get("label_names")
        self.num_tokens: int = int(meta["num_tokens"])
        # Plain lists make the hot-loop lookups in __getitem__ cheap Python ints.
        self._off_list = self.offsets.tolist()
        self._len_list = self.lengths.tolist()
        self._doc_list = self.doc_ids.tolist()
        self._lab_list = self.labels.tolist()
        self._has_labels = self.label_names is not None
        self._mask: np.ndarray | None = None  # loss_mask.bin, when the store has one
        self.verified = "sizes"  # what `open` checked: sizes | full | sampled

    # ------------------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, *, verify: bool | str = False) -> TokenStore:
        """Open and validate a store; any inconsistency is an LLMTrainError naming the path.

        Sizes and shapes are always checked against meta.json. `verify` also checks content
        against its checksums: "full" (or True) re-hashes every file, "sampled" hashes spread
        blocks, "auto" picks by size (module docstring). `store.verified` says what was done:
        "sizes", "full" or "sampled".
        """
        path = Path(path)
        meta = _read_meta(path)
        n_chunks, n_tokens, n_starts, dtype = _meta_counts(path / META, meta)
        mode = verify_mode(meta["files"], verify)
        _check_files(path, meta["files"], mode)
        if n_tokens * dtype.itemsize != int(meta["files"][TOKENS]["size"]):
            raise LLMTrainError(f"{path / META}: num_tokens disagrees with the size of {TOKENS}")
        arrays = _load_arrays(path, n_chunks, n_starts)
        index = arrays["index.npy"]
        if n_chunks and (
            index[:, 1].min() < 0
            or index[:, 0].min() < 0
            or int((index[:, 0] + index[:, 1]).max()) > n_tokens
        ):
            raise LLMTrainError(f"{path / 'index.npy'}: chunks point outside {TOKENS}; rebuild")
        if n_tokens:
            tokens = np.memmap(path / TOKENS, dtype=dtype, mode="r", shape=(n_tokens,))
        else:
            tokens = np.zeros(0, dtype=dtype)
        store = cls(path, meta, tokens, arrays)
        store.verified = mode
        if MASK in meta["files"]:
            store._mask = np.memmap(path / MASK, dtype=np.uint8, mode="r", shape=(n_tokens,))
        return store

    # ------------------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self._len_list)

    def __getitem__(self, i: int) -> dict[str, Any]:
        off = self._off_list[i]
        ids = self._tokens[off : off + self._len_list[i]].astype(np.int64)
        label = self._lab_list[i] if self._has_labels else None
        item = {"input_ids": ids, "doc_id": self._doc_list[i], "label": label}
        if self._mask is not None:  # True = a target (instruction data)
            item["loss_mask"] = self._mask[off : off + self._len_list[i]].astype(bool)
        return item

    @property
    def has_loss_mask(self) -> bool:
        return self._mask is not None

    def doc_starts(self, i: int) -> np.ndarray:
        """Offsets inside chunk i where a document begins (pack mode; [0] in window/truncate).

        0 is listed only when a document really begins at the chunk's first token; a chunk that
        opens mid-document has its first segment implicitly starting at 0.
        """
        if i < 0:
            i += len(self)
        return self._starts[self._starts_index[i] : self._starts_index[i + 1]]

    def __repr__(self) -> str:
        return f"TokenStore({str(self.path)!r}, chunks={len(self)}, tokens={self.num_tokens})"


# ---------------------------------------------------------------------- validation on open
def _read_meta(path: Path) -> dict[str, Any]:
    """meta.json as a dict, of this format version; anything else is an LLMTrainError."""
    meta_path = path / META
    if not path.is_dir():
        raise LLMTrainError(f"{path}: no token store here (run `llmtrain chunk` first)")
    if not meta_path.is_file():
        raise LLMTrainError(f"{meta_path}: missing; the store is incomplete, rebuild it")
    raw = meta_path.read_bytes()
    recorded = (read_mark(path) or {}).get("meta_sha256")  # absent: a store of before marks
    if recorded is not None and hashlib.sha256(raw).hexdigest() != recorded:
        raise LLMTrainError(
            f"{meta_path}: checksum mismatch (sha256 as {path.name}/.llmtrain records it); "
            "the store's metadata was edited, rebuild it with `llmtrain chunk --force`"
        )
    try:
        meta = json.loads(raw.decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise LLMTrainError(f"{meta_path}: not valid JSON ({e}); rebuild the store") from e
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise LLMTrainError(
            f"{meta_path}: format_version {version!r}, this llmtrain reads "
            f"{FORMAT_VERSION}; rebuild the store with `llmtrain chunk --force`"
        )
    return meta


def _meta_counts(meta_path: Path, meta: dict[str, Any]) -> tuple[int, int, int, np.dtype]:
    """(chunks, tokens, doc starts, token dtype) from meta.json, whose `files` entry must give
    an integer size for every file of the store."""
    try:
        files = meta["files"]
        n_chunks = int(meta["num_chunks"])
        n_tokens = int(meta["num_tokens"])
        n_starts = int(meta["num_doc_starts"])
        dtype = np.dtype(meta["dtype"])
        for name in ALL_FILES:
            int(files[name]["size"])
    except (KeyError, TypeError, ValueError) as e:
        raise LLMTrainError(f"{meta_path}: malformed ({e!r} missing or invalid)") from e
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise LLMTrainError(f"{meta_path}: unsupported token dtype {dtype}")
    return n_chunks, n_tokens, n_starts, dtype


def store_files(files: dict[str, Any]) -> tuple[str, ...]:
    """The files of a store: ALL_FILES, and loss_mask.bin when meta.json lists it."""
    return (*ALL_FILES, MASK) if MASK in files else ALL_FILES


def verify_mode(files: dict[str, Any], verify: bool | str) -> str:
    """What `open(verify=...)` will check: sizes | full | sampled. A store written before the
    sampled checksums existed is verified in full."""
    if verify is False or verify == "sizes":
        return "sizes"
    if verify is True or verify == "full":
        return "full"
    if verify not in ("auto", "sampled"):
        raise ValueError(f"verify must be a bool, 'auto', 'full' or 'sampled' (got {verify!r})")
    if any("sample_sha256" not in files[name] for name in store_files(files)):
        return "full"
    if verify == "auto":
        total = sum(int(files[name]["size"]) for name in store_files(files))
        return "full" if total <= FULL_VERIFY_MAX_BYTES else "sampled"
    return "sampled"


def _check_files(path: Path, files: dict[str, Any], mode: str) -> None:
    """Every file present with the size meta.json records, and with the checksum `mode`
    (verify_mode) asks for."""
    for name in store_files(files):
        p = path / name
        if not p.is_file():
            raise LLMTrainError(f"{p}: missing; the store is incomplete, rebuild it")
        size, expected = p.stat().st_size, int(files[name]["size"])
        if size != expected:
            raise LLMTrainError(
                f"{p}: {size} bytes, meta.json says {expected}; the store is truncated or "
                "corrupt, rebuild it with `llmtrain chunk --force`"
            )
        if mode == "full" and _sha256(p) != files[name].get("sha256"):
            raise LLMTrainError(
                f"{p}: checksum mismatch (sha256 of the whole file, as meta.json records it); "
                "the store was edited or is corrupt, rebuild it"
            )
        if mode == "sampled" and _sampled_sha256(p, size) != files[name]["sample_sha256"]:
            raise LLMTrainError(
                f"{p}: checksum mismatch (sampled blocks, as meta.json records them); the "
                "store was edited or is corrupt, rebuild it"
            )


def _load_arrays(path: Path, n_chunks: int, n_starts: int) -> dict[str, np.ndarray]:
    """The index arrays, each of the shape the counts in meta.json imply."""
    shapes = {
        "index.npy": (n_chunks, 2),
        "doc_ids.npy": (n_chunks,),
        "labels.npy": (n_chunks,),
        "starts.npy": (n_starts,),
        "starts_index.npy": (n_chunks + 1,),
    }
    arrays = {}
    for name, shape in shapes.items():
        try:
            arr = np.load(path / name, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise LLMTrainError(f"{path / name}: unreadable ({e}); rebuild the store") from e
        if arr.shape != shape:
            raise LLMTrainError(
                f"{path / name}: shape {arr.shape}, meta.json implies {shape}; rebuild it"
            )
        arrays[name] = arr
    return arrays
