"""`rlhf-backend export`: the stored annotations of every template kind, in TRL's formats, and a
version as Hugging Face checkpoints that transformers loads alone."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rlhf_cli.main import main
from rlhf_core.artifacts import content_hash
from rlhf_core.config import BackendConfig
from rlhf_core.conversion import preference_pairs
from rlhf_core.registry import POLICY, PROMOTED
from rlhf_core.store import Store
from rlhf_core.tiny import build_tiny_causal_lm
from tests.conftest import annotation_event
from trainer.jobs import registry_for, train_reward_model

CONFIG_DIR = Path(__file__).resolve().parent.parent / "label_configs"


def xml(name: str) -> str:
    return (CONFIG_DIR / f"{name}.xml").read_text(encoding="utf-8")


def item(from_name: str, to_name: str, kind: str, value: dict) -> dict:
    return {"from_name": from_name, "to_name": to_name, "type": kind, "value": value}


PAIR_TASK = {"prompt": "capital of France?", "answer1": "Paris", "answer2": "Lyon"}
RANK_TASK = {
    "prompt": "reverse a string",
    "candidates": [
        {"id": "c1", "title": "1", "body": "text[::-1]"},
        {"id": "c2", "title": "2", "body": "''.join(reversed(text))"},
        {"id": "c3", "title": "3", "body": "text.reverse()"},
    ],
}
RATE_TASK = {"prompt": "a haiku", "answer1": "cold coffee", "answer2": "it works now, yes"}

# (project, label config, task, annotation results): one project per template kind.
PROJECTS = {
    1: (
        "pairwise",
        [
            (11, PAIR_TASK, [item("comparison", "comparison", "pairwise", {"selected": "left"})]),
            (
                12,
                {"prompt": "2+2?", "answer1": "4", "answer2": "5"},
                [
                    item("comparison", "comparison", "pairwise", {"selected": "left"}),
                    item("tie", "prompt", "choices", {"choices": ["Tie / equally good"]}),
                    item("feedback_answer2", "answer2", "textarea", {"text": ["wrong sum"]}),
                ],
            ),
        ],
    ),
    2: (
        "ranking",
        [
            (
                21,
                RANK_TASK,
                [
                    item(
                        "rank",
                        "candidates",
                        "ranker",
                        {"ranker": {"best": ["c1"], "good": ["c2"], "weak": ["c3"]}},
                    ),
                    item("notes", "prompt", "textarea", {"text": ["mention slicing"]}),
                ],
            )
        ],
    ),
    3: (
        "rating",
        [
            (
                31,
                RATE_TASK,
                [
                    item("rating_answer1", "answer1", "rating", {"rating": 5}),
                    item("rating_answer2", "answer2", "rating", {"rating": 2}),
                ],
            ),
            (
                32,
                {"prompt": "hello", "answer1": "hi", "answer2": "hey"},
                [
                    item("rating_answer1", "answer1", "rating", {"rating": 4}),
                    item("rating_answer2", "answer2", "rating", {"rating": 4}),
                ],
            ),
        ],
    ),
}


def deliver(client, project: int, template: str, tasks: list, annotator: int = 3) -> None:
    """Every annotation through the real webhook intake (POST /webhook)."""
    for task_id, data, result in tasks:
        body = annotation_event(
            task_id * 10 + annotator,
            project_id=project,
            task_id=task_id,
            task_data=data,
            result=result,
            completed_by=annotator,
            label_config=xml(template),
        )
        response = client.post("/webhook", json=body)
        assert response.status_code == 200, response.get_json()


@pytest.fixture
def populated(client, client_store, app_config):
    for project, (template, tasks) in PROJECTS.items():
        deliver(client, project, template, tasks)
    return client, client_store, app_config


def export(config: BackendConfig, project: int, out: Path, *extra: str) -> None:
    argv = ["export", "--project", str(project), "--out", str(out)]
    assert main([*argv, "--data-dir", str(config.data_dir), *extra]) == 0


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("project", sorted(PROJECTS))
def test_one_trl_preference_line_per_stored_pair(populated, tmp_path, project):
    _, store, config = populated
    out = tmp_path / "out"
    export(config, project, out)

    lines = read_jsonl(out / "preferences.jsonl")
    # What a training job reads: the stored pairs and the pairs each stored ranking implies.
    stored = preference_pairs(
        store.records(project, "preference"), store.records(project, "ranking")
    )
    assert len(lines) == len(stored) > 0
    for line, record in zip(lines, stored):
        assert (line["prompt"], line["chosen"], line["rejected"], line["tie"]) == (
            record["prompt"],
            record["chosen"],
            record["rejected"],
            record["tie"],
        )
        assert (line["task"], line["annotation"], line["annotator"]) == (
            record["task"],
            record["annotation"],
            3,
        )
        assert line["split"] in ("train", "heldout")


def test_ties_margins_feedback_and_kto_rows(populated, tmp_path):
    _, _, config = populated
    for project in PROJECTS:
        export(config, project, tmp_path / str(project))

    pairwise = read_jsonl(tmp_path / "1" / "preferences.jsonl")
    assert [(p["chosen"], p["tie"]) for p in pairwise] == [("Paris", False), ("4", True)]
    assert all(p["margin"] is None for p in pairwise)  # Pairwise gives no strength
    ranking = read_jsonl(tmp_path / "2" / "preferences.jsonl")
    assert {(p["chosen"], p["rejected"]) for p in ranking} == {
        ("text[::-1]", "''.join(reversed(text))"),
        ("text[::-1]", "text.reverse()"),
        ("''.join(reversed(text))", "text.reverse()"),
    }
    rating = read_jsonl(tmp_path / "3" / "preferences.jsonl")
    assert [(p["chosen"], p["tie"], p["margin"]) for p in rating] == [
        ("cold coffee", False, 3.0),
        ("hi", True, 0.0),
    ]

    feedback = read_jsonl(tmp_path / "1" / "feedback.jsonl")
    assert feedback == [
        {
            "prompt": "2+2?",
            "response": "5",
            "feedback": "wrong sum",
            "control": "feedback_answer2",
            "project": 1,
            "task": 12,
            "annotation": 123,
            "annotator": 3,
        }
    ]
    notes = read_jsonl(tmp_path / "2" / "feedback.jsonl")
    assert [(f["response"], f["feedback"]) for f in notes] == [(None, "mention slicing")]
    kto = read_jsonl(tmp_path / "1" / "kto.jsonl")  # the tie gives no unpaired rows
    assert [(k["prompt"], k["completion"], k["label"]) for k in kto] == [
        ("capital of France?", "Paris", True),
        ("capital of France?", "Lyon", False),
    ]
    card = (tmp_path / "3" / "README.md").read_text()
    assert "Preference pairs (`preferences.jsonl`, TRL prompt/chosen/rejected): 2" in card
    assert "| rating | 2 |" in card


def test_rerunning_the_export_writes_identical_files(populated, tmp_path):
    _, _, config = populated
    export(config, 1, tmp_path / "a", "--hf")
    export(config, 1, tmp_path / "b", "--hf")

    def digests(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    first = digests(tmp_path / "a")
    assert first == digests(tmp_path / "b")
    assert {"preferences.jsonl", "feedback.jsonl", "kto.jsonl", "README.md"} <= set(first)


def test_hf_dataset_round_trips(populated, tmp_path):
    import datasets

    _, store, config = populated
    export(config, 1, tmp_path / "out", "--hf")
    loaded = datasets.load_from_disk(str(tmp_path / "out" / "hf"))
    assert loaded["preferences"]["chosen"] == [r["chosen"] for r in store.records(1, "preference")]
    assert loaded["feedback"]["feedback"] == ["wrong sum"]
    assert loaded["kto"]["label"] == [True, False]
    export(config, 1, tmp_path / "out")  # without --hf: no stale dataset stays behind
    assert not (tmp_path / "out" / "hf").exists()


def test_deleted_annotations_are_not_exported(populated, tmp_path, captured):
    client, _, config = populated
    body = captured("07_webhook_annotations_deleted")
    body["project"] = {"id": 1}
    body["annotations"] = [{"id": 123}]  # task 12's annotation (annotator 3)
    assert client.post("/webhook", json=body).status_code == 200
    export(config, 1, tmp_path / "out")
    lines = read_jsonl(tmp_path / "out" / "preferences.jsonl")
    assert [line["task"] for line in lines] == [11]
    assert read_jsonl(tmp_path / "out" / "feedback.jsonl") == []


def test_inter_annotator_agreement_in_the_card(populated, tmp_path):
    client, _, config = populated
    flipped = [
        (11, PAIR_TASK, [item("comparison", "comparison", "pairwise", {"selected": "right"})])
    ]
    deliver(client, 1, "pairwise", PROJECTS[1][1][:1], annotator=4)  # agrees with annotator 3
    deliver(client, 1, "pairwise", flipped, annotator=5)  # disagrees with both
    export(config, 1, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert (
        "Between annotators: 0.333 of pairs of verdicts agree, Krippendorff's α 0.000, on 1 "
        in card
    )


def test_pairs_carry_the_versions_that_wrote_and_scored_the_task(populated, tmp_path):
    from rlhf_core.arena import text_hash

    _, store, config = populated
    store.note_task_models(1, 11, generated_by="rm-0001.policy-0001")
    store.note_task_models(1, 11, scored_by="rm-0002.policy-0001")
    export(config, 1, tmp_path / "out")
    first, second = read_jsonl(tmp_path / "out" / "preferences.jsonl")
    versions = ("generated_by", "scored_by", "chosen_by", "rejected_by")
    assert [first[k] for k in versions] == [
        "rm-0001.policy-0001",
        "rm-0002.policy-0001",
        "policy-0001",
        "policy-0001",
    ]
    assert [second[k] for k in versions] == [None, None, None, None]

    # An arena task: each response's author is recorded.
    arena = [
        {"text_hash": text_hash("Paris"), "policy_version": "policy-base", "chars": 5},
        {"text_hash": text_hash("Lyon"), "policy_version": "policy-0001", "chars": 4},
    ]
    store.replace_arena_responses(1, 11, arena)
    export(config, 1, tmp_path / "arena")
    first = read_jsonl(tmp_path / "arena" / "preferences.jsonl")[0]
    assert (first["chosen"], first["chosen_by"], first["rejected_by"]) == (
        "Paris",
        "policy-base",
        "policy-0001",
    )


def test_unknown_project_is_refused(tmp_path, capsys):
    code = main(
        ["export", "--project", "9", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path)]
    )
    assert code == 2
    assert "project 9 is unknown" in capsys.readouterr().err


# -- a version as Hugging Face checkpoints ---------------------------------------------------


def test_exported_version_loads_with_transformers_alone(tmp_path, tiny_backbone, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = BackendConfig(
        data_dir=tmp_path / "data", reward_backbone=tiny_backbone, reward_heads=3
    )
    store = Store(config.db_path).initialize()
    store.upsert_project(1, xml("pairwise"))
    registry = registry_for(config)
    records = [
        {
            "project": 1,
            "task": i,
            "annotation": i,
            "annotator": 1,
            "prompt": f"q{i}",
            "chosen": f"thanks {i}",
            "rejected": f"no {i}",
            "tie": False,
        }
        for i in range(12)
    ]
    rm = train_reward_model(config, registry, 1, records)
    # A policy version: a tiny LM with other weights than the base one (seed 3, base is seed 0).
    version, path = registry.new_version_dir(1, POLICY)
    build_tiny_causal_lm(path, seed=3)
    registry.record(
        1,
        POLICY,
        version,
        path,
        {"base": "tiny"},
        {"records": 12, "annotations": []},
        {"gate": {"win_rate": 0.6, "prompts": 4}},
        PROMOTED,
        "won the gate",
    )

    out = tmp_path / "export"
    code = main(
        [
            "export",
            "--project",
            "1",
            "--version",
            f"{rm['version']}.{version}",
            "--out",
            str(out),
            "--data-dir",
            str(config.data_dir),
        ]
    )
    assert code == 0
    # Written whole under a scratch name and renamed into place; its hash says what was written.
    assert json.loads(capsys.readouterr().out)["sha256"] == content_hash(out)
    assert [p.name for p in out.parent.iterdir() if ".tmp-" in p.name] == []

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    trained = AutoModelForCausalLM.from_pretrained(path)
    for (name, a), b in zip(model.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), name  # the version's weights, not the base model's
    ids = tokenizer("Explain the sky", return_tensors="pt").input_ids
    generated = model.generate(
        ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    assert generated.shape[1] == ids.shape[1] + 5

    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "won the gate" in card
    assert '"win_rate": 0.6' in card and "12 records" in card

    # The reward model: the short loader gives the backend's own rewards.
    spec = importlib.util.spec_from_file_location(
        "loader", out / "reward_model" / "load_reward_model.py"
    )
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    exported = loader.load(out / "reward_model")
    from rlhf_core.reward_model import RewardModel

    ours = RewardModel.load(registry.get(1, "rm", rm["version"]).path)
    responses = ["thanks a lot", "no way", "a longer answer with many words in it"]
    expected = ours.score_heads([("q1", responses)])[0]
    assert torch.allclose(
        exported.head_rewards("q1", responses).double(), torch.tensor(expected), atol=1e-4
    )

    # An export never lands on top of other files.
    again = ["export", "--project", "1", "--version", version, "--out", str(out)]
    assert main([*again, "--data-dir", str(config.data_dir)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_exporting_an_unknown_version_names_the_known_ones(populated, tmp_path, capsys):
    _, _, config = populated
    code = main(
        [
            "export",
            "--project",
            "1",
            "--version",
            "rm-0007",
            "--out",
            str(tmp_path / "o"),
            "--data-dir",
            str(config.data_dir),
        ]
    )
    assert code == 2
    assert "no rm-0007; versions of this kind: rm-untrained" in capsys.readouterr().err


GRADED_TASKS = [
    (
        41,
        PAIR_TASK,
        [item("preference", "prompt", "choices", {"choices": ["A is slightly better"]})],
    ),
    (
        42,
        {"prompt": "2+2?", "answer1": "5", "answer2": "22"},
        [item("preference", "prompt", "choices", {"choices": ["Both are bad"]})],
    ),
]
THUMBS_TASKS = [
    (
        51,
        {"prompt": "hi", "response": "hello"},
        [item("verdict", "response", "choices", {"choices": ["Thumbs up: good response"]})],
    ),
    (
        52,
        {"prompt": "hi", "response": "go away"},
        [item("verdict", "response", "choices", {"choices": ["Thumbs down: bad response"]})],
    ),
]


def test_graded_margins_both_bad_and_thumbs_are_exported_and_counted(
    client, client_store, app_config, tmp_path
):
    from rlhf_core.summary import label_counts

    deliver(client, 4, "graded", GRADED_TASKS)
    deliver(client, 5, "thumbs", THUMBS_TASKS)
    export(app_config, 4, tmp_path / "4")
    export(app_config, 5, tmp_path / "5")

    [pair] = read_jsonl(tmp_path / "4" / "preferences.jsonl")  # "both bad" is not a pair
    assert (pair["chosen"], pair["rejected"], pair["margin"]) == ("Paris", "Lyon", 1 / 3)
    kto = read_jsonl(tmp_path / "4" / "kto.jsonl")
    assert [(k["completion"], k["label"], k["source"]) for k in kto] == [
        ("Paris", True, "choices"),
        ("Lyon", False, "choices"),
        ("5", False, "both_bad"),
        ("22", False, "both_bad"),
    ]
    card = (tmp_path / "4" / "README.md").read_text()
    assert '1 "both bad" answers' in card and "Graded pairs (with a strength): 1" in card
    thumbs = read_jsonl(tmp_path / "5" / "kto.jsonl")
    assert [(k["completion"], k["label"], k["source"]) for k in thumbs] == [
        ("hello", True, "thumbs"),
        ("go away", False, "thumbs"),
    ]
    graded = label_counts(
        client_store.records(4, "preference"), client_store.records(4, "unpaired")
    )
    assert graded == {
        "pairs": 1,
        "graded_pairs": 1,
        "ties": 0,
        "both_bad": 1,
        "desirable": 0,
        "undesirable": 0,
    }
    assert label_counts([], client_store.records(5, "unpaired"))["undesirable"] == 1
