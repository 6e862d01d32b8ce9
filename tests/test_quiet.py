"""No third-party line reaches the user (llmtrain/util/quiet.py); --debug lets them through."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from run_helpers import tiny_lm_config, write_config, write_corpus

ROOT = Path(__file__).resolve().parent.parent
# What the libraries' own lines look like: logger names, warning categories, file:line.
THIRD_PARTY = re.compile(
    r"kernels|bitsandbytes|transformers|peft|huggingface|Warning:|\.py:\d+", re.IGNORECASE
)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("LLMTRAIN_DEBUG", None)
    cmd = [sys.executable, "-m", "llmtrain", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("quiet")
    corpus = write_corpus(root / "corpus.txt", lines=60)
    cfg = tiny_lm_config(root / "run", corpus, name="quiet", max_steps=1)
    cfg["optim"]["name"] = "adamw8bit"  # imports bitsandbytes when the optimizer is built
    return write_config(root / "config.yaml", cfg)


def _third_party(stderr: str) -> list[str]:
    # llmtrain's own lines may name bitsandbytes ("warning: bitsandbytes could not ...")
    ours = ("notice:", "warning:", "error:", "--overwrite")
    return [ln for ln in stderr.splitlines() if THIRD_PARTY.search(ln) and not ln.startswith(ours)]


@pytest.mark.slow
def test_commands_print_no_third_party_lines(config):
    for args in (["validate", str(config)], ["fit", str(config), "--dry-run"]):
        res = _cli(*args)
        assert res.returncode == 0, res.stderr
        assert _third_party(res.stderr) == [], args
    res = _cli("fit", str(config))  # one step of adamw8bit: bitsandbytes is imported
    assert res.returncode == 0, res.stderr
    assert _third_party(res.stderr) == []


@pytest.mark.slow
def test_debug_lets_everything_through(config):
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes asks for a hub kernel only on CPUs with AVX512-BF16")
    res = _cli("--debug", "fit", str(config), "--overwrite", "--yes")
    assert res.returncode == 0, res.stderr
    assert any("kernels-community" in ln for ln in _third_party(res.stderr)), res.stderr


def test_what_matters_is_said_once_in_our_words(capsys):
    import logging

    from llmtrain.util import quiet

    quiet.apply(debug=False)  # what the CLI does first (idempotent)
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: offline")
    for _ in range(2):
        logging.getLogger("bitsandbytes.cextension").error("bitsandbytes library load error: x")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: bitsandbytes could not load")


def test_transformers_progress_bars_are_off_unless_debugging():
    """transformers' "Loading weights" bar (every from_pretrained) would interleave with
    llmtrain's own progress: the quiet setup turns it off before transformers is imported."""
    code = (
        "import sys; from llmtrain.util import quiet; quiet.apply(debug=sys.argv[1] == '1'); "
        "from transformers.utils import logging; print(logging.is_progress_bar_enabled())"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    shown = {
        debug: subprocess.run(
            [sys.executable, "-c", code, debug], env=env, capture_output=True, text=True
        ).stdout.strip()
        for debug in ("0", "1")
    }
    assert shown == {"0": "False", "1": "True"}
