"""`llmtrain predict` and `llmtrain evaluate` on trained runs: the same windows, batches and
aggregation as fit's eval, so their numbers equal the ones fit logged."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from run_helpers import records, topic_text, trained
from typer.testing import CliRunner

from llmtrain.cli import app
from llmtrain.commands import evaluate as evaluate_cmd
from llmtrain.commands import predict as predict_cmd
from llmtrain.data.chunking import window_spans
from llmtrain.data.corpus import iter_documents
from llmtrain.rundir.trained import inference_batch, input_source, open_run, scoring_spec


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    return trained("classifier", tmp_path_factory)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return trained("lm", tmp_path_factory)


def _eval_file(run_dir):
    return run_dir.parent / "data" / "eval.jsonl"


def test_predict_doc_accuracy_equals_fits_last_eval(clf, tmp_path):
    out = tmp_path / "pred.jsonl"
    summary = predict_cmd.execute(str(clf), input_path=str(_eval_file(clf)), output=str(out))
    logged = records(clf, "eval")[-1]["doc_accuracy"]
    assert abs(summary["doc_accuracy"] - logged) <= 1e-9
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    gold = [json.loads(x) for x in _eval_file(clf).read_text().splitlines()]
    assert [r["id"] for r in rows] == [g["id"] for g in gold]
    assert all(set(r) == {"id", "label", "probs", "windows"} for r in rows)
    hits = [r["label"] == g["label"] for r, g in zip(rows, gold, strict=True)]
    assert abs(sum(hits) / len(hits) - logged) <= 1e-9
    for r in rows:
        assert set(r["probs"]) == {"sport", "science", "music"}
        assert math.isclose(sum(r["probs"].values()), 1.0, rel_tol=1e-9)
        assert max(r["probs"], key=r["probs"].get) == r["label"]
    # multi-window documents: a document's label is aggregated, not one window's
    assert max(r["windows"] for r in rows) > 1


def test_a_3000_word_document_goes_through_several_windows(clf, tmp_path):
    doc = topic_text(random.Random(7), "science", 3000)
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"id": "long", "text": doc}) + "\n", encoding="utf-8")
    out = tmp_path / "pred.jsonl"
    predict_cmd.execute(str(clf), input_path=str(path), output=str(out))
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    run = open_run(clf)
    spec = scoring_spec(run)
    n_tokens = len(run.tokenizer(doc, add_special_tokens=False)["input_ids"])
    assert n_tokens >= 3000 > run.positions
    expected = window_spans(n_tokens, spec.body_len, spec.overlap, spec.min_tail)
    assert row["windows"] == len(expected) > 100
    assert row["label"] in run.label_names


@torch.no_grad()
def test_causal_lm_per_document_loss(lm, tmp_path):
    """Each document's loss is the model's own next-token loss on that document alone, with
    the EOS that training appends; the summary is their token-weighted mean."""
    path = tmp_path / "docs.txt"
    texts = ["the cat sat on a mat.", "birds sang while the dog ran.", "red ball"]
    path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")  # paragraphs, as the run
    out = tmp_path / "pred.jsonl"
    summary = predict_cmd.execute(str(lm), input_path=str(path), output=str(out))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    run = open_run(lm)
    docs = list(iter_documents(input_source(str(path), like=run.cfg.data.train)))
    assert [d.text for d in docs] == texts and len(rows) == 3
    total, tokens = 0.0, 0
    for row, doc in zip(rows, docs, strict=True):
        ids = run.tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([[*ids, run.tokenizer.eos_token_id]])
        logits = run.model(input_ids=ids).logits[0, :-1]
        expected = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
        assert row["loss"] == pytest.approx(expected, rel=1e-5)
        assert row["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
        assert row["tokens"] == ids.shape[1] - 1 and row["windows"] == 1
        total, tokens = total + expected * row["tokens"], tokens + row["tokens"]
    assert summary["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert len({r["loss"] for r in rows}) == 3  # the documents really differ


def test_predict_cli_json_and_bad_input(clf, tmp_path):
    res = CliRunner().invoke(app, ["predict", str(clf), "--input", str(_eval_file(clf)), "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert len(payload["predictions"]) == 12 and "doc_accuracy" in payload["summary"]
    res = CliRunner().invoke(app, ["predict", str(clf), "--input", str(tmp_path / "nope.jsonl")])
    assert res.exit_code == 1
    assert "nope.jsonl" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(
        app, ["predict", str(clf), "--input", str(_eval_file(clf)), "--batch", "0"]
    )
    assert res.exit_code == 2 and "--batch" in res.output
    res = CliRunner().invoke(app, ["predict", str(tmp_path), "--input", str(_eval_file(clf))])
    assert res.exit_code == 1 and "not a run directory" in res.output


def test_batch_auto_probes_and_leaves_the_model_alone(lm):
    run = open_run(lm)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    n = inference_batch(run, "auto")
    assert 1 <= n <= run.cfg.batch.global_batch
    assert not run.model.training
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    assert inference_batch(run, None) == 4  # default: the micro-batch the run trained with
    assert inference_batch(run, "3") == 3


def test_evaluate_equals_the_logged_eval(clf):
    result = evaluate_cmd.execute(str(clf))
    logged = records(clf, "eval")[-1]
    for key in ("loss", "accuracy", "doc_accuracy"):
        assert result[key] == pytest.approx(logged[key], rel=1e-12, abs=1e-12), key
    matrix = result["confusion"]
    n_docs = sum(map(sum, matrix))
    assert n_docs == 12
    assert sum(matrix[i][i] for i in range(3)) / n_docs == pytest.approx(logged["doc_accuracy"])
    assert sum(r["support"] for r in result["per_class"]) == n_docs
    for i, r in enumerate(result["per_class"]):
        predicted = sum(row[i] for row in matrix)
        assert r["recall"] == pytest.approx(matrix[i][i] / max(sum(matrix[i]), 1))
        assert r["precision"] == pytest.approx(matrix[i][i] / predicted if predicted else 0.0)


def test_evaluate_a_checkpoint_and_an_input_file(clf):
    at_5 = next(r for r in records(clf, "eval") if r["step"] == 5)
    result = evaluate_cmd.execute(str(clf), checkpoint=str(clf / "checkpoints" / "step-00000005"))
    assert result["step"] == 5
    for key in ("loss", "accuracy", "doc_accuracy"):
        assert result[key] == pytest.approx(at_5[key], rel=1e-12, abs=1e-12), key
    final = records(clf, "eval")[-1]
    assert final["loss"] != at_5["loss"]  # the two weights really differ
    from_file = evaluate_cmd.execute(str(clf), input_path=str(_eval_file(clf)))
    for key in ("loss", "accuracy", "doc_accuracy"):
        assert from_file[key] == pytest.approx(final[key], rel=1e-12, abs=1e-12), key


def test_evaluate_causal_lm_json(lm):
    res = CliRunner().invoke(app, ["evaluate", str(lm), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    logged = records(lm, "eval")[-1]
    assert result["loss"] == pytest.approx(logged["loss"], rel=1e-12)
    assert result["ppl"] == pytest.approx(logged["ppl"], rel=1e-12)
    assert result["step"] == logged["step"] == 6


def test_final_tokenizer_knows_the_model_length(lm, clf):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(lm / "final").model_max_length == 32
    assert AutoTokenizer.from_pretrained(clf / "final").model_max_length == 32


def test_a_damaged_checkpoint_is_refused_before_loading(clf, tmp_path):
    import shutil

    copy = tmp_path / "step-00000005"
    shutil.copytree(clf / "checkpoints" / "step-00000005", copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # truncated
    res = CliRunner().invoke(app, ["evaluate", str(clf), "--checkpoint", str(copy)])
    assert res.exit_code == 1
    assert "model.safetensors" in res.output and "truncated" in res.output
    assert "Traceback" not in res.output


def test_a_moved_corpus_does_not_stop_predict(clf, tmp_path):
    """predict reads no corpus of the run's: a run whose training data has gone still loads;
    evaluate, which needs the eval corpus, names what is missing."""
    import shutil

    run = tmp_path / "moved"
    shutil.copytree(clf, run, ignore=shutil.ignore_patterns("store", "checkpoints"))
    config = run / "config.resolved.yaml"
    old = str(clf.parent / "data")
    config.write_text(config.read_text().replace(old, str(tmp_path / "gone")))
    out = tmp_path / "pred.jsonl"
    summary = predict_cmd.execute(str(run), input_path=str(_eval_file(clf)), output=str(out))
    assert summary["doc_accuracy"] == pytest.approx(records(clf, "eval")[-1]["doc_accuracy"])
    res = CliRunner().invoke(app, ["evaluate", str(run)])
    assert res.exit_code == 2 and "data.train.path" in res.output and "gone" in res.output


def test_a_changed_final_model_is_refused_before_loading(clf, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(clf, run, ignore=shutil.ignore_patterns("store", "checkpoints"))
    listed = json.loads((run / "final" / "checksums.json").read_text())["files"]
    assert {"config.json", "model.safetensors"} <= set(listed)
    weights = run / "final" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed
    weights.write_bytes(bytes(data))
    res = CliRunner().invoke(app, ["evaluate", str(run)])
    assert res.exit_code == 1
    assert "model.safetensors" in res.output and "sha256" in res.output
    assert "Traceback" not in res.output
