"""Predictions in the project's own control tags, validated by label-studio-sdk."""

from __future__ import annotations

import json
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface
from test_store import TASKS, write_annotation

from rlhf_core.conversion import preference_pairs
from rlhf_core.label_schema import parse_label_config
from rlhf_core.predict import labels_by_task, pair_probabilities, predict_tasks, task_candidates
from rlhf_core.store import Store

FIXTURES = Path(__file__).parent / "fixtures"
PAIRWISE = json.loads((FIXTURES / "01_setup.json").read_text())["body"]["schema"]
CUSTOM = """<View>
  <Text name="question" value="$question"/>
  <Text name="response_a" value="$response_a"/>
  <Text name="response_b" value="$response_b"/>
  <Choices name="preference" toName="question">
    <Choice value="A is better"/><Choice value="B is better"/><Choice value="Tie"/>
  </Choices>
</View>"""
RANKING = """<View>
  <Text name="prompt" value="$prompt"/>
  <List name="candidates" value="$candidates" title="Candidates"/>
  <Ranker name="rank" toName="candidates"/>
</View>"""
RATING = """<View>
  <Text name="prompt" value="$prompt"/>
  <Text name="a" value="$a"/><Rating name="rating_a" toName="a" maxRating="5"/>
  <Text name="b" value="$b"/><Rating name="rating_b" toName="b" maxRating="5"/>
</View>"""


def embedding(text: str, dims: int = 16) -> np.ndarray:
    """A fixed pseudo-random embedding per text (different texts point different ways)."""
    return np.random.default_rng(zlib.crc32(text.encode())).normal(size=dims)


def fixed_rewards(table: dict[str, list[float]]):
    """A scoring function reading per-head rewards from a {response text: rewards} table;
    embeddings from :func:`embedding`."""
    calls = []

    def head_rewards(items):
        calls.append(items)
        rewards = [np.array([table[text] for text in responses]) for _, responses in items]
        return rewards, [np.stack([embedding(t) for t in responses]) for _, responses in items]

    head_rewards.calls = calls
    return head_rewards


def valid(config: str, prediction: dict) -> list:
    return LabelInterface(config).validate_prediction(prediction, return_errors=True)


def test_pairwise_selects_the_higher_reward_and_validates():
    fn = fixed_rewards({"hello": [1.0, 1.2], "go away": [-1.0, -0.8]})
    tasks = [{"id": 1, "data": {"prompt": "hi", "answer1": "hello", "answer2": "go away"}}]
    [[prediction]] = predict_tasks(parse_label_config(PAIRWISE), tasks, fn, "rm-0000.policy-0000")
    assert prediction["result"] == [
        {
            "from_name": "comparison",
            "to_name": "answer1",
            "type": "pairwise",
            "value": {"selected": "left"},
        }
    ]
    assert prediction["model_version"] == "rm-0000.policy-0000"
    assert valid(PAIRWISE, prediction) == []


def test_score_is_low_when_heads_disagree_and_high_when_they_agree():
    # heads agree that x beats y strongly vs. heads split evenly on the (u, v) pair
    fn = fixed_rewards(
        {
            "x": [5.0, 5.0, 5.0, 5.0],
            "y": [-5.0, -5.0, -5.0, -5.0],
            "u": [4.0, -4.0, 4.0, -4.0],
            "v": [-4.0, 4.0, -4.0, 4.0],
        }
    )
    tasks = [
        {"data": {"prompt": "p", "answer1": "x", "answer2": "y"}},
        {"data": {"prompt": "p", "answer1": "u", "answer2": "v"}},
    ]
    [[sure], [unsure]] = predict_tasks(parse_label_config(PAIRWISE), tasks, fn, "v", "bald")
    assert sure["score"] > 0.99
    assert unsure["score"] < 0.2


def test_all_tasks_of_a_request_are_scored_in_one_batch():
    fn = fixed_rewards({"a": [0.0], "b": [1.0]})
    tasks = [{"data": {"prompt": str(i), "answer1": "a", "answer2": "b"}} for i in range(5)]
    predict_tasks(parse_label_config(PAIRWISE), tasks, fn, "v")
    assert len(fn.calls) == 1 and len(fn.calls[0]) == 5


def test_prompt_only_tasks_get_no_prediction_and_no_model_call():
    fn = fixed_rewards({})
    tasks = [
        {"data": {"prompt": "only a prompt"}},
        {"data": {"prompt": "p", "answer1": "", "answer2": ""}},
    ]
    assert predict_tasks(parse_label_config(PAIRWISE), tasks, fn, "v") == [[], []]
    assert fn.calls == []


def test_custom_field_names_and_choices_preference_validates():
    fn = fixed_rewards({"meh": [0.0], "great": [2.0]})
    tasks = [{"data": {"question": "q", "response_a": "meh", "response_b": "great"}}]
    [[prediction]] = predict_tasks(parse_label_config(CUSTOM), tasks, fn, "v")
    assert prediction["result"] == [
        {
            "from_name": "preference",
            "to_name": "question",  # the control's toName, where Label Studio draws it
            "type": "choices",
            "value": {"choices": ["B is better"]},
        }
    ]
    assert valid(CUSTOM, prediction) == []


def test_ranker_orders_items_by_reward_and_validates():
    fn = fixed_rewards({"one": [0.0], "two": [3.0], "three": [1.0]})
    items = [
        {"id": "c1", "title": "1", "body": "one"},
        {"id": "c2", "title": "2", "body": "two"},
        {"id": "c3", "title": "3", "body": "three"},
    ]
    tasks = [{"data": {"prompt": "p", "candidates": items}}]
    [[prediction]] = predict_tasks(parse_label_config(RANKING), tasks, fn, "v")
    assert prediction["result"][0]["value"] == {"ranker": {"rank": ["c2", "c3", "c1"]}}
    assert valid(RANKING, prediction) == []


def test_bucketed_ranker_spreads_the_order_over_tiers_best_first():
    config = RANKING.replace(
        '<Ranker name="rank" toName="candidates"/>',
        '<Ranker name="rank" toName="candidates"><Bucket name="best"/>'
        '<Bucket name="worst"/></Ranker>',
    )
    fn = fixed_rewards({"one": [0.0], "two": [3.0], "three": [1.0], "four": [-1.0]})
    items = [
        {"id": f"c{i}", "title": str(i), "body": b}
        for i, b in enumerate(["one", "two", "three", "four"], 1)
    ]
    [[prediction]] = predict_tasks(
        parse_label_config(config), [{"data": {"prompt": "p", "candidates": items}}], fn, "v"
    )
    assert prediction["result"][0]["value"] == {
        "ranker": {"best": ["c2", "c3"], "worst": ["c1", "c4"]}
    }


def test_rating_per_response_within_range_and_validates():
    fn = fixed_rewards({"good": [6.0], "bad": [-6.0]})
    tasks = [{"data": {"prompt": "p", "a": "good", "b": "bad"}}]
    [[prediction]] = predict_tasks(parse_label_config(RATING), tasks, fn, "v")
    ratings = {r["from_name"]: r["value"]["rating"] for r in prediction["result"]}
    assert ratings == {"rating_a": 5, "rating_b": 1}
    assert valid(RATING, prediction) == []


def test_task_candidates_reads_fields_named_by_the_config():
    schema = parse_label_config(CUSTOM)
    found = task_candidates({"question": "q", "response_a": "1", "response_b": "2"}, schema)
    assert (found.prompt, found.ids, found.texts) == ("q", ["response_a", "response_b"], ["1", "2"])


def test_pair_probabilities_are_bradley_terry_per_head():
    pairs, p = pair_probabilities(np.array([[0.0, 1.0], [0.0, -1.0], [2.0, 0.0]]))
    assert pairs == [(0, 1), (0, 2), (1, 2)]
    np.testing.assert_allclose(p[0], [0.5, 1 / (1 + np.exp(-2.0))])
    np.testing.assert_allclose(p[1], [1 / (1 + np.exp(2.0)), 1 / (1 + np.exp(-1.0))])


@pytest.mark.parametrize(
    "strategy", ["random", "entropy", "margin", "variance", "bald", "batch", "eig", "default"]
)
def test_every_strategy_yields_scores_in_unit_interval(strategy):
    fn = fixed_rewards({"a": [0.3, -0.2, 1.0], "b": [0.1, 0.4, -2.0]})
    tasks = [{"data": {"prompt": "p", "answer1": "a", "answer2": "b"}}]
    [[prediction]] = predict_tasks(parse_label_config(PAIRWISE), tasks, fn, "v", strategy)
    assert 0.0 <= prediction["score"] <= 1.0


TEMPLATES = Path(__file__).resolve().parents[1] / "label_configs"


@pytest.mark.parametrize("name", ["pairwise", "graded", "rating", "ranking", "pairwise_chat"])
def test_without_preselect_a_prediction_scores_the_task_and_suggests_no_answer(name):
    """No anchoring: the same score (the order Label Studio shows tasks in), no result that
    "Use predictions to prelabel tasks" could fill in."""
    xml = (TEMPLATES / f"{name}.xml").read_text()
    sample = json.loads((TEMPLATES / f"{name}.tasks.json").read_text())
    schema = parse_label_config(xml)
    tasks = [t for t in sample if task_candidates(t["data"], schema) is not None]

    def score_fn(items):
        rewards = [np.array([[len(t) / 100.0, -len(t) / 90.0] for t in r]) for _, r in items]
        return rewards, [np.stack([embedding(t) for t in r]) for _, r in items]

    anchored = predict_tasks(schema, tasks, score_fn, "v")
    plain = predict_tasks(schema, tasks, score_fn, "v", preselect=False)

    assert len(plain) == len(tasks) >= 5
    for [with_answer], [without] in zip(anchored, plain, strict=True):
        assert with_answer["result"] and without["result"] == []
        assert without["score"] == with_answer["score"]
        assert without["model_version"] == "v"


def test_a_graded_prediction_picks_the_strength_nearest_the_reward_gap():
    xml = (TEMPLATES / "graded.xml").read_text()
    schema = parse_label_config(xml)
    data = {"prompt": "p", "answer1": "close", "answer2": "far"}
    for gap, expected in [(0.05, "negligibly"), (0.3, "slightly"), (0.7, "better"), (3, "signif")]:
        fn = fixed_rewards({"close": [0.0], "far": [float(gap)]})
        [[prediction]] = predict_tasks(schema, [{"data": data}], fn, "v")
        [region] = prediction["result"]
        assert region["value"]["choices"][0].startswith(f"B is {expected}"), (gap, region)
        assert valid(xml, prediction) == []


def test_labels_by_task_reads_the_tasks_asked_for_as_the_whole_project_read_found_them(
    database_url,
):
    """Preferences and the pairs each ranking implies, by task, for the tasks asked for: the
    same as reading every record of the project and keeping those tasks' (as /predict did)."""
    store = Store(database_url).initialize()
    for annotation_id, task_id in enumerate(TASKS, 1):
        write_annotation(store, annotation_id, task_id)
    wanted = {7, 1801, 2, "2", 99}

    def kept(kind: str) -> list[dict]:
        return [r for r in store.records(1, kind) if r.get("task") in wanted]

    expected = defaultdict(list)
    for record in preference_pairs(kept("preference"), kept("ranking"), 1):
        expected[record["task"]].append(record)
    found = labels_by_task(store, 1, 1, wanted)
    assert found == expected and set(found) == {7, 1801, 2}
    assert [len(found[task]) for task in (7, 1801, 2)] == [4, 2, 2]  # one ranking pair each
    assert set(labels_by_task(store, 1, 1)) == set(TASKS)  # the whole project, as sync reads it
    assert labels_by_task(store, 1, 1, set()) == {}
