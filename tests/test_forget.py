"""`rlhf-backend forget`: a task's text leaves the store (tables and files), the next training
does not see it, and the command names the exported files that still hold it."""

from __future__ import annotations

import contextlib
import json
import sqlite3

import pytest

from rlhf_cli.main import main
from rlhf_core.config import BackendConfig
from rlhf_core.embedding_store import text_hash
from rlhf_core.registry import REWARD_MODEL
from rlhf_core.serving import embedding_store_path
from rlhf_core.store import JOB_TRAIN
from tests.conftest import TEST_WEBHOOK_SECRET, annotation_event
from tests.test_export import xml
from trainer.export import exports_log
from trainer.forget import exported_files_with_task
from trainer.jobs import registry_for, train_job

SECRET = "my passport number is X1234567"


@pytest.fixture
def app_config(tmp_path, tiny_backbone):
    return BackendConfig(
        data_dir=tmp_path / "data",
        reward_backbone=tiny_backbone,
        reward_heads=4,
        policy_training="off",
        train_every=0,
        webhook_secret=TEST_WEBHOOK_SECRET,
    )


def pairwise(task_id: int, prompt: str, feedback: str = "") -> dict:
    result = [
        {
            "from_name": "comparison",
            "to_name": "comparison",
            "type": "pairwise",
            "value": {"selected": "left"},
        }
    ]
    if feedback:
        result.append(
            {
                "from_name": "feedback_answer2",
                "to_name": "answer2",
                "type": "textarea",
                "value": {"text": [feedback]},
            }
        )
    return annotation_event(
        task_id,
        task_id=task_id,
        task_data={"prompt": prompt, "answer1": f"good {task_id}", "answer2": f"bad {task_id}"},
        result=result,
        label_config=xml("pairwise"),
    )


def cli(config: BackendConfig, *args: str) -> int:
    return main([*args, "--project", "1", "--data-dir", str(config.data_dir)])


def test_forget_removes_the_task_everywhere_and_training_no_longer_sees_it(
    client, client_store, app_config, tmp_path, capsys
):
    for task_id in range(1, 9):
        prompt = SECRET if task_id == 3 else f"question {task_id}"
        # A long text too: it fills overflow pages, which a delete frees without erasing.
        feedback = f"about {SECRET} " * 400 if task_id == 3 else ""
        body = pairwise(task_id, prompt, feedback=feedback)
        assert client.post("/webhook", json=body).status_code == 200
    assert cli(app_config, "export", "--out", str(tmp_path / "export")) == 0
    assert cli(app_config, "export", "--out", str(tmp_path / "with-hf"), "--hf") == 0
    (tmp_path / "with-hf" / "feedback.jsonl").unlink()  # a file the team already deleted
    arena = {"text_hash": "0" * 24, "policy_version": "policy-base", "chars": 6}
    for task_id in (3, 4):
        client_store.replace_arena_responses(1, task_id, [arena])
    capsys.readouterr()

    assert cli(app_config, "forget", "--task", "3") == 0
    report = json.loads(capsys.readouterr().out)

    assert report["annotations"] == [3]
    assert report["texts_erased"] == 3  # the prompt and both responses (what embeddings key on)
    assert report["exported_files_still_holding_it"] == [
        str((tmp_path / "export" / name).resolve())
        for name in ("feedback.jsonl", "kto.jsonl", "preferences.jsonl")
    ] + [
        str((tmp_path / "with-hf" / name).resolve())
        for name in ("hf", "kto.jsonl", "preferences.jsonl")
    ]
    store = client_store
    assert all(r["task"] != 3 for r in store.records(1))
    assert [a.task_id for a in store.annotations(1)] == [1, 2, 4, 5, 6, 7, 8]
    assert [row["task_id"] for row in store.arena_responses(1)] == [4]
    # Not only out of the tables: out of the database files (secure_delete, WAL truncated).
    store.close()
    for path in app_config.data_dir.glob("store.sqlite3*"):
        assert SECRET.encode() not in path.read_bytes(), path.name

    # A late delivery of the forgotten annotation does not bring it back.
    late = pairwise(3, SECRET)
    late["action"] = "ANNOTATION_UPDATED"
    late["annotation"]["updated_at"] = "2027-01-01T00:00:00Z"
    assert client.post("/webhook", json=late).get_json()["status"] == "stale"

    # The next training reads the store without it.
    store.enqueue_training(1, "test")
    job = store.claim_job("test", kinds=(JOB_TRAIN,))
    train_job(app_config, job)
    trained = registry_for(app_config).served(1, REWARD_MODEL)
    assert trained.data_snapshot["annotations"] == [1, 2, 4, 5, 6, 7, 8]


def test_forget_names_the_versions_that_trained_on_the_task(
    client, client_store, app_config, capsys
):
    for task_id in range(1, 5):
        assert client.post("/webhook", json=pairwise(task_id, f"q{task_id}")).status_code == 200
    client_store.enqueue_training(1, "test")
    train_job(app_config, client_store.claim_job("test", kinds=(JOB_TRAIN,)))
    capsys.readouterr()
    assert cli(app_config, "forget", "--task", "2") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions_trained_on_it"] == ["rm-0001"]
    assert report["exported_files_still_holding_it"] == []
    # The training cached the embeddings of every (prompt, response); the task's are gone.
    assert report["embeddings_dropped"] == 2
    with contextlib.closing(sqlite3.connect(embedding_store_path(app_config))) as cache:
        cached = [
            cache.execute(
                "SELECT COUNT(*) FROM embeddings WHERE prompt_hash = ?", (text_hash(q),)
            ).fetchone()[0]
            for q in ("q1", "q2", "q3", "q4")
        ]
    assert cached == [2, 0, 2, 2]


def test_forgetting_an_unknown_project_is_refused(app_config, capsys):
    assert (
        main(["forget", "--project", "4", "--task", "1", "--data-dir", str(app_config.data_dir)])
        == 2
    )
    assert "project 4 is unknown" in capsys.readouterr().err


def test_exports_are_logged_beside_the_checkpoints_and_an_older_log_is_still_read(tmp_path):
    config = BackendConfig(data_dir=tmp_path / "data", artifact_dir=str(tmp_path / "shared"))
    registry = registry_for(config)
    assert exports_log(registry, 1) == tmp_path / "shared" / "exports" / "project-1.jsonl"
    older = tmp_path / "older-export.jsonl"  # logged where exports were logged before
    older.write_text(json.dumps({"task": 3}) + "\n")
    legacy = config.data_dir / "exports" / "project-1.jsonl"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({"files": [str(older)], "tasks": [3]}) + "\n")
    assert exported_files_with_task(config, registry, 1, 3) == [str(older)]
