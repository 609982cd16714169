import dataclasses
from pathlib import Path

import pytest

from rlhf_core.config import BackendConfig, ConfigError, markdown_table

README = Path(__file__).parents[1] / "README.md"


def test_readme_configuration_table_matches_the_dataclass():
    readme = README.read_text()
    start = readme.index("<!-- config-table:start -->") + len("<!-- config-table:start -->")
    end = readme.index("<!-- config-table:end -->")
    assert readme[start:end].strip() == markdown_table()


# Every variable, with a valid value that is not its default, and the value it must become.
EVERY_VARIABLE = {
    "RLHF_DATA_DIR": ("/tmp/x", Path("/tmp/x")),
    "RLHF_DATABASE_URL": ("postgresql://rlhf@db:5432/rlhf", "postgresql://rlhf@db:5432/rlhf"),
    "RLHF_HOST": ("127.0.0.1", "127.0.0.1"),
    "RLHF_PORT": ("9999", 9999),
    "RLHF_WORKERS": ("3", 3),
    "RLHF_THREADS": ("8", 8),
    "BASIC_AUTH_USER": ("u", "u"),
    "BASIC_AUTH_PASS": ("p", "p"),
    "RLHF_MAX_BODY_BYTES": ("1024", 1024),
    "RLHF_PUBLIC_URL": ("http://backend:9090", "http://backend:9090"),
    "LABEL_STUDIO_URL": ("http://ls:8080", "http://ls:8080"),
    "LABEL_STUDIO_API_KEY": ("key", "key"),
    "RLHF_TRAIN_EVERY": ("0", 0),
    "RLHF_PROMOTION_TOLERANCE": ("0.1", 0.1),
    "RLHF_MIN_HELDOUT_PAIRS": ("50", 50),
    "RLHF_RECONCILE_EVERY_S": ("60", 60.0),
    "RLHF_STORE_SYNC": ("full", "full"),
    "RLHF_REDIS_URL": ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    "RLHF_JOB_MAX_ATTEMPTS": ("5", 5),
    "RLHF_JOB_STALE_AFTER_S": ("12.5", 12.5),
    "RLHF_EMBEDDED_WORKER": ("0", 0),
    "RLHF_REWARD_BACKBONE": ("/models/enc", "/models/enc"),
    "RLHF_REWARD_HEADS": ("3", 3),
    "RLHF_POLICY_MODEL": ("/models/lm", "/models/lm"),
    "RLHF_NUM_CANDIDATES": ("6", 6),
    "RLHF_MAX_NEW_TOKENS": ("32", 32),
    "RLHF_TEMPERATURE": ("0.7", 0.7),
    "RLHF_TOP_P": ("0.5", 0.5),
    "RLHF_POLICY_TRAINING": ("grpo", "grpo"),
    "RLHF_UNCERTAINTY_PENALTY": ("2.5", 2.5),
    "RLHF_STRATEGY": ("bald", "bald"),
    "RLHF_ARENA_SHARE": ("0.5", 0.5),
    "RLHF_PRESELECT": ("1", 1),
    "RLHF_KEEP_VERSIONS": ("2", 2),
    "RLHF_MAX_LABEL_CONFIG_BYTES": ("4096", 4096),
    "RLHF_MAX_RANKING_PAIRS": ("20", 20),
    "RLHF_PREDICT_MAX_TASKS": ("100", 100),
    "RLHF_PREDICT_TIME_BUDGET_S": ("30", 30.0),
    "RLHF_SECRET_KEY": ("k" * 32, "k" * 32),
    "RLHF_WEBHOOK_SECRET": ("w" * 16, "w" * 16),
    "RLHF_ANNOTATOR_RELIABILITY": ("0", 0),
    "RLHF_RELOOK_CONTRADICTION": ("0.99", 0.99),
    "RLHF_METRICS_MAX_ANNOTATORS": ("10", 10),
    "LOG_LEVEL": ("DEBUG", "DEBUG"),
    "RLHF_ARTIFACT_DIR": ("/mnt/shared/artifacts", "/mnt/shared/artifacts"),
}


def test_from_env_reads_every_variable_with_its_type():
    fields = {f.metadata["env"]: f for f in dataclasses.fields(BackendConfig)}
    assert set(EVERY_VARIABLE) == set(fields), "give each new variable a value here"
    config = BackendConfig.from_env({env: raw for env, (raw, _) in EVERY_VARIABLE.items()})
    for env, (_, expected) in EVERY_VARIABLE.items():
        value = getattr(config, fields[env].name)
        assert value == expected and type(value) is type(expected), env
        assert value != fields[env].default, f"{env}: pick a value that is not the default"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RLHF_PORT": "http"}, "RLHF_PORT"),
        ({"RLHF_WORKERS": "0"}, "RLHF_WORKERS"),
        ({"BASIC_AUTH_USER": "only-user"}, "BASIC_AUTH_PASS"),
        ({"RLHF_TRAIN_EVERY": "-1"}, "RLHF_TRAIN_EVERY"),
        ({"RLHF_PRESELECT": "2"}, "RLHF_PRESELECT"),
        ({"RLHF_MIN_HELDOUT_PAIRS": "0"}, "RLHF_MIN_HELDOUT_PAIRS"),
        ({"RLHF_RECONCILE_EVERY_S": "-1"}, "RLHF_RECONCILE_EVERY_S"),
        ({"RLHF_JOB_STALE_AFTER_S": "0"}, "RLHF_JOB_STALE_AFTER_S"),
        ({"RLHF_DATABASE_URL": "mysql://db/rlhf"}, "RLHF_DATABASE_URL"),
        ({"RLHF_RELOOK_CONTRADICTION": "0.3"}, "RLHF_RELOOK_CONTRADICTION"),
        ({"RLHF_ANNOTATOR_RELIABILITY": "2"}, "RLHF_ANNOTATOR_RELIABILITY"),
    ],
)
def test_bad_values_are_rejected_with_the_variable_named(env, message):
    with pytest.raises(ConfigError, match=message):
        BackendConfig.from_env(env)


def test_artifacts_live_under_the_data_dir_unless_rlhf_artifact_dir_names_a_volume(tmp_path):
    assert BackendConfig(data_dir=tmp_path).artifacts_path == tmp_path / "models"
    shared = tmp_path / "shared"
    config = BackendConfig.from_env(
        {"RLHF_DATA_DIR": str(tmp_path), "RLHF_ARTIFACT_DIR": str(shared)}
    )
    assert config.artifacts_path == shared
