"""docs/config.md is generated from the field descriptions and must not go stale."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llmtrain.config import Config

ROOT = Path(__file__).resolve().parents[1]


def load_generator():
    spec = importlib.util.spec_from_file_location(
        "gen_config_docs", ROOT / "scripts" / "gen_config_docs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_docs_are_current() -> None:
    gen = load_generator()
    assert gen.main(["--check"]) == 0, (
        "docs/config.md is stale: run python scripts/gen_config_docs.py"
    )


def test_every_field_has_a_description_and_a_row() -> None:
    text = load_generator().render()
    for name, info in Config.model_fields.items():
        assert f"## `{name}`" in text
        assert info.description
    from llmtrain.config import BatchConfig, ChunkConfig

    for model in (BatchConfig, ChunkConfig):
        for name, info in model.model_fields.items():
            assert info.description, name
            assert f"| `{name}` |" in text


def test_check_fails_on_a_stale_file(tmp_path: Path, monkeypatch) -> None:
    gen = load_generator()
    stale = tmp_path / "config.md"
    stale.write_text("old\n")
    monkeypatch.setattr(gen, "OUT", stale)
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0
    assert gen.main(["--check"]) == 0
