"""Re-scoring a pool after a promotion: from the embedding cache against re-encoding, same run.

    python bench/rescore.py --tasks 300

A promotion changes only the reward heads. The pool's tasks (two responses each, texts from
``bench/worlds.py``'s bank) are scored once to fill a fresh ``rlhf_core.embedding_store`` file,
the heads are replaced, and the pool is re-scored twice, the way the pre-annotation job does
it (``RewardModel.score_and_embed``, then ``rlhf_core.selection.score_tasks`` for the order):
once reading the cache, once re-encoding every text. Both paths do the same head arithmetic
and the same ordering; the only difference is the encoder. Prints both times and the ratio.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic_world import OPENERS
from bench.worlds import response_bank
from rlhf_core.config import BackendConfig
from rlhf_core.embedding_store import EmbeddingStore
from rlhf_core.reward_model import RewardModel
from rlhf_core.selection import score_tasks
from rlhf_core.serving import reward_model_config
from trainer.simulate import fresh_heads


def pool_items(n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    bank = response_bank()
    items = []
    for _ in range(n):
        topic = rng.choice(list(bank))
        (a, _), (b, _) = rng.sample(bank[topic], 2)
        items.append((rng.choice(OPENERS).format(t=topic), [a, b]))
    return items


def rescore(model: RewardModel, items, store: EmbeddingStore | None) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    rewards, embeddings = model.score_and_embed(items, store)
    _, scores = score_tasks("default", list(zip(rewards, embeddings)), model.posterior())
    return time.perf_counter() - started, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = RewardModel.create(reward_model_config(BackendConfig()))
    items = pool_items(args.tasks)
    with tempfile.TemporaryDirectory() as tmp:
        store = EmbeddingStore(Path(tmp) / "embeddings.sqlite")
        first, _ = rescore(model, items, store)  # the first scoring fills the cache
        model.heads = fresh_heads(model, seed=1)  # the promotion: new heads, same backbone
        cached, from_cache = rescore(model, items, store)
        encoded, from_encoder = rescore(model, items, None)
        store.close()
    assert np.allclose(from_cache, from_encoder, atol=1e-4), "the cache changed the scores"
    texts = 2 * args.tasks
    print(f"| path | seconds for {args.tasks} tasks ({texts} texts) | tasks / s |")
    print("| --- | ---: | ---: |")
    print(f"| first scoring (encode, fill the cache) | {first:.2f} | {args.tasks / first:.0f} |")
    print(f"| re-score from the cache | {cached:.3f} | {args.tasks / cached:.0f} |")
    print(f"| re-score by re-encoding | {encoded:.2f} | {args.tasks / encoded:.0f} |")
    print(f"\nratio re-encoding / cache: {encoded / cached:.0f}x")


if __name__ == "__main__":
    main()
