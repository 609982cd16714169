"""The pre-annotation job's logic against an in-memory Label Studio stand-in.

The real Label Studio path (label-studio-sdk calls) is exercised in tests/e2e.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from rlhf_core.label_schema import parse_label_config
from rlhf_core.preannotate import fill_candidates, preannotate_project
from rlhf_core.predict import predict_tasks, prior_posterior

PAIRWISE = """<View><Text name="prompt" value="$prompt"/>
<Pairwise name="comparison" toName="answer1,answer2"/>
<Text name="answer1" value="$answer1"/><Text name="answer2" value="$answer2"/></View>"""
RANKING = """<View><Text name="prompt" value="$prompt"/>
<List name="candidates" value="$candidates" title="Candidates"/>
<Ranker name="rank" toName="candidates"/></View>"""


class FakeModels:
    """Rewards: the length of a response; the two heads disagree by 3 per ``+`` or ``-`` it ends
    with (so they disagree most on candidates 1 and 2). Embeddings: a bag of its words."""

    def __init__(self, version="rm-0000.policy-0000"):
        self.version = version
        self.generated_for: list[str] = []

    def served_version(self, project_id):
        return self.version

    def generate(self, project_id, prompts, n):
        self.generated_for += prompts
        return [
            [f"{p} answer {i}{'+' * (i == 1)}{'-' * (i == 2)}" for i in range(n)] for p in prompts
        ]

    def posterior(self, project_id):
        return prior_posterior(64)

    def score_and_embed(self, project_id, items):
        rewards, embeddings = [], []
        for _, responses in items:
            rows = []
            for r in responses:
                base = len(r.rstrip("+-")) / 10
                swing = 3.0 * (r.count("+") - r.count("-"))
                rows.append([base + swing, base - swing])
            rewards.append(np.array(rows))
            embeddings.append(np.stack([bag_of_words(r) for r in responses]))
        return rewards, embeddings


def bag_of_words(text, dims=64):
    vector = np.zeros(dims)
    for word in text.replace("+", " ").replace("-", " ").split():
        vector[zlib.crc32(word.encode()) % dims] += 1.0
    return vector


class FakeLabelStudio:
    def __init__(self, tasks, crash_after_updates=None):
        self.tasks = {t["id"]: t for t in tasks}
        self.predictions: dict[int, list[dict]] = {}
        self.updates = 0
        self.crash_after_updates = crash_after_updates
        self.project_versions: dict[int, str] = {}

    def unlabeled_tasks(self, project_id):
        for task in self.tasks.values():
            yield {
                "id": task["id"],
                "data": dict(task["data"]),
                "predictions": list(self.predictions.get(task["id"], [])),
            }

    def update_task_data(self, task_id, data):
        if self.crash_after_updates is not None and self.updates >= self.crash_after_updates:
            raise ConnectionError("Label Studio went away")
        self.tasks[task_id]["data"] = data
        self.updates += 1

    def create_prediction(self, task_id, prediction):
        self.predictions.setdefault(task_id, []).append(prediction)

    def set_project_model_version(self, project_id, model_version):
        self.project_versions[project_id] = model_version


def prompt_tasks(n, start=1):
    return [{"id": i, "data": {"prompt": f"q{i}"}} for i in range(start, start + n)]


def test_prompt_only_tasks_get_the_most_uncertain_pair_and_a_prediction():
    ls = FakeLabelStudio(prompt_tasks(3))
    report = preannotate_project(
        1, parse_label_config(PAIRWISE), FakeModels(), ls, num_candidates=4, strategy="bald"
    )
    assert (report.generated, report.predicted) == (3, 3)
    for task in ls.tasks.values():
        # candidates 1 and 2 are the ones the heads disagree on
        assert {task["data"]["answer1"], task["data"]["answer2"]} == {
            f"{task['data']['prompt']} answer 1+",
            f"{task['data']['prompt']} answer 2-",
        }
        [prediction] = ls.predictions[task["id"]]
        assert prediction["model_version"] == "rm-0000.policy-0000"
        assert prediction["result"][0]["type"] == "pairwise"
    assert ls.project_versions == {1: "rm-0000.policy-0000"}


def test_tasks_with_responses_are_predicted_not_regenerated():
    tasks = [{"id": 1, "data": {"prompt": "p", "answer1": "a", "answer2": "bb"}}]
    models = FakeModels()
    ls = FakeLabelStudio(tasks)
    report = preannotate_project(1, parse_label_config(PAIRWISE), models, ls, num_candidates=4)
    assert models.generated_for == []
    assert ls.tasks[1]["data"] == {"prompt": "p", "answer1": "a", "answer2": "bb"}
    assert report.predicted == 1


THUMBS = """<View><Text name="prompt" value="$prompt"/><Text name="response" value="$response"/>
<Choices name="verdict" toName="response"><Choice value="Good"/><Choice value="Bad"/></Choices>
</View>"""


def test_a_single_response_task_gets_the_policys_answer_once_and_no_prediction():
    """Thumbs up/down: the prompt-only task gets one answer written in; a task that has its
    response keeps it; there is no pair to predict, so no model version to show either (Label
    Studio refuses a version that no prediction carries)."""
    tasks = [
        {"id": 1, "data": {"prompt": "q1", "response": ""}},
        {"id": 2, "data": {"prompt": "q2", "response": "already here"}},
    ]
    models = FakeModels()
    ls = FakeLabelStudio(tasks)
    report = preannotate_project(1, parse_label_config(THUMBS), models, ls, num_candidates=4)

    assert models.generated_for == ["q1"] and report.generated == 1
    assert ls.tasks[1]["data"]["response"].startswith("q1 answer")
    assert ls.tasks[2]["data"] == {"prompt": "q2", "response": "already here"}
    assert ls.predictions == {} and ls.project_versions == {}


def test_crash_halfway_leaves_whole_tasks_and_a_rerun_continues():
    ls = FakeLabelStudio(prompt_tasks(6), crash_after_updates=4)
    schema = parse_label_config(PAIRWISE)
    with pytest.raises(ConnectionError):
        preannotate_project(1, schema, FakeModels(), ls, num_candidates=3, batch_size=2)
    written = [t for t in ls.tasks.values() if "answer1" in t["data"]]
    assert len(written) == 4
    assert all(t["data"]["answer1"] and t["data"]["answer2"] for t in written)
    first_answers = {t["id"]: dict(t["data"]) for t in written}

    ls.crash_after_updates = None
    models = FakeModels()
    report = preannotate_project(1, schema, models, ls, num_candidates=3, batch_size=2)
    assert all("answer1" in t["data"] for t in ls.tasks.values())
    assert all(len(ls.predictions[i]) == 1 for i in ls.tasks)  # one prediction per task, no dupes
    assert {
        t["id"]: t["data"] for t in ls.tasks.values() if t["id"] in first_answers
    } == first_answers
    assert sorted(models.generated_for) == ["q5", "q6"]
    assert report.generated == 2


def test_rerun_at_the_same_version_does_nothing():
    ls = FakeLabelStudio(prompt_tasks(2))
    schema = parse_label_config(PAIRWISE)
    preannotate_project(1, schema, FakeModels(), ls, num_candidates=2)
    report = preannotate_project(1, schema, FakeModels(), ls, num_candidates=2)
    assert (report.tasks_seen, report.generated, report.predicted) == (0, 0, 0)


def test_new_version_repredicts_without_regenerating():
    ls = FakeLabelStudio(prompt_tasks(2))
    schema = parse_label_config(PAIRWISE)
    preannotate_project(1, schema, FakeModels(), ls, num_candidates=2)
    models = FakeModels("rm-0001.policy-0000")
    report = preannotate_project(1, schema, models, ls, num_candidates=2)
    assert (report.generated, report.predicted) == (0, 2)
    assert models.generated_for == []
    assert ls.project_versions[1] == "rm-0001.policy-0000"


def test_ranker_gets_every_candidate_as_list_items():
    schema = parse_label_config(RANKING)
    data = fill_candidates(schema, {"prompt": "p"}, ["x", "y", "z"], np.zeros((3, 2)), "default")
    assert data["candidates"] == [
        {"id": "c1", "title": "Response 1", "body": "x"},
        {"id": "c2", "title": "Response 2", "body": "y"},
        {"id": "c3", "title": "Response 3", "body": "z"},
    ]


def test_task_without_prompt_is_reported_not_crashed():
    ls = FakeLabelStudio([{"id": 1, "data": {"other": "x"}}])
    report = preannotate_project(
        1, parse_label_config(PAIRWISE), FakeModels(), ls, num_candidates=2
    )
    assert report.generated == 0 and "prompt" in report.errors[0]


def pool_of(*pairs):
    return [
        {"id": i, "data": {"prompt": f"q{i}", "answer1": a, "answer2": b}}
        for i, (a, b) in enumerate(pairs, start=1)
    ]


# Task 1 and task 2 ask the same question of the model (the same two answers); task 3 is a
# different question it is a little less unsure about.
NEAR_DUPLICATES = pool_of(
    ("the cat sat+", "the cat ran-"), ("the cat sat+", "the cat ran-"), ("a dog+", "a fish")
)


def label_studio_order(ls):
    return sorted(ls.predictions, key=lambda task: ls.predictions[task][0]["score"])


def test_the_pool_is_ordered_as_the_batch_selection_picks_it():
    ls = FakeLabelStudio(NEAR_DUPLICATES)
    schema = parse_label_config(PAIRWISE)
    preannotate_project(1, schema, FakeModels(), ls, num_candidates=2, strategy="eig")
    assert label_studio_order(ls)[-1] == 2  # the repeat waits behind a new question


@pytest.mark.parametrize("strategy", ["default", "eig", "batch", "margin"])
def test_predict_scores_a_pool_exactly_as_the_pool_order_does(strategy):
    """/predict and the pool order written after a promotion are one selection function."""
    tasks = pool_of(
        ("the cat sat+", "the cat ran-"),
        ("the cat sat+", "the cat ran-"),
        ("a dog+", "a fish"),
        ("blue sky", "grey sky-"),
        ("one", "two+"),
        ("three", "four"),
    )
    ls = FakeLabelStudio(tasks)
    models = FakeModels()
    schema = parse_label_config(PAIRWISE)
    preannotate_project(1, schema, models, ls, num_candidates=2, strategy=strategy)
    predicted = predict_tasks(
        schema,
        tasks,
        lambda items: models.score_and_embed(1, items),
        models.served_version(1),
        strategy,
        models.posterior(1),
    )
    assert [p[0]["score"] for p in predicted] == [
        ls.predictions[t["id"]][0]["score"] for t in tasks
    ]
    assert [p[0]["result"] for p in predicted] == [
        ls.predictions[t["id"]][0]["result"] for t in tasks
    ]


def test_a_single_pair_strategy_orders_by_uncertainty_alone():
    ls = FakeLabelStudio(NEAR_DUPLICATES)
    schema = parse_label_config(PAIRWISE)
    preannotate_project(1, schema, FakeModels(), ls, num_candidates=2, strategy="bald")
    assert label_studio_order(ls) == [1, 2, 3]
    assert ls.predictions[1][0]["score"] == ls.predictions[2][0]["score"]


def test_predictions_reach_label_studio_most_informative_first():
    ls = FakeLabelStudio(list(reversed(NEAR_DUPLICATES)))
    uploads = []
    create = ls.create_prediction
    ls.create_prediction = lambda task_id, p: (uploads.append(task_id), create(task_id, p))
    preannotate_project(1, parse_label_config(PAIRWISE), FakeModels(), ls, num_candidates=2)
    assert uploads == label_studio_order(ls)


def test_the_store_learns_which_versions_wrote_and_scored_each_task(tmp_path):
    from rlhf_core.preannotate import RecordingTasks
    from rlhf_core.store import Store

    store = Store(tmp_path / "store.sqlite3").initialize()
    tasks = [*prompt_tasks(2), {"id": 9, "data": {"prompt": "p", "answer1": "a", "answer2": "b"}}]
    ls = FakeLabelStudio(tasks)
    models = FakeModels("rm-0002.policy-0001")
    recording = RecordingTasks(ls, store.note_task_models, 1, models.served_version(1))
    preannotate_project(1, parse_label_config(PAIRWISE), models, recording, num_candidates=2)
    assert store.task_models(1) == {
        1: ("rm-0002.policy-0001", "rm-0002.policy-0001"),
        2: ("rm-0002.policy-0001", "rm-0002.policy-0001"),
        9: (None, "rm-0002.policy-0001"),  # its responses came with the task
    }
    assert ls.project_versions == {1: "rm-0002.policy-0001"}
    models.version = "rm-0003.policy-0001"  # re-scored later: the new scorer, the same writer
    preannotate_project(
        1,
        parse_label_config(PAIRWISE),
        models,
        RecordingTasks(ls, store.note_task_models, 1, models.version),
        2,
    )
    assert store.task_models(1)[1] == ("rm-0002.policy-0001", "rm-0003.policy-0001")
