"""A trained run, opened for use: what `predict`, `evaluate`, `generate` and `report` share
(docs/architecture.md, "Using a trained run").

`open_run(RUN_DIR)` reads the run's `config.resolved.yaml` through the config loader, loads
the model from `final/` (`from_pretrained`, safetensors only) or from a checkpoint
(`model.safetensors` into the model `fit` would build), and the tokenizer saved beside it.
`encode_input` turns any corpus that `data.*` accepts into a token store with the run's own
tokenizer and chunking (`llmtrain.data.encode.SplitWriter`, the writer `fit` uses), so a
document reaches the model as it did in training. Nothing here unpickles anything.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from llmtrain.config import Config, DataSourceConfig, load_config
from llmtrain.console import say
from llmtrain.data.chunk_spec import raw_backend, resolve_spec
from llmtrain.data.chunking import ChunkSpec
from llmtrain.data.corpus import Document, ReadStats, iter_documents
from llmtrain.data.encode import SplitWriter, document_batches
from llmtrain.data.store import TokenStore
from llmtrain.data.store_cache import store_root
from llmtrain.data.tokenizer import ensure_special_tokens, load_tokenizer
from llmtrain.engine.checkpoint import check_no_links, verify_manifest
from llmtrain.engine.distributed import resolve_device
from llmtrain.engine.model import auto_class, build_model, model_positions
from llmtrain.engine.precision import param_dtype
from llmtrain.errors import ConfigError, LLMTrainError
from llmtrain.layout import CHECKPOINT_PREFIX, CHECKPOINTS_DIR, CONFIG_FILE, FINAL_DIR, METRICS_FILE
from llmtrain.util.owned import confined

# Config problems that do not matter to a command that never reads the run's corpora: the
# corpus (or the tokenizer it was trained from) may have moved since the run.
_MOVED_INPUT = re.compile(r"\b(data\.(train|eval)\.path|tokenizer\.path)(\.\d+)?: ")


@dataclass
class TrainedRun:
    """A run directory with its model loaded for inference (eval mode, on `device`).

    Invariant: `cfg.run.output_dir` is `path`, so everything the config places in the run
    directory (stores, tokenizer cache, probe cache) is found wherever the directory now is.
    """

    path: Path
    cfg: Config
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    weights: Path  # final/ or the checkpoint directory the weights came from
    label_names: list[str] | None
    positions: int | None  # tokens the model reads at most (None: it declares no limit)

    @property
    def classify(self) -> bool:
        return self.cfg.model.task == "sequence-classification"

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0


# ------------------------------------------------------------------------------ config
def run_config_path(run_dir: str | Path) -> Path:
    """`<run_dir>/config.resolved.yaml`, or an error saying what a run directory is."""
    path = Path(run_dir)
    if not path.is_dir():
        raise LLMTrainError(f"{path}: no such run directory (give a run's run.output_dir)")
    config = confined(path, path / CONFIG_FILE)
    if not config.is_file():
        raise LLMTrainError(
            f"{path}: not a run directory (no {CONFIG_FILE}; `llmtrain fit` writes it when "
            "training starts)"
        )
    return config


def read_run_config(run_dir: str | Path, *, needs_corpus: bool = True) -> Config:
    """The run's config, validated by the config loader, with `run.output_dir` = `run_dir`.

    `needs_corpus=False`: a command that reads no corpus of the run's (predict/evaluate
    with --input, generate) accepts a run whose corpus or tokenizer source has moved."""
    path = run_config_path(run_dir)
    try:
        cfg = load_config(path, check_model=False)
    except ConfigError as e:
        if needs_corpus or not all(_MOVED_INPUT.search(m) for m in e.messages):
            raise
        # the only problems are paths this command never opens: the schema alone decides
        cfg = Config.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    run = cfg.run.model_copy(update={"output_dir": str(run_dir)})
    return cfg.model_copy(update={"run": run})


def read_run_metrics(run_dir: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(the records of `metrics.jsonl`, where a line could not be read): a crash may have
    torn the last line, which costs that record, not the report."""
    path = confined(Path(run_dir), Path(run_dir) / METRICS_FILE)
    if not path.is_file():
        raise LLMTrainError(f"{path}: no such file; has the run logged a step yet?")
    records, bad = [], []
    text = path.read_text(encoding="utf-8", errors="replace")  # torn bytes: a bad line
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            bad.append(f"{path}:{lineno}")
            continue
        if isinstance(record, dict):
            records.append(record)
    return records, bad


def run_name(run_dir: str | Path) -> str:
    """The run's run.name (its config, read without validation: a report needs nothing else),
    else the directory's name."""
    path = Path(run_dir)
    try:
        data = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8"))
        name = data.get("run", {}).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        name = None
    return str(name) if name else path.resolve().name


def run_micro_batch(run_dir: str | Path, cfg: Config) -> int | None:
    """The micro-batch the run trained (and evaluated) with last: its last train record's
    (an OOM may have halved it), else the configured integer; None for an unrecorded auto."""
    try:
        records, _ = read_run_metrics(run_dir)
    except LLMTrainError:
        records = []
    trained = [r for r in records if r.get("split") == "train" and r.get("micro_batch")]
    if trained:
        return int(trained[-1]["micro_batch"])
    micro = cfg.batch.micro_batch
    return int(micro) if micro != "auto" else None


# ------------------------------------------------------------------------------- model
def _unreadable(file: Path, e: Exception, what: str = "cannot load") -> LLMTrainError:
    """One line naming the file a library failed to read (safetensors, tokenizers and json
    raise their own types, with messages over several lines)."""
    return LLMTrainError(f"{file}: {what} ({type(e).__name__}: {' '.join(str(e).split())})")


def _hf_quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_run_tokenizer(run_dir: Path, cfg: Config) -> Any:
    """The tokenizer saved in `final/` (what the run trained with), else the run's own
    (`tokenizer.path` or the cached trained one) for a run that has no final/ yet."""
    final = confined(run_dir, run_dir / FINAL_DIR)
    if final.is_dir():
        check_no_links(final)  # before its first file is read (the tokenizer)
    if (final / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(final), local_files_only=True)
        except Exception as e:  # the Rust tokenizer raises plain Exception on a bad file
            # named by the message when it says which file (config.json is read too)
            damaged = final if str(final) in str(e) else final / "tokenizer.json"
            raise _unreadable(damaged, e, "cannot load the tokenizer") from e
    else:
        tok = load_tokenizer(cfg)
    ensure_special_tokens(tok, cfg.model.task)
    return tok


def _run_labels(run_dir: Path, cfg: Config) -> tuple[int | None, list[str] | None]:
    """(num_labels, label names) of a classification run: final/'s config, else the train
    store's names, else model.num_labels."""
    if cfg.model.task != "sequence-classification":
        return None, None
    config = run_dir / FINAL_DIR / "config.json"
    if config.is_file():
        try:
            id2label = json.loads(config.read_text(encoding="utf-8")).get("id2label") or {}
            names = [str(id2label[k]) for k in sorted(id2label, key=int)]
        except (ValueError, AttributeError, TypeError) as e:
            raise _unreadable(config, e, "not a model config") from e
        if names:
            return len(names), names
    train = store_root(cfg) / "train"
    if train.is_dir():
        names = TokenStore.open(train).label_names
        if names:
            return len(names), [str(n) for n in names]
    return cfg.model.num_labels, None


def _from_final(run_dir: Path, cfg: Config) -> torch.nn.Module:
    from safetensors import SafetensorError

    final = run_dir / FINAL_DIR
    if not (final / "config.json").is_file():
        raise LLMTrainError(
            f"{final}: no final model (the run has not finished); give --checkpoint "
            f"{run_dir / CHECKPOINTS_DIR}/{CHECKPOINT_PREFIX}…"
        )
    verify_manifest(final, required=("config.json",))  # checksums before anything is read
    kwargs: dict[str, Any] = {}
    if cfg.model.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    try:
        return auto_class(cfg.model.task).from_pretrained(
            str(final),
            dtype=param_dtype(cfg.train.precision),
            use_safetensors=True,
            local_files_only=True,
            **kwargs,
        )
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # a damaged file
        damaged = final / "model.safetensors" if isinstance(e, SafetensorError) else final
        raise _unreadable(damaged, e) from e


def _from_checkpoint(path: Path, run_dir: Path, cfg: Config, tok: Any) -> torch.nn.Module:
    """The model `fit` builds, with the checkpoint's weights: all of them, or under PEFT the
    adapters (the base is model.pretrained, as on resume)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    weights = path / "model.safetensors"
    if not weights.is_file():
        raise LLMTrainError(
            f"{path}: not a checkpoint (no model.safetensors); give a directory "
            f"{run_dir / CHECKPOINTS_DIR}/{CHECKPOINT_PREFIX}N"
        )
    verify_manifest(path)  # its checksums, before anything of it is read
    num_labels, names = _run_labels(run_dir, cfg)
    model = build_model(cfg, tok, num_labels, names)
    if getattr(cfg.model, "peft", None) is not None:
        from llmtrain.engine.peft import load_trainable

        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError) as e:  # a damaged file
            raise _unreadable(weights, e) from e
        load_trainable(model, tensors, path)
        return model
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:  # damaged; shapes that differ
        raise _unreadable(weights, e) from e
    if missing or unexpected:  # sets of names
        raise LLMTrainError(
            f"{weights}: weights do not match the run's model (missing "
            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); is it a checkpoint "
            "of this run?"
        )
    return model


def open_run(
    run_dir: str | Path, *, checkpoint: str | Path | None = None, needs_corpus: bool = True
) -> TrainedRun:
    """Open a run directory for inference: config, tokenizer, model (final/ or
    `checkpoint`), in eval mode on the run's device (`run.device`)."""
    path = Path(run_dir)
    cfg = read_run_config(path, needs_corpus=needs_corpus)
    _hf_quiet()
    tok = load_run_tokenizer(path, cfg)
    if checkpoint is None:
        model, weights = _from_final(path, cfg), path / FINAL_DIR
    else:
        weights = Path(checkpoint)
        model = _from_checkpoint(weights, path, cfg, tok)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = True  # generation reuses past keys; scoring ignores it
    device = resolve_device(cfg.run.device)
    model.to(device).eval()
    names = None
    if cfg.model.task == "sequence-classification":
        id2label = getattr(model.config, "id2label", None) or {}
        names = [str(id2label[i]) for i in sorted(id2label)] or _run_labels(path, cfg)[1]
    return TrainedRun(path, cfg, model, tok, device, weights, names, model_positions(model.config))


# ------------------------------------------------------------------------------ inputs
def input_source(
    path: str, *, text_field: str | None = None, label_field: str | None = None, like: Any
) -> DataSourceConfig:
    """A corpus given on the command line, read like `like` (the run's data.train, a mixture's
    first source): its
    format rules, fields and txt split unless overridden."""
    base = {k: v for k, v in like.model_dump().items() if k in DataSourceConfig.model_fields}
    # documents are text: a conversation format of an SFT run's data does not carry over
    base.update(path=path, prompt_field=None, response_field=None)
    if base.get("format") == "chat":
        base["format"] = "auto"
    if text_field is not None:
        base["text_field"] = text_field
    if label_field is not None:
        base["label_field"] = label_field
    try:
        return DataSourceConfig.model_validate(base)
    except ValueError as e:
        raise LLMTrainError(f"--input {path}: {' '.join(str(e).split())}") from e


def scoring_spec(run: TrainedRun) -> ChunkSpec:
    """The windows a document is scored in: the run's own chunking, except that a causal LM
    trained on packed text scores each document alone, in consecutive windows of seq_len
    (packing would mix documents, which have no loss of their own then)."""
    spec = resolve_spec(run.cfg, run.tokenizer)
    if spec.mode == "pack":
        return dataclasses.replace(spec, mode="window", overlap=0, min_tail=1)
    return spec


@dataclass
class InputStore:
    """Documents encoded and chunked for the model: a SequenceSource over `store` whose
    labels come from the documents (`label_ids`, one per document; 0 where a document has
    none, so collate has a class to carry — such a row's loss means nothing).

    `names[d]` and `gold[d]` are document d's id and label as the corpus gave them."""

    store: TokenStore
    names: list[str]
    gold: list[str | None]
    label_ids: np.ndarray
    isolate_docs: bool = False
    lengths: np.ndarray = field(init=False)
    doc_ids: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.lengths, self.doc_ids = self.store.lengths, self.store.doc_ids

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.store[i]
        item["label"] = int(self.label_ids[item["doc_id"]])
        return item

    def doc_starts(self, i: int) -> np.ndarray:
        return self.store.doc_starts(i)

    def windows(self) -> np.ndarray:
        """How many windows each document has (documents in order)."""
        return np.bincount(self.doc_ids, minlength=len(self.names))


def _label_index(run: TrainedRun, doc: Document, required: bool) -> int:
    """The class id of a document's label; unknown labels are an error when `required`."""
    names = run.label_names or []
    if doc.label is not None and str(doc.label) in names:
        return names.index(str(doc.label))
    if required:
        got = "no label" if doc.label is None else f"label {doc.label!r}"
        raise LLMTrainError(f"{doc.where}: {got}, not one of the run's labels ({', '.join(names)})")
    return -1


def encode_input(
    run: TrainedRun,
    source: DataSourceConfig,
    root: Path,
    *,
    spec: ChunkSpec,
    require_label: bool = False,
    key: str = "--input",
) -> InputStore:
    """Read `source`, encode it with the run's tokenizer and chunk it by `spec` into a token
    store under `root` (the chunk stage's writer); `require_label` (evaluate) makes a missing
    or unknown label an error naming its line."""
    tok = run.tokenizer
    vocab = max(len(tok), tok.backend_tokenizer.get_vocab_size(with_added_tokens=True))
    writer = SplitWriter("input", root / "input", spec, vocab, {"source": key})
    names: list[str] = []
    gold: list[str | None] = []
    ids_of: list[int] = []
    docs = iter_documents(source, ReadStats(), require_label=require_label, key=key)
    try:
        with raw_backend(tok) as backend:
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            for batch in document_batches(docs):
                encodings = encode([d.text for d in batch], add_special_tokens=False)
                writer.add(batch, [e.ids for e in encodings], [])
                names += [d.doc_id for d in batch]
                gold += [None if d.label is None else str(d.label) for d in batch]
                if run.classify:
                    ids_of += [_label_index(run, d, require_label) for d in batch]
        store = writer.close(None)
    except BaseException:
        writer.writer.abort()
        raise
    label_ids = np.maximum(np.asarray(ids_of or [0] * len(names), dtype=np.int64), 0)
    packed_alone = spec.mode == "pack" and run.cfg.data.is_isolated  # as the run's own packing
    return InputStore(store, names, gold, label_ids, isolate_docs=packed_alone)


def inference_batch(run: TrainedRun, batch: str | None) -> int:
    """Rows per forward: `--batch N`; `auto` probes (llmtrain.probe: training steps, so the
    answer leaves room to spare for inference); by default the run's own micro-batch."""
    if batch is None:
        micro = run_micro_batch(run.path, run.cfg)
        if micro is not None:
            return micro
        batch = "auto"
    if batch == "auto":
        from llmtrain.probe.plan import probe_for_config

        result = probe_for_config(
            run.cfg, run.model, run.device, use_cache=run.cfg.batch.probe.cache
        )
        run.model.eval()  # the trials train; the weights are unchanged
        say(f"--batch auto → {result.micro_batch} (the probe's measured micro-batch)", label="note")
        return result.micro_batch
    try:
        n = int(batch)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--batch: expected a positive integer or auto (got {batch!r})")
    return n
