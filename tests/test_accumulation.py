"""Exact accumulation: (micro 2 → k 4), (micro 3, uneven) and (micro 8 → k 1) give the same
model (docs/architecture.md, "Exact accumulation")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fit_helpers import FakeTokenizer, make_cfg, max_rel_diff, params, random_store, run_train

from llmtrain.data.batching import collate, epoch_order, rank_share, split_micro, window_indices
from llmtrain.data.mixture import open_mixture
from llmtrain.engine.loss import summed_loss
from llmtrain.engine.model import build_model

TOL = 1e-10


def _runs(tmp_path, arch, task, store, micros, **kw):
    out = {}
    for micro in micros:
        cfg = make_cfg(tmp_path / f"{arch}-{micro}", arch=arch, task=task, micro=micro, **kw)
        model, _ = run_train(cfg, store, num_labels=3 if task != "causal-lm" else None)
        out[micro] = params(model)
    return out


@pytest.mark.parametrize(
    ("arch", "task"), [("gpt2", "causal-lm"), ("bert", "sequence-classification")]
)
def test_micro_batch_does_not_change_the_update(tmp_path, arch, task):
    n_labels = 3 if task != "causal-lm" else None
    # 20 sequences, global 8: windows of 8, 8 and a short last one of 4 (exact too).
    store = random_store(20, n_labels=n_labels, seed=1)
    runs = _runs(tmp_path, arch, task, store, [2, 3, 8])
    init = params(
        build_model(make_cfg(tmp_path / "x", arch=arch, task=task), FakeTokenizer(), n_labels)
    )
    assert max_rel_diff(init, runs[8]) > 1e-3  # training really moved the weights
    assert max_rel_diff(runs[8], runs[2]) < TOL
    assert max_rel_diff(runs[8], runs[3]) < TOL


def test_a_two_source_mixture_is_exact_too(tmp_path):
    """A weighted mixture feeds the same window code: (micro 2, k 4) == (micro 8, k 1) in
    fp64, over 2 epochs of 12 draws, one source up-sampled (weights 1:1 for sizes 9 and 3)."""
    a, b = random_store(9, seed=11), random_store(3, seed=12, lo=10, hi=16)
    runs = {}
    for micro in (2, 8):
        store, mixture = open_mixture(["web", "books"], [a, b], [1.0, 1.0])
        assert mixture.counts == [6, 6] and mixture.repeats == [0, 3]
        cfg = make_cfg(tmp_path / f"mix-{micro}", micro=micro, steps=4)
        model, _ = run_train(cfg, store, mixture=mixture)
        runs[micro] = params(model)
    init = params(build_model(make_cfg(tmp_path / "x"), FakeTokenizer(), None))
    assert max_rel_diff(init, runs[8]) > 1e-3  # training really moved the weights
    assert max_rel_diff(runs[8], runs[2]) < TOL


def test_sequences_normalization_is_exact_too(tmp_path):
    store = random_store(24, seed=2)
    runs = _runs(
        tmp_path, "gpt2", "causal-lm", store, [3, 8], train={"loss_normalization": "sequences"}
    )
    assert max_rel_diff(runs[8], runs[3]) < TOL


def _grads(model, batches, normalize):
    model.zero_grad(set_to_none=True)
    n_total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        s = summed_loss(logits, b["labels"], "causal-lm")
        n_micro = int((b["labels"][:, 1:] != -100).sum())
        loss = s / n_total if normalize == "window" else s / n_micro / len(batches)
        loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_mean_of_micro_means_would_fail(tmp_path):
    """The same data discriminates: averaging micro-batch means gives another gradient."""
    store = random_store(40, seed=1)
    model = build_model(make_cfg(tmp_path), FakeTokenizer(), None)
    window = window_indices(epoch_order(len(store), 0, 0), 0, 8)

    def batches(micro):
        return [collate(store, i, pad_id=0, task="causal-lm") for i in split_micro(window, micro)]

    full = _grads(model, batches(8), "window")
    exact = _grads(model, batches(2), "window")
    naive = _grads(model, batches(2), "mean-of-means")
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    assert rel(exact, full) < TOL
    assert rel(naive, full) > 1e-4  # orders of magnitude beyond the tolerance


def test_order_and_rank_split():
    order = epoch_order(50, seed=7, epoch=2)
    assert np.array_equal(order, epoch_order(50, seed=7, epoch=2))
    assert not np.array_equal(order, epoch_order(50, seed=7, epoch=3))
    window = window_indices(order, 1, 7)
    shares = [rank_share(window, r, 3) for r in range(3)]
    assert [len(s) for s in shares] == [3, 2, 2]
    assert np.array_equal(np.concatenate(shares), window)
    assert [len(m) for m in split_micro(shares[0], 2)] == [2, 1]
    assert len(window_indices(order, 7, 7)) == 1  # 50 = 7×7 + 1: the short last window


def test_collate_pads_and_masks():
    store = random_store(3, lo=3, hi=9, seed=5)
    b = collate(store, np.array([0, 1, 2]), pad_id=0, task="causal-lm")
    lengths = store.lengths
    assert b["input_ids"].shape == (3, lengths.max())
    assert b["attention_mask"].sum(1).tolist() == lengths.tolist()
    assert ((b["labels"] == -100) == (b["attention_mask"] == 0)).all()


def test_summed_loss_matches_the_models_own_mean(tmp_path):
    store = random_store(4, seed=9)
    model = build_model(make_cfg(tmp_path), FakeTokenizer(), None)
    b = collate(store, np.arange(4), pad_id=0, task="causal-lm")
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    n = int((b["labels"][:, 1:] != -100).sum())
    summed = summed_loss(out.logits, b["labels"], "causal-lm")
    # transformers computes its loss in fp32 even for an fp64 model: agree to fp32 precision
    assert float(summed.detach() / n) == pytest.approx(float(out.loss.detach()), rel=1e-6)
