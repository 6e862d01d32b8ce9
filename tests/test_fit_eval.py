"""Classification eval with window → document aggregation, and document isolation in pack mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fit_helpers import FakeStore, FakeTokenizer, make_cfg, random_store

from llmtrain.data.batching import collate
from llmtrain.engine.evaluate import AGGREGATES, aggregate_windows, evaluate
from llmtrain.engine.model import build_model, check_document_isolation
from llmtrain.engine.step import StepSpec
from llmtrain.errors import LLMTrainError

LOGITS = torch.tensor(
    [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.5, 0.0], [0.0, 0.0, 3.0], [0.1, 0.0, 0.2]],
    dtype=torch.float64,
)
DOCS = np.array([7, 7, 7, 9, 4])  # doc 7: three windows; docs 9 and 4: one window each


def test_aggregates():
    expect = {  # predicted class per doc, docs sorted: 4, 7, 9
        "mean_logits": [2, 1, 2],  # doc 7: [2/3, 2.5/3, 0]
        "max_logits": [2, 0, 2],  # doc 7: [2, 1.5, 0]
        "mean_probs": [2, 1, 2],
        "first": [2, 0, 2],
        "vote": [2, 1, 2],  # doc 7: votes 0, 1, 1
    }
    for method in AGGREGATES:
        docs, scores = aggregate_windows(LOGITS, DOCS, method)
        assert docs.tolist() == [4, 7, 9]
        assert scores.argmax(-1).tolist() == expect[method], method


@pytest.mark.parametrize("method", AGGREGATES)
def test_one_window_document_is_unchanged(method):
    logits = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, scores = aggregate_windows(logits, np.arange(6), method)
    assert torch.equal(scores.argmax(-1), logits.argmax(-1))


def test_classification_eval_accuracies(tmp_path):
    cfg = make_cfg(tmp_path, arch="bert", task="sequence-classification")
    store = random_store(9, n_labels=3, seed=3)
    store.doc_ids = np.array([0, 0, 0, 1, 1, 2, 3, 4, 5])
    store.labels = np.array([1, 1, 1, 2, 2, 0, 1, 2, 0])
    model = build_model(cfg, FakeTokenizer(), 3)
    scores = evaluate(
        model,
        store,
        StepSpec("sequence-classification", "tokens", "fp64", None),
        micro=4,
        pad_id=0,
        device=torch.device("cpu"),
        aggregate="mean_logits",
    )
    with torch.no_grad():
        model.eval()
        b = collate(store, np.arange(9), pad_id=0, task="sequence-classification")
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    pred = logits.argmax(-1).numpy()
    assert scores["accuracy"] == pytest.approx(float((pred == store.labels).mean()))
    _, agg = aggregate_windows(logits.double(), store.doc_ids, "mean_logits")
    doc_labels = np.array([1, 2, 0, 1, 2, 0])
    assert scores["doc_accuracy"] == pytest.approx(
        float((agg.argmax(-1).numpy() == doc_labels).mean())
    )
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(store.labels)).item()
    assert scores["loss"] == pytest.approx(loss, rel=1e-9)


def test_packed_documents_do_not_see_each_other(tmp_path):
    """fp64: doc 2's logits inside a packed chunk equal doc 2 run alone."""
    cfg = make_cfg(
        tmp_path,
        data={
            "train": {"path": str(tmp_path)},
            "chunk": {"seq_len": 16, "mode": "pack", "cross_doc_attention": False},
        },
    )
    model = build_model(cfg, FakeTokenizer(), None).eval()
    check_document_isolation(model, torch.device("cpu"))
    rng = np.random.default_rng(0)
    doc1, doc2, doc3 = (rng.integers(2, 64, size=k) for k in (5, 7, 3))
    store = FakeStore(
        [np.concatenate([doc1, doc2, doc3]), doc2], starts=[np.array([0, 5, 12]), np.array([0])]
    )
    packed = collate(store, np.array([0]), pad_id=0, task="causal-lm", isolate_docs=True)
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    assert packed["labels"][0, 5] == -100 and packed["labels"][0, 12] == -100  # no cross-doc target
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        alone = model(input_ids=torch.tensor(doc2)[None]).logits
    assert torch.allclose(together[0, 5:12], alone[0], rtol=0, atol=1e-10)
    # the same chunk with cross-document attention really differs (the test discriminates)
    with torch.no_grad():
        mixed = model(input_ids=packed["input_ids"]).logits
    assert (mixed[0, 5:12] - alone[0]).abs().max() > 1e-4
    # padding in a packed batch is its own segment: the real tokens are unaffected
    both = collate(store, np.array([1, 0]), pad_id=0, task="causal-lm", isolate_docs=True)
    with torch.no_grad():
        padded = model(input_ids=both["input_ids"], position_ids=both["position_ids"]).logits
    assert torch.allclose(padded[0, :7], alone[0], rtol=0, atol=1e-10)


class _LeakyLM(torch.nn.Module):
    """A stand-in model whose every position sees the whole sequence (no document isolation)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, position_ids=None, use_cache=False):
        class Out:
            logits = self.emb(input_ids).cumsum(1)

        return Out()


def test_model_without_document_isolation_is_refused():
    with pytest.raises(LLMTrainError, match="cross_doc_attention"):
        check_document_isolation(_LeakyLM(), torch.device("cpu"))
