"""A weighted mixture of training sources as one index space (docs/training.md, "Mixtures").

Each source keeps its own token store; `ConcatStore` puts them end to end, so source i's
sequence j is global index `offsets[i] + j`, and `Mixture.order` is a permutation-like
array of global indices that the existing window, rank-share and collate code consume
unchanged (data/batching.py). Invariants, each tested:

- an epoch holds `epoch_size = Σ sizes` sequences; source i contributes `counts[i]` of
  them, its weight's share by the largest-remainder rule (Σ counts = epoch_size, and each
  count is within 1 of its exact share);
- a source asked for more than it holds is repeated (up-sampled): every one of its
  sequences `counts[i] // size` times, plus a fresh random subset for the rest; one asked
  for fewer gives a random subset without repeats, drawn again each epoch;
- the order is a function of (seed, epoch, sizes, weights) only — never of the
  micro-batch, k or the world size;
- one source at its own size is `batching.epoch_order` exactly (a single `data.train`
  trains in the order it always did).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from llmtrain.data.batching import SequenceSource
from llmtrain.errors import LLMTrainError


# ------------------------------------------------------------------------- pure functions
def draw_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Sequences of each source in one epoch of Σ sizes: the share w_i / Σw, floored, and
    the floors' shortfall given one each to the largest remainders (ties: the earlier source).

    Exact arithmetic (Fraction of each float weight), so no platform rounds differently.
    """
    total = sum(int(n) for n in sizes)
    shares = [Fraction(w) for w in weights]
    whole = sum(shares)
    quotas = [total * s / whole for s in shares]
    counts = [int(q) for q in quotas]  # floor: quotas are non-negative
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def source_draws(size: int, count: int, seed: int, epoch: int, source: int) -> np.ndarray:
    """The local indices source `source` contributes to an epoch: `count // size` full
    passes in order, then `count % size` distinct ones drawn at random (seeded by seed,
    epoch and the source's position); the epoch's permutation then mixes everything."""
    full, rest = divmod(count, size)
    draws = [np.tile(np.arange(size, dtype=np.int64), full)]
    if rest:
        pick = np.random.default_rng([seed, epoch, source + 1]).permutation(size)[:rest]
        draws.append(pick.astype(np.int64))
    return np.concatenate(draws)


def mixture_order(sizes: Sequence[int], counts: Sequence[int], seed: int, epoch: int) -> np.ndarray:
    """Global indices of one epoch: every source's draws at its offset, then permuted by
    `default_rng([seed, epoch])` — the generator `batching.epoch_order` uses, so that one
    source drawn once in full gives exactly its order."""
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    draws = np.concatenate(
        [
            offsets[i] + source_draws(int(n), int(c), seed, epoch, i)
            for i, (n, c) in enumerate(zip(sizes, counts, strict=True))
        ]
    )
    return draws[np.random.default_rng([seed, epoch]).permutation(len(draws))]


def source_of(indices: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Which source each global index belongs to."""
    return np.searchsorted(np.cumsum(sizes), indices, side="right")


# -------------------------------------------------------------------------------- objects
@dataclass(frozen=True)
class Mixture:
    """The sources of a training run: names, sizes (sequences held) and weights."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    weights: tuple[float, ...]

    @classmethod
    def single(cls, size: int) -> Mixture:
        """One source drawn once in full: `batching.epoch_order`'s order."""
        return cls(("train",), (size,), (float(size),))

    @property
    def epoch_size(self) -> int:
        return sum(self.sizes)

    @property
    def counts(self) -> list[int]:
        """Sequences of each source in one epoch (`draw_counts`)."""
        return draw_counts(self.sizes, self.weights)

    @property
    def repeats(self) -> list[int]:
        """Per source, draws beyond its size in one epoch (up-sampling); 0 when it fits."""
        return [max(0, c - n) for c, n in zip(self.counts, self.sizes, strict=True)]

    def order(self, seed: int, epoch: int) -> np.ndarray:
        return mixture_order(self.sizes, self.counts, seed, epoch)

    def count(self, indices: np.ndarray) -> dict[str, int]:
        """Sequences per source among `indices` (a window), every source named."""
        hits = np.bincount(source_of(indices, self.sizes), minlength=len(self.sizes))
        return {name: int(n) for name, n in zip(self.names, hits, strict=True)}


class ConcatStore:
    """Token stores end to end as one SequenceSource: global index offset_i + j is store
    i's sequence j. Read-only; the stores stay open as they are."""

    def __init__(self, stores: Sequence[SequenceSource]):
        self.stores = list(stores)
        sizes = [len(s) for s in self.stores]
        self.ends = np.cumsum(sizes)
        self.starts = self.ends - np.asarray(sizes)
        self.lengths = np.concatenate([np.asarray(s.lengths) for s in self.stores])
        self.label_names = getattr(self.stores[0], "label_names", None)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _locate(self, i: int) -> tuple[SequenceSource, int]:
        k = int(np.searchsorted(self.ends, i, side="right"))
        return self.stores[k], i - int(self.starts[k])

    def __getitem__(self, i: int) -> dict[str, Any]:
        store, j = self._locate(int(i))
        return store[j]

    def doc_starts(self, i: int) -> np.ndarray:
        store, j = self._locate(int(i))
        return store.doc_starts(j)


def open_mixture(
    names: Sequence[str], stores: Sequence[SequenceSource], weights: Sequence[float | None]
) -> tuple[ConcatStore, Mixture]:
    """The training data of a mixture: its stores as one, and the mixture (a weight left
    out is the source's size). An empty source is refused: it has nothing to draw."""
    for name, store in zip(names, stores, strict=True):
        if len(store) == 0:
            raise LLMTrainError(
                f"data.train: source {name!r} holds no sequences after chunking; remove it "
                "or point it at a corpus with text"
            )
    sizes = tuple(len(s) for s in stores)
    resolved = tuple(float(n if w is None else w) for w, n in zip(weights, sizes, strict=True))
    return ConcatStore(stores), Mixture(tuple(names), sizes, resolved)
