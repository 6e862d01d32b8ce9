"""Named eval sets: `data.eval: {name: corpus}` validated with file:line, one store per set,
each evaluated at eval_every and logged as split eval/<name>, drawn by `report` as its own
curve, summarised by `evaluate` (one row per set); `train.best_metric` says which set and key
"best eval" means. A single eval corpus keeps split `eval`."""

from __future__ import annotations

import json
import shutil

import pytest
from fit_helpers import make_cfg, random_store, run_train
from run_helpers import tiny_lm_config, write_config, write_corpus

from llmtrain.config import load_config
from llmtrain.config.schema import DataSourceConfig
from llmtrain.engine.metrics import TIMING_FIELDS, read_metrics
from llmtrain.errors import ConfigError

HEAD = """\
model: {arch: gpt2, config: {n_layer: 1, n_embd: 16, n_head: 2}}
tokenizer: {train: {kind: bpe, vocab_size: 300}}
data:
  train: {path: a.txt}
"""


def _load(tmp_path, monkeypatch, data: str, train: str = "max_steps: 2"):
    monkeypatch.chdir(tmp_path)
    for name in ("a.txt", "web.txt", "books.txt"):
        (tmp_path / name).write_text("some text\n", encoding="utf-8")
    (tmp_path / "cfg.yaml").write_text(f"{HEAD}{data}train: {{{train}}}\n", encoding="utf-8")
    return load_config("cfg.yaml")


def _refused(tmp_path, monkeypatch, data: str, train: str = "max_steps: 2") -> list[str]:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, monkeypatch, data, train)
    return info.value.messages


NAMED = "  eval:\n    web: {path: web.txt}\n    books: {path: books.txt}\n"


def test_named_and_single_eval_sets(tmp_path, monkeypatch):
    cfg = _load(tmp_path, monkeypatch, NAMED)
    assert list(cfg.data.eval_sets) == ["eval/web", "eval/books"]
    assert [w for w, _ in cfg.data.sources()] == [
        ("data", "train"),
        ("data", "eval", "web"),
        ("data", "eval", "books"),
    ]
    cfg = _load(tmp_path, monkeypatch, "  eval: {path: web.txt}\n")
    assert isinstance(cfg.data.eval, DataSourceConfig)
    assert list(cfg.data.eval_sets) == ["eval"]


@pytest.mark.parametrize(
    ("data", "train", "message"),
    [
        (
            "  eval:\n    web: {path: web.txt, formt: txt}\n",
            "max_steps: 2",
            "cfg.yaml:6:26: data.eval.web.formt: unknown key, did you mean 'format'?",
        ),
        (
            "  eval: {path: web.txt, text_feild: x}\n",
            "max_steps: 2",
            "cfg.yaml:5:25: data.eval.text_feild: unknown key, did you mean 'text_field'?",
        ),
        (
            "  eval:\n    web: {path: nowhere.txt}\n",
            "max_steps: 2",
            "cfg.yaml:6:11: data.eval.web.path: no such file or directory 'nowhere.txt'",
        ),
        (
            '  eval:\n    "web site": {path: web.txt}\n',
            "max_steps: 2",
            "cfg.yaml:6:5: data.eval.web site: eval set name 'web site': use letters, digits",
        ),
        (
            NAMED,
            "max_steps: 2, best_metric: eval/wbe:loss",
            "cfg.yaml:8:23: train.best_metric: no eval set 'eval/wbe' (this run's: eval/web, "
            "eval/books), did you mean 'eval/web'?",
        ),
        (
            NAMED,
            "max_steps: 2, best_metric: eval/web:acuracy",
            "cfg.yaml:8:23: train.best_metric: causal-lm eval records hold loss, ppl, not "
            "'acuracy'",
        ),
        (
            NAMED,
            "max_steps: 2, best_metric: loss",
            "cfg.yaml:8:23: train.best_metric: write SPLIT:KEY, e.g. eval/web:loss (got 'loss')",
        ),
        (
            "",
            "max_steps: 2, best_metric: eval:loss",
            "cfg.yaml:5:23: train.best_metric: the run has no eval data",
        ),
    ],
)
def test_bad_eval_sets_and_best_metric_name_the_key_and_line(
    tmp_path, monkeypatch, data, train, message
):
    messages = _refused(tmp_path, monkeypatch, data, train)
    assert len(messages) == 1, messages
    assert messages[0].startswith(message), messages[0]


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def test_each_set_is_evaluated_at_eval_every_as_its_own_split(tmp_path):
    train, a, b = random_store(30, seed=4), random_store(6, seed=5), random_store(9, seed=6)
    named_cfg = make_cfg(tmp_path / "named", steps=4, train={"eval_every": 2})
    _, named = run_train(named_cfg, train, {"eval/a": a, "eval/b": b})
    _, single = run_train(make_cfg(tmp_path / "one", steps=4, train={"eval_every": 2}), train, b)
    records = read_metrics(tmp_path / "named" / "metrics.jsonl")
    evals = [(r["split"], r["step"]) for r in records if r["split"] != "train"]
    assert evals == [("eval/a", 2), ("eval/b", 2), ("eval/a", 4), ("eval/b", 4)]
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    # the same training (an extra eval set changes nothing), and eval/b is what a run whose
    # only eval set is b logs as split "eval" (fp64, the same computation: exactly equal)
    train_only = [r for r in records if r["split"] == "train"]
    assert _without_timing(train_only) == _without_timing([r for r in one if r["split"] == "train"])
    as_b = [{**r, "split": "eval"} for r in records if r["split"] == "eval/b"]
    assert as_b == [r for r in one if r["split"] == "eval"]
    assert named.last_evals["eval/b"] == single.last_eval
    assert named.last_eval == named.last_evals["eval/a"]  # the first set's, as before


@pytest.fixture(scope="module")
def named_run(tmp_path_factory):
    """A tiny GPT-2 through the whole pipeline with two named eval sets of different text."""
    from run_helpers import _fit

    root = tmp_path_factory.mktemp("named")
    cfg = tiny_lm_config(
        root / "run",
        write_corpus(root / "train.txt"),
        name="lm",
        max_steps=4,
        eval_every=2,
        save_every=4,
        log_every=2,
        best_metric="eval/books:ppl",
    )
    (root / "books.txt").write_text("the dog ran to the red ball.\n\nbirds sang.\n" * 20)
    cfg["data"]["eval"] = {
        "web": {"path": str(write_corpus(root / "web.txt", lines=60)), "split": "paragraphs"},
        "books": {"path": str(root / "books.txt"), "split": "paragraphs"},
    }
    _fit(write_config(root / "config.yaml", cfg))
    return root


def test_pipeline_builds_a_store_per_set_and_evaluate_has_a_row_each(named_run, capsys):
    from llmtrain.commands import evaluate as evaluate_cmd

    run = named_run / "run"
    stores = sorted(p.name for p in (run / "store").iterdir() if p.is_dir())
    assert stores == ["eval-books", "eval-web", "train"]
    logged = {r["split"]: r for r in read_metrics(run / "metrics.jsonl") if r["step"] == 4}
    result = evaluate_cmd.execute(str(run), as_json=True)
    payload = json.loads(capsys.readouterr().out)
    assert payload == json.loads(json.dumps(result))
    assert result["step"] == 4 and [s["split"] for s in result["sets"]] == [
        "eval/web",
        "eval/books",
    ]
    for row in result["sets"]:
        # the same weights, rows and micro-batches as fit's last eval (fp32 sums in another
        # order of calls: 1e-9 relative)
        assert row["loss"] == pytest.approx(logged[row["split"]]["loss"], rel=1e-9)
    assert result["sets"][0]["loss"] != pytest.approx(result["sets"][1]["loss"], rel=1e-3)


def test_report_draws_a_curve_per_set_and_picks_best_by_best_metric(named_run):
    from matplotlib.figure import Figure

    from llmtrain.commands import report as report_cmd
    from llmtrain.plot import draw_panel

    run = named_run / "run"
    (metrics,) = report_cmd.load_runs([str(run)])
    ax = Figure().subplots()
    draw_panel(ax, "loss", [metrics], ["C0"])
    assert [line.get_label() for line in ax.get_lines()] == [
        "lm train",
        "lm eval/web",
        "lm eval/books",
    ]
    books = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "eval/books"]
    best = min(books, key=lambda r: r["ppl"])
    row = report_cmd.summary(metrics)
    assert row["best_metric"] == "eval/books:ppl"
    assert (row["best_value"], row["best_step"]) == (best["ppl"], best["step"])
    assert report_cmd.best_text(row) == f"eval/books ppl {best['ppl']:.4f} @ {best['step']}"


def test_best_metric_accuracy_is_the_highest(tmp_path):
    """An accuracy is best highest, a loss lowest; without best_metric: the first set's loss."""
    from llmtrain.commands import report as report_cmd

    rows = [
        {"split": "eval/a", "step": 1, "loss": 2.0, "doc_accuracy": 0.5},
        {"split": "eval/b", "step": 1, "loss": 1.0, "doc_accuracy": 0.9},
        {"split": "eval/a", "step": 2, "loss": 1.5, "doc_accuracy": 0.7},
        {"split": "eval/b", "step": 2, "loss": 1.2, "doc_accuracy": 0.6},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (metrics,) = report_cmd.load_runs([str(tmp_path)])
    assert report_cmd.summary(metrics)["best_metric"] == "eval/a:loss"
    assert report_cmd.summary(metrics)["best_value"] == 1.5
    (tmp_path / "config.resolved.yaml").write_text("train: {best_metric: 'eval/b:doc_accuracy'}\n")
    row = report_cmd.summary(metrics)
    assert (row["best_value"], row["best_step"]) == (0.9, 1)


def test_a_stale_eval_store_is_removed_when_the_sets_change(named_run, tmp_path):
    """Going back to one eval corpus reuses train's store and drops the named ones."""
    from llmtrain.config import load_config as load
    from llmtrain.data.store_cache import ensure_stores
    from llmtrain.data.tokenizer import load_tokenizer

    store = tmp_path / "store"  # a copy: the module's run stays as it was
    shutil.copytree(named_run / "run" / "store", store)
    cfg_data = json.loads((named_run / "config.yaml").read_text())
    cfg_data["data"]["eval"] = cfg_data["data"]["eval"]["web"]
    cfg_data["data"]["store"] = str(store)
    cfg_data["train"].pop("best_metric")
    cfg = load(write_config(tmp_path / "single.yaml", cfg_data))
    report = ensure_stores(cfg, load_tokenizer(cfg), progress=False)
    assert sorted(p.name for p in store.iterdir() if p.is_dir()) == ["eval", "train"]
    assert list(report.stores) == ["train", "eval"]
