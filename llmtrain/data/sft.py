"""Instruction data: conversations rendered by the chat template into token ids and a loss mask
(docs/architecture.md, "Instruction data"); or, with `data.sft.template: none`, prompt/response
pairs joined as plain text (`PairEncoder`).

A record is a conversation (`format: chat`: a list of `{role, content}`) or a prompt/response
pair (a user turn and an assistant turn). `ChatEncoder` renders it with
`tokenizer.apply_chat_template` — the tokenizer's own template or `data.sft.chat_template` —
and marks the targets: with `train_on: assistant`, the characters each assistant turn adds to
the rendering, end-of-turn marker included, found by rendering the conversation turn by turn:

    span of assistant turn i = [len(render(turns[:i], add_generation_prompt=True)),
                                len(render(turns[:i + 1])))

so the generation prompt ("<|assistant|>\\n") is prompt, and what the model must learn to
write (the content and the end of its turn) is target. Tokens overlapping a span are targets
(transformers' own rule for `return_assistant_tokens_mask`). A template that does not render
a conversation as the concatenation of its turns cannot be masked this way: an error says so.

Without a template (`PairEncoder`, TRL's prompt-completion format) a pair is the text
`prompt + response`, tokenized as one, then the EOS id: the target span is the response's
characters [len(prompt), len(prompt + response)), plus the EOS. The same overlap rule makes a
token that straddles the boundary (its characters partly prompt, partly response) a target:
the model must learn to write the response's first characters, which that token carries.

Invariant: `len(mask) == len(ids)` for every encoded conversation; with `train_on: all` the
mask is all True.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmtrain.config.messages import kind_of
from llmtrain.config.rules import NO_TEMPLATE
from llmtrain.config.schema import DataConfig, SftConfig
from llmtrain.errors import ConfigError, LLMTrainError

ROLES = ("system", "user", "assistant")
Turn = tuple[str, str]  # (role, content)


# ------------------------------------------------------------------------------- records
def parse_conversation(value: Any, field: str) -> tuple[list[Turn], str | None]:
    """(turns, None) for a list of {role, content}; ([], why not) for anything else."""
    if not isinstance(value, list):
        return [], f"field '{field}' is {kind_of(value)}, expected a list of {{role, content}}"
    turns: list[Turn] = []
    for i, message in enumerate(value, 1):
        if not isinstance(message, dict):
            return [], f"message {i} of '{field}' is {kind_of(message)}, expected {{role, content}}"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            got = "no role" if role is None else f"role {role!r}"
            return [], f"message {i} of '{field}' has {got}; roles are {', '.join(ROLES)}"
        if not isinstance(content, str):
            return [], f"message {i} of '{field}' has no string 'content'"
        turns.append((role, content))
    return turns, conversation_problem(turns)


def conversation_problem(turns: Sequence[Turn]) -> str | None:
    """Why a conversation teaches nothing (no assistant turn, an empty one), or None."""
    if not any(role == "assistant" for role, _ in turns):
        return "no assistant turn: nothing to learn from this conversation"
    for i, (role, content) in enumerate(turns, 1):
        if role == "assistant" and not content.strip():
            return f"message {i}: empty assistant turn"
    return None


# ------------------------------------------------------------------------------ templates
def sft_fingerprint(data: DataConfig) -> dict[str, str] | None:
    """What of `data.sft` decides a store's bytes (for the store fingerprint): train_on and the
    template file's content; None for a text corpus."""
    if not data.is_sft:
        return None
    if data.sft.template == "none":
        return {"train_on": data.sft.train_on, "template": "none"}
    template = data.sft.chat_template
    digest = None
    if template is not None and Path(template).is_file():
        digest = hashlib.sha256(Path(template).read_bytes()).hexdigest()
    return {"train_on": data.sft.train_on, "chat_template": digest or "tokenizer"}


def read_template(sft: SftConfig, tokenizer: Any) -> str | None:
    """The Jinja text of `data.sft.chat_template`, or None for the tokenizer's own; a
    tokenizer without one (and no file) is a ConfigError naming the key."""
    if sft.chat_template is not None:
        try:
            return Path(sft.chat_template).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(
                f"data.sft.chat_template: cannot read {sft.chat_template!r} ({e})"
            ) from e
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"data.sft.chat_template: is required: the tokenizer {NO_TEMPLATE}")
    return None


class ChatEncoder:
    """Conversations → (token ids, loss mask), through the chat template and the tokenizer's
    Rust backend (`backend`: truncation and padding off, see chunk_spec.raw_backend)."""

    def __init__(self, tokenizer: Any, backend: Any, sft: SftConfig, max_len: int | None = None):
        self.tokenizer = tokenizer
        self.backend = backend
        self.template = self.load_template(sft)
        self.assistant_only = sft.train_on == "assistant"
        self.max_len = max_len  # truncate mode: a longer conversation is a bad record
        self.suffix: tuple[int, ...] = ()  # ids appended after the rendering, all targets

    def load_template(self, sft: SftConfig) -> str | None:
        return read_template(sft, self.tokenizer)

    def render(self, turns: Sequence[Turn], *, prompt: bool = False) -> str:
        messages = [{"role": role, "content": content} for role, content in turns]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=prompt
        )

    def spans(self, turns: Sequence[Turn]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the [start, end) characters of its assistant turns.
        Raises ValueError when the template does not render turn by turn."""
        text = self.render(turns)
        spans = []
        for i, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            before, upto = self.render(turns[:i], prompt=True), self.render(turns[: i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise ValueError(
                    "the chat template does not render this conversation as the concatenation "
                    "of its turns, so the assistant tokens cannot be located; use a template "
                    "that does (data.sft.chat_template)"
                )
            spans.append((len(before), len(upto)))
        return text, spans

    def encode(
        self, conversations: Sequence[Sequence[Turn]]
    ) -> list[tuple[list[int], np.ndarray] | str]:
        """Per conversation (ids, mask), or the reason it is a bad record (a template error, a
        rendering longer than the truncate length)."""
        rendered: list[tuple[str, list[tuple[int, int]]] | str] = []
        for turns in conversations:
            try:
                rendered.append(self.spans(turns))
            except ImportError as e:
                raise LLMTrainError(
                    "data.sft: chat templates need jinja2: pip install jinja2"
                ) from e
            except Exception as e:  # jinja's TemplateError, raise_exception() in templates
                rendered.append(f"chat template: {' '.join(str(e).split())}")
        texts = [r[0] for r in rendered if not isinstance(r, str)]
        encodings = iter(self.backend.encode_batch(texts, add_special_tokens=False))
        out: list[tuple[list[int], np.ndarray] | str] = []
        for r in rendered:
            if isinstance(r, str):
                out.append(r)
                continue
            enc = next(encodings)
            ids = [*enc.ids, *self.suffix]
            if self.max_len is not None and len(ids) > self.max_len:
                out.append(
                    f"the conversation renders to {len(ids)} tokens, above "
                    f"data.chunk.seq_len={self.max_len} (mode: truncate); use mode: pack"
                )
                continue
            if not self.assistant_only:
                out.append((ids, np.ones(len(ids), dtype=bool)))
                continue
            mask = self._mask(enc.offsets, r[1])
            if self.suffix:
                mask = np.concatenate([mask, np.ones(len(self.suffix), dtype=bool)])
            out.append((ids, mask))
        return out

    @staticmethod
    def _mask(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
        """True for every token whose characters overlap an assistant span."""
        starts = np.fromiter((a for a, _ in offsets), dtype=np.int64, count=len(offsets))
        ends = np.fromiter((b for _, b in offsets), dtype=np.int64, count=len(offsets))
        mask = np.zeros(len(offsets), dtype=bool)
        for a, b in spans:
            mask |= (starts < b) & (ends > a)
        return mask


class PairEncoder(ChatEncoder):
    """`data.sft.template: none`: a prompt/response pair as the text `prompt + response`, then
    the EOS id; the response's characters and the EOS are the targets (module docstring)."""

    def __init__(self, tokenizer: Any, backend: Any, sft: SftConfig, max_len: int | None = None):
        super().__init__(tokenizer, backend, sft, max_len)
        if tokenizer.eos_token_id is None:
            raise ConfigError(
                "data.sft.template: none ends each pair with the EOS token, and the tokenizer "
                "has none; use a tokenizer with an eos_token"
            )
        self.suffix = (int(tokenizer.eos_token_id),)

    def load_template(self, sft: SftConfig) -> str | None:
        return None

    def spans(self, turns: Sequence[Turn]) -> tuple[str, list[tuple[int, int]]]:
        (_, prompt), (_, response) = turns  # a pair: user, assistant (corpus._sft_record)
        return prompt + response, [(len(prompt), len(prompt) + len(response))]


def conversation_encoder(
    tokenizer: Any, backend: Any, sft: SftConfig, max_len: int | None = None
) -> ChatEncoder:
    """The encoder `data.sft.template` asks for."""
    kind = PairEncoder if sft.template == "none" else ChatEncoder
    return kind(tokenizer, backend, sft, max_len)
