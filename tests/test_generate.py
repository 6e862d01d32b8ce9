"""`llmtrain generate`: reproducible with a seed, bounded by the model's positions, chat
templates for instruction-tuned runs."""

from __future__ import annotations

import json

import pytest
from run_helpers import trained
from typer.testing import CliRunner

from llmtrain.cli import app
from llmtrain.commands import generate as generate_cmd
from llmtrain.errors import LLMTrainError
from llmtrain.rundir.trained import open_run


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return trained("lm", tmp_path_factory)


def _gen(run_dir, **kw):
    kw = {"prompt": "the cat", "input_path": None, "max_new_tokens": 12, **kw}
    (g,) = generate_cmd.execute(str(run_dir), **kw)
    return g


def test_same_seed_same_text_other_seed_other_text(lm):
    a = _gen(lm, seed=3, temperature=1.5, top_p=1.0)
    b = _gen(lm, seed=3, temperature=1.5, top_p=1.0)
    c = _gen(lm, seed=4, temperature=1.5, top_p=1.0)
    assert a == b
    assert a.new_tokens > 0 and a.completion
    assert c.completion != a.completion  # sampling really samples: the seed decides


def test_greedy_needs_no_seed(lm):
    assert _gen(lm, temperature=0.0) == _gen(lm, temperature=0.0)


def test_request_beyond_positions_is_cut_with_a_notice(lm, capsys):
    g = _gen(lm, max_new_tokens=500, temperature=0.0)
    assert g.cut and g.prompt_tokens + g.new_tokens <= 32
    assert "cut to" in capsys.readouterr().err


def test_prompt_longer_than_the_model_is_refused(lm):
    with pytest.raises(LLMTrainError, match="at most 32 positions"):
        _gen(lm, prompt="the cat sat on a mat " * 20)
    res = CliRunner().invoke(app, ["generate", str(lm), "--prompt", "the cat sat on a mat " * 20])
    assert res.exit_code == 1 and "32 positions" in res.output
    assert "Traceback" not in res.output and "IndexError" not in res.output


def test_prompts_from_a_file_as_json(lm, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("the cat\n\nthe dog ran\n", encoding="utf-8")
    args = ["generate", str(lm), "--input", str(path), "--seed", "0", "--max-new-tokens", "5"]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    generations = json.loads(res.stdout)["generations"]
    assert [g["prompt"] for g in generations] == ["the cat", "the dog ran"]
    res = CliRunner().invoke(app, ["generate", str(lm)])
    assert res.exit_code == 2 and "--prompt" in res.output


def test_generate_refuses_a_classifier(tmp_path_factory):
    clf = trained("classifier", tmp_path_factory)
    with pytest.raises(LLMTrainError, match="causal-lm"):
        _gen(clf)


def test_an_sft_run_wraps_the_prompt_in_its_chat_template(lm, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}",
        encoding="utf-8",
    )
    run = open_run(lm)
    assert generate_cmd.chat_prompt(run, "hi") == "hi"  # a plain run: the text as is
    data = run.cfg.data.model_copy(
        update={
            "train": run.cfg.data.train.model_copy(update={"format": "chat"}),
            "sft": run.cfg.data.sft.model_copy(update={"chat_template": str(template)}),
        }
    )
    run.cfg = run.cfg.model_copy(update={"data": data})
    assert generate_cmd.chat_prompt(run, "hi") == "<user>hi\n<assistant>"
