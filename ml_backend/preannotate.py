"""The pre-annotation job: candidates, the most informative pair, and predictions, for a project.

For every unlabeled task of a project, in batches:

1. tasks with only a prompt get ``num_candidates`` responses from the policy; the reward-model
   ensemble scores them and the pair (or, for a Ranker, the list) whose label would teach the
   model most is written into the task's data fields named by the label config — one task
   update per task, so a crash never leaves a task half-written;
2. every task then gets a prediction at the served model version (rewards, predicted choice,
   uncertainty score).

Resumable by construction: a rerun skips tasks that already carry a prediction of the served
version, and tasks that already have responses are only predicted, never regenerated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from ml_backend.conversion import field_text
from ml_backend.label_schema import RLHFSchema
from ml_backend.predict import pair_probabilities, predict_tasks, task_candidates
from trainer.acquisition import acquisition

logger = logging.getLogger(__name__)


class Models(Protocol):
    def head_rewards(self, project_id: int, items: list[tuple[str, list[str]]]) -> list[np.ndarray]:
        """Per-head rewards (n_responses, K) for each (prompt, responses) item."""

    def generate(self, project_id: int, prompts: list[str], n: int) -> list[list[str]]:
        """``n`` candidate responses per prompt from the served policy."""

    def served_version(self, project_id: int) -> str: ...


class TaskWriter(Protocol):
    """Where tasks come from and go to: Label Studio (label-studio-sdk) in production."""

    def unlabeled_tasks(self, project_id: int) -> Iterator[dict[str, Any]]: ...

    def update_task_data(self, task_id: int, data: dict[str, Any]) -> None: ...

    def create_prediction(self, task_id: int, prediction: dict[str, Any]) -> None: ...

    def set_project_model_version(self, project_id: int, model_version: str) -> None: ...


@dataclass
class PreannotateReport:
    model_version: str
    tasks_seen: int = 0
    generated: int = 0
    predicted: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def fill_candidates(
    schema: RLHFSchema,
    data: dict[str, Any],
    candidates: list[str],
    head_rewards: np.ndarray,
    strategy: str,
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
    slots = list(schema.responses)
    pairs, p_heads = pair_probabilities(head_rewards)
    value = acquisition(strategy)(p_heads, np.random.default_rng(len(candidates)))
    first, second = pairs[int(np.argmax(value))]
    order = [first, second] + [i for i in range(len(candidates)) if i not in (first, second)]
    for slot, index in zip(slots, order):
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
    on_batch: Callable[[PreannotateReport], None] | None = None,
) -> PreannotateReport:
    version = models.served_version(project_id)
    report = PreannotateReport(model_version=version)
    slots = len(schema.responses) if not schema.rankers else num_candidates
    n = max(num_candidates, slots, 2)
    pending = [
        task
        for task in tasks.unlabeled_tasks(project_id)
        if not any(p.get("model_version") == version for p in task.get("predictions") or [])
    ]
    bar = tqdm(
        total=len(pending), desc=f"pre-annotating project {project_id}", disable=not progress
    )
    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]
        _generate_where_needed(project_id, schema, models, tasks, batch, n, strategy, report)
        predictions = predict_tasks(
            schema,
            batch,
            lambda items: models.head_rewards(project_id, items),
            version,
            strategy,
        )
        for task, task_predictions in zip(batch, predictions):
            for prediction in task_predictions:
                tasks.create_prediction(task["id"], prediction)
                report.predicted += 1
            if not task_predictions:
                report.skipped += 1
        report.tasks_seen += len(batch)
        bar.update(len(batch))
        if on_batch:
            on_batch(report)
    bar.close()
    tasks.set_project_model_version(project_id, version)
    return report


def _generate_where_needed(
    project_id: int,
    schema: RLHFSchema,
    models: Models,
    tasks: TaskWriter,
    batch: list[dict[str, Any]],
    n: int,
    strategy: str,
    report: PreannotateReport,
) -> None:
    empty = []
    for task in batch:
        data = task.get("data") or {}
        if task_candidates(data, schema) is not None:
            continue
        if not str(data.get(schema.prompt.key) or "").strip():
            report.errors.append(f"task {task['id']}: no {schema.prompt.key!r} to generate from")
            continue
        empty.append(task)
    if not empty:
        return
    prompts = [field_text(t["data"], schema.prompt) for t in empty]
    generated = models.generate(project_id, prompts, n)
    rewards = models.head_rewards(project_id, list(zip(prompts, generated)))
    for task, candidates, head_rewards in zip(empty, generated, rewards):
        data = fill_candidates(schema, task["data"], candidates, head_rewards, strategy)
        tasks.update_task_data(task["id"], data)
        task["data"] = data  # the batch is predicted next, with the written candidates
        report.generated += 1
