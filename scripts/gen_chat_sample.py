#!/usr/bin/env python3
"""Generate configs/data/chat-sample.jsonl: a small chat corpus for the SFT example
(configs/sft-chat.yaml). Every conversation is made here from templates (our own text, no
licence questions) and every answer is computed, so it is right: arithmetic, counting, word
games, the calendar. Some conversations have a system turn, some several exchanges.
Deterministic (seeded).

  python scripts/gen_chat_sample.py            # 400 conversations
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = [
    "river", "garden", "window", "planet", "candle", "forest", "silver", "bridge", "engine",
    "pencil", "market", "rocket", "island", "letter", "winter", "harbor", "violin", "meadow",
]  # fmt: skip
SYSTEMS = [
    "You are a helpful assistant. Answer briefly.",
    "You are a careful tutor. Show the result in one sentence.",
    "Answer the question exactly.",
]

Exchange = tuple[str, str]  # (question, answer)


def add(rng: random.Random) -> Exchange:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."


def multiply(rng: random.Random) -> Exchange:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."


def subtract(rng: random.Random) -> Exchange:
    a, b = sorted((rng.randint(2, 99), rng.randint(2, 99)), reverse=True)
    return f"Subtract {b} from {a}.", f"{a} - {b} = {a - b}."


def parity(rng: random.Random) -> Exchange:
    n = rng.randint(1, 500)
    return f"Is {n} even or odd?", f"{n} is {'even' if n % 2 == 0 else 'odd'}."


def reverse(rng: random.Random) -> Exchange:
    w = rng.choice(WORDS)
    return f"Spell the word {w} backwards.", f"{w} backwards is {w[::-1]}."


def letters(rng: random.Random) -> Exchange:
    w = rng.choice(WORDS)
    return f"How many letters are in the word {w}?", f"The word {w} has {len(w)} letters."


def upper(rng: random.Random) -> Exchange:
    w = " ".join(rng.sample(WORDS, 2))
    return f"Write '{w}' in capital letters.", f"{w.upper()}"


def sort_numbers(rng: random.Random) -> Exchange:
    xs = rng.sample(range(1, 60), rng.randint(3, 5))
    shown = ", ".join(map(str, xs))
    return f"Sort these numbers from smallest to largest: {shown}.", ", ".join(
        map(str, sorted(xs))
    ) + "."


def weekday(rng: random.Random) -> Exchange:
    d, n = rng.randrange(7), rng.randint(1, 20)
    return (
        f"If today is {DAYS[d]}, what day is it in {n} days?",
        f"In {n} days it will be {DAYS[(d + n) % 7]}.",
    )


def largest(rng: random.Random) -> Exchange:
    xs = rng.sample(range(1, 200), 3)
    return f"Which is the largest of {xs[0]}, {xs[1]} and {xs[2]}?", f"The largest is {max(xs)}."


TASKS: list[Callable[[random.Random], Exchange]] = [
    add, multiply, subtract, parity, reverse, letters, upper, sort_numbers, weekday, largest,
]  # fmt: skip


def conversation(rng: random.Random, i: int) -> dict:
    """One record: an optional system turn, then one to three exchanges."""
    messages = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    for _ in range(rng.choice((1, 1, 2, 3))):
        question, answer = rng.choice(TASKS)(rng)
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    return {"id": f"chat-{i:04d}", "messages": messages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=400, help="conversations to write")
    ap.add_argument("--out", type=Path, default=Path("configs/data/chat-sample.jsonl"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with open(args.out, "w", encoding="utf-8") as f:
        for i in range(args.n):
            f.write(json.dumps(conversation(rng, i)) + "\n")
    print(f"wrote {args.n} conversations to {args.out}")


if __name__ == "__main__":
    main()
