"""A weighted mixture through fit and chunk: per-source stores and statistics, the dry-run
table, train records' per-source counts, an exact resume, and the weights as part of what
a resume may not change (docs/training.md, "Mixtures")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from fit_helpers import make_cfg, params, random_store, run_train
from run_helpers import tiny_lm_config, write_corpus
from typer.testing import CliRunner

from llmtrain.cli import app
from llmtrain.config import Config, dump_config
from llmtrain.data.mixture import Mixture, open_mixture
from llmtrain.engine.faults import SimulatedKill
from llmtrain.engine.metrics import TIMING_FIELDS, read_metrics
from llmtrain.errors import ConfigError
from llmtrain.rundir.provenance import compare

torch.set_num_threads(1)


def _records(out: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in TIMING_FIELDS}
        for r in read_metrics(out / "metrics.jsonl")
    ]


def _resume_cfg(out: Path) -> Config:
    # dropout on: the resume must restore the RNG too; log_every 4 with save_every 3 puts
    # the checkpoint inside a record's interval (its per-source sums ride in the checkpoint)
    return make_cfg(
        out,
        steps=7,
        precision="fp32",
        dropout=True,
        micro=3,
        train={"save_every": 3, "log_every": 4},
    )


def _mixture():
    return open_mixture(
        ["web", "books"], [random_store(20, seed=4), random_store(5, seed=5)], [1.0, 3.0]
    )


def test_resume_of_a_mixture_is_exact(tmp_path, monkeypatch):
    store, mixture = _mixture()
    assert mixture.repeats == [0, 14]  # books: 5 held, 19 drawn per epoch of 25
    ref_model, _ = run_train(_resume_cfg(tmp_path / "ref"), store, mixture=mixture)
    ref = _records(tmp_path / "ref")
    train = [r for r in ref if r.get("split") == "train"]
    assert [r["step"] for r in train] == [1, 4, 7]
    assert all(sum(r["sources"].values()) == r["sequences"] for r in train)
    assert sum(r["sources"]["books"] for r in train) > sum(r["sources"]["web"] for r in train)

    out = tmp_path / "run"
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL", "step_end:5")  # checkpoint at 3, mid-interval
    monkeypatch.setenv("LLMTRAIN_FAULT_KILL_MODE", "raise")
    with pytest.raises(SimulatedKill):
        run_train(_resume_cfg(out), store, mixture=mixture)
    monkeypatch.delenv("LLMTRAIN_FAULT_KILL")
    model, result = run_train(_resume_cfg(out), store, resume="auto", mixture=mixture)
    assert result.step == 7
    a, b = params(ref_model), params(model)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert _records(out) == ref


def _mixture_config(out: Path, weights: list[float]) -> Config:
    sources = [
        {"path": "web.txt", "weight": weights[0]},
        {"path": "books/", "weight": weights[1], "name": "books"},
    ]
    return make_cfg(out, data={"train": sources})


def test_a_changed_weight_is_refused_on_resume(tmp_path):
    resolved = tmp_path / "config.resolved.yaml"
    resolved.write_text(dump_config(_mixture_config(tmp_path, [1.0, 3.0])))
    assert compare(_mixture_config(tmp_path, [1.0, 3.0]), resolved, 3) == {}
    with pytest.raises(ConfigError) as err:
        compare(_mixture_config(tmp_path, [1.0, 2.0]), resolved, 3)
    assert "data.train.1.weight: 3.0 → 2.0 (changes how the mixture draws" in str(err.value)
    renamed = yaml.safe_load(resolved.read_text())
    renamed["data"]["train"][1]["name"] = "novels"
    with pytest.raises(ConfigError, match=r"data.train.1.name: \"books\" → \"novels\""):
        compare(Config.model_validate(renamed), resolved, 3)


# ----------------------------------------------------------------------- through the CLI
@pytest.fixture(scope="module")
def mix_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mix")
    web = write_corpus(root / "web" / "web.txt", lines=90)
    books = write_corpus(root / "books" / "books.txt", lines=24)
    cfg = tiny_lm_config(root / "run", web, name="mix", epochs=1, log_every=3, save_every=None)
    cfg["data"]["train"] = [
        {"path": str(web), "split": "paragraphs", "weight": 1},
        {"path": str(books.parent), "split": "paragraphs", "weight": 1, "name": "books"},
    ]
    (root / "mix.yaml").write_text(json.dumps(cfg), encoding="utf-8")  # JSON is YAML
    return root


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_chunk_dry_run_and_fit_show_every_source(mix_dir):
    config = str(mix_dir / "mix.yaml")
    res = _cli("chunk", config, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    web, books = report["sources"]["web"], report["sources"]["books"]
    total = report["splits"]["train"]
    for key in ("documents", "tokens_in", "tokens_out", "chunks", "dropped_tokens"):
        assert total[key] == web[key] + books[key]
    store = mix_dir / "run" / "store"
    assert sorted(p.name for p in store.iterdir() if p.is_dir()) == ["train-books", "train-web"]
    # weights decide the draws, not the stores' bytes: a new weight reuses them
    res = _cli("chunk", config, "--json", "--set", "data.train.0.weight=5")
    assert json.loads(res.stdout)["up_to_date"] is True
    res = _cli("chunk", config)
    assert "  web" in res.output and "  books" in res.output

    held = [web["chunks"], books["chunks"]]
    mixture = Mixture(("web", "books"), tuple(held), (1.0, 1.0))
    drawn = mixture.counts
    assert drawn[1] > held[1]  # books is up-sampled at 1:1
    res = _cli("fit", config, "--dry-run")
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if "│ books" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells == [
        "books",
        f"{held[1]:,}",
        "1",
        f"{drawn[1]:,}",
        f"{100 * drawn[1] / sum(held):.1f}%",
        f"{drawn[1] - held[1]:,} (×{drawn[1] / held[1]:.2f})",
    ]

    res = _cli("fit", config)
    assert res.exit_code == 0, res.output
    train = [r for r in read_metrics(mix_dir / "run" / "metrics.jsonl") if r.get("split")]
    train = [r for r in train if r["split"] == "train"]
    assert all(sum(r["sources"].values()) == r["sequences"] for r in train)
    # one epoch: the records' per-source sums are the mixture's draws
    assert [sum(r["sources"][n] for r in train) for n in ("web", "books")] == drawn
    # a mixture's run is used like any other (read like its first source)
    web_text = str(mix_dir / "web" / "web.txt")
    res = _cli("predict", str(mix_dir / "run"), "--input", web_text, "--json")
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------------------- the stores
def _store_cfg(tmp_path: Path, train, task: str = "causal-lm", **data) -> Config:
    return Config.model_validate(
        {
            "run": {"output_dir": str(tmp_path / "run")},
            "model": {"task": task},
            "data": {"train": train, "chunk": {"seq_len": 16, "mode": "truncate"}, **data},
        }
    )


def test_each_source_is_its_own_store_with_one_label_map(tmp_path):
    from chunk_helpers import doc_names, wordpiece_tokenizer, write_jsonl

    from llmtrain.data.store_cache import ensure_stores

    a = write_jsonl(tmp_path / "a.jsonl", 40, labels=("sport", "music"), seed=1)
    b = write_jsonl(tmp_path / "b.jsonl", 30, labels=("science", "music"), seed=2)
    tok = wordpiece_tokenizer()
    single = _store_cfg(tmp_path, {"path": str(a)}, "sequence-classification")
    ensure_stores(single, tok, progress=False)
    assert (tmp_path / "run" / "store" / "train").is_dir()

    sources = [{"path": str(a)}, {"path": str(b), "weight": 2}]
    cfg = _store_cfg(tmp_path, sources, "sequence-classification", eval_fraction=0.3)
    report = ensure_stores(cfg, tok, progress=False)
    assert sorted(report.stores) == ["eval", "train-a", "train-b"]
    assert not (tmp_path / "run" / "store" / "train").exists()  # the single source's, stale
    sa, sb = report.stores["train-a"], report.stores["train-b"]
    union = ["music", "science", "sport"]
    assert sa.label_names == sb.label_names == report.stores["eval"].label_names == union
    for store, path in ((sa, a), (sb, b)):  # every chunk's label id names its record's label
        labels = [json.loads(x)["label"] for x in path.read_text().splitlines()]
        names = doc_names(store)  # file:line
        for i in range(len(store)):
            line = int(names[store[i]["doc_id"]].rsplit(":", 1)[1])
            assert union[store[i]["label"]] == labels[line - 1]
    # eval_fraction holds documents out of every source
    held_out = doc_names(report.stores["eval"])
    assert any("a.jsonl" in n for n in held_out) and any("b.jsonl" in n for n in held_out)


def test_one_source_keeps_its_store_and_fingerprint(tmp_path, tok_dir):
    """data.train as one source keeps store/train and the fingerprint it had before
    mixtures (its corpus's own), so a store built by an earlier llmtrain is reused."""
    from chunk_helpers import write_jsonl
    from transformers import AutoTokenizer

    from llmtrain.data.corpus import corpus_fingerprint, train_fingerprint
    from llmtrain.data.store_cache import ensure_stores

    a = write_jsonl(tmp_path / "a.jsonl", 20)
    cfg = _store_cfg(tmp_path, {"path": str(a)})
    assert train_fingerprint(cfg.data) == corpus_fingerprint(cfg.data.train)
    report = ensure_stores(cfg, AutoTokenizer.from_pretrained(tok_dir), progress=False)
    assert sorted(report.stores) == ["train"]
