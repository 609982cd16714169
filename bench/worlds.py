"""Preference worlds of several kinds, each with a hidden utility and annotators who follow it.

Texts come from one fixed bank built with :mod:`bench.synthetic_world` (a response is
assembled from parts the hidden rule values: on topic, a concrete step, politeness, rudeness,
filler); what differs between the families is how pairs are drawn and how annotators turn
the utility into a label:

* ``uniform``: every label disagrees with the utility order with the same probability (0.2):
  the world ``bench/synthetic_world.py`` has always built.
* ``bradley_terry``: P(a preferred) = sigmoid((u_a - u_b) / T), T set so that a label agrees
  with the utility order 80% of the time (the noise ceiling); annotators disagree most on close
  pairs, and exact ties (about 9% of pairs) are coin flips.
* ``thurstone``: the same with Gaussian noise, P = Phi((u_a - u_b) / T), and a quarter of the
  pool drawn as close pairs (responses of similar utility): most of the budget could go to
  coin flips.
* ``mixed_crowd``: four careful annotators (Bradley–Terry, T halved) and one who clicks at
  random; each label comes from one of the five at random (``annotator`` on the label).
* ``near_duplicates``: 250 distinct response pairs, each in the pool about eight times, asked
  in other words (another opener for the same topic) or shown the other way round; each copy
  is labelled on its own.
* ``unbalanced_topics``: topics drawn Zipf-like (the commonest about 40% of pairs), and the
  rule differs by topic (on half of them politeness is worth much more); evaluation pairs follow
  the same skew.
* ``position_bias``: Bradley–Terry annotators (with the exact ties) who also lean towards the
  reply shown first, P(first preferred) = sigmoid((u_first - u_second) / T + 1): on a far pair
  the lean changes little, on a close pair or a tie it picks the first reply about 73% of the
  time. The reward model never sees the order, so to it the lean is noise concentrated on close
  pairs. Added after the default selection was fixed, as a family nothing was tuned on.

``generate(kind, out, pool, eval, seed)`` writes ``pool.jsonl``, ``labels.jsonl`` and
``eval.jsonl`` (the files ``rlhf-backend simulate`` reads; eval labels are annotator labels,
as a team would have them) and ``truth.jsonl`` (the evaluation pairs labelled by the utility
order, exact ties by a coin), and returns the noise ceiling: how often the evaluation labels
agree with the utility order.

    python bench/worlds.py --kind bradley_terry --out DIR --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

from bench.synthetic_world import OPENERS, POLITE, TOPICS, make_response

KINDS = (
    "uniform",
    "bradley_terry",
    "thurstone",
    "mixed_crowd",
    "near_duplicates",
    "unbalanced_topics",
    "position_bias",
)
CEILING = 0.8  # how often an annotator label agrees with the utility order (bt, thurstone)
POSITION_LEAN = 1.0  # position_bias: the logit added in favour of the reply shown first
POLITE_TOPICS = frozenset(list(TOPICS)[::2])  # unbalanced_topics: politeness matters here

Label = Callable[[random.Random, float, float], int]  # (rng, u_a, u_b) -> preferred index


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


BANK_RESPONSES = 40  # per topic; every opener of a topic shares them


def response_bank() -> dict[str, list[tuple[str, float]]]:
    """The texts every world draws from: 40 distinct responses per topic with their utility.

    One fixed bank (12 topics x 5 openers x 40 responses = 2,400 (prompt, response) texts) for
    every kind and seed, so the benchmark embeds it once and worlds differ in which pairs they
    hold and how they are labelled, not in what has to be encoded."""
    rng = random.Random("response-bank")
    bank: dict[str, list[tuple[str, float]]] = {}
    for topic in TOPICS:
        seen: dict[str, float] = {}
        while len(seen) < BANK_RESPONSES:
            text, utility = make_response(rng, topic)
            seen.setdefault(text, utility)
        bank[topic] = list(seen.items())
    return bank


def _utility(kind: str, topic: str, text: str, utility: float) -> float:
    """unbalanced_topics: on the polite topics a polite opener is worth 2 more."""
    if kind == "unbalanced_topics" and topic in POLITE_TOPICS and any(p in text for p in POLITE):
        return utility + 2.0
    return utility


def _temperature(link: Callable[[float], float], diffs: list[float], ceiling: float) -> float:
    """T such that the mean of max(p, 1 - p) over ``diffs`` is ``ceiling`` (bisection)."""
    low, high = 1e-3, 100.0
    for _ in range(60):
        t = math.sqrt(low * high)
        agree = sum(max(link(d / t), 1 - link(d / t)) for d in diffs) / len(diffs)
        low, high = (t, high) if agree > ceiling else (low, t)
    return math.sqrt(low * high)


def _response_pair(kind: str, rng: random.Random, responses: list[tuple[str, float]]) -> tuple:
    gap = None
    if kind in ("bradley_terry", "thurstone", "position_bias") and rng.random() < 0.035:
        gap = 0.0  # an exact tie: together with the natural ones about 9% of pairs
    elif kind == "thurstone" and rng.random() < 0.25:
        gap = 0.5  # a close pair
    while True:
        (a, ua), (b, ub) = rng.sample(responses, 2)
        if gap is None or abs(ua - ub) <= gap:
            return a, ua, b, ub


def _pairs(kind: str, rng: random.Random, n: int, bank: dict) -> list[tuple]:
    topics = list(TOPICS)
    if kind == "unbalanced_topics":
        weights = [1.0 / (rank + 1) ** 1.5 for rank in range(len(topics))]
    else:
        weights = [1.0] * len(topics)

    def draw() -> tuple:
        topic = rng.choices(topics, weights)[0]
        a, ua, b, ub = _response_pair(kind, rng, bank[topic])
        return topic, a, _utility(kind, topic, a, ua), b, _utility(kind, topic, b, ub)

    def asked(topic: str, a: str, ua: float, b: str, ub: float) -> tuple:
        prompt = rng.choice(OPENERS).format(t=topic)
        return (prompt, a, ua, b, ub) if rng.random() < 0.5 else (prompt, b, ub, a, ua)

    if kind != "near_duplicates":
        return [asked(*draw()) for _ in range(n)]
    # Near-duplicates: the same two responses, asked in other words or shown the other way round.
    bases = [draw() for _ in range(max(1, n // 8))]
    return [asked(*rng.choice(bases)) for _ in range(n)]


def _labeller(kind: str, calibration: list[float], rng: random.Random) -> Label:
    if kind == "uniform":
        return lambda r, ua, ub: _order(r, ua, ub) if r.random() >= 0.2 else 1 - _order(r, ua, ub)
    link = _phi if kind == "thurstone" else _sigmoid
    t = _temperature(link, calibration, CEILING)
    if kind == "mixed_crowd":
        t /= 2.0
    lean = POSITION_LEAN if kind == "position_bias" else 0.0
    return lambda r, ua, ub: 0 if r.random() < link((ua - ub) / t + lean) else 1


def _order(rng: random.Random, ua: float, ub: float) -> int:
    return 0 if ua > ub else 1 if ub > ua else rng.randint(0, 1)


def generate(kind: str, out: Path, pool_size: int, eval_size: int, seed: int) -> float:
    """Write the world's files under ``out``; returns the evaluation labels' noise ceiling."""
    if kind not in KINDS:
        raise ValueError(f"unknown world kind {kind!r}; choose one of {KINDS}")
    rng = random.Random(f"{kind}:{seed}")
    bank = response_bank()
    pool, evaluation = _pairs(kind, rng, pool_size, bank), _pairs(kind, rng, eval_size, bank)
    label = _labeller(kind, [ua - ub for _, _, ua, _, ub in pool], rng)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "pool.jsonl").open("w") as pool_file, (out / "labels.jsonl").open("w") as labels:
        for i, (prompt, a, ua, b, ub) in enumerate(pool):
            pool_file.write(json.dumps({"id": f"p{i}", "prompt": prompt, "responses": [a, b]}))
            pool_file.write("\n")
            annotator = rng.randrange(5) if kind == "mixed_crowd" else 0
            preferred = rng.randint(0, 1) if annotator == 4 else label(rng, ua, ub)
            row = {"id": f"p{i}", "preferred": preferred}
            if kind == "mixed_crowd":
                row["annotator"] = annotator
            labels.write(json.dumps(row) + "\n")
    agree = 0
    with (out / "eval.jsonl").open("w") as noisy, (out / "truth.jsonl").open("w") as truth:
        for i, (prompt, a, ua, b, ub) in enumerate(evaluation):
            item = {"id": f"e{i}", "prompt": prompt, "responses": [a, b]}
            annotator = rng.randrange(5) if kind == "mixed_crowd" else 0
            preferred = rng.randint(0, 1) if annotator == 4 else label(rng, ua, ub)
            best = _order(rng, ua, ub)
            agree += preferred == best
            noisy.write(json.dumps({**item, "preferred": preferred}) + "\n")
            truth.write(json.dumps({**item, "preferred": best}) + "\n")
    return agree / len(evaluation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pool", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ceiling = generate(args.kind, args.out, args.pool, args.eval, args.seed)
    print(f"{args.kind}: noise ceiling of the evaluation labels {ceiling:.3f}")


if __name__ == "__main__":
    main()
