"""Predictions in the project's own control tags, from the reward-model ensemble.

For every task that carries responses the backend predicts, per response, a reward and for
each pair a Bradley–Terry preference with its epistemic uncertainty; it answers in the
project's control tags (Pairwise ``selected``, Ranker order, a Rating per response, the
preference Choice).

``score`` follows Label Studio's convention that the Data Manager and uncertainty sampling show
the LOWEST score first. It comes from :func:`rlhf_core.selection.score_tasks`, the one selection
function: the same call orders the pool after a promotion (``rlhf_core.preannotate``) and picks
the simulator's batches, so the tasks of a request sort in the order the strategy would have them
labelled. With one task, ``score = 1 − u``, ``u`` in [0, 1] the value of the task's most
informative pair (for the default, the information a label would carry about the reward
model's weights). A score near 0 means "a human label here teaches the reward model most";
near 1, "the model is already sure". Without ``preselect`` (RLHF_PRESELECT=0, the service's
default) the prediction's ``result`` is empty: the score orders the tasks, and no answer is
suggested for an annotator to anchor on. Tasks with only a prompt get no prediction from
``/predict`` (Label Studio cannot take new task data from a prediction): the pre-annotation job
generates their candidates.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from rlhf_core.acquisition import Posterior, prior_precision
from rlhf_core.conversion import field_text, list_item_texts, preference_pairs
from rlhf_core.errors import AnnotationMismatch
from rlhf_core.label_schema import STRENGTH_MARGINS, TEXT_OBJECTS, RLHFSchema, TextField
from rlhf_core.reliability import Verdict, needs_another_look
from rlhf_core.selection import score_tasks, task_pairs
from rlhf_core.store import Store

logger = logging.getLogger(__name__)

# Scores every (prompt, response) of every item in one batched call: returns, per item, the
# per-head rewards of its responses (n_responses, K) and their embeddings (n_responses, H).
ScoreFn = Callable[[list[tuple[str, list[str]]]], tuple[list[np.ndarray], list[np.ndarray]]]

# Tasks scored per backbone call in /predict; the time budget is checked between chunks.
PREDICT_CHUNK = 32


@dataclass(frozen=True)
class Candidates:
    """The responses a task shows, in config order: the text responses, then each Ranker
    List's items. ``owners[i]`` is the object tag response ``i`` belongs to (its own name, or
    the List's); ``ids[i]`` is the field name, or the List item's id."""

    prompt: str
    ids: list[str]
    texts: list[str]
    owners: list[str]

    def index(self, name: str) -> int | None:
        """The position of the text response ``name`` (not a List item), if the task shows it."""
        return next(
            (i for i, (o, n) in enumerate(zip(self.owners, self.ids)) if o == n == name), None
        )

    def of(self, owner: str) -> list[int]:
        """Positions of the items of the List ``owner``."""
        return [i for i, o in enumerate(self.owners) if o == owner]


def task_candidates(task_data: dict[str, Any], schema: RLHFSchema) -> Candidates | None:
    """The prompt and responses of a task, or None when the task has no responses yet."""
    ids: list[str] = []
    texts: list[str] = []
    owners: list[str] = []
    try:
        prompt = field_text(task_data, schema.prompt)
        for field in schema.responses:
            if field.tag in TEXT_OBJECTS:
                ids.append(field.name)
                texts.append(field_text(task_data, field))
                owners.append(field.name)
        for list_name, field in {r.items.name: r.items for r in schema.rankers}.items():
            for item_id, text in list_item_texts(task_data, field).items():
                ids.append(item_id)
                texts.append(text)
                owners.append(list_name)
    except AnnotationMismatch:
        return None
    if len(texts) < 2 or not all(t.strip() for t in texts):
        return None
    return Candidates(prompt, ids, texts, owners)


def pair_probabilities(head_rewards: np.ndarray) -> tuple[list[tuple[int, int]], np.ndarray]:
    """All pairs (i < j) and the per-head probability that i beats j: (P, K)."""
    pairs = list(combinations(range(head_rewards.shape[0]), 2))
    if not pairs:
        return pairs, np.zeros((0, head_rewards.shape[1]))
    left = head_rewards[[i for i, _ in pairs]]  # (P, K)
    right = head_rewards[[j for _, j in pairs]]  # (P, K)
    return pairs, 1.0 / (1.0 + np.exp(-(left - right)))


def most_informative_pair(
    head_rewards: np.ndarray,
    strategy: str,
    embeddings: np.ndarray | None = None,
    posterior: Posterior | None = None,
) -> tuple[int, int, float] | None:
    """The pair (i, j) of responses whose label teaches the most, and its value; ``None`` for
    fewer than two responses. ``embeddings`` (n, H) and ``posterior`` (default: the prior) are
    what ``eig``/``adaptive``/``mixed`` measure with; the ensemble-only strategies ignore them."""
    if head_rewards.shape[0] < 2:
        return None
    if embeddings is None:
        embeddings = np.zeros((head_rewards.shape[0], 1))
    posterior = posterior or prior_posterior(embeddings.shape[1])
    pairs, _, value = task_pairs(strategy, head_rewards, embeddings, posterior)
    best = int(np.argmax(value))
    return pairs[best][0], pairs[best][1], float(value[best])


def prior_posterior(hidden_size: int, prior_scale: float = 4.0) -> Posterior:
    """The posterior of a model with no labels (the reward model's default prior scale)."""
    return Posterior.prior(hidden_size, prior_precision(hidden_size, prior_scale))


def build_prediction(
    schema: RLHFSchema,
    candidates: Candidates,
    head_rewards: np.ndarray,
    model_version: str,
    score: float,
    preselect: bool = True,
) -> dict[str, Any]:
    """One Label Studio prediction for a task, from its responses' per-head rewards (n, K) and
    its selection ``score`` (:func:`rlhf_core.selection.score_tasks`); with ``preselect`` False,
    the score and version alone (an empty ``result``: nothing pre-selected)."""
    if not preselect:
        return {"model_version": model_version, "score": round(score, 6), "result": []}
    rewards = head_rewards.mean(axis=1)  # (n,)
    result: list[dict[str, Any]] = []
    for control in schema.pairwise:
        left, right = candidates.index(control.left.name), candidates.index(control.right.name)
        if left is None or right is None:
            continue
        selected = "left" if rewards[left] >= rewards[right] else "right"
        result.append(_region(control.name, control.left.name, "pairwise", {"selected": selected}))
    for ranker in schema.rankers:
        items = candidates.of(ranker.items.name)
        if not items:
            continue
        ranked = sorted(items, key=lambda i: -rewards[i])  # stable: ties keep the task's order
        order = [candidates.ids[i] for i in ranked]
        value = _ranker_value(ranker.name, ranker.buckets, order)
        result.append(_region(ranker.name, ranker.items.name, "ranker", {"ranker": value}))
    for rating in schema.ratings:
        target = candidates.index(rating.target.name)
        if target is not None:
            reward = rewards[target]
            stars = 1 + round((rating.max_rating - 1) / (1.0 + np.exp(-reward)))
            result.append(_region(rating.name, rating.target.name, "rating", {"rating": stars}))
    for choice in schema.preference_choices:
        picked = _predicted_choice(
            choice.choice_to_index, choice.responses, candidates, rewards, choice.choice_to_strength
        )
        if picked is not None:
            region = _region(choice.name, choice.to_name, "choices", {"choices": [picked]})
            result.append(region)
    return {"model_version": model_version, "score": round(score, 6), "result": result}


def _predicted_choice(
    choice_to_index: dict[str, int],
    responses: tuple[TextField, ...],
    candidates: Candidates,
    rewards: np.ndarray,
    strengths: dict[str, str] | None = None,
) -> str | None:
    positions = [candidates.index(r.name) for r in responses]
    if any(p is None for p in positions):
        return None
    chosen = [rewards[p] for p in positions]
    best = int(np.argmax(chosen))
    keys = [key for key, index in choice_to_index.items() if index == best]
    if strengths and len(chosen) == 2:  # graded: the strength whose margin is nearest the gap
        gap = abs(chosen[0] - chosen[1])
        keys.sort(key=lambda key: abs(STRENGTH_MARGINS.get(strengths.get(key, ""), 0.0) - gap))
    return keys[0] if keys else None


def _ranker_value(name: str, buckets: tuple[str, ...], order: list[str]) -> dict[str, list[str]]:
    """Label Studio's Ranker value: the order under the Ranker's name, or tiers when bucketed
    (ranked items spread evenly over the buckets, best bucket first)."""
    if not buckets:
        return {name: order}
    value: dict[str, list[str]] = {bucket: [] for bucket in buckets}
    for rank, item in enumerate(order):
        value[buckets[rank * len(buckets) // len(order)]].append(item)
    return value


def _region(from_name: str, to_name: str, kind: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"from_name": from_name, "to_name": to_name, "type": kind, "value": value}


def predict_tasks(
    schema: RLHFSchema,
    tasks: list[dict[str, Any]],
    score_fn: ScoreFn,
    model_version: str,
    strategy: str = "default",
    posterior: Posterior | None = None,
    preselect: bool = True,
) -> list[list[dict[str, Any]]]:
    """One list of predictions per task (empty for prompt-only tasks), ordered among themselves
    by the selection strategy (``posterior``: the served reward model's, default the prior)."""
    return predict_in_time(
        schema, tasks, score_fn, model_version, strategy, posterior=posterior, preselect=preselect
    ).results


@dataclass
class TimedPredictions:
    """Predictions for the tasks reached in time; ``unreached`` tasks got an empty list."""

    results: list[list[dict[str, Any]]]
    unreached: int


def predict_in_time(
    schema: RLHFSchema,
    tasks: list[dict[str, Any]],
    score_fn: ScoreFn,
    model_version: str,
    strategy: str = "default",
    budget_s: float | None = None,
    chunk: int = PREDICT_CHUNK,
    posterior: Posterior | None = None,
    labels: Mapping[Any, list[dict[str, Any]]] | None = None,
    contradiction: float = 0.9,
    preselect: bool = True,
) -> TimedPredictions:
    """Predictions scored ``chunk`` tasks at a time while ``budget_s`` seconds (None: no limit)
    leave room for one more: a chunk is started only if the slowest chunk so far still fits, so
    the answer comes near the budget even when the machine is slow. The first chunk always runs.
    The tasks reached are then scored together by :func:`rlhf_core.selection.score_tasks`.

    ``labels``: the stored preference records by task id; a task whose labels disagree, or
    whose single label the model contradicts with probability ``contradiction``, scores 0
    (:func:`rlhf_core.reliability.needs_another_look`).
    """
    started = time.monotonic()
    slowest = 0.0
    reached = len(tasks)
    scored: list[tuple[int, Candidates, np.ndarray, np.ndarray]] = []
    for start in range(0, len(tasks), chunk):
        now = time.monotonic()
        if budget_s is not None and start and now - started + slowest > budget_s:
            reached = start
            break
        scored += _score_chunk(schema, tasks[start : start + chunk], start, score_fn)
        slowest = max(slowest, time.monotonic() - now)
    results: list[list[dict[str, Any]]] = [[] for _ in tasks]
    if scored:
        posterior = posterior or prior_posterior(scored[0][3].shape[1])
        another_look = [
            needs_another_look(
                task_verdicts(candidates, (labels or {}).get(tasks[index].get("id"), [])),
                head_rewards,
                contradiction,
            )
            for index, candidates, head_rewards, _ in scored
        ]
        _, scores = score_tasks(
            strategy,
            [(r, e) for _, _, r, e in scored],
            posterior,
            another_look=another_look,
        )
        for (index, candidates, head_rewards, _), score in zip(scored, scores):
            prediction = build_prediction(
                schema, candidates, head_rewards, model_version, float(score), preselect
            )
            results[index] = [prediction]
    return TimedPredictions(results, len(tasks) - reached)


def labels_by_task(
    store: Store, project_id: int, max_ranking_pairs: int, tasks: Collection[Any] | None = None
) -> dict[Any, list[dict[str, Any]]]:
    """The project's stored preference pairs (each ranking's implied ones too), by task id;
    ``tasks``: only these, read from the store by task (not the whole project). What decides
    whether a task needs another look."""
    found: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    preferences, rankings = (
        store.records(project_id, kind, tasks) for kind in ("preference", "ranking")
    )
    for record in preference_pairs(preferences, rankings, max_ranking_pairs):
        found[record.get("task")].append(record)
    return found


def task_verdicts(candidates: Candidates, records: list[dict[str, Any]]) -> list[Verdict]:
    """The task's stored preference records as (chosen, rejected, tie) indices into its
    responses; a record naming a text the task no longer shows is left out. Gold records
    settle the task: none then (it needs no other look)."""
    if any(record.get("ground_truth") for record in records):
        return []
    position = {text: i for i, text in reversed(list(enumerate(candidates.texts)))}
    return [
        (position[r["chosen"]], position[r["rejected"]], bool(r.get("tie")))
        for r in records
        if r.get("chosen") in position and r.get("rejected") in position
    ]


def _score_chunk(
    schema: RLHFSchema, tasks: list[dict[str, Any]], offset: int, score_fn: ScoreFn
) -> list[tuple[int, Candidates, np.ndarray, np.ndarray]]:
    """(task index, candidates, per-head rewards, embeddings) for the chunk's tasks that have
    responses, from one backbone call."""
    found = [
        (offset + i, c)
        for i, task in enumerate(tasks)
        if (c := task_candidates(_task_data(task), schema)) is not None
    ]
    if not found:
        return []
    rewards, embeddings = score_fn([(c.prompt, c.texts) for _, c in found])
    return [
        (index, candidates, head_rewards, np.asarray(emb, dtype=np.float64))
        for (index, candidates), head_rewards, emb in zip(found, rewards, embeddings)
    ]


def _task_data(task: dict[str, Any]) -> dict[str, Any]:
    data = task.get("data")
    return data if isinstance(data, dict) else {}
