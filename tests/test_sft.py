"""Instruction data (docs/architecture.md, "Instruction data"): chats and prompt/response pairs
rendered by the chat template, a per-token loss mask in the store, conversations packed whole,
bad records named by file:line, and N counting targets only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from chunk_helpers import bpe_tokenizer
from run_helpers import refused_by_validate
from tokenizers import decoders
from typer.testing import CliRunner

from llmtrain.config import Config
from llmtrain.data.batching import IGNORE, collate, supervised_count
from llmtrain.data.chunking import ConversationPacker
from llmtrain.data.store_cache import ensure_stores
from llmtrain.errors import ConfigError, LLMTrainError

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "configs" / "chat-template.jinja"
SYSTEM, USER, ASSISTANT = "sysnote", "askq", "replyr"  # markers: one role each, never mixed


SEQ = 384  # above every conversation write_chats makes, except its long ones (12 turns)


@pytest.fixture(scope="module")
def tok():
    t = bpe_tokenizer()
    t.backend_tokenizer.decoder = decoders.ByteLevel()  # decode() gives the text back
    return t


def _conversation(i: int, turns: int) -> list[dict[str, str]]:
    """A chat whose every content names its role and position, so decoded text says which."""
    messages = [{"role": "system", "content": f"{SYSTEM} {i} keep it short"}] if i % 3 else []
    for t in range(turns):
        messages.append({"role": "user", "content": f"{USER} {i}.{t} what now"})
        messages.append({"role": "assistant", "content": f"{ASSISTANT} {i}.{t} done so"})
    return messages


def write_chats(path: Path, n: int, *, long_every: int = 0) -> list[list[dict]]:
    chats = []
    with open(path, "w") as f:
        for i in range(n):
            turns = 12 if long_every and i % long_every == 0 else 1 + i % 3
            chats.append(_conversation(i, turns))
            f.write(json.dumps({"id": f"c{i}", "messages": chats[-1]}) + "\n")
    return chats


def sft_cfg(tmp_path: Path, *, train: dict | None = None, **data) -> Config:
    chunk = {"seq_len": SEQ, "mode": "pack", **data.pop("chunk", {})}
    sft = {"chat_template": str(TEMPLATE), **data.pop("sft", {})}
    source = {"path": str(tmp_path / "chats.jsonl"), "format": "chat", **(train or {})}
    return Config.model_validate(
        {
            "run": {"output_dir": str(tmp_path / "run")},
            "model": {"arch": "gpt2"},
            "data": {"train": source, "chunk": chunk, "sft": sft, **data},
        }
    )


def supervised_runs(store, i: int, tok) -> list[str]:
    """The decoded text of each run of consecutive target tokens in chunk i."""
    item = store[i]
    ids, mask = item["input_ids"], item["loss_mask"]
    runs, current = [], []
    for t, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if m:
            current.append(t)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


# ------------------------------------------------------------------------------ the mask
def test_packed_store_supervises_responses_and_no_prompt(tmp_path, tok):
    chats = write_chats(tmp_path / "chats.jsonl", 40)
    store = ensure_stores(sft_cfg(tmp_path), tok, progress=False).stores["train"]
    assert store.has_loss_mask
    runs = [r for i in range(len(store)) for r in supervised_runs(store, i, tok)]
    text = "\n".join(runs)
    responses = [m["content"] for c in chats for m in c if m["role"] == "assistant"]
    prompts = [m["content"] for c in chats for m in c if m["role"] != "assistant"]
    assert all(r in text for r in responses)
    assert not any(p in text for p in prompts)
    assert USER not in text and SYSTEM not in text and "<|user|>" not in text
    # every assistant turn is one run: its text, then the end-of-turn token
    assert sorted(runs) == sorted(f"{r}<|endoftext|>\n" for r in responses)


def test_train_on_all_supervises_every_token(tmp_path, tok):
    write_chats(tmp_path / "chats.jsonl", 10)
    store = ensure_stores(sft_cfg(tmp_path, sft={"train_on": "all"}), tok, progress=False)
    s = store.stores["train"]
    assert all(s[i]["loss_mask"].all() for i in range(len(s)))


def test_pairs_mask_the_prompt(tmp_path, tok):
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"q": f"{USER} {i} tell", "a": f"{ASSISTANT} {i} told"}) + "\n")
    train = {"path": str(tmp_path / "pairs.jsonl"), "format": "jsonl"}
    train |= {"prompt_field": "q", "response_field": "a"}
    cfg = sft_cfg(tmp_path, train=train, chunk={"mode": "truncate"})
    s = ensure_stores(cfg, tok, progress=False).stores["train"]
    assert len(s) == 12  # truncate: one chunk per pair
    for i in range(len(s)):
        assert supervised_runs(s, i, tok) == [f"{ASSISTANT} {i} told<|endoftext|>\n"]


def test_collate_takes_labels_from_the_mask_and_n_counts_targets(tmp_path, tok):
    write_chats(tmp_path / "chats.jsonl", 30)
    s = ensure_stores(sft_cfg(tmp_path), tok, progress=False).stores["train"]
    idx = np.arange(min(4, len(s)))
    batch = collate(s, idx, pad_id=tok.pad_token_id, task="causal-lm", isolate_docs=True)
    for row, i in enumerate(idx):
        item = s[int(i)]
        n = len(item["input_ids"])
        targets = (batch["labels"][row, :n] != IGNORE).numpy()
        expected = item["loss_mask"].copy()
        expected[[x for x in s.doc_starts(int(i)) if x > 0]] = False
        assert np.array_equal(targets, expected)
        assert (batch["labels"][row, n:] == IGNORE).all()
        starts = [int(x) for x in s.doc_starts(int(i))]
        assert all(int(batch["position_ids"][row, x]) == 0 for x in starts)  # positions restart
        assert int(batch["position_ids"][row, n - 1]) == n - 1 - max(x for x in [0, *starts])
    assert "attention_mask" not in batch  # conversations see only themselves (docs restart)
    n_targets = sum(int(s[int(i)]["loss_mask"][1:].sum()) for i in idx)
    assert supervised_count(batch, "causal-lm", "tokens") == n_targets  # N counts targets only
    assert n_targets < int(sum(s.lengths[idx]))


# ---------------------------------------------------------------------------- packing
def test_pack_keeps_conversations_whole_and_counts_cuts(tmp_path, tok):
    write_chats(tmp_path / "chats.jsonl", 30, long_every=10)  # 3 conversations > seq_len
    report = ensure_stores(sft_cfg(tmp_path), tok, progress=False)
    s, stats = report.stores["train"], report.splits["train"]
    assert stats["conversations_cut"] == 3
    assert stats["dropped_tokens"] == 0 and stats["tokens_out"] == stats["tokens_in"]
    assert stats["pad_tokens"] == len(s) * SEQ - stats["tokens_out"]
    pieces: dict[int, int] = {}  # conversation → chunks holding part of it
    for i in range(len(s)):
        assert len(s[i]["input_ids"]) <= SEQ
        starts = [int(x) for x in s.doc_starts(i)]
        docs = len(starts) + (0 if starts and starts[0] == 0 else 1)
        first = int(s.doc_ids[i])
        for d in range(first, first + docs):
            pieces[d] = pieces.get(d, 0) + 1
    assert sorted(pieces) == list(range(30))
    cut = {d for d, n in pieces.items() if n > 1}
    assert cut == {0, 10, 20}  # only the long ones span chunks


def test_conversation_packer_properties():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=200)
    convs = [rng.integers(0, 100, size=n) for n in lengths]
    masks = [rng.random(n) < 0.5 for n in lengths]
    packer = ConversationPacker(16)
    batches = [
        packer.add(convs[i : i + 7], masks[i : i + 7], range(i, i + 7)) for i in range(0, 196, 7)
    ]
    batches += [packer.add(convs[196:], masks[196:], range(196, 200)), packer.finish()]
    tokens = np.concatenate([b.tokens for b in batches])
    assert np.array_equal(tokens, np.concatenate(convs))  # nothing lost, nothing reordered
    assert np.array_equal(np.concatenate([b.loss_mask for b in batches]), np.concatenate(masks))
    chunk_lengths = np.concatenate([b.lengths for b in batches])
    assert chunk_lengths.max() <= 16 and chunk_lengths.sum() == lengths.sum()
    assert sum(b.cut for b in batches) == int((lengths > 16).sum())
    assert sum(int(b.starts_counts.sum()) for b in batches) == 200  # one start per conversation


# ------------------------------------------------------------------------------ bad records
BAD = [
    ({"id": "x"}, "missing field 'messages' (data.train.messages_field)"),
    ({"messages": "hi"}, "field 'messages' is a string, expected a list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "message 1 of 'messages' has role 'bot'"),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
        "message 2: empty assistant turn",
    ),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
]


@pytest.mark.parametrize(("record", "message"), BAD, ids=[m[:20] for _, m in BAD])
def test_bad_record_names_file_and_line(tmp_path, tok, record, message):
    write_chats(tmp_path / "chats.jsonl", 3)
    with open(tmp_path / "chats.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    with pytest.raises(LLMTrainError, match=r"chats\.jsonl:4: ") as e:
        ensure_stores(sft_cfg(tmp_path), tok, progress=False)
    assert message in str(e.value) and "on_error: skip" in str(e.value)


def test_bad_records_are_skipped_and_counted(tmp_path, tok):
    write_chats(tmp_path / "chats.jsonl", 5, long_every=2)  # 0, 2, 4 render > SEQ tokens
    with open(tmp_path / "chats.jsonl", "a") as f:
        for record, _ in BAD:
            f.write(json.dumps(record) + "\n")
    cfg = sft_cfg(tmp_path, train={"on_error": "skip"}, chunk={"mode": "truncate"})
    report = ensure_stores(cfg, tok, progress=False)
    assert report.splits["train"]["skipped_records"] == len(BAD) + 3
    assert report.splits["train"]["documents"] == 2


def test_too_long_in_truncate_mode_is_a_bad_record(tmp_path, tok):
    write_chats(tmp_path / "chats.jsonl", 3, long_every=2)
    cfg = sft_cfg(tmp_path, chunk={"mode": "truncate"})
    with pytest.raises(LLMTrainError, match=r"chats.jsonl:1: the conversation renders to \d+ "):
        ensure_stores(cfg, tok, progress=False)


def test_a_template_that_does_not_render_turn_by_turn_is_a_bad_record(tmp_path, tok):
    write_chats(tmp_path / "chats.jsonl", 2)
    odd = tmp_path / "odd.jinja"  # numbers turns from the end: a prefix renders differently
    odd.write_text(
        "{% for m in messages %}{{ messages|length - loop.index }} {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}> {% endif %}"
    )
    with pytest.raises(LLMTrainError, match="does not render this conversation as the"):
        ensure_stores(sft_cfg(tmp_path, sft={"chat_template": str(odd)}), tok, progress=False)


def test_tokenizer_without_template_names_the_key(tmp_path, tok):
    write_chats(tmp_path / "chats.jsonl", 2)
    cfg = sft_cfg(tmp_path)
    cfg.data.sft.chat_template = None
    with pytest.raises(ConfigError, match=r"data.sft.chat_template: is required"):
        ensure_stores(cfg, tok, progress=False)


# ------------------------------------------------------------------------------- validation
def _validate(tmp_path: Path, data: str, model: str = "arch: gpt2", train: str = "") -> str:
    """`llmtrain validate` on a config with these data lines; returns its output (exit 2)."""
    write_chats(tmp_path / "chats.jsonl", 2)
    train = train or f"{{path: {tmp_path / 'chats.jsonl'}, format: chat}}"
    (tmp_path / "c.yaml").write_text(
        f"run: {{output_dir: {tmp_path / 'out'}}}\nmodel: {{{model}}}\n"
        f"tokenizer: {{train: {{vocab_size: 300}}}}\ntrain: {{max_steps: 1}}\n"
        f"data:\n  train: {train}\n{data}"
    )
    return refused_by_validate(tmp_path / "c.yaml")


def test_trained_tokenizer_needs_a_template_file(tmp_path):
    out = _validate(tmp_path, "")
    assert "data.sft.chat_template: is required: a tokenizer trained by tokenizer.train" in out


def test_sft_rules(tmp_path):
    sft = f"  sft: {{chat_template: {tmp_path / 'none.jinja'}}}\n  chunk: {{mode: window}}\n"
    out = _validate(tmp_path, sft, model="arch: bert, task: sequence-classification")
    assert "c.yaml:7" in out and "data.sft.chat_template: no such file" in out
    assert "data.chunk.mode: window cuts documents for classification" in out
    assert "model.task: instruction data (chats or pairs) trains a causal-lm" in out


def test_pair_fields_come_together(tmp_path):
    out = _validate(tmp_path, f"  eval: {{path: {tmp_path / 'chats.jsonl'}, prompt_field: q}}\n")
    assert "data.eval.response_field: instruction pairs need both" in out


def test_sft_section_needs_instruction_data(tmp_path):
    (tmp_path / "t.txt").write_text("plain text\n")
    out = _validate(tmp_path, "  sft: {train_on: all}\n", train=f"{{path: {tmp_path / 't.txt'}}}")
    assert "data.sft: applies to instruction data" in out


def test_fit_trains_on_targets_only(tmp_path, tok, monkeypatch):
    """One SFT step end to end: the logged token count is the window's tokens, N its targets
    (loss finite); the eval loss is over assistant tokens only."""
    from llmtrain.engine.loop import train
    from llmtrain.engine.model import build_model

    write_chats(tmp_path / "chats.jsonl", 16)
    cfg = sft_cfg(tmp_path)
    data = cfg.model_dump()
    data["model"]["config"] = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": SEQ}
    data["batch"] = {"global_batch": 4, "micro_batch": 2}
    data["train"] = {"max_steps": 2, "precision": "fp32", "save_every": None, "eval_every": None}
    data["log"] = {"progress": False}
    cfg = Config.model_validate(data)
    s = ensure_stores(cfg, tok, progress=False).stores["train"]
    torch.set_num_threads(1)
    model = build_model(cfg, tok, None)
    result = train(cfg, model, tok, s, None, micro_batch=2, device=torch.device("cpu"))
    assert result.step == 2 and np.isfinite(result.last_loss)


def test_sft_fingerprint_follows_train_on_and_the_template(tmp_path):
    from llmtrain.data.sft import sft_fingerprint

    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE.read_text())
    cfg = sft_cfg(tmp_path, sft={"chat_template": str(template)})
    first = sft_fingerprint(cfg.data)
    cfg.data.sft.train_on = "all"
    assert sft_fingerprint(cfg.data) != first
    cfg.data.sft.train_on = "assistant"
    assert sft_fingerprint(cfg.data) == first
    template.write_text(TEMPLATE.read_text() + "\n")
    assert sft_fingerprint(cfg.data) != first
    cfg.data.train.format = "jsonl"  # a text corpus: nothing of data.sft matters
    assert sft_fingerprint(cfg.data) is None


def test_csv_pairs_and_a_missing_column(tmp_path, tok):
    rows = "".join(f'"{USER} {i} tell","{ASSISTANT} {i} told"\n' for i in range(5))
    (tmp_path / "pairs.csv").write_text("q,a\n" + rows)
    train = {"path": str(tmp_path / "pairs.csv"), "format": "csv"}
    cfg = sft_cfg(tmp_path, train=train | {"prompt_field": "q", "response_field": "a"})
    s = ensure_stores(cfg, tok, progress=False).stores["train"]
    text = "".join(r for i in range(len(s)) for r in supervised_runs(s, i, tok))
    assert all(f"{ASSISTANT} {i} told" in text for i in range(5)) and USER not in text
    cfg = sft_cfg(tmp_path, train=train | {"prompt_field": "q", "response_field": "answer"})
    with pytest.raises(LLMTrainError, match=r"pairs\.csv:1: no column 'answer'"):
        ensure_stores(cfg, tok, progress=False)


def test_shipped_sft_example_resolves(tmp_path, monkeypatch):
    """configs/sft-chat.yaml as a new user runs it (from the repository root): tokenizer,
    template, store of masked conversations and model, up to the first step (--dry-run)."""
    from llmtrain.cli import app
    from llmtrain.data.store import TokenStore

    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    res = CliRunner().invoke(
        app, ["fit", "configs/sft-chat.yaml", "--dry-run", "--set", f"run.output_dir={out}"]
    )
    assert res.exit_code == 0, res.output
    store = TokenStore.open(out / "store" / "train")
    assert store.has_loss_mask and 0 < store.meta["stats"]["documents"] < 400
    assert store.meta["stats"]["conversations_cut"] == 0
