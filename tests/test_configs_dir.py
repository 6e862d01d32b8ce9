"""Every config shipped in configs/ validates (run from the repository root, as users do)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmtrain.cli import app

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    p.relative_to(ROOT)
    for pattern in ("*.yaml", "*.yml")
    for p in (ROOT / "configs").rglob(pattern)
)


def test_there_are_configs() -> None:
    assert Path("configs/quickstart.yaml") in CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=[str(p) for p in CONFIGS])
def test_validate_shipped_config(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    text = config.read_text(encoding="utf-8")
    if "pretrained: models/" in text and not (ROOT / "models").is_dir():
        # the config's header names the one-time setup that puts the model there
        pytest.skip(f"{config} needs its pretrained model in models/ (see the config's header)")
    result = CliRunner().invoke(app, ["validate", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
