"""`llmtrain report`: a valid PNG for one run and for several, and the summary table."""

from __future__ import annotations

import json

import pytest
from run_helpers import records, trained
from typer.testing import CliRunner

from llmtrain.cli import app
from llmtrain.commands import report as report_cmd
from llmtrain.plot import panels

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return trained("classifier", tmp_path_factory), trained("lm", tmp_path_factory)


def _image(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG
    return imread(path)


def test_one_run_writes_a_png_into_the_run(runs, tmp_path):
    clf, _ = runs
    path = report_cmd.execute([str(clf)])
    assert path == clf / "report.png"
    image = _image(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
    # loss, lr, tokens/s, grad norm and (a classifier) accuracy
    assert [p for p, _ in panels(report_cmd.load_runs([str(clf)]))] == [
        "loss",
        "lr",
        "tokens_per_s",
        "grad_norm",
        "accuracy",
    ]


def test_two_runs_overlaid_and_summarized(runs, tmp_path):
    clf, lm = runs
    out = tmp_path / "both.png"
    res = CliRunner().invoke(app, ["report", str(clf), str(lm), "--output", str(out), "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["output"] == str(out)
    _image(out)
    rows = {r["run"]: r for r in payload["runs"]}
    assert set(rows) == {"clf", "lm"}
    for name, run in (("clf", clf), ("lm", lm)):
        train, evals = records(run, "train"), records(run, "eval")
        row = rows[name]
        assert row["steps"] == train[-1]["step"]
        assert row["final_loss"] == train[-1]["loss"]
        assert row["best_eval_loss"] == min(r["loss"] for r in evals)
        # records carry the tokens of their whole interval: they add up to the run's
        assert row["tokens"] == sum(r["tokens"] for r in train) > train[-1]["tokens"]
    assert "best_doc_accuracy" in rows["clf"] and "best_doc_accuracy" not in rows["lm"]
    res = CliRunner().invoke(app, ["report", str(clf), str(lm), "--output", str(out)])
    assert res.exit_code == 0 and "clf" in res.output and "lm" in res.output


def test_report_without_metrics_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 1 and "metrics.jsonl" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "report.png").exists()


def test_wall_time_adds_the_sessions_of_a_resumed_run():
    train = [{"elapsed_s": t} for t in (1.0, 5.0, 9.0, 2.0, 4.0)]  # resumed after 9 s
    assert report_cmd.wall_seconds(train) == 13.0
    assert report_cmd.wall_seconds([]) is None
