"""data.sft.template: none: prompt/response pairs as plain text (prompt + response + EOS), the
loss on the response and the EOS; the boundary found on characters."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from run_helpers import refused_by_validate
from test_chunk import bpe_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llmtrain.commands.generate import chat_prompt
from llmtrain.config import Config
from llmtrain.config.schema import SftConfig
from llmtrain.data.sft import PairEncoder
from llmtrain.data.store_cache import ensure_stores
from llmtrain.errors import ConfigError


@pytest.fixture(scope="module")
def words() -> PreTrainedTokenizerFast:
    """Whole words and punctuation, so every token's characters can be checked by hand."""
    vocab = {"Q": 0, ":": 1, "hello": 2, "world": 3, "<eos>": 4, "[UNK]": 5, "hel": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="[UNK]")


def encode(tok, prompt: str, response: str, **sft) -> tuple[list[int], list[bool]]:
    enc = PairEncoder(tok, tok.backend_tokenizer, SftConfig(template="none", **sft))
    ((ids, mask),) = enc.encode([[("user", prompt), ("assistant", response)]])
    return ids, mask.tolist()


@pytest.mark.parametrize(
    ("prompt", "response", "mask"),
    [
        # "Q", ":" are prompt; "hello" (chars 3-8), "world", EOS are response.
        ("Q: ", "hello world", [False, False, True, True, True]),
        # "hello" straddles the boundary (prompt ends at char 6, inside it): a target.
        ("Q: hel", "lo world", [False, False, True, True, True]),
        # The boundary on a token edge with nothing between: ":" ends at 2, "hello" is response.
        ("Q:", "hello world", [False, False, True, True, True]),
        # Everything up to the last prompt token stays prompt, whatever follows.
        ("Q: hello", " world", [False, False, False, True, True]),
    ],
)
def test_mask_by_hand(words, prompt: str, response: str, mask: list[bool]) -> None:
    ids, got = encode(words, prompt, response)
    # "Q: hello world" whole: the text is tokenized as one, the EOS id appended.
    assert ids == [0, 1, 2, 3, 4]
    assert got == mask


def test_train_on_all_supervises_every_token(words) -> None:
    assert encode(words, "Q: ", "hello world", train_on="all")[1] == [True] * 5


def test_no_eos_token_is_refused() -> None:
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, "a")))
    with pytest.raises(ConfigError, match=r"data.sft.template: none ends each pair with the EOS"):
        PairEncoder(tok, tok.backend_tokenizer, SftConfig(template="none"))


# ------------------------------------------------------------------------- the store
def _cfg(tmp_path: Path, **sft) -> Config:
    train = {"path": str(tmp_path / "pairs.jsonl"), "prompt_field": "q", "response_field": "a"}
    return Config.model_validate(
        {
            "run": {"output_dir": str(tmp_path / "run")},
            "model": {"arch": "gpt2"},
            "data": {"train": train, "chunk": {"seq_len": 64, "mode": "truncate"}, "sft": sft},
        }
    )


def test_store_holds_prompt_response_eos_with_the_response_supervised(tmp_path: Path) -> None:
    tok = bpe_tokenizer()  # no chat template: template none is the way to use it
    pairs = [(f"alpha {i} beta\n", f"gamma {i} delta") for i in range(6)]
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for q, a in pairs:
            f.write(json.dumps({"q": q, "a": a}) + "\n")
    store = ensure_stores(_cfg(tmp_path, template="none"), tok, progress=False).stores["train"]
    assert len(store) == len(pairs)
    for i, (q, a) in enumerate(pairs):
        item = store[i]
        n_prompt = len(tok(q, add_special_tokens=False)["input_ids"])
        want = [*tok(q + a, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        assert item["input_ids"].tolist() == want
        # "\n" ends the prompt as its own token here, so the split is by token count too.
        assert item["loss_mask"].tolist() == [False] * n_prompt + [True] * (len(want) - n_prompt)


def test_sft_settings_decide_the_store(tmp_path: Path) -> None:
    """template and train_on are in the store fingerprint: changing either rebuilds."""
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"q": "alpha ", "a": "beta"}) + "\n")
    tok = bpe_tokenizer()
    cfg = _cfg(tmp_path, template="none")
    masks = ensure_stores(cfg, tok, progress=False).stores["train"][0]["loss_mask"]
    assert not masks.all()
    again = ensure_stores(_cfg(tmp_path, template="none", train_on="all"), tok, progress=False)
    assert not again.up_to_date and again.stores["train"][0]["loss_mask"].all()
    assert ensure_stores(_cfg(tmp_path, template="none", train_on="all"), tok).up_to_date


def test_generate_prompts_a_plain_pair_model_with_the_bare_text(tmp_path: Path) -> None:
    (tmp_path / "pairs.jsonl").write_text("")
    run = SimpleNamespace(cfg=_cfg(tmp_path, template="none"), tokenizer=bpe_tokenizer())
    assert chat_prompt(run, "alpha ") == "alpha "


# -------------------------------------------------------------------------- validation
def _validate(tmp_path: Path, train: str, sft: str) -> str:
    (tmp_path / "c.jsonl").write_text(json.dumps({"q": "x", "a": "y"}) + "\n")
    (tmp_path / "c.yaml").write_text(
        f"run: {{output_dir: {tmp_path / 'out'}}}\nmodel: {{arch: gpt2}}\n"
        f"tokenizer: {{train: {{vocab_size: 300}}}}\ntrain: {{max_steps: 1}}\n"
        f"data:\n  train: {{path: {tmp_path / 'c.jsonl'}, {train}}}\n  sft: {sft}\n"
    )
    return refused_by_validate(tmp_path / "c.yaml")


def test_no_template_refusal_names_both_ways_out(tmp_path: Path) -> None:
    out = _validate(tmp_path, "prompt_field: q, response_field: a", "{train_on: all}")
    assert "data.sft.chat_template: is required" in out
    assert "set data.sft.chat_template to a Jinja file" in out
    assert "or data.sft.template: none" in out


def test_template_none_needs_pairs_and_no_template_file(tmp_path: Path) -> None:
    out = _validate(tmp_path, "format: chat", f"{{template: none, chat_template: {tmp_path}}}")
    assert "data.sft.template: none joins prompt_field and response_field, but data.train" in out
    assert "data.sft.chat_template: is unused with data.sft.template: none" in out


def test_template_none_validates_without_a_chat_template(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llmtrain.cli import app

    ok = tmp_path / "ok.yaml"
    (tmp_path / "c.jsonl").write_text(json.dumps({"q": "x", "a": "y"}) + "\n")
    ok.write_text(
        f"run: {{output_dir: {tmp_path / 'out'}}}\nmodel: {{arch: gpt2}}\n"
        f"tokenizer: {{train: {{vocab_size: 300}}}}\ntrain: {{max_steps: 1}}\n"
        f"data:\n  train: {{path: {tmp_path / 'c.jsonl'}, prompt_field: q, response_field: a}}\n"
        "  sft: {template: none}\n"
    )
    result = CliRunner().invoke(app, ["validate", str(ok)])
    assert result.exit_code == 0, result.output
