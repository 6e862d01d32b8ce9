"""`llmtrain generate RUN_DIR --prompt TEXT`: continue text with a trained causal LM, through
transformers' `generate` (docs/architecture.md, "Using a trained run").

A prompt is encoded as training encoded documents (no special tokens added; an empty prompt
starts after an EOS, where every training document starts). A run trained on instruction
data (`data.sft`) wraps the prompt in its chat template as one user turn. The model's
positions bound prompt + new tokens: the new tokens are cut to fit, with a notice, and a
prompt that alone fills the model is refused.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from llmtrain.config import DataSourceConfig
from llmtrain.console import human_console, say
from llmtrain.data.corpus import ReadStats, iter_documents
from llmtrain.errors import LLMTrainError
from llmtrain.rundir.trained import TrainedRun, open_run


@dataclass
class Generation:
    prompt: str
    completion: str
    prompt_tokens: int
    new_tokens: int
    cut: bool  # max_new_tokens was lowered to fit the model's positions


def chat_prompt(run: TrainedRun, text: str) -> str:
    """The prompt as the model saw prompts in training: an SFT run's chat template around
    one user turn (with the assistant's generation prompt); any other run, the text."""
    data = run.cfg.data
    if not getattr(data, "is_sft", False) or data.sft.template == "none":
        return text  # template: none trained on prompt + response as plain text
    from llmtrain.data.sft import read_template

    template = read_template(data.sft, run.tokenizer)
    messages = [{"role": "user", "content": text}]
    return run.tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )


def prompt_ids(run: TrainedRun, text: str) -> list[int]:
    """Token ids of a prompt, encoded like training documents (no specials added)."""
    ids = run.tokenizer(chat_prompt(run, text), add_special_tokens=False)["input_ids"]
    if not ids:
        eos = run.tokenizer.eos_token_id
        if eos is None:
            raise LLMTrainError("--prompt: empty, and the tokenizer has no EOS to start from")
        ids = [int(eos)]
    return list(ids)


def fit_to_positions(run: TrainedRun, n_prompt: int, max_new: int) -> tuple[int, bool]:
    """(new tokens to ask for, whether that was cut): prompt + new never exceeds the model's
    positions (an IndexError deep inside the model otherwise)."""
    limit = run.positions
    if limit is None or n_prompt + max_new <= limit:
        return max_new, False
    if n_prompt >= limit:
        raise LLMTrainError(
            f"--prompt: {n_prompt} tokens, and the model reads at most {limit} positions "
            "(prompt and new tokens together); shorten the prompt"
        )
    return limit - n_prompt, True


@torch.no_grad()
def generate_one(
    run: TrainedRun, text: str, *, max_new_tokens: int, temperature: float, top_p: float
) -> Generation:
    ids = prompt_ids(run, text)
    new, cut = fit_to_positions(run, len(ids), max_new_tokens)
    if cut:
        say(
            f"--max-new-tokens {max_new_tokens} cut to {new}: the prompt is {len(ids)} tokens "
            f"and the model reads at most {run.positions} positions",
            label="note",
        )
    inputs = torch.tensor([ids], device=run.device)
    tok = run.tokenizer
    sampling: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    output = run.model.generate(
        inputs,
        attention_mask=torch.ones_like(inputs),
        max_new_tokens=new,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        **sampling,
    )
    continuation = output[0, len(ids) :].tolist()
    if continuation and continuation[-1] == tok.eos_token_id:
        continuation = continuation[:-1]  # the end of the document, not text
    completion = tok.decode(continuation, skip_special_tokens=True)
    return Generation(text, completion, len(ids), len(continuation), cut)


def read_prompts(run: TrainedRun, path: str, text_field: str | None) -> list[str]:
    """Prompts from a file: .txt one per line (blank lines skipped), .jsonl/.csv one per
    record (`--text-field`, default "text")."""
    source = DataSourceConfig(
        path=path, split="lines", text_field=text_field or "text", label_field=None
    )
    prompts = [d.text for d in iter_documents(source, ReadStats(), key="input")]
    return [p for p in prompts if p.strip()]


def show(out: Console, generations: list[Generation]) -> None:
    for i, g in enumerate(generations):
        if i:
            out.rule(style="dim")
        out.print(f"[bold]{escape(g.prompt)}[/]{escape(g.completion)}", highlight=False)


def execute(
    run_dir: str,
    *,
    prompt: str | None,
    input_path: str | None,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int | None = None,
    text_field: str | None = None,
    checkpoint: str | None = None,
    as_json: bool = False,
) -> list[Generation]:
    """Entry point of `llmtrain generate`; returns the generations (tests read them)."""
    out = human_console(as_json)
    trained = open_run(run_dir, checkpoint=checkpoint, needs_corpus=False)
    if trained.cfg.model.task != "causal-lm":
        raise LLMTrainError(
            f"{run_dir}: generate needs a causal-lm run; this one is {trained.cfg.model.task} "
            "(use llmtrain predict)"
        )
    prompts = [prompt] if prompt is not None else read_prompts(trained, input_path, text_field)
    if seed is not None:
        torch.manual_seed(seed)  # sampling draws from torch's generator only
    generations = [
        generate_one(
            trained, p, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p
        )
        for p in prompts
    ]
    if as_json:
        sys.stdout.write(json.dumps({"generations": [asdict(g) for g in generations]}) + "\n")
        sys.stdout.flush()
    else:
        show(out, generations)
    return generations
