"""A synthetic preference world with a hidden rule, and annotators who disagree with it.

Prompts ask for help on a topic; each response is assembled from parts that the hidden rule
values differently: staying on the prompt's topic, giving a concrete step, being polite, or
being rude / padding with filler. The true quality of a response is a weighted sum of its
parts; the true preference follows the quality (ties broken by a coin), and each annotator
label disagrees with the truth with probability ``noise`` (20% by default).

    python bench/synthetic_world.py --out DIR --pool 2000 --eval 500 --seed 0

writes ``DIR/pool.jsonl``, ``DIR/labels.jsonl`` (noisy annotator labels) and ``DIR/eval.jsonl``
(labels from the hidden rule itself, so accuracy on it is measured against the truth).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TOPICS = {
    "bread": ("knead the dough for ten minutes", "let the loaf rise in a warm place"),
    "tomatoes": ("water the plants deeply twice a week", "stake the stems as they grow"),
    "python lists": ("use list.append to add an item", "slice with a[1:3] to copy part"),
    "a flat tyre": ("loosen the wheel nuts before jacking", "check the spare's pressure"),
    "sleep": ("keep the same bedtime every night", "avoid screens an hour before bed"),
    "budgeting": ("write down every expense for a month", "set aside savings first"),
    "running": ("start with three short runs a week", "increase distance by ten percent"),
    "coffee": ("grind the beans just before brewing", "use water just off the boil"),
    "job interviews": ("research the company beforehand", "prepare two questions to ask"),
    "houseplants": ("let the soil dry between waterings", "give them bright indirect light"),
    "email": ("put the request in the first line", "keep it under five sentences"),
    "studying": ("test yourself instead of rereading", "space sessions over several days"),
}
OPENERS = (
    "How do I get better at {t}?",
    "Any advice about {t}?",
    "Help me with {t}, please.",
    "What should I know about {t}?",
    "I'm struggling with {t}. Tips?",
)
POLITE = ("Happy to help!", "Good question.", "Thanks for asking.")
RUDE = ("Honestly, this is obvious.", "Figure it out yourself.", "Why would you even ask?")
FILLER = (
    "There are many things one could say.",
    "It depends on a lot of factors.",
    "Everyone is different in this regard.",
)
# The hidden rule: what each part is worth.
WEIGHTS = {
    "on_topic": 2.0,
    "step": 1.0,
    "second_step": 0.5,
    "polite": 0.5,
    "rude": -2.0,
    "filler": -0.75,
}


def make_response(rng: random.Random, topic: str) -> tuple[str, float]:
    parts, score = [], 0.0
    if rng.random() < 0.4:
        parts.append(rng.choice(POLITE))
        score += WEIGHTS["polite"]
    if rng.random() < 0.25:
        parts.append(rng.choice(RUDE))
        score += WEIGHTS["rude"]
    on_topic = rng.random() < 0.6
    subject = topic if on_topic else rng.choice([t for t in TOPICS if t != topic])
    steps = TOPICS[subject]
    if rng.random() < 0.7:
        parts.append(f"For {subject}, {steps[0]}.")
        score += WEIGHTS["step"] + (WEIGHTS["on_topic"] if on_topic else 0.0)
        if rng.random() < 0.5:
            parts.append(f"Also {steps[1]}.")
            score += WEIGHTS["second_step"]
    else:
        parts.append(f"{subject.capitalize()} is a broad subject.")
        score += WEIGHTS["on_topic"] * 0.5 if on_topic else 0.0
    if rng.random() < 0.35:
        parts.append(rng.choice(FILLER))
        score += WEIGHTS["filler"]
    rng.shuffle(parts)
    return " ".join(parts), score


def make_pair(rng: random.Random, index: int, prefix: str) -> tuple[dict, int]:
    topic = rng.choice(list(TOPICS))
    prompt = rng.choice(OPENERS).format(t=topic)
    (a, qa), (b, qb) = make_response(rng, topic), make_response(rng, topic)
    while a == b:
        b, qb = make_response(rng, topic)
    truth = 0 if qa > qb else 1 if qb > qa else rng.randint(0, 1)
    return {"id": f"{prefix}{index}", "prompt": prompt, "responses": [a, b]}, truth


def generate(out: Path, pool_size: int, eval_size: int, noise: float, seed: int) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "pool.jsonl").open("w") as pool, (out / "labels.jsonl").open("w") as labels:
        for i in range(pool_size):
            item, truth = make_pair(rng, i, "p")
            annotator = truth if rng.random() >= noise else 1 - truth
            pool.write(json.dumps(item) + "\n")
            labels.write(json.dumps({"id": item["id"], "preferred": annotator}) + "\n")
    with (out / "eval.jsonl").open("w") as evaluation:
        for i in range(eval_size):
            item, truth = make_pair(rng, i, "e")
            evaluation.write(json.dumps({**item, "preferred": truth}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pool", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=500)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generate(args.out, args.pool, args.eval, args.noise, args.seed)


if __name__ == "__main__":
    main()
