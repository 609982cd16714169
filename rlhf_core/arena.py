"""The arena: the served policy against its earlier promoted versions, judged by annotators.

During pre-annotation a stable share (``RLHF_ARENA_SHARE``) of the prompt-only tasks gets its
responses from two policy versions instead of one: half of the response slots from the served
policy, half from an earlier promoted version (the base policy included), in an order shuffled per
task so that neither version always sits on the left. No reward model picks among them: the
annotator sees what each version writes. Which version wrote which response is recorded in the
store (``arena_responses``, keyed by task and the response text's hash), with the reward the
serving reward model gave it.

Annotators label these tasks like any other (their labels train the models as usual). Every
preference record whose two texts came from two different versions is also a verdict between
those versions; :func:`comparisons` finds them and :mod:`rlhf_core.leaderboard` fits the
ratings. :func:`reward_model_win_rates` gives the reward model's own verdicts on the same pairs.
"""

from __future__ import annotations

import hashlib
import random
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlhf_core.leaderboard import Comparison

# (policy version, prompts, n) -> n responses per prompt from that version
GenerateWith = Callable[[str, list[str], int], list[list[str]]]
# (project, task, responses) -> None: ``Store.replace_arena_responses``
RecordResponses = Callable[[int, int, list[dict[str, Any]]], None]


AMBIGUOUS = "(both versions)"  # two versions wrote the same text: a label on it says nothing


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def in_arena(project_id: int, task_id: int, share: float) -> bool:
    """Whether a task is one of the arena's: a stable draw, so a rerun picks the same tasks."""
    return zlib.crc32(f"arena:{project_id}:{task_id}".encode()) / 2**32 < share


@dataclass
class Arena:
    """What pre-annotation needs to pit ``current`` against ``opponents`` on a share of tasks."""

    project_id: int
    share: float
    current: str  # the served policy version
    opponents: list[str]  # earlier promoted policy versions
    reward_model: str  # the reward model version whose rewards are recorded
    generate_with: GenerateWith
    record: RecordResponses
    # task -> [(text, version)] of what pit() wrote, until record_authors() stores it
    _authors: dict[int, list[tuple[str, str]]] = field(default_factory=dict, init=False, repr=False)

    @property
    def active(self) -> bool:
        return self.share > 0 and bool(self.opponents)

    def opponent_for(self, task_id: int) -> str:
        return random.Random(f"{self.project_id}:{task_id}").choice(sorted(self.opponents))

    def pit(
        self, task_ids: list[int], prompts: list[str], generated: list[list[str]], slots: int
    ) -> list[list[str]]:
        """The candidates to write: for arena tasks, ``slots`` responses from two versions.

        ``generated`` holds the served policy's candidates for every task (kept for the others).
        """
        if not self.active:
            return generated
        picked = [i for i, t in enumerate(task_ids) if in_arena(self.project_id, t, self.share)]
        by_opponent: dict[str, list[int]] = defaultdict(list)
        for i in picked:
            by_opponent[self.opponent_for(task_ids[i])].append(i)
        ours_n, theirs_n = (slots + 1) // 2, slots // 2
        result = list(generated)
        for opponent, indices in by_opponent.items():
            theirs = self.generate_with(opponent, [prompts[i] for i in indices], theirs_n)
            for i, their_texts in zip(indices, theirs):
                authored = [(text, self.current) for text in generated[i][:ours_n]]
                authored += [(text, opponent) for text in their_texts[:theirs_n]]
                random.Random(f"order:{self.project_id}:{task_ids[i]}").shuffle(authored)
                result[i] = [text for text, _ in authored]
                self._authors[task_ids[i]] = authored
        return result

    def record_authors(self, task_ids: list[int], head_rewards: list[np.ndarray]) -> None:
        """Store who wrote each arena response, before the task is written to Label Studio.

        ``head_rewards``: per task, the served reward model's per-head rewards (n, K) of its
        candidates, in the order :meth:`pit` returned them.
        """
        for task_id, rewards in zip(task_ids, head_rewards):
            authors = self._authors.pop(task_id, None)
            if authors is None:
                continue
            mean = rewards.mean(axis=1)
            rows: dict[str, dict[str, Any]] = {}
            for i, (text, version) in enumerate(authors):
                row: dict[str, Any] = {
                    "text_hash": text_hash(text),
                    "policy_version": version,
                    "chars": len(text),
                    "rm_reward": float(mean[i]),
                    "rm_version": self.reward_model,
                }
                if rows.setdefault(row["text_hash"], row)["policy_version"] != version:
                    rows[row["text_hash"]]["policy_version"] = AMBIGUOUS
            self.record(self.project_id, task_id, list(rows.values()))


def comparisons(
    preference_records: Iterable[dict[str, Any]], arena_rows: Iterable[dict[str, Any]]
) -> list[Comparison]:
    """Human verdicts between versions: preference records on arena tasks whose two texts were
    written by two different versions. Annotations of texts edited after writing are skipped."""
    authors: dict[tuple[Any, str], dict[str, Any]] = {
        (row["task_id"], row["text_hash"]): row for row in arena_rows
    }
    found = []
    for record in preference_records:
        chosen = authors.get((record.get("task"), text_hash(str(record.get("chosen")))))
        rejected = authors.get((record.get("task"), text_hash(str(record.get("rejected")))))
        if chosen is None or rejected is None:
            continue
        versions = {chosen["policy_version"], rejected["policy_version"]}
        if len(versions) < 2 or AMBIGUOUS in versions:
            continue
        found.append(
            Comparison(
                a=chosen["policy_version"],
                b=rejected["policy_version"],
                outcome=0.5 if record.get("tie") else 1.0,
                length_a=chosen["chars"],
                length_b=rejected["chars"],
            )
        )
    return found


def reward_model_win_rates(arena_rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per version, the mean probability the reward model gave its response of beating the
    other version's in the same task (Bradley–Terry on the recorded rewards), and the count."""
    by_task: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in arena_rows:
        if row.get("rm_reward") is not None and row["policy_version"] != AMBIGUOUS:
            by_task[row["task_id"]].append(row)
    wins: dict[str, list[float]] = defaultdict(list)
    for rows in by_task.values():
        for mine in rows:
            for other in rows:
                if mine["policy_version"] != other["policy_version"]:
                    margin = mine["rm_reward"] - other["rm_reward"]
                    wins[mine["policy_version"]].append(1.0 / (1.0 + np.exp(-margin)))
    return {
        version: {"rm_win_rate": round(float(np.mean(p)), 4), "rm_comparisons": len(p)}
        for version, p in wins.items()
    }
