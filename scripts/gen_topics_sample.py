#!/usr/bin/env python3
"""Generate configs/data/topics-{train,eval}.jsonl: a tiny labelled corpus for the BERT
long-document example. Synthetic text (our own, no licence questions): each topic has its own
word list mixed with shared filler words; lengths vary so that some documents need several
windows. Deterministic (seeded).

  python scripts/gen_topics_sample.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = {
    "sport": [
        "match",
        "goal",
        "team",
        "player",
        "coach",
        "score",
        "league",
        "season",
        "stadium",
        "referee",
        "win",
        "cup",
    ],
    "science": [
        "atom",
        "energy",
        "cell",
        "experiment",
        "theory",
        "particle",
        "data",
        "lab",
        "physics",
        "biology",
        "model",
    ],
    "music": [
        "song",
        "album",
        "band",
        "guitar",
        "concert",
        "melody",
        "rhythm",
        "singer",
        "chorus",
        "drum",
        "tour",
    ],
}
FILLER = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "with",
    "that",
    "it",
    "as",
    "at",
    "by",
    "from",
    "this",
]


def document(rng: random.Random, topic: str) -> str:
    words = []
    for _ in range(rng.randint(40, 700)):
        pool = TOPICS[topic] if rng.random() < 0.35 else FILLER
        words.append(rng.choice(pool))
    return " ".join(words) + "."


def main() -> None:
    rng = random.Random(0)
    out = Path(__file__).resolve().parent.parent / "configs" / "data"
    for split, n in (("train", 36), ("eval", 12)):
        with open(out / f"topics-{split}.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                topic = list(TOPICS)[i % len(TOPICS)]
                record = {"id": f"{split}-{i}", "text": document(rng, topic), "label": topic}
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
