"""Weighted mixtures (data/mixture.py; docs/training.md, "Mixtures"): how many sequences of
each source an epoch holds, their order, and the concatenated store."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from fit_helpers import random_store
from hypothesis import given, settings
from hypothesis import strategies as st

from llmtrain.data.batching import epoch_order, rank_share, split_micro, window_indices
from llmtrain.data.mixture import ConcatStore, Mixture, draw_counts, open_mixture, source_of
from llmtrain.errors import LLMTrainError

sizes_st = st.lists(st.integers(1, 40), min_size=1, max_size=5)
weight_st = st.floats(0.01, 100.0, allow_nan=False, allow_infinity=False)


@st.composite
def mixtures(draw):
    sizes = draw(sizes_st)
    weights = draw(st.lists(weight_st, min_size=len(sizes), max_size=len(sizes)))
    return Mixture(tuple(f"s{i}" for i in range(len(sizes))), tuple(sizes), tuple(weights))


def test_largest_remainder_counts():
    # sizes 10 + 3 + 7 = 20 drawn 1 : 1 : 2 → quotas 5, 5, 10 exactly
    assert draw_counts([10, 3, 7], [1, 1, 2]) == [5, 5, 10]
    # 10 drawn 1 : 1 : 1 → quotas 3.33 each; the one spare goes to the first (a tie)
    assert draw_counts([4, 3, 3], [1, 1, 1]) == [4, 3, 3]
    # quotas 1.5, 8.5 → floors 1, 8; tie on remainders → the earlier source
    assert draw_counts([5, 5], [3, 17]) == [2, 8]
    # the default weights (the sizes) draw every source once
    assert draw_counts([9, 3], [9.0, 3.0]) == [9, 3]


@settings(max_examples=200, deadline=None)
@given(mixtures())
def test_counts_sum_to_the_epoch_and_follow_the_weights(m):
    counts = m.counts
    assert sum(counts) == m.epoch_size
    whole = sum(Fraction(w) for w in m.weights)
    for c, w in zip(counts, m.weights, strict=True):
        assert abs(c - m.epoch_size * Fraction(w) / whole) < 1


@settings(max_examples=100, deadline=None)
@given(mixtures(), st.integers(0, 2**32 - 1), st.integers(0, 5))
def test_the_order_draws_each_source_its_count(m, seed, epoch):
    order = m.order(seed, epoch)
    assert len(order) == m.epoch_size
    assert np.array_equal(order, m.order(seed, epoch))  # a function of its arguments
    per_source = np.bincount(source_of(order, m.sizes), minlength=len(m.sizes))
    assert per_source.tolist() == m.counts
    assert m.count(order) == dict(zip(m.names, m.counts, strict=True))
    offsets = np.concatenate([[0], np.cumsum(m.sizes)[:-1]])
    for i, (n, c) in enumerate(zip(m.sizes, m.counts, strict=True)):
        local = order[source_of(order, m.sizes) == i] - offsets[i]
        assert local.min(initial=0) >= 0 and local.max(initial=0) < n
        # every sequence of a source drawn floor(c/n) or ceil(c/n) times: repeats are even
        times = np.bincount(local, minlength=n)
        assert set(times.tolist()) <= {c // n, -(-c // n)}


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.integers(0, 2**32 - 1), st.integers(0, 5))
def test_one_source_at_its_size_is_the_single_source_order(n, seed, epoch):
    """data.train as one source trains in the order it always did (batching.epoch_order)."""
    assert np.array_equal(Mixture.single(n).order(seed, epoch), epoch_order(n, seed, epoch))
    named = Mixture(("web",), (n,), (float(n),))
    assert np.array_equal(named.order(seed, epoch), epoch_order(n, seed, epoch))


@settings(max_examples=100, deadline=None)
@given(
    mixtures(),
    st.integers(0, 1000),
    st.integers(1, 16),
    st.integers(1, 8),
    st.integers(1, 4),
)
def test_what_a_step_trains_depends_on_no_micro_batch_k_or_world(m, seed, gb, micro, world):
    """Every step's sequences, over all ranks and micro-batches, are the window of the
    mixture's order; so (micro, k, world) never change which sequences a step sees."""
    order = m.order(seed, 0)
    steps = -(-len(order) // gb)
    for t in range(steps):
        window = window_indices(order, t, gb)
        seen = [mb for r in range(world) for mb in split_micro(rank_share(window, r, world), micro)]
        assert np.array_equal(np.concatenate(seen) if seen else window[:0], window)
    assert np.array_equal(
        np.concatenate([window_indices(order, t, gb) for t in range(steps)]), order
    )


def test_epochs_draw_different_subsets_of_a_down_sampled_source():
    m = Mixture(("big", "small"), (30, 10), (1.0, 3.0))
    assert m.counts == [10, 30] and m.repeats == [0, 20]
    firsts = [set(m.order(0, e)[m.order(0, e) < 30].tolist()) for e in range(3)]
    assert all(len(s) == 10 for s in firsts)  # 10 of the 30, none twice
    assert firsts[0] != firsts[1] != firsts[2]
    assert not np.array_equal(m.order(0, 0), m.order(1, 0))  # the seed matters


def test_concat_store_reads_each_source_at_its_offset():
    a, b = random_store(4, seed=1), random_store(3, seed=2)
    store, m = open_mixture(["a", "b"], [a, b], [None, 2.0])
    assert len(store) == 7 and m.weights == (4.0, 2.0)
    assert np.array_equal(store.lengths, np.concatenate([a.lengths, b.lengths]))
    for i in range(4):
        assert np.array_equal(store[i]["input_ids"], a[i]["input_ids"])
    for j in range(3):
        assert np.array_equal(store[4 + j]["input_ids"], b[j]["input_ids"])
    assert np.array_equal(store.doc_starts(5), b.doc_starts(1))
    assert isinstance(store, ConcatStore)


def test_an_empty_source_is_refused():
    with pytest.raises(LLMTrainError, match="source 'b' holds no sequences"):
        open_mixture(["a", "b"], [random_store(3), random_store(0)], [None, None])


def test_counts_in_a_window():
    m = Mixture(("a", "b"), (3, 2), (1.0, 1.0))
    assert m.count(np.array([0, 4, 3, 3])) == {"a": 1, "b": 3}
    assert m.count(np.array([], dtype=np.int64)) == {"a": 0, "b": 0}
    assert Counter(source_of(np.arange(5), m.sizes).tolist()) == {0: 3, 1: 2}
