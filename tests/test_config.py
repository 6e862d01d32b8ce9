# ruff: noqa: E501 -- the table of cases reads best one case per line, with exact messages.
"""Config loading and the CLI's answer to bad configs: exit 2, the key, the file:line, no traceback.

Every case runs the real CLI (`llmtrain validate`) in a temporary directory holding the
config and a small corpus, so relative paths in messages are short and exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llmtrain import __version__
from llmtrain.cli import app
from llmtrain.config import Config, dump_config, load_config, parse_bytes
from llmtrain.errors import ConfigError

# Line numbers matter: the cases below point at them.
BASE = """\
run:
  output_dir: out
  device: cpu
model:
  arch: gpt2
  config:
    n_layer: 1
    n_positions: 64
tokenizer:
  train:
    vocab_size: 300
data:
  train:
    path: corpus.txt
  eval_fraction: 0.1
  chunk:
    seq_len: 32
    mode: pack
batch:
  global_batch: 8
  micro_batch: 2
optim:
  lr: 1.0e-3
  warmup_steps: 2
train:
  max_steps: 10
  precision: fp32
"""

runner = CliRunner()


def edit(*pairs: tuple[str, str]) -> str:
    """BASE with each `old` line text (which must occur once) replaced by `new`."""
    text = BASE
    for old, new in pairs:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


@dataclass
class Case:
    id: str
    text: str
    expect: str  # "file:line:col: key.path: start of message" (or --set ...: key.path:)
    sets: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)


CASES = [
    # --- typos at several depths, with suggestions
    Case("typo-top", edit(("batch:\n", "bacth:\n")), "cfg.yaml:19:1: bacth: unknown key, did you mean 'batch'?"),
    Case("typo-depth2", edit(("  micro_batch: 2", "  micro_bach: 2")),
         "cfg.yaml:21:3: batch.micro_bach: unknown key, did you mean 'micro_batch'?"),
    Case("typo-depth3", edit(("    vocab_size: 300", "    vocab_sise: 300")),
         "cfg.yaml:11:5: tokenizer.train.vocab_sise: unknown key, did you mean 'vocab_size'?"),
    Case("typo-depth3-data", edit(("    path: corpus.txt", "    pth: corpus.txt")),
         "cfg.yaml:14:5: data.train.pth: unknown key, did you mean 'path'?"),
    Case("missing-required", edit(("    path: corpus.txt", "    format: txt")),
         "cfg.yaml:13:3: data.train.path: is required"),
    # --- wrong types
    Case("int-from-word", edit(("  global_batch: 8", "  global_batch: eight")),
         "cfg.yaml:20:3: batch.global_batch: must be a positive integer (got 'eight')"),
    Case("micro-negative", edit(("  micro_batch: 2", "  micro_batch: -3")),
         'cfg.yaml:21:3: batch.micro_batch: must be a positive integer or "auto" (got -3)'),
    Case("micro-word", edit(("  micro_batch: 2", "  micro_batch: automatic")),
         'cfg.yaml:21:3: batch.micro_batch: must be an integer or "auto" (got \'automatic\')'),
    Case("float-from-word", edit(("  lr: 1.0e-3", "  lr: fast")),
         "cfg.yaml:23:3: optim.lr: must be a positive number (got 'fast')"),
    Case("bool-from-word", edit(("  arch: gpt2", "  arch: gpt2\n  gradient_checkpointing: maybe")),
         "cfg.yaml:6:3: model.gradient_checkpointing: must be true or false (got 'maybe')"),
    Case("section-is-list", edit(("batch:\n  global_batch: 8\n  micro_batch: 2\n", "batch: [8, 2]\n")),
         "cfg.yaml:19:1: batch: must be a mapping (got [8, 2])"),
    Case("betas-too-short", edit(("  lr: 1.0e-3", "  lr: 1.0e-3\n  betas: [0.9]")),
         "cfg.yaml:24:3: optim.betas: needs more items"),
    # --- out of range / not one of the choices
    Case("fraction-range", edit(("  eval_fraction: 0.1", "  eval_fraction: 1.5")),
         "cfg.yaml:15:3: data.eval_fraction: must be a number in (0, 1) (got 1.5)"),
    Case("seq-len-tiny", edit(("    seq_len: 32", "    seq_len: 1")),
         "cfg.yaml:17:5: data.chunk.seq_len: must be an integer >= 2 (got 1)"),
    Case("mode-choice", edit(("    mode: pack", "    mode: pak")),
         "cfg.yaml:18:5: data.chunk.mode: must be one of pack, window, truncate (got 'pak'); did you mean 'pack'?"),
    Case("device-pattern", edit(("  device: cpu", "  device: gpu")),
         "cfg.yaml:3:3: run.device: must be one of auto, cpu, cuda, cuda:N (got 'gpu')"),
    Case("precision-choice", edit(("  precision: fp32", "  precision: fp8")),
         "cfg.yaml:27:3: train.precision: must be one of fp32, bf16, fp16, fp64 (got 'fp8')"),
    # --- file-level problems
    Case("yaml-syntax", edit(("  micro_batch: 2", "  micro_batch: [2")), "cfg.yaml:22:6: invalid YAML"),
    Case("empty-file", "", "cfg.yaml:1:1: the file is empty"),
    Case("comments-only", "# nothing here\n", "cfg.yaml:1:1: the file is empty"),
    Case("top-level-list", "- run\n- model\n", "cfg.yaml:1:1: expected a mapping of sections"),
    Case("duplicate-key", edit(("  micro_batch: 2", "  micro_batch: 2\n  micro_batch: 4")),
         "cfg.yaml:22:3: batch.micro_batch: duplicate key"),
    Case("non-string-key", edit(("    n_layer: 1", "    1: 2")), "cfg.yaml:7:5: model.config: key '1' must be a string"),
    Case("missing-data-file", edit(("    path: corpus.txt", "    path: nothere.txt")),
         "cfg.yaml:14:5: data.train.path: no such file or directory 'nothere.txt'"),
    Case("glob-matches-nothing", edit(("    path: corpus.txt", "    path: 'texts/*.txt'")),
         "cfg.yaml:14:5: data.train.path: the glob 'texts/*.txt' matches no files"),
    Case("missing-tokenizer-path", edit(("  train:\n    vocab_size: 300", "  path: tok/")),
         "cfg.yaml:10:3: tokenizer.path: no such file or directory 'tok/'"),
    # --- cross-field rules
    Case("arch-and-pretrained", edit(("  arch: gpt2", "  arch: gpt2\n  pretrained: corpus.txt")),
         "cfg.yaml:6:3: model.pretrained: set either model.arch (from scratch) or model.pretrained, not both"),
    Case("neither-arch-nor-pretrained", edit(("  arch: gpt2\n  config:\n    n_layer: 1\n    n_positions: 64\n", "  task: causal-lm\n")),
         "cfg.yaml:4:1: model.arch: is required"),
    Case("pretrained-missing-dir", edit(("  arch: gpt2\n  config:\n    n_layer: 1\n    n_positions: 64\n", "  pretrained: models/small\n")),
         "cfg.yaml:5:3: model.pretrained: no such directory 'models/small'"),
    Case("unknown-arch", edit(("  arch: gpt2", "  arch: gtp2")),
         "cfg.yaml:5:3: model.arch: unknown transformers model_type 'gtp2', did you mean 'gpt2'?"),
    Case("hf-config-typo", edit(("    n_layer: 1", "    n_layers: 1")),
         "cfg.yaml:7:5: model.config.n_layers: not a field of GPT2Config, did you mean 'n_layer'?"),
    Case("seq-len-above-positions", edit(("    seq_len: 32", "    seq_len: 128")),
         "cfg.yaml:17:5: data.chunk.seq_len: 128 is above the model's position limit n_positions=64"),
    Case("pack-with-classification", edit(("  arch: gpt2", "  task: sequence-classification\n  arch: gpt2")),
         "cfg.yaml:19:5: data.chunk.mode: pack mixes documents"),
    Case("overlap-ge-seq-len", edit(("    mode: pack", "    mode: window\n    overlap: 32")),
         "cfg.yaml:19:5: data.chunk.overlap: must be smaller than data.chunk.seq_len=32 (got 32)"),
    Case("min-tail-above-seq-len", edit(("    mode: pack", "    mode: window\n    min_tail: 40")),
         "cfg.yaml:19:5: data.chunk.min_tail: must be at most data.chunk.seq_len=32 (got 40)"),
    Case("steps-and-epochs", edit(("  max_steps: 10", "  max_steps: 10\n  epochs: 2")),
         "cfg.yaml:27:3: train.epochs: set either train.max_steps or train.epochs, not both"),
    Case("neither-steps-nor-epochs", edit(("  max_steps: 10\n", "")),
         "cfg.yaml:25:1: train.max_steps: is required: set train.max_steps or train.epochs"),
    Case("tokenizer-path-and-train", edit(("tokenizer:\n", "tokenizer:\n  path: corpus.txt\n")),
         "cfg.yaml:11:3: tokenizer.train: set either tokenizer.path or tokenizer.train, not both"),
    Case("tokenizer-neither", edit(("  train:\n    vocab_size: 300\n", "  path: null\n")),
         "cfg.yaml:10:3: tokenizer.path: is required"),
    Case("eval-and-fraction", edit(("  eval_fraction: 0.1", "  eval_fraction: 0.1\n  eval: {path: corpus.txt}")),
         "cfg.yaml:15:3: data.eval_fraction: set either data.eval or data.eval_fraction, not both"),
    Case("micro-above-global", edit(("  micro_batch: 2", "  micro_batch: 16")),
         "cfg.yaml:21:3: batch.micro_batch: must be at most batch.global_batch=8 (got 16)"),
    Case("lr-scaling-without-base", edit(("  lr: 1.0e-3", "  lr: 1.0e-3\n  lr_scaling: sqrt")),
         "cfg.yaml:22:1: optim.base_batch: is required with lr_scaling: sqrt"),
    Case("memory-limit-unparseable", edit(("  micro_batch: 2", "  micro_batch: 2\n  probe:\n    memory_limit: 2 bananas")),
         "cfg.yaml:23:5: batch.probe.memory_limit: expected a size such as 2GiB"),
    Case("warmup-above-steps", edit(("  warmup_steps: 2", "  warmup_steps: 20")),
         "cfg.yaml:24:3: optim.warmup_steps: must be at most train.max_steps=10 (got 20)"),
    Case("flash-attention-on-cpu", edit(("  arch: gpt2", "  arch: gpt2\n  attn_implementation: flash_attention_2")),
         "cfg.yaml:6:3: model.attn_implementation: flash_attention_2 needs a CUDA device"),
    Case("num-labels-causal-lm", edit(("  arch: gpt2", "  arch: gpt2\n  num_labels: 3")),
         "cfg.yaml:6:3: model.num_labels: only applies to task: sequence-classification"),
    # --- --set: syntax and types
    Case("set-no-equals", BASE, "--set batch.micro_batch: expected KEY=VALUE", sets=["batch.micro_batch"]),
    Case("set-empty-key", BASE, "--set =4: the key must be a dotted path", sets=["=4"]),
    Case("set-empty-part", BASE, "--set batch..micro_batch=4: the key must be a dotted path",
         sets=["batch..micro_batch=4"]),
    Case("set-into-scalar", BASE, "--set batch.micro_batch.x=1: batch.micro_batch is 2, not a mapping",
         sets=["batch.micro_batch.x=1"]),
    Case("set-wrong-type", BASE, "--set batch.global_batch=lots: batch.global_batch: must be a positive integer",
         sets=["batch.global_batch=lots"]),
    Case("set-typo", BASE, "--set batch.micro_bach=4: batch.micro_bach: unknown key, did you mean 'micro_batch'?",
         sets=["batch.micro_bach=4"]),
    Case("set-bad-yaml", BASE, "--set optim.betas=[0.9: the value is not valid YAML", sets=["optim.betas=[0.9"]),
    Case("set-breaks-rule", BASE, "--set train.epochs=1: train.epochs: set either train.max_steps",
         sets=["train.epochs=1"]),
    # --- extends
    Case("extends-missing", "extends: base.yaml\n" + BASE,
         "cfg.yaml:1:1: extends: no such file 'base.yaml'"),
    Case("extends-cycle", "extends: base.yaml\n" + BASE, "base.yaml:1:1: extends: cycle",
         files={"base.yaml": "extends: cfg.yaml\n"}),
    Case("extends-not-a-string", "extends: [a.yaml]\n" + BASE, "cfg.yaml:1:1: extends: must be a file name"),
    Case("error-in-base-file", "extends: base.yaml\nrun:\n  device: cpu\n",
         "base.yaml:2:3: batch.micro_batch: must be a positive integer",
         files={"base.yaml": "batch:\n  micro_batch: 0\n"
                + BASE.replace("batch:\n  global_batch: 8\n  micro_batch: 2\n", "")}),
    # --- a mixture of training sources (data.train as a list)
    Case("mixture-derived-names-clash",
         edit(("    path: corpus.txt", "    - path: corpus.txt\n    - path: corpus.txt\n      weight: 2")),
         "cfg.yaml:15:7: data.train.1: the source name 'corpus' is already data.train.0's "
         "(derived from its path); set a unique name: on this source"),
    Case("mixture-names-clash",
         edit(("    path: corpus.txt",
               "    - {path: corpus.txt, name: web}\n    - {path: corpus.txt, name: web}")),
         "cfg.yaml:15:26: data.train.1.name: the source name 'web' is already data.train.0's"),
    Case("mixture-weight-negative",
         edit(("    path: corpus.txt", "    - {path: corpus.txt, weight: -1}")),
         "cfg.yaml:14:26: data.train.0.weight: must be a positive number (got -1)"),
    Case("mixture-name-not-a-folder",
         edit(("    path: corpus.txt", "    - {path: corpus.txt, name: a/b}")),
         "cfg.yaml:14:26: data.train.0.name: must be letters, digits, _ . - only"),
    Case("weight-needs-a-list", edit(("    path: corpus.txt", "    path: corpus.txt\n    weight: 2")),
         "cfg.yaml:15:5: data.train.weight: unknown key (valid keys: path, format,"),
    Case("mixture-text-and-chat",
         edit(("    path: corpus.txt",
               "    - {path: corpus.txt}\n    - {path: corpus.txt, name: c, format: chat}")),
         "cfg.yaml:13:3: data.train: mixes text corpora with instruction data"),
    Case("mixture-empty", edit(("    path: corpus.txt", "    []")),
         "data.train: must list at least one source"),
]  # fmt: skip


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("To be, or not to be.\n\nThat is the question.\n")
    return tmp_path


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_config_exits_2_naming_key_and_line(workdir: Path, case: Case) -> None:
    (workdir / "cfg.yaml").write_text(case.text)
    for name, text in case.files.items():
        (workdir / name).write_text(text)
    args = ["validate", "cfg.yaml"]
    for s in case.sets:
        args += ["--set", s]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert case.expect in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 30


def test_base_config_is_valid(workdir: Path) -> None:
    (workdir / "cfg.yaml").write_text(BASE)
    result = invoke("validate", "cfg.yaml")
    assert result.exit_code == 0, result.output
    assert "micro_batch: 2" in result.stdout


def test_all_errors_of_a_file_at_once(workdir: Path) -> None:
    text = edit(
        ("  micro_batch: 2", "  micro_bach: 2"),
        ("  lr: 1.0e-3", "  lr: -1"),
        ("    seq_len: 32", "    seq_len: 128"),
        ("  max_steps: 10", "  max_steps: 10\n  epochs: 1"),
    )
    (workdir / "cfg.yaml").write_text(text)
    result = invoke("validate", "cfg.yaml")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "data.chunk.seq_len",
        "batch.micro_bach",
        "optim.lr",
        "train.epochs",
    ]
    assert lines[1].startswith("cfg.yaml:21:3: ")
    assert lines[2] == "cfg.yaml:23:3: optim.lr: must be a positive number (got -1)"


def test_load_config_raises_one_error_holding_all(workdir: Path) -> None:
    (workdir / "cfg.yaml").write_text(edit(("  device: cpu", "  device: tpu")))
    with pytest.raises(ConfigError) as info:
        load_config("cfg.yaml", ["batch.global_batch=0", "train.max_steps=x"])
    assert len(info.value.messages) == 3
    assert info.value.messages[0].startswith("cfg.yaml:3:3: run.device:")
    assert {m.split(":")[0] for m in info.value.messages[1:]} == {
        "--set batch.global_batch=0",
        "--set train.max_steps=x",
    }


def test_set_values_are_typed_like_yaml(workdir: Path) -> None:
    (workdir / "cfg.yaml").write_text(BASE)
    cfg = load_config(
        "cfg.yaml",
        [
            "model.config.n_layer=3",
            "batch.micro_batch=auto",
            "optim.betas=[0.8, 0.9]",
            "log.tensorboard=true",
            "model.config_overrides={resid_pdrop: 0.0}",
            "run.name='007'",  # quoted: a string, as in YAML
            "data.eval_fraction=",  # empty value is YAML null
            "data.eval.path=corpus.txt",  # creates the mapping on the way
            "tokenizer.train.vocab_size=512",
        ],
    )
    assert cfg.model.config == {"n_layer": 3, "n_positions": 64}
    assert cfg.batch.micro_batch == "auto"
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.log.tensorboard is True
    assert cfg.model.config_overrides == {"resid_pdrop": 0.0}
    assert cfg.run.name == "007"
    assert cfg.data.eval_fraction is None
    assert cfg.data.eval is not None and cfg.data.eval.path == "corpus.txt"
    assert cfg.tokenizer.train is not None and cfg.tokenizer.train.vocab_size == 512


def test_set_list_item(workdir: Path) -> None:
    (workdir / "cfg.yaml").write_text(edit(("  lr: 1.0e-3", "  lr: 1.0e-3\n  betas: [0.9, 0.95]")))
    assert load_config("cfg.yaml", ["optim.betas.1=0.99"]).optim.betas == (0.9, 0.99)


def test_extends_deep_merges_relative_to_the_file(workdir: Path) -> None:
    (workdir / "configs" / "base").mkdir(parents=True)
    (workdir / "configs" / "base" / "common.yaml").write_text(BASE)
    (workdir / "configs" / "mid.yaml").write_text(
        "extends: base/common.yaml\nmodel:\n  config:\n    n_layer: 2\noptim:\n  lr: 0.01\n"
    )
    (workdir / "configs" / "top.yaml").write_text(
        "extends: mid.yaml\nbatch:\n  micro_batch: 4\nmodel:\n  config:\n    n_head: 2\n"
    )
    cfg = load_config("configs/top.yaml")
    # mappings merge key by key through the chain; scalars are replaced
    assert cfg.model.config == {"n_layer": 2, "n_positions": 64, "n_head": 2}
    assert cfg.optim.lr == 0.01
    assert cfg.optim.warmup_steps == 2
    assert (cfg.batch.micro_batch, cfg.batch.global_batch) == (4, 8)
    assert cfg.data.train.path == "corpus.txt"  # relative to the current directory


def test_extends_error_points_into_the_defining_file(workdir: Path) -> None:
    (workdir / "base.yaml").write_text(edit(("  lr: 1.0e-3", "  lr: 0")))
    (workdir / "child.yaml").write_text("extends: base.yaml\nbatch:\n  micro_batch: 99\n")
    result = invoke("validate", "child.yaml")
    assert result.exit_code == 2
    assert "base.yaml:23:3: optim.lr: must be a positive number (got 0)" in result.stderr
    assert (
        "child.yaml:3:3: batch.micro_batch: must be at most batch.global_batch=8" in result.stderr
    )


def test_validate_json_round_trips(workdir: Path) -> None:
    (workdir / "cfg.yaml").write_text(BASE)
    result = invoke("validate", "cfg.yaml", "--json", "--set", "batch.micro_batch=4")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["batch"]["micro_batch"] == 4
    (workdir / "resolved.json").write_text(result.stdout)
    again = load_config("resolved.json")
    assert again == load_config("cfg.yaml", ["batch.micro_batch=4"])


def test_dump_config_round_trips(workdir: Path) -> None:
    (workdir / "cfg.yaml").write_text(BASE)
    cfg = load_config("cfg.yaml")
    (workdir / "dumped.yaml").write_text(dump_config(cfg))
    assert load_config("dumped.yaml") == cfg
    assert list(yaml.safe_load(dump_config(cfg))) == list(Config.model_fields)


def test_validate_prints_resolved_yaml(workdir: Path) -> None:
    (workdir / "cfg.yaml").write_text(BASE)
    result = invoke("validate", "cfg.yaml", "-s", "optim.lr=0.5")
    assert result.exit_code == 0
    resolved = yaml.safe_load(result.stdout)
    assert resolved["optim"]["lr"] == 0.5
    assert resolved["optim"]["weight_decay"] == 0.1  # defaults are filled in


def test_missing_config_file(workdir: Path) -> None:
    result = invoke("validate", "nope.yaml")
    assert result.exit_code == 2
    assert result.stderr.strip() == "nope.yaml: no such config file"


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"llmtrain {__version__}"


def test_help_lists_the_four_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("fit", "chunk", "probe-batch", "validate"):
        assert any(
            line.strip(" │").startswith(command + " ") for line in result.stdout.splitlines()
        )


def test_work_commands_validate_first(workdir: Path) -> None:
    (workdir / "cfg.yaml").write_text(edit(("  micro_batch: 2", "  micro_batch: 0")))
    for command in ("fit", "chunk", "probe-batch"):
        result = invoke(command, "cfg.yaml")
        assert result.exit_code == 2, (command, result.output)
        assert "cfg.yaml:21:3: batch.micro_batch:" in result.stderr


def test_unexpected_error_is_one_line_without_traceback(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llmtrain.commands.chunk as command

    def fail(*args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(command, "execute", fail)
    monkeypatch.delenv("LLMTRAIN_DEBUG", raising=False)
    (workdir / "cfg.yaml").write_text(BASE)
    result = invoke("chunk", "cfg.yaml")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: RuntimeError: disk on fire second line (run with --debug for the traceback)"
    )
    result = invoke("--debug", "chunk", "cfg.yaml")
    assert result.exit_code == 1
    assert "Traceback" in result.stderr


def test_debug_shows_the_cause_of_a_translated_error(workdir: Path, monkeypatch) -> None:
    """A translated error keeps its one line; with --debug the traceback names its cause."""
    monkeypatch.delenv("LLMTRAIN_DEBUG", raising=False)
    (workdir / "cfg.yaml").write_text("model: [unclosed\n")
    result = invoke("validate", "cfg.yaml")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert line.startswith("cfg.yaml") and "invalid YAML" in line and "\n" not in line
    result = invoke("--debug", "validate", "cfg.yaml")
    assert result.exit_code == 2
    assert "yaml.parser.ParserError" in result.stderr
    assert "direct cause of the following exception" in result.stderr
    assert result.stderr.strip().endswith(line)


def test_interrupt_exits_130_with_one_line(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llmtrain.commands.fit as command

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "execute", stop)
    (workdir / "cfg.yaml").write_text(BASE)
    result = invoke("fit", "cfg.yaml")
    assert result.exit_code == 130
    assert result.stderr.strip() == (
        "llmtrain fit: interrupted; the last checkpoint is intact, continue with --resume auto"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2GiB", 2 * 1024**3), ("512MB", 512 * 10**6), ("1.5 KiB", 1536), (4096, 4096), ("4096", 4096),
     ("3g", 3 * 1024**3)],
)  # fmt: skip
def test_parse_bytes(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "0", 0, "2 GiBs", True])
def test_parse_bytes_rejects(text: str | int) -> None:
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_subprocess_entry_points_and_no_torch_on_import(workdir: Path) -> None:
    """The console script path (python -m llmtrain) end to end, and a light CLI import."""
    (workdir / "cfg.yaml").write_text(edit(("  micro_batch: 2", "  micro_batch: -3")))
    env = {**os.environ, "LLMTRAIN_DEBUG": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "llmtrain", "validate", "cfg.yaml"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        'cfg.yaml:21:3: batch.micro_batch: must be a positive integer or "auto" (got -3)'
    )
    code = "import sys, llmtrain.cli; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"
    # chunk loads its config without the HF model checks: no transformers, no torch.
    (workdir / "cfg.yaml").write_text(BASE)
    code = (
        "import sys; from llmtrain.config import load_config; "
        "load_config('cfg.yaml', check_model='light'); print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


def test_check_model_false_skips_only_the_hf_rules(workdir: Path) -> None:
    # What only the HF config class knows (its fields, its defaults, the size bound) waits
    # for fit / validate; a position limit written in the YAML is checked without it.
    (workdir / "cfg.yaml").write_text(edit(("    n_positions: 64", "    n_positionz: 64")))
    assert load_config("cfg.yaml", check_model="light").model.config == {
        "n_layer": 1,
        "n_positionz": 64,
    }
    with pytest.raises(ConfigError, match="n_positionz: not a field of GPT2Config"):
        load_config("cfg.yaml")
    (workdir / "cfg.yaml").write_text(edit(("    seq_len: 32", "    seq_len: 128")))
    for check_model in (True, "light"):
        with pytest.raises(ConfigError, match="128 is above the model's position limit"):
            load_config("cfg.yaml", check_model=check_model)
    # False (a trained run's config) skips the model checks altogether.
    assert load_config("cfg.yaml", check_model=False).data.chunk.seq_len == 128
    for check_model in (False, "light"):
        with pytest.raises(ConfigError, match="micro_batch: must be at most"):
            load_config("cfg.yaml", ["batch.micro_batch=9"], check_model=check_model)


def test_position_offset_twins_agree():
    """config/rules.py keeps its own copy of the RoBERTa-like position offset table (config/
    must not import engine/); the seq_len check and `model_positions` must read the same."""
    from llmtrain.config import rules
    from llmtrain.engine import model

    assert rules._POSITION_OFFSET == model.POSITION_OFFSET
