"""Every template in label_configs/, used in a real Label Studio as a team would use it.

For each template: a project with the template's XML and its sample tasks (some with responses,
some prompt-only), the backend connected, predictions retrieved, the pre-annotation job run, then
rounds of a scripted annotator (it prefers the longer response) until a retrained reward model is
promoted; Label Studio's project then carries the new model version and the unlabeled tasks get
predictions of it. An update and a deletion in Label Studio are reflected in the training data.

The backend here trains only the reward model (RLHF_POLICY_TRAINING=off) to keep CI short; the
DPO round is in test_training_round.py. It pre-selects answers (RLHF_PRESELECT=1) so that Label
Studio's own validation checks every answer a prediction can carry; the default, predictions
that only score, has its own test here with the graded template, and the thumbs template (no
pairs: its labels train the policy with KTO) has its own round.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from label_studio_sdk.client import LabelStudio
from label_studio_sdk.label_interface import LabelInterface

from rlhf_core.config import BackendConfig
from rlhf_core.conversion import Provenance, convert
from rlhf_core.label_schema import RLHFSchema, parse_label_config
from rlhf_core.predict import task_candidates
from rlhf_core.registry import PROMOTED, REWARD_MODEL
from rlhf_core.store import JOB_DONE
from trainer.jobs import registry_for

from .harness import (
    REPO,
    SESSION_SETUP_BUDGET_S,
    Backend,
    LabelStudioServer,
    Project,
    connect,
    create_project,
    start_backend,
)
from .harness import wait_for as _wait_for

TEMPLATE_DIR = REPO / "label_configs"
TEMPLATES = sorted(  # the templates whose labels are pairs (the others: their own tests)
    path.stem
    for path in TEMPLATE_DIR.glob("*.xml")
    if parse_label_config(path.read_text(encoding="utf-8")).learns_preferences
)
TRAIN_EVERY = 3
ROUNDS = 2  # each labels TRAIN_EVERY tasks; the rest stay unlabeled
JOB_TIMEOUT_S = 600.0

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(SESSION_SETUP_BUDGET_S + 1200)]


def wait_for(probe: Any, what: Any) -> Any:
    return _wait_for(probe, timeout_s=JOB_TIMEOUT_S, what=what, interval_s=0.5)


@pytest.fixture(scope="module")
def templates_backend(
    tmp_path_factory: pytest.TempPathFactory, label_studio: LabelStudioServer
) -> Any:
    data_dir = tmp_path_factory.mktemp("templates-backend") / "data"
    server = start_backend(
        data_dir,
        RLHF_TRAIN_EVERY=str(TRAIN_EVERY),
        RLHF_POLICY_TRAINING="off",
        # One held-out task decides the gate this early; the gate has its own tests.
        RLHF_PROMOTION_TOLERANCE="1",
        RLHF_PRESELECT="1",
        LABEL_STUDIO_URL=label_studio.url,
    )
    try:
        yield server
    finally:
        server.process.stop()


# -- the scripted annotator -------------------------------------------------------------------


def text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def annotate(xml: str, data: dict[str, Any], prefer_longer: bool = True) -> list[dict[str, Any]]:
    """One annotation in the template's own controls: the longer response wins (or the shorter,
    to change one's mind), and the loser gets a line of feedback where the template asks."""
    schema = parse_label_config(xml)
    interface = LabelInterface(xml)

    def to_name(control: str) -> str:
        return str(interface.get_control(control).to_name[0])

    def item(control: str, kind: str, value: dict[str, Any], target: str | None = None):
        target = target or to_name(control)
        return {"from_name": control, "to_name": target, "type": kind, "value": value}

    def ordered(texts: list[str]) -> list[int]:
        """Indices, best first."""
        return sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=prefer_longer)

    result = []
    if schema.pairwise:
        control = schema.pairwise[0]
        best = ordered([text(data[control.left.key]), text(data[control.right.key])])[0]
        value = {"selected": "left" if best == 0 else "right"}
        result.append(item(control.name, "pairwise", value, target=control.name))
    elif schema.choices:
        control = schema.choices[0]
        best = ordered([text(data[r.key]) for r in control.responses])[0]
        choice = next(c for c, index in control.choice_to_index.items() if index == best)
        result.append(item(control.name, "choices", {"choices": [choice]}))
    elif schema.ratings:
        ranks = ordered([text(data[r.target.key]) for r in schema.ratings])
        for place, index in enumerate(ranks):
            rating = schema.ratings[index]
            stars = max(1, rating.max_rating - 2 * place)
            result.append(item(rating.name, "rating", {"rating": stars}))
    elif schema.rankers:
        control = schema.rankers[0]
        candidates = data[control.items.key]
        order = ordered([c["body"] for c in candidates])
        tiers: dict[str, list[str]] = {bucket: [] for bucket in control.buckets}
        for place, index in enumerate(order):
            bucket = control.buckets[min(place, len(control.buckets) - 1)]
            tiers[bucket].append(candidates[index]["id"])
        result.append(item(control.name, "ranker", {"ranker": {"_": [], **tiers}}))
    else:
        raise AssertionError(f"the scripted annotator does not know this template: {xml[:200]}")
    if schema.feedback:
        control = schema.feedback[-1]
        result.append(item(control.name, "textarea", {"text": ["Too short to be useful."]}))
    return result


# -- what Label Studio holds vs what the backend stored ----------------------------------------


def expected_records(ls: LabelStudio, project: Project, schema: RLHFSchema) -> list[str]:
    """The records Label Studio's annotations convert to, as sorted JSON lines."""
    records = []
    for task in ls.tasks.list(project=project.id, fields="all"):
        for annotation in ls.annotations.list(id=task.id):
            provenance = Provenance(project.id, task.id, annotation.id, annotation.completed_by)
            records += convert(annotation.result, dict(task.data), schema, provenance)
    return sorted(json.dumps(payload, sort_keys=True) for _, payload in records)


def stored_records(backend: Backend, project_id: int) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in backend.store.records(project_id))


def assert_store_matches(ls: LabelStudio, backend: Backend, project: Project, schema: RLHFSchema):
    expected = expected_records(ls, project, schema)
    assert expected, "the annotations made no training records"
    wait_for(
        lambda: stored_records(backend, project.id) == expected,
        what=lambda: f"the store to hold {expected}, not {stored_records(backend, project.id)}",
    )


def prediction_errors(interface: LabelInterface, prediction: Any) -> list[Any]:
    """Label Studio's own check of a prediction against the config (Pairwise results name the
    control itself as to_name, which the SDK's validator does not know)."""
    checked = [r for r in prediction.result if r["type"] != "pairwise"]
    if not checked:
        return []
    return list(interface.validate_prediction({"result": checked}, return_errors=True))


def served_version(backend: Backend, project_id: int) -> str:
    return registry_for(BackendConfig(data_dir=backend.store.path.parent)).served_version(
        project_id
    )


def preannotate(label_studio: LabelStudioServer, backend: Backend, project_id: int, queue: bool):
    """``rlhf-backend preannotate``: in this process, or with ``--queue`` by the service's own
    worker. Either way it reaches Label Studio with what the backend's /setup stored."""
    script = Path(sys.executable).parent / "rlhf-backend"
    data_dir = backend.store.path.parent
    argv = [str(script), "preannotate", "--project", str(project_id), "--data-dir", str(data_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LABEL_STUDIO_URL": label_studio.url}
    run = subprocess.run(
        argv + ["--queue"] * queue, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )
    assert run.returncode == 0, run.stderr[-3000:]
    if queue:
        wait_for(
            lambda: any(
                j.kind == "preannotate" and j.status == JOB_DONE
                for j in backend.store.jobs(project_id)
            ),
            what="the pre-annotation job",
        )
    else:
        assert '"generated": ' in run.stdout and '"errors": []' in run.stdout, run.stdout


def check_test_prediction(label_studio: LabelStudioServer, ml_id: int) -> None:
    """The model settings' *Test prediction*: Label Studio relays what /predict answered, and
    turns a backend error, or a /predict slower than its timeout, into a 500."""
    test = label_studio.api("POST", f"/api/ml/{ml_id}/predict/test", params={"random": "true"})
    assert test.status_code == 200, test.text
    answer = test.json()
    assert answer["status"] == 200 and answer["url"].endswith("/predict"), answer
    assert isinstance(answer["response"], list), answer


def data_manager_order(ls: LabelStudio, project_id: int, task_ids: list[int]) -> list[int]:
    """``task_ids`` in the order the Data Manager shows them sorted by prediction score."""
    query = json.dumps({"ordering": ["tasks:predictions_score"]})
    shown = [t.id for t in ls.tasks.list(project=project_id, query=query, fields="all")]
    return [task_id for task_id in shown if task_id in task_ids]


def default_first_pick(backend: Backend, project_id: int, schema: RLHFSchema, tasks: dict) -> int:
    """Of ``tasks`` (id -> data), the one the default selection labels first, computed here
    from the served checkpoint (its heads, its Laplace posterior) with the selection function."""
    from rlhf_core.reward_model import RewardModel
    from rlhf_core.selection import score_tasks

    registry = registry_for(BackendConfig(data_dir=backend.store.path.parent))
    model = RewardModel.load(registry.served(project_id, REWARD_MODEL).path)
    candidates = {task_id: task_candidates(data, schema) for task_id, data in tasks.items()}
    rewards, embeddings = model.score_and_embed([(c.prompt, c.texts) for c in candidates.values()])
    _, scores = score_tasks("default", list(zip(rewards, embeddings)), model.posterior())
    return list(candidates)[int(np.argmin(scores))]


def trainings_done(backend: Backend, project_id: int) -> int:
    return sum(j.kind == "train" and j.status == JOB_DONE for j in backend.store.jobs(project_id))


def is_blank(value: Any) -> bool:
    return not value or (isinstance(value, str) and not value.strip())


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_in_label_studio_predict_preannotate_annotate_retrain(
    name: str,
    label_studio: LabelStudioServer,
    templates_backend: Backend,
    ls: LabelStudio,
) -> None:
    backend = templates_backend
    xml = (TEMPLATE_DIR / f"{name}.xml").read_text(encoding="utf-8")
    sample = json.loads((TEMPLATE_DIR / f"{name}.tasks.json").read_text(encoding="utf-8"))
    schema, interface = parse_label_config(xml), LabelInterface(xml)
    keys = [r.key for r in schema.responses]
    project = create_project(ls, f"template {name}", sample, label_config=xml)
    prompt_only = {t for t, d in project.task_data.items() if all(is_blank(d[k]) for k in keys)}
    assert prompt_only and len(prompt_only) < len(project.task_ids)

    ml = connect(label_studio, project.id, backend)
    assert ml["state"] == "CO", ml
    check_test_prediction(label_studio, ml["id"])

    # "Retrieve Predictions" in the data manager: every task with responses gets a valid one.
    action = label_studio.api(
        "POST",
        "/api/dm/actions",
        params={"id": "retrieve_tasks_predictions", "project": project.id},
        json={"selectedItems": {"all": True, "excluded": []}},
    )
    assert action.status_code == 200, action.text
    predicted = {p.task: p for p in ls.predictions.list(project=project.id)}
    assert set(predicted) == set(project.task_ids) - prompt_only, sorted(predicted)
    for prediction in predicted.values():
        assert prediction.result and prediction_errors(interface, prediction) == []

    # The pre-annotation job writes candidates into the prompt-only tasks and predicts them all.
    preannotate(label_studio, backend, project.id, queue=name != TEMPLATES[0])
    tasks = {t.id: dict(t.data) for t in ls.tasks.list(project=project.id, fields="all")}
    for task_id in prompt_only:
        assert not any(is_blank(tasks[task_id][k]) for k in keys), tasks[task_id]
    untrained = served_version(backend, project.id)
    for task_id in project.task_ids:
        versions = [p.model_version for p in ls.predictions.list(task=task_id)]
        assert untrained in versions, (task_id, versions)

    # Rounds of labels: every TRAIN_EVERY labels queue a training job by themselves.
    order = sorted(prompt_only) + sorted(set(project.task_ids) - prompt_only)
    registry = registry_for(BackendConfig(data_dir=backend.store.path.parent))
    annotations = []
    for round_ in range(1, ROUNDS + 1):
        for task_id in order[(round_ - 1) * TRAIN_EVERY : round_ * TRAIN_EVERY]:
            result = annotate(xml, tasks[task_id])
            annotations.append(ls.annotations.create(id=task_id, result=result))
        wait_for(lambda n=round_: trainings_done(backend, project.id) >= n, f"training {round_}")
    served = registry.served(project.id, REWARD_MODEL)
    assert served.version == f"rm-{ROUNDS:04d}" and served.status == PROMOTED, served
    version = served_version(backend, project.id)
    assert version != untrained and version.startswith(served.version)
    assert_store_matches(ls, backend, project, schema)

    # Label Studio follows the promoted version, and the unlabeled tasks are re-scored with it.
    wait_for(
        lambda: ls.projects.get(id=project.id).model_version == version,
        what=f"the project's model_version to become {version}",
    )
    unlabeled = order[len(annotations) :]
    assert unlabeled
    for task_id in unlabeled:
        fresh = [p for p in ls.predictions.list(task=task_id) if p.model_version == version]
        assert len(fresh) == 1 and prediction_errors(interface, fresh[0]) == [], fresh
        assert 0.0 <= fresh[0].score <= 1.0
    # The Data Manager shows first the task the retrained model is least sure about.
    shown = data_manager_order(ls, project.id, unlabeled)
    assert sorted(shown) == sorted(unlabeled), shown
    unlabeled_data = {task_id: tasks[task_id] for task_id in unlabeled}
    assert shown[0] == default_first_pick(backend, project.id, schema, unlabeled_data), shown

    # A changed mind and a deleted annotation reach the training data.
    first, second = annotations[0], annotations[1]
    flipped = annotate(xml, tasks[first.task], prefer_longer=False)
    ls.annotations.update(id=first.id, result=flipped)
    ls.annotations.delete(id=second.id)
    assert_store_matches(ls, backend, project, schema)
    assert second.id not in {a.annotation_id for a in backend.store.annotations(project.id)}


# -- graded preferences without pre-selection; thumbs trained with KTO -------------------------


def retrieve_predictions(label_studio: LabelStudioServer, project_id: int) -> None:
    action = label_studio.api(
        "POST",
        "/api/dm/actions",
        params={"id": "retrieve_tasks_predictions", "project": project_id},
        json={"selectedItems": {"all": True, "excluded": []}},
    )
    assert action.status_code == 200, action.text


def choice_item(control: str, to_name: str, choice: str) -> dict[str, Any]:
    value = {"choices": [choice]}
    return {"from_name": control, "to_name": to_name, "type": "choices", "value": value}


def test_graded_template_scores_without_preselecting_and_keeps_strength_and_both_bad(
    label_studio: LabelStudioServer, training_backend: Backend, ls: LabelStudio
) -> None:
    xml = (TEMPLATE_DIR / "graded.xml").read_text(encoding="utf-8")
    sample = json.loads((TEMPLATE_DIR / "graded.tasks.json").read_text(encoding="utf-8"))
    schema = parse_label_config(xml)
    project = create_project(ls, "template graded, no preselection", sample, label_config=xml)
    with_responses = sorted(
        t for t, d in project.task_data.items() if task_candidates(d, schema) is not None
    )
    ml = connect(label_studio, project.id, training_backend)
    check_test_prediction(label_studio, ml["id"])

    # Predictions pre-select nothing; Label Studio stores their scores and sorts by them.
    retrieve_predictions(label_studio, project.id)
    predicted = {p.task: p for p in ls.predictions.list(project=project.id)}
    assert sorted(predicted) == with_responses
    for prediction in predicted.values():
        assert prediction.result == [] and 0.0 <= prediction.score <= 1.0, prediction
    preannotate(label_studio, training_backend, project.id, queue=False)  # the prompt-only ones
    version = served_version(training_backend, project.id)
    scores = {
        p.task: p.score
        for p in ls.predictions.list(project=project.id)
        if p.model_version == version
    }
    assert sorted(scores) == sorted(project.task_ids)
    assert all(p.result == [] for p in ls.predictions.list(project=project.id))
    shown = data_manager_order(ls, project.id, project.task_ids)
    assert [scores[t] for t in shown] == sorted(scores.values()), (shown, scores)
    with_responses = sorted(project.task_ids)

    # A graded answer keeps its strength; a tie is a tie; "both bad" is two undesirable examples.
    answers = ["B is slightly better", "Tie: equally good", "Both are bad", "A is better"]
    for task_id, answer in zip(with_responses, answers, strict=False):
        result = [choice_item("preference", "prompt", answer)]
        ls.annotations.create(id=task_id, result=result)
    assert_store_matches(ls, training_backend, project, schema)
    preferences = training_backend.store.records(project.id, "preference")
    assert sorted(p.get("strength", "tie") for p in preferences) == ["better", "slightly", "tie"]
    both_bad = training_backend.store.records(project.id, "unpaired")
    assert [r["source"] for r in both_bad] == ["both_bad", "both_bad"]
    assert not any(r["desirable"] for r in both_bad)


def test_thumbs_template_in_label_studio_trains_the_policy_with_kto(
    label_studio: LabelStudioServer, training_backend: Backend, ls: LabelStudio
) -> None:
    from rlhf_core.registry import POLICY

    xml = (TEMPLATE_DIR / "thumbs.xml").read_text(encoding="utf-8")
    sample = json.loads((TEMPLATE_DIR / "thumbs.tasks.json").read_text(encoding="utf-8"))
    schema = parse_label_config(xml)
    project = create_project(ls, "template thumbs", sample, label_config=xml)
    prompt_only = {t for t, d in project.task_data.items() if is_blank(d["response"])}
    assert prompt_only and len(prompt_only) < len(project.task_ids)
    connect(label_studio, project.id, training_backend)

    # Pre-annotation writes the policy's answer into the prompt-only tasks, and only there.
    preannotate(label_studio, training_backend, project.id, queue=False)
    tasks = {t.id: dict(t.data) for t in ls.tasks.list(project=project.id, fields="all")}
    assert all(not is_blank(tasks[t]["response"]) for t in prompt_only)
    assert all(tasks[t] == project.task_data[t] for t in set(tasks) - prompt_only)

    # Thumbs (up for the longer half of the answers) and one written feedback: 4 labels, a job.
    labelled = sorted(set(project.task_ids) - prompt_only)[:4]
    lengths = sorted(len(tasks[t]["response"]) for t in labelled)
    for task_id in labelled:
        good = len(tasks[task_id]["response"]) >= lengths[2]
        verdict = "Thumbs up: good response" if good else "Thumbs down: bad response"
        result = [choice_item("verdict", "response", verdict)]
        if task_id == labelled[0]:
            feedback = {"text": ["Give the exact steps."]}
            result.append(
                {
                    "from_name": "feedback",
                    "to_name": "response",
                    "type": "textarea",
                    "value": feedback,
                }
            )
        ls.annotations.create(id=task_id, result=result)
    assert_store_matches(ls, training_backend, project, schema)
    wait_for(lambda: trainings_done(training_backend, project.id) >= 1, "the training job")

    registry = registry_for(BackendConfig(data_dir=training_backend.store.path.parent))
    [version] = [v for v in registry.versions(project.id) if v.kind == POLICY]
    assert version.metrics["kto_examples"] == 4 and version.metrics["kto"]["steps"] >= 1
    assert version.metrics["ilf_examples"] == 1
    assert "no trained reward model" in version.reason  # nothing to judge it: not served
    assert registry.served(project.id, POLICY).version == "policy-base"
