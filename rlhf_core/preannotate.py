"""The pre-annotation job: candidates, the most informative pair, and predictions, for a project.

For every unlabeled task of a project:

1. in batches, tasks with only a prompt get ``num_candidates`` responses from the policy; the
   reward-model ensemble scores them and the pair (or, for a Ranker, the list) whose label would
   teach the model most is written into the task's data fields named by the label config — one
   task update per task, so a crash never leaves a task half-written (on the arena's share of the
   tasks, one response from the served policy and one from an earlier version instead:
   :mod:`rlhf_core.arena`). Every task is then scored:
   rewards, predicted choice, and the acquisition value of its most informative pair;
2. the pool is ordered as the selection strategy would pick it (:func:`rlhf_core.selection.
   score_tasks`, the function behind ``/predict``'s scores and the simulator's batches: with the
   default, a near-duplicate of a task already near the front waits behind a different one, since
   a label on the first already told the model most of what the second would), and the
   predictions go to Label Studio in that order, each with ``score`` = 1 − its value at its
   place. Label Studio shows the lowest score first, so annotators label the batch the reward
   model asks for.

Resumable by construction: a rerun skips tasks that already carry a prediction of the served
version, and tasks that already have responses are only predicted, never regenerated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from rlhf_core.acquisition import Posterior
from rlhf_core.arena import Arena
from rlhf_core.conversion import field_text
from rlhf_core.label_schema import RLHFSchema
from rlhf_core.predict import (
    Candidates,
    build_prediction,
    most_informative_pair,
    task_candidates,
    task_verdicts,
)
from rlhf_core.reliability import needs_another_look
from rlhf_core.selection import score_tasks

logger = logging.getLogger(__name__)


class Models(Protocol):
    def score_and_embed(
        self, project_id: int, items: list[tuple[str, list[str]]]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per (prompt, responses) item: per-head rewards (n, K) and embeddings (n, H)."""

    def generate(self, project_id: int, prompts: list[str], n: int) -> list[list[str]]:
        """``n`` candidate responses per prompt from the served policy."""

    def served_version(self, project_id: int) -> str: ...

    def posterior(self, project_id: int) -> Posterior:
        """The served reward model's Laplace posterior (what selection measures against)."""


class TaskWriter(Protocol):
    """Where tasks come from and go to: Label Studio (label-studio-sdk) in production."""

    def unlabeled_tasks(self, project_id: int) -> Iterator[dict[str, Any]]: ...

    def update_task_data(self, task_id: int, data: dict[str, Any]) -> None: ...

    def create_prediction(self, task_id: int, prediction: dict[str, Any]) -> None: ...

    def set_project_model_version(self, project_id: int, model_version: str) -> None: ...


class RecordingTasks:
    """A :class:`TaskWriter` that also notes, per task, the model version that wrote its
    responses and the one that scored it (exports carry both)."""

    def __init__(
        self, tasks: TaskWriter, note: Callable[..., None], project_id: int, version: str
    ) -> None:
        """``note``: ``Store.note_task_models(project, task, generated_by=, scored_by=)``."""
        self.tasks = tasks
        self.note = note
        self.project_id = project_id
        self.version = version

    def unlabeled_tasks(self, project_id: int) -> Iterator[dict[str, Any]]:
        return self.tasks.unlabeled_tasks(project_id)

    def update_task_data(self, task_id: int, data: dict[str, Any]) -> None:
        self.tasks.update_task_data(task_id, data)
        self.note(self.project_id, task_id, generated_by=self.version)

    def create_prediction(self, task_id: int, prediction: dict[str, Any]) -> None:
        self.tasks.create_prediction(task_id, prediction)
        self.note(self.project_id, task_id, scored_by=prediction.get("model_version"))

    def set_project_model_version(self, project_id: int, model_version: str) -> None:
        self.tasks.set_project_model_version(project_id, model_version)


@dataclass
class PreannotateReport:
    model_version: str
    tasks_seen: int = 0
    generated: int = 0
    predicted: int = 0
    skipped: int = 0
    another_look: int = 0  # labelled tasks sent back to the front (disagreement, contradiction)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ScoredTask:
    """A task, its responses' per-head rewards (n, K) and embeddings (n, H), and what it shows."""

    task_id: int
    candidates: Candidates
    head_rewards: np.ndarray
    embeddings: np.ndarray


def fill_candidates(
    schema: RLHFSchema,
    data: dict[str, Any],
    candidates: list[str],
    head_rewards: np.ndarray,
    strategy: str,
    embeddings: np.ndarray | None = None,
    posterior: Posterior | None = None,
) -> dict[str, Any]:
    """Task data with the generated candidates written into the config's response fields.

    Two-response configs get the pair with the highest acquisition value; a Ranker's List gets
    every candidate (ids ``c1``..``cN``).
    """
    new = dict(data)
    if schema.rankers:
        items = [
            {"id": f"c{i + 1}", "title": f"Response {i + 1}", "body": text}
            for i, text in enumerate(candidates)
        ]
        new[schema.rankers[0].items.key] = items
        return new
    informative = most_informative_pair(head_rewards, strategy, embeddings, posterior)
    assert informative is not None  # the job writes at least two candidates
    first, second, _ = informative
    order = [first, second] + [i for i in range(len(candidates)) if i not in (first, second)]
    for slot, index in zip(schema.responses, order):
        new[slot.key] = candidates[index]
    return new


def preannotate_project(
    project_id: int,
    schema: RLHFSchema,
    models: Models,
    tasks: TaskWriter,
    num_candidates: int,
    batch_size: int = 16,
    strategy: str = "default",
    progress: bool = False,
    arena: Arena | None = None,
    labelled: Sequence[tuple[dict[str, Any], list[dict[str, Any]]]] = (),
    contradiction: float = 0.9,
    preselect: bool = True,
) -> PreannotateReport:
    """``arena``: pit the served policy against earlier versions on a share of the prompt-only
    tasks (:mod:`rlhf_core.arena`); None: every candidate comes from the served policy.
    ``labelled``: labelled tasks (``id``, ``data``) with their stored preference records; those
    whose labels call for another look (:func:`rlhf_core.reliability.needs_another_look`) get a
    prediction scoring 0, so Label Studio shows them first again."""
    version = models.served_version(project_id)
    posterior = models.posterior(project_id)
    report = PreannotateReport(model_version=version)
    slots = len(schema.responses) if not schema.rankers else num_candidates
    n = max(num_candidates, slots, 2)
    pending = [
        task
        for task in tasks.unlabeled_tasks(project_id)
        if not any(p.get("model_version") == version for p in task.get("predictions") or [])
    ]
    scored: list[ScoredTask] = []
    bar = tqdm(total=len(pending), desc=f"scoring project {project_id}", disable=not progress)
    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]
        _generate_where_needed(
            project_id, schema, models, tasks, batch, n, strategy, posterior, report, arena
        )
        batch_scored = _score(project_id, schema, models, batch)
        report.skipped += len(batch) - len(batch_scored)
        report.tasks_seen += len(batch)
        scored += batch_scored
        bar.update(len(batch))
    bar.close()
    if scored:
        pool = [(s.head_rewards, s.embeddings) for s in scored]
        _, scores = score_tasks(strategy, pool, posterior)
        for index in tqdm(
            np.argsort(scores, kind="stable"), desc="uploading", disable=not progress
        ):
            task = scored[int(index)]
            prediction = build_prediction(
                schema, task.candidates, task.head_rewards, version, float(scores[index]), preselect
            )
            tasks.create_prediction(task.task_id, prediction)
            report.predicted += 1
    for task in _another_look(project_id, schema, models, labelled, contradiction, batch_size):
        _, [score] = score_tasks(
            strategy, [(task.head_rewards, task.embeddings)], posterior, another_look=[True]
        )
        prediction = build_prediction(
            schema, task.candidates, task.head_rewards, version, float(score), preselect
        )
        tasks.create_prediction(task.task_id, prediction)
        report.another_look += 1
    if schema.learns_preferences:  # Label Studio refuses a version that no prediction carries
        tasks.set_project_model_version(project_id, version)
    return report


def _another_look(
    project_id: int,
    schema: RLHFSchema,
    models: Models,
    labelled: Sequence[tuple[dict[str, Any], list[dict[str, Any]]]],
    contradiction: float,
    batch_size: int,
) -> list[ScoredTask]:
    """The labelled tasks whose annotators disagree, or whose single label the served reward
    model contradicts."""
    found = []
    for start in range(0, len(labelled), batch_size):
        batch = labelled[start : start + batch_size]
        records = {task["id"]: task_records for task, task_records in batch}
        for task in _score(project_id, schema, models, [task for task, _ in batch]):
            verdicts = task_verdicts(task.candidates, records[task.task_id])
            if needs_another_look(verdicts, task.head_rewards, contradiction):
                found.append(task)
    return found


def _score(
    project_id: int, schema: RLHFSchema, models: Models, batch: list[dict[str, Any]]
) -> list[ScoredTask]:
    """Rewards and embeddings of the tasks of ``batch`` that have responses."""
    found = [
        (task, c)
        for task in batch
        if (c := task_candidates(task.get("data") or {}, schema)) is not None
    ]
    if not found:
        return []
    rewards, embeddings = models.score_and_embed(
        project_id, [(c.prompt, c.texts) for _, c in found]
    )
    return [
        ScoredTask(task["id"], candidates, head_rewards, np.asarray(emb, dtype=np.float64))
        for (task, candidates), head_rewards, emb in zip(found, rewards, embeddings)
    ]


def _has_its_one_response(data: dict[str, Any], schema: RLHFSchema) -> bool:
    """A single-response task (thumbs up/down, one rating) whose response is filled in."""
    if len(schema.responses) != 1:
        return False
    return bool(str(data.get(schema.responses[0].key) or "").strip())


def _generate_where_needed(
    project_id: int,
    schema: RLHFSchema,
    models: Models,
    tasks: TaskWriter,
    batch: list[dict[str, Any]],
    n: int,
    strategy: str,
    posterior: Posterior,
    report: PreannotateReport,
    arena: Arena | None = None,
) -> None:
    empty = []
    for task in batch:
        data = task.get("data") or {}
        if task_candidates(data, schema) is not None or _has_its_one_response(data, schema):
            continue
        if not str(data.get(schema.prompt.key) or "").strip():
            report.errors.append(f"task {task['id']}: no {schema.prompt.key!r} to generate from")
            continue
        empty.append(task)
    if not empty:
        return
    prompts = [field_text(t["data"], schema.prompt) for t in empty]
    generated = models.generate(project_id, prompts, n)
    if arena is not None:
        slots = n if schema.rankers else len(schema.responses)
        generated = arena.pit([t["id"] for t in empty], prompts, generated, slots)
    rewards, embeddings = models.score_and_embed(project_id, list(zip(prompts, generated)))
    if arena is not None:
        arena.record_authors([t["id"] for t in empty], rewards)
    for task, candidates, head_rewards, emb in zip(empty, generated, rewards, embeddings):
        data = fill_candidates(
            schema, task["data"], candidates, head_rewards, strategy, np.asarray(emb), posterior
        )
        tasks.update_task_data(task["id"], data)
        task["data"] = data  # the batch is scored next, with the written candidates
        report.generated += 1
