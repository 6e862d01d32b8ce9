"""The tokenize stage: a local Hugging Face tokenizer, or one trained on the training corpus.

`load_tokenizer(cfg)` is the only entry point the pipeline needs. It never downloads: a
`tokenizer.path` must be a local directory (saved with `save_pretrained`) or a bare
`tokenizer.json`. With `tokenizer.train` the tokenizer is trained with the `tokenizers` library
by streaming `data.train`, saved in `<run.output_dir>/tokenizer/`, and reused as long as the
corpus files, the training settings and the task are unchanged (a fingerprint file says so).

Whatever the source, the tokenizer that comes back has the special tokens the task needs:
eos + pad for causal-lm, cls + sep + pad for sequence-classification (added when missing, which
may grow the vocabulary: models are built, or resized, with `len(tokenizer)`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import tokenizers
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from llmtrain import layout
from llmtrain.config import Config, TokenizerTrainConfig
from llmtrain.data.corpus import iter_documents, train_fingerprint
from llmtrain.data.encode import document_batches
from llmtrain.errors import LLMTrainError
from llmtrain.util.atomic import atomic_dir
from llmtrain.util.locks import exclusive
from llmtrain.util.owned import check_replaceable, confined

FINGERPRINT_FILE = "llmtrain_tokenizer.json"
_FINGERPRINT_VERSION = 1

# Names given to tokens this module adds, per role. A trained BPE uses them from the start.
_ADDED = {
    "eos_token": "<|endoftext|>",
    "pad_token": "<|pad|>",
    "cls_token": "<|cls|>",
    "sep_token": "<|sep|>",
}
_WORDPIECE_SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
# Roles recognised in a bare tokenizer.json, which records tokens but not what they are for.
_KNOWN_ROLES = {
    "eos_token": ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>"),
    "bos_token": ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>"),
    "pad_token": ("<|pad|>", "<pad>", "[PAD]"),
    "unk_token": ("<unk>", "[UNK]", "<|unk|>"),
    "cls_token": ("[CLS]", "<cls>", "<|cls|>"),
    "sep_token": ("[SEP]", "<sep>", "<|sep|>"),
    "mask_token": ("[MASK]", "<mask>"),
}
_REQUIRED = {
    "causal-lm": ("eos_token", "pad_token"),
    "sequence-classification": ("cls_token", "sep_token", "pad_token"),
}


# ------------------------------------------------------------------------------- public API
def load_tokenizer(cfg: Config) -> PreTrainedTokenizerFast:
    """The run's tokenizer, from `tokenizer.path` or trained (and cached) per `tokenizer.train`."""
    tc = cfg.tokenizer
    if tc.path is not None and tc.train is not None:
        raise LLMTrainError("tokenizer: set either tokenizer.path or tokenizer.train, not both")
    if tc.path is not None:
        tok = _load_local(tc.path)
    elif tc.train is not None:
        tok = _trained(cfg, tc.train)
    else:
        raise LLMTrainError(
            "tokenizer: set tokenizer.path (a local tokenizer directory or tokenizer.json) "
            "or tokenizer.train: {kind: bpe} to train one on data.train"
        )
    ensure_special_tokens(tok, cfg.model.task)
    return tok


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """sha256 of everything that decides token ids: the backend's JSON and the special ids."""
    h = hashlib.sha256(tok.backend_tokenizer.to_str().encode())
    h.update(json.dumps(special_token_ids(tok), sort_keys=True).encode())
    return h.hexdigest()


def special_token_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    """{"eos_token": id, "pad_token": id, ...} for every special role the tokenizer has set."""
    ids = {}
    for role in (
        "bos_token",
        "eos_token",
        "pad_token",
        "unk_token",
        "cls_token",
        "sep_token",
        "mask_token",
    ):
        token = getattr(tok, role, None)
        if token is not None:
            ids[role] = tok.convert_tokens_to_ids(str(token))
    return ids


def ensure_special_tokens(tok: PreTrainedTokenizerFast, task: str) -> list[str]:
    """Give `tok` the special tokens `task` needs, adding only what is missing.

    Returns the roles that were added. A causal LM pads with a distinct `<|pad|>` rather than
    eos so that an eos inside the data is never mistaken for padding.
    """
    added = {}
    for role in _REQUIRED[task]:
        if getattr(tok, role, None) is None:
            added[role] = _ADDED[role]
    if added:
        tok.add_special_tokens(added)
    return sorted(added)


# ------------------------------------------------------------------------------ local files
def _looks_like_hub_id(path: str) -> bool:
    """ "org/name" or "name": no leading ./ ~ /, no backslash, at most one slash, no extension."""
    if path.startswith((".", "/", "~")) or "\\" in path or path.endswith(".json"):
        return False
    return path.count("/") <= 1


def _from_directory(path: Path) -> PreTrainedTokenizerFast:
    """A saved tokenizer directory. With a tokenizer.json (every fast tokenizer has one) the
    generic fast class loads it with its special-token roles and never imports torch, which
    `llmtrain chunk` does not need; AutoTokenizer (which does import torch) is the fallback."""
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _load_local(path: str) -> PreTrainedTokenizerFast:
    p = Path(path).expanduser()
    if p.is_dir():
        try:
            tok = _from_directory(p)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LLMTrainError(
                f"tokenizer.path '{path}': cannot load a tokenizer from this directory ({e})"
            ) from e
        if not hasattr(tok, "backend_tokenizer"):
            raise LLMTrainError(
                f"tokenizer.path '{path}': not a fast tokenizer (no tokenizer.json); save one with "
                "a `tokenizers`-backed tokenizer's save_pretrained"
            )
        return tok
    if p.is_file():
        try:
            backend = Tokenizer.from_file(str(p))
        except Exception as e:  # the Rust side raises plain Exception on a bad file
            raise LLMTrainError(f"tokenizer.path '{path}': not a valid tokenizer.json ({e})") from e
        return _wrap(backend, _roles_from_added(backend))
    if _looks_like_hub_id(path):
        raise LLMTrainError(
            f"tokenizer.path '{path}' is not a local directory; llmtrain never downloads — point "
            "tokenizer.path at a local directory (e.g. one saved with save_pretrained)"
        )
    raise LLMTrainError(f"tokenizer.path '{path}' does not exist")


def _roles_from_added(backend: Tokenizer) -> dict[str, str]:
    """Guess special roles from a tokenizer.json's special added tokens by their usual names."""
    specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    roles = {}
    for role, names in _KNOWN_ROLES.items():
        for name in names:
            if name in specials:
                roles[role] = name
                break
    return roles


def _wrap(backend: Tokenizer, roles: dict[str, str]) -> PreTrainedTokenizerFast:
    # clean_up_tokenization_spaces would rewrite " ." to "." on decode and break round trips.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, clean_up_tokenization_spaces=False, **roles
    )


# -------------------------------------------------------------------------------- training
def _tokenizer_dir(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) / layout.TOKENIZER_DIR


def _train_fingerprint(cfg: Config, train: TokenizerTrainConfig) -> dict:
    return {
        "version": _FINGERPRINT_VERSION,
        "corpus": train_fingerprint(cfg.data),
        "train": train.model_dump(),
        "task": cfg.model.task,
        "tokenizers": tokenizers.__version__,
    }


def _trained(cfg: Config, train: TokenizerTrainConfig) -> PreTrainedTokenizerFast:
    """The cached tokenizer when its fingerprint matches, else a freshly trained one."""
    target = _tokenizer_dir(cfg)
    want = _train_fingerprint(cfg, train)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Under torchrun every rank gets here at once: the first trains and saves, the others
    # wait on the lock and then find a valid cache.
    with exclusive(confined(target.parent, target.parent / ".tokenizer.lock")):
        cached = _load_cached(target, want)
        if cached is not None:
            return cached
        tok = train_tokenizer(cfg, train)
        _save_atomic(tok, target, want)
        return tok


def _load_cached(target: Path, want: dict) -> PreTrainedTokenizerFast | None:
    try:
        have = json.loads((target / FINGERPRINT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if have != want:
        return None
    try:
        return _from_directory(target)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged cache is retrained, not reported


def _save_atomic(tok: PreTrainedTokenizerFast, target: Path, fingerprint: dict) -> None:
    """Write the cache beside `target` and swap it in whole: a crash never leaves half a cache.
    Only a cache of llmtrain's own is replaced: its fingerprint file is its mark."""
    check_replaceable(confined(target.parent, target), "tokenizer", (FINGERPRINT_FILE,))
    with atomic_dir(target) as tmp:
        tok.save_pretrained(str(tmp))
        # Written last: a cache without its fingerprint file is never trusted.
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2, sort_keys=True))


def _text_batches(cfg: Config) -> Iterator[list[str]]:
    """Corpus texts in lists (`document_batches`), as the trainer takes them."""
    for part in cfg.data.train_parts:  # a mixture's sources each once, unweighted
        for batch in document_batches(iter_documents(part.source, key=part.key)):
            yield [doc.text for doc in batch]


def train_tokenizer(cfg: Config, train: TokenizerTrainConfig) -> PreTrainedTokenizerFast:
    """Train a tokenizer on `data.train` (streamed) per `train`; not cached (see load_tokenizer).

    bpe: byte-level BPE (GPT-2 style) — every string round-trips exactly, no unknown tokens.
    wordpiece: BERT-style, lowercased, `[CLS] text [SEP]` added on encode.
    """
    # Training runs on Rust threads; saying so explicitly keeps every core busy and silences
    # the warning tokenizers prints when the process forks later. A user's setting wins.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    task = cfg.model.task
    if train.kind == "bpe":
        roles = {role: _ADDED[role] for role in ("eos_token", "pad_token")}
        if task == "sequence-classification":
            roles.update(cls_token=_ADDED["cls_token"], sep_token=_ADDED["sep_token"])
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=train.vocab_size,
            min_frequency=train.min_frequency,
            special_tokens=list(roles.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        roles = dict(_WORDPIECE_SPECIALS)
        if task == "causal-lm":
            roles["eos_token"] = "[SEP]"  # BERT's end-of-sequence marker
        backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=True)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(
            vocab_size=train.vocab_size,
            min_frequency=train.min_frequency,
            special_tokens=list(_WORDPIECE_SPECIALS.values()),
            continuing_subword_prefix="##",
            show_progress=False,
        )
    backend.train_from_iterator(_text_batches(cfg), trainer=trainer)
    if train.kind == "bpe" and task == "sequence-classification":
        cls, sep = roles["cls_token"], roles["sep_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(t, backend.token_to_id(t)) for t in (cls, sep)],
        )
    elif train.kind == "wordpiece":
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[(t, backend.token_to_id(t)) for t in ("[CLS]", "[SEP]")],
        )
    return _wrap(backend, roles)


__all__ = [
    "FINGERPRINT_FILE",
    "ensure_special_tokens",
    "load_tokenizer",
    "special_token_ids",
    "tokenizer_fingerprint",
    "train_tokenizer",
]
