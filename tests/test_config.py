from pathlib import Path

import pytest

from ml_backend.config import BackendConfig, ConfigError, markdown_table

README = Path(__file__).parents[1] / "README.md"


def test_readme_configuration_table_matches_the_dataclass():
    readme = README.read_text()
    start = readme.index("<!-- config-table:start -->") + len("<!-- config-table:start -->")
    end = readme.index("<!-- config-table:end -->")
    assert readme[start:end].strip() == markdown_table()


def test_from_env_reads_every_variable_with_types():
    config = BackendConfig.from_env(
        {
            "RLHF_DATA_DIR": "/tmp/x",
            "RLHF_PORT": "9999",
            "BASIC_AUTH_USER": "u",
            "BASIC_AUTH_PASS": "p",
            "RLHF_TRAIN_EVERY": "0",
        }
    )
    assert config.data_dir == Path("/tmp/x")
    assert config.port == 9999
    assert config.auth_enabled
    assert config.train_every == 0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RLHF_PORT": "http"}, "RLHF_PORT"),
        ({"RLHF_WORKERS": "0"}, "RLHF_WORKERS"),
        ({"BASIC_AUTH_USER": "only-user"}, "BASIC_AUTH_PASS"),
        ({"RLHF_TRAIN_EVERY": "-1"}, "RLHF_TRAIN_EVERY"),
    ],
)
def test_bad_values_are_rejected_with_the_variable_named(env, message):
    with pytest.raises(ConfigError, match=message):
        BackendConfig.from_env(env)
