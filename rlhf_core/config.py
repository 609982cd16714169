"""The backend's configuration: one dataclass, read from the environment in one place.

Every field names its environment variable and carries a help string; the README's
configuration table is generated from these fields (``rlhf-backend config --markdown``) and a
test keeps the two in sync.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIN_SECRET_CHARS = 32
DATABASE_SCHEMES = ("sqlite:///", "postgresql://", "postgres://", "postgresql+psycopg://")
STRATEGY_NAMES = (
    "default",
    "random",
    "entropy",
    "margin",
    "variance",
    "bald",
    "batch",
    "eig",
    "adaptive",
    "mixed",
)


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message says how to fix it."""


def _setting(default: Any, env: str, help: str) -> Any:
    return field(default=default, metadata={"env": env, "help": help})


@dataclass(frozen=True)
class BackendConfig:
    data_dir: Path = _setting(
        Path("data"),
        "RLHF_DATA_DIR",
        "This machine's directory: the SQLite store (unless RLHF_DATABASE_URL names another "
        "database), model checkpoints (unless RLHF_ARTIFACT_DIR names another directory), caches "
        "and metrics files.",
    )
    artifact_dir: str = _setting(
        "",
        "RLHF_ARTIFACT_DIR",
        "Directory of the model checkpoints (each written under a scratch name and renamed into "
        "place; its content hash is checked on load). With several machines, a volume they all "
        "mount (each at a path of its own: the registry stores paths relative to it). Unset: "
        "RLHF_DATA_DIR/models.",
    )
    host: str = _setting("0.0.0.0", "RLHF_HOST", "Address `rlhf-backend serve` binds to.")
    port: int = _setting(9090, "RLHF_PORT", "Port `rlhf-backend serve` listens on.")
    workers: int = _setting(2, "RLHF_WORKERS", "Gunicorn worker processes serving HTTP.")
    threads: int = _setting(4, "RLHF_THREADS", "Threads per gunicorn worker.")
    basic_auth_user: str = _setting(
        "",
        "BASIC_AUTH_USER",
        "Require HTTP basic auth with this user on every endpoint except /health.",
    )
    basic_auth_pass: str = _setting("", "BASIC_AUTH_PASS", "Password for BASIC_AUTH_USER.")
    max_body_bytes: int = _setting(
        32 * 1024 * 1024,
        "RLHF_MAX_BODY_BYTES",
        "Largest request body accepted; larger requests get 413.",
    )
    max_label_config_bytes: int = _setting(
        1024 * 1024,
        "RLHF_MAX_LABEL_CONFIG_BYTES",
        "Largest label config (UTF-8 bytes) /setup, /predict and webhooks accept; larger ones "
        "get 413 and are not stored.",
    )
    max_ranking_pairs: int = _setting(
        1000,
        "RLHF_MAX_RANKING_PAIRS",
        "Preference pairs a training job derives from one ranking (a Ranker answer is stored "
        "once as an ordering; a ranking implying more pairs gives a fixed random sample of this "
        "many).",
    )
    predict_max_tasks: int = _setting(
        20000,
        "RLHF_PREDICT_MAX_TASKS",
        "Most tasks one /predict request may carry; more get 413 (Label Studio sends its whole "
        "Retrieve Predictions selection in one request).",
    )
    predict_time_budget_s: float = _setting(
        60.0,
        "RLHF_PREDICT_TIME_BUDGET_S",
        "Seconds /predict spends scoring (Label Studio gives up after 100 s); tasks left when it "
        "runs out are handed to a queued pre-annotation job that uploads their predictions "
        "through Label Studio's API.",
    )
    public_url: str = _setting(
        "",
        "RLHF_PUBLIC_URL",
        "URL at which Label Studio reaches this backend (for the project webhook). Default: the "
        "URL Label Studio holds for this backend among the project's ML backends.",
    )
    label_studio_url: str = _setting(
        "",
        "LABEL_STUDIO_URL",
        "Label Studio URL; overrides the `hostname` Label Studio sends in /setup.",
    )
    label_studio_api_key: str = _setting(
        "",
        "LABEL_STUDIO_API_KEY",
        "Label Studio API token; overrides the `access_token` Label Studio sends in /setup (which "
        "is then not stored). Sent only to LABEL_STUDIO_URL, which it requires.",
    )
    secret_key: str = _setting(
        "",
        "RLHF_SECRET_KEY",
        "Key (32+ characters) that encrypts stored Label Studio tokens and webhook secrets. "
        "Unset: a random key generated once in RLHF_DATA_DIR/secret.key (mode 0600).",
    )
    webhook_secret: str = _setting(
        "",
        "RLHF_WEBHOOK_SECRET",
        "Webhook secret accepted for every project in the X-RLHF-Webhook-Secret header (for "
        "webhooks made by hand). Unset: only each project's own secret, which the backend puts on "
        "the webhooks it creates or fixes.",
    )
    train_every: int = _setting(
        50,
        "RLHF_TRAIN_EVERY",
        "Queue a training job after this many new usable annotations in a project (0: never).",
    )
    promotion_tolerance: float = _setting(
        0.02,
        "RLHF_PROMOTION_TOLERANCE",
        "The reward-model gate: a retrained version is promoted unless its held-out accuracy is "
        "below the serving version's by more than this (1: always promote).",
    )
    keep_versions: int = _setting(
        5,
        "RLHF_KEEP_VERSIONS",
        "After each promotion, delete the checkpoints of versions that are neither served, "
        "pinned, nor among the newest N of their kind (registry rows are kept; 0: keep all).",
    )
    min_heldout_pairs: int = _setting(
        30,
        "RLHF_MIN_HELDOUT_PAIRS",
        "Decisive held-out pairs a project needs before the reward-model gate compares on them; "
        "below that it compares on every labelled pair (in-sample) and its reason says so.",
    )
    reconcile_every_s: float = _setting(
        3600.0,
        "RLHF_RECONCILE_EVERY_S",
        "Workers read every connected project's annotations from Label Studio this often "
        "(`rlhf-backend reconcile`), storing what webhooks missed (0: only after /setup).",
    )
    database_url: str = _setting(
        "",
        "RLHF_DATABASE_URL",
        "Database of the store, job queue and model registry: sqlite:///PATH (embedded, one "
        "machine) or postgresql://USER[:PASSWORD]@HOST:PORT/DB (a plain libpq URL; several "
        "machines). Unset: sqlite:///RLHF_DATA_DIR/store.sqlite3. The schema is migrated at "
        "start (`rlhf-backend migrate`).",
    )
    store_sync: str = _setting(
        "normal",
        "RLHF_STORE_SYNC",
        "SQLite synchronous mode of the store: normal (an acknowledged webhook survives kill -9 "
        "of the server) or full (also an OS crash or power loss; fsync per webhook, slower).",
    )
    redis_url: str = _setting(
        "",
        "RLHF_REDIS_URL",
        "Redis URL (e.g. redis://host:6379/0): queued jobs also go to RQ, so `rlhf-backend "
        "worker` processes on other machines (on the same database) take them at once. Unset: "
        "workers poll the store.",
    )
    job_max_attempts: int = _setting(
        3, "RLHF_JOB_MAX_ATTEMPTS", "Runs of a failing job before it is marked failed."
    )
    job_stale_after_s: float = _setting(
        60.0,
        "RLHF_JOB_STALE_AFTER_S",
        "A running job whose worker sent no heartbeat for this long is picked up again (workers "
        "beat every quarter of this, at most every 5 s; on the database's clock).",
    )
    embedded_worker: int = _setting(
        1, "RLHF_EMBEDDED_WORKER", "`serve` also runs one job worker process (0: no, use `worker`)."
    )
    reward_backbone: str = _setting(
        "",
        "RLHF_REWARD_BACKBONE",
        "Reward-model encoder: HF model id or local path (default: offline all-MiniLM-L6-v2).",
    )
    reward_heads: int = _setting(
        8, "RLHF_REWARD_HEADS", "Reward heads in the ensemble (epistemic uncertainty)."
    )
    policy_model: str = _setting(
        "",
        "RLHF_POLICY_MODEL",
        "Policy causal LM: HF model id or local path (default: a tiny offline model).",
    )
    num_candidates: int = _setting(
        4, "RLHF_NUM_CANDIDATES", "Candidates generated per prompt-only task."
    )
    max_new_tokens: int = _setting(64, "RLHF_MAX_NEW_TOKENS", "Longest generated response.")
    temperature: float = _setting(1.0, "RLHF_TEMPERATURE", "Sampling temperature.")
    top_p: float = _setting(0.95, "RLHF_TOP_P", "Nucleus sampling mass.")
    policy_training: str = _setting(
        "dpo",
        "RLHF_POLICY_TRAINING",
        "Policy training after each reward-model retrain: dpo (DPO on pairs), grpo (on-policy RL "
        "against the reward model), each with ILF on language feedback (TRL), or off.",
    )
    uncertainty_penalty: float = _setting(
        1.0,
        "RLHF_UNCERTAINTY_PENALTY",
        "grpo: reward = reward-model heads' mean - this x their std (resists reward hacking).",
    )
    strategy: str = _setting(
        "default",
        "RLHF_STRATEGY",
        "Acquisition strategy for scores and selection: random, entropy, margin, variance, "
        "bald, batch (margin, near-duplicates spread out), eig (expected information gain "
        "under the reward model's Laplace posterior, greedy batch design), adaptive (eig mixed "
        "with random picks, the share moved by what each batch's labels bought; simulate only "
        "carries the share between batches), mixed (half of every batch eig, half random), or "
        "default (mixed).",
    )
    preselect: int = _setting(
        0,
        "RLHF_PRESELECT",
        "1: predictions pre-select the model's answer (the response it prefers, its ranking, "
        "its stars), which Label Studio fills in when the project's 'Use predictions to "
        "prelabel tasks' is on. 0 (default): predictions carry only their score and model "
        "version, ordering the Data Manager and the labeling queue without suggesting an "
        "answer, so annotators are not anchored on the model's own choice.",
    )
    arena_share: float = _setting(
        0.1,
        "RLHF_ARENA_SHARE",
        "Share of prompt-only tasks on which pre-annotation pits the served policy against an "
        "earlier promoted version (one response each) for the dashboard's human-judged "
        "leaderboard (0: never).",
    )
    annotator_reliability: int = _setting(
        1,
        "RLHF_ANNOTATOR_RELIABILITY",
        "Weigh each annotator's labels in reward training by their reliability, estimated from "
        "gold, overlaps and agreement with a model fitted without them (a flagged A/B swapper's "
        "labels are turned round); 0: every label counts the same.",
    )
    relook_contradiction: float = _setting(
        0.9,
        "RLHF_RELOOK_CONTRADICTION",
        "A task whose single label the reward model contradicts with at least this probability "
        "(or whose annotators disagree) gets score 0 in /predict, so Label Studio shows it first "
        "for another annotation (1: only disagreement).",
    )
    metrics_max_annotators: int = _setting(
        50,
        "RLHF_METRICS_MAX_ANNOTATORS",
        "Annotators per project /metrics exports a reliability for (flagged ones first, then by "
        "labels): bounds the label cardinality.",
    )
    log_level: str = _setting("INFO", "LOG_LEVEL", "Python logging level.")

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ConfigError("Set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither.")
        for name in (
            "port",
            "workers",
            "threads",
            "max_body_bytes",
            "job_max_attempts",
            "reward_heads",
            "num_candidates",
            "max_new_tokens",
            "max_label_config_bytes",
            "max_ranking_pairs",
            "predict_max_tasks",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_env_name(name)} must be a positive integer.")
        if self.job_stale_after_s <= 0:
            raise ConfigError("RLHF_JOB_STALE_AFTER_S must be a positive number of seconds.")
        if self.predict_time_budget_s <= 0:
            raise ConfigError("RLHF_PREDICT_TIME_BUDGET_S must be positive.")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("RLHF_TOP_P must be in (0, 1].")
        if self.temperature <= 0.0:
            raise ConfigError("RLHF_TEMPERATURE must be positive.")
        if self.strategy not in STRATEGY_NAMES:
            raise ConfigError(f"RLHF_STRATEGY must be one of {', '.join(STRATEGY_NAMES)}.")
        if self.database_url and not self.database_url.startswith(DATABASE_SCHEMES):
            raise ConfigError(
                "RLHF_DATABASE_URL must be sqlite:///PATH or postgresql://USER@HOST:PORT/DB."
            )
        if self.store_sync not in ("normal", "full"):
            raise ConfigError("RLHF_STORE_SYNC must be normal or full.")
        if self.policy_training not in ("dpo", "grpo", "off"):
            raise ConfigError("RLHF_POLICY_TRAINING must be dpo, grpo or off.")
        if self.uncertainty_penalty < 0:
            raise ConfigError("RLHF_UNCERTAINTY_PENALTY must be >= 0.")
        if self.train_every < 0:
            raise ConfigError("RLHF_TRAIN_EVERY must be 0 (never) or a positive integer.")
        if self.label_studio_api_key and not self.label_studio_url:
            raise ConfigError(
                "LABEL_STUDIO_API_KEY is sent only to LABEL_STUDIO_URL: set LABEL_STUDIO_URL too."
            )
        if self.secret_key and len(self.secret_key) < MIN_SECRET_CHARS:
            raise ConfigError(
                f"RLHF_SECRET_KEY must be at least {MIN_SECRET_CHARS} characters; generate one "
                "with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        if self.webhook_secret and len(self.webhook_secret) < MIN_SECRET_CHARS // 2:
            raise ConfigError(
                f"RLHF_WEBHOOK_SECRET must be at least {MIN_SECRET_CHARS // 2} characters."
            )
        if self.keep_versions < 0:
            raise ConfigError("RLHF_KEEP_VERSIONS must be 0 (keep all) or a positive integer.")
        if self.min_heldout_pairs < 1:
            raise ConfigError("RLHF_MIN_HELDOUT_PAIRS must be a positive integer.")
        if self.reconcile_every_s < 0:
            raise ConfigError("RLHF_RECONCILE_EVERY_S must be 0 (off) or a number of seconds.")
        if not 0.0 <= self.promotion_tolerance <= 1.0:
            raise ConfigError("RLHF_PROMOTION_TOLERANCE must be in [0, 1].")
        if self.preselect not in (0, 1):
            raise ConfigError("RLHF_PRESELECT must be 0 (no pre-selected answer) or 1.")
        if not 0.0 <= self.arena_share <= 1.0:
            raise ConfigError("RLHF_ARENA_SHARE must be in [0, 1].")
        if not 0.5 < self.relook_contradiction <= 1.0:
            raise ConfigError("RLHF_RELOOK_CONTRADICTION must be in (0.5, 1].")
        if self.annotator_reliability not in (0, 1):
            raise ConfigError("RLHF_ANNOTATOR_RELIABILITY must be 1 (on) or 0 (off).")
        if self.metrics_max_annotators < 0:
            raise ConfigError("RLHF_METRICS_MAX_ANNOTATORS must be 0 (none) or more.")

    @property
    def auth_enabled(self) -> bool:
        return bool(self.basic_auth_user)

    @property
    def artifacts_path(self) -> Path:
        """Where the model registry's checkpoints live (RLHF_ARTIFACT_DIR)."""
        return Path(self.artifact_dir) if self.artifact_dir else self.data_dir / "models"

    @property
    def db_path(self) -> Path:
        """The default SQLite store in the data directory (RLHF_DATABASE_URL unset)."""
        return self.data_dir / "store.sqlite3"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.db_path}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> BackendConfig:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        values.update(overrides)
        return cls(**values)


def _env_name(field_name: str) -> str:
    return next(
        f.metadata["env"] for f in dataclasses.fields(BackendConfig) if f.name == field_name
    )


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = type(f.default)
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{f.metadata['env']}={raw!r} is not an integer.") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{f.metadata['env']}={raw!r} is not a number.") from None
    if issubclass(kind, Path):
        return Path(raw)
    return raw


def markdown_table() -> str:
    """The README's configuration table, generated from the dataclass."""
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(BackendConfig):
        default = f.default if f.default != "" else "(unset)"
        rows.append(f"| `{f.metadata['env']}` | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows)
