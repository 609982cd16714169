"""The arena: pre-annotation pits the served policy against an earlier version on a share of the
prompt-only tasks, records who wrote what, and annotators' labels become verdicts between versions.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_preannotate import PAIRWISE, RANKING, FakeLabelStudio, FakeModels, prompt_tasks

from rlhf_core.arena import Arena, comparisons, in_arena, reward_model_win_rates, text_hash
from rlhf_core.config import BackendConfig
from rlhf_core.label_schema import parse_label_config
from rlhf_core.preannotate import preannotate_project
from rlhf_core.registry import POLICY, PROMOTED, REJECTED, Registry
from rlhf_core.serving import ModelServer
from rlhf_core.store import Store


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store.sqlite3").initialize()


def old_policy(version, prompts, n):
    return [[f"{p} old reply {i} from {version}" for i in range(n)] for p in prompts]


def arena(store, share=1.0, opponents=("policy-base",)):
    return Arena(
        project_id=1,
        share=share,
        current="policy-0002",
        opponents=list(opponents),
        reward_model="rm-0003",
        generate_with=old_policy,
        record=store.replace_arena_responses,
    )


def authors(store):
    return {(r["task_id"], r["text_hash"]): r for r in store.arena_responses(1)}


def test_arena_tasks_show_one_response_per_version_and_record_who_wrote_which(store):
    ls = FakeLabelStudio(prompt_tasks(6))
    report = preannotate_project(
        1, parse_label_config(PAIRWISE), FakeModels(), ls, num_candidates=4, arena=arena(store)
    )
    assert report.generated == report.predicted == 6
    written = authors(store)
    lefts = set()
    for task in ls.tasks.values():
        data, task_id = task["data"], task["id"]
        texts = {data["answer1"], data["answer2"]}
        assert texts == {f"q{task_id} answer 0", f"q{task_id} old reply 0 from policy-base"}
        for text in texts:
            row = written[(task_id, text_hash(text))]
            assert row["policy_version"] == ("policy-base" if "old" in text else "policy-0002")
            assert row["chars"] == len(text) and row["rm_version"] == "rm-0003"
            assert row["rm_reward"] == pytest.approx(len(text) / 10)  # FakeModels' mean reward
        lefts.add("old" in data["answer1"])
    assert lefts == {True, False}  # neither version always sits on the left


def test_a_ranker_gets_responses_from_both_versions(store):
    ls = FakeLabelStudio(prompt_tasks(2))
    preannotate_project(
        1, parse_label_config(RANKING), FakeModels(), ls, num_candidates=4, arena=arena(store)
    )
    for task in ls.tasks.values():
        bodies = [item["body"] for item in task["data"]["candidates"]]
        assert sorted("old" in body for body in bodies) == [False, False, True, True]
    assert len(store.arena_responses(1)) == 2 * 4


def test_without_an_earlier_version_the_most_informative_pair_is_written(store):
    schema = parse_label_config(PAIRWISE)
    with_arena, without = FakeLabelStudio(prompt_tasks(3)), FakeLabelStudio(prompt_tasks(3))
    no_opponent = arena(store, opponents=())
    preannotate_project(1, schema, FakeModels(), with_arena, num_candidates=4, arena=no_opponent)
    preannotate_project(1, schema, FakeModels(), without, num_candidates=4)
    assert store.arena_responses(1) == []
    assert with_arena.tasks == without.tasks


def test_the_share_is_a_stable_subset_of_tasks():
    picked = [t for t in range(1, 2001) if in_arena(1, t, 0.1)]
    assert 150 < len(picked) < 250
    assert picked == [t for t in range(1, 2001) if in_arena(1, t, 0.1)]
    assert not any(in_arena(1, t, 0.0) for t in range(1, 2001))
    assert all(in_arena(1, t, 1.0) for t in range(1, 100))


def test_only_arena_tasks_are_pitted(store):
    ls = FakeLabelStudio(prompt_tasks(40))
    preannotate_project(
        1, parse_label_config(PAIRWISE), FakeModels(), ls, num_candidates=2, arena=arena(store, 0.3)
    )
    expected = {t for t in range(1, 41) if in_arena(1, t, 0.3)}
    assert 0 < len(expected) < 40
    assert {r["task_id"] for r in store.arena_responses(1)} == expected
    for task_id, task in ls.tasks.items():
        assert ("old" in task["data"]["answer1"] + task["data"]["answer2"]) == (task_id in expected)


def record(task, chosen, rejected, tie=False, annotator=1):
    return {
        "task": task,
        "chosen": chosen,
        "rejected": rejected,
        "tie": tie,
        "annotator": annotator,
    }


ROWS = [
    {
        "task_id": 1,
        "text_hash": text_hash("new"),
        "policy_version": "policy-0002",
        "chars": 3,
        "rm_reward": 2.0,
    },
    {
        "task_id": 1,
        "text_hash": text_hash("older"),
        "policy_version": "policy-base",
        "chars": 5,
        "rm_reward": 0.0,
    },
]


def test_labels_on_arena_pairs_become_verdicts_between_versions():
    found = comparisons(
        [
            record(1, "new", "older"),
            record(1, "older", "new", annotator=2),
            record(1, "new", "older", tie=True, annotator=3),
            record(2, "new", "older"),  # not an arena task
            record(1, "new", "edited by hand"),  # a text no version wrote
        ],
        ROWS,
    )
    assert [(c.a, c.b, c.outcome, c.length_a, c.length_b) for c in found] == [
        ("policy-0002", "policy-base", 1.0, 3, 5),
        ("policy-base", "policy-0002", 1.0, 5, 3),
        ("policy-0002", "policy-base", 0.5, 3, 5),
    ]


def test_the_reward_models_win_rate_comes_from_the_recorded_rewards():
    rates = reward_model_win_rates(ROWS)
    p = 1 / (1 + np.exp(-2.0))
    assert rates["policy-0002"] == {"rm_win_rate": pytest.approx(p, abs=1e-4), "rm_comparisons": 1}
    assert rates["policy-base"]["rm_win_rate"] == pytest.approx(1 - p, abs=1e-4)


def test_opponents_are_the_earlier_promoted_policies_and_the_base(tmp_path):
    config = BackendConfig(data_dir=tmp_path)
    Store(config.db_path).initialize()
    registry = Registry(config.db_path, tmp_path / "models")
    for number, status in ((1, PROMOTED), (2, REJECTED), (3, PROMOTED), (4, PROMOTED)):
        version = f"policy-{number:04d}"
        if number != 3:  # policy-0003's checkpoint was deleted (retention)
            (tmp_path / version).mkdir()
        registry.record(1, POLICY, version, tmp_path / version, {}, {}, {}, status, "test")
    assert ModelServer(config, registry).arena_opponents(1) == ["policy-0001", "policy-base"]
    assert ModelServer(config, registry).arena_opponents(2) == []  # only the base: no arena


@pytest.mark.slow
def test_the_job_pits_the_served_policy_against_a_real_earlier_one(tmp_path):
    """The pre-annotation job's arena, with the tiny offline policy as the base version."""
    import dataclasses

    from rlhf_core.policy import Policy
    from rlhf_core.serving import policy_config
    from trainer.label_studio_sync import _arena
    from trainer.policy_training import save_policy

    config = BackendConfig(data_dir=tmp_path, max_new_tokens=4, arena_share=1.0)
    store = Store(config.db_path).initialize()
    registry = Registry(config.db_path, tmp_path / "models")
    path = tmp_path / "models" / "project-1" / "policy-0001"
    save_policy(Policy.load(policy_config(config), tmp_path / "cache"), path)
    registry.record(1, POLICY, "policy-0001", path, {}, {}, {}, PROMOTED, "test")
    models = ModelServer(config, registry)

    job_arena = _arena(config, store, models, 1)
    assert (job_arena.current, job_arena.opponents) == ("policy-0001", ["policy-base"])
    assert (job_arena.share, job_arena.reward_model) == (1.0, "rm-untrained")
    [pitted] = job_arena.pit([7], ["hi"], [["served says x", "served says y"]], slots=2)
    assert len(pitted) == 2 and "served says x" in pitted and "served says y" not in pitted
    job_arena.record_authors([7], [np.zeros((2, 3))])
    rows = {r["policy_version"] for r in store.arena_responses(1)}
    assert rows == {"policy-0001", "policy-base"}
    loaded = models._other_policy
    job_arena.generate_with("policy-base", ["hello"], 1)
    assert models._other_policy is loaded  # the opponent stays loaded between batches
    none = _arena(dataclasses.replace(config, arena_share=0.0), store, models, 1)
    assert not none.active
