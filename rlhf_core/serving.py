"""Models as a worker process serves them: loaded lazily, once, after the fork; swapped atomically.

Each gunicorn worker (and the job worker) holds one ``ModelServer``. Nothing is loaded until the
first request that needs a model, so nothing touches CUDA before gunicorn forks. When the
registry promotes a new version, the next request loads it under a lock and replaces the
project's entry in one assignment; requests already running keep the model object they started
with and finish on the old version.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_core.artifacts import ArtifactError, verify
from rlhf_core.config import BackendConfig
from rlhf_core.registry import (
    BASE_VERSIONS,
    POLICY,
    PROMOTED,
    REWARD_MODEL,
    ModelVersion,
    Registry,
    served_version_string,
)

logger = logging.getLogger(__name__)

REFUSAL_RETRY_S = 60.0  # a refused checkpoint is checked again after this (a copy may complete)


def release_memory() -> None:
    """Give the memory a large request used back to the OS: glibc keeps freed heap pages in
    the process (a 2,000-task /predict left ~300 MB behind) unless asked to trim them."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reward_model_config(config: BackendConfig) -> Any:
    from rlhf_core.reward_model import RewardModelConfig

    return RewardModelConfig(backbone=config.reward_backbone, num_heads=config.reward_heads)


def embedding_store_path(config: BackendConfig) -> Path:
    """The per-machine embedding cache (rlhf_core.embedding_store): a cache, not the store."""
    return config.data_dir / "cache" / "embeddings.sqlite"


def policy_config(config: BackendConfig, model: str | None = None) -> Any:
    from rlhf_core.policy import PolicyConfig

    return PolicyConfig(
        model=model if model is not None else config.policy_model,
        num_candidates=config.num_candidates,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
    )


def load_version(config: BackendConfig, version: ModelVersion, device: str | None = None) -> Any:
    """The model a registry version names: its checkpoint, once its content is proven to be
    what was recorded when it was written (else :class:`~rlhf_core.artifacts.ArtifactError`),
    or, for the base version (no path), the base model the configuration describes."""
    if version.path is not None:
        verify(version.path, version.artifact_sha256)
    if version.kind == REWARD_MODEL:
        from rlhf_core.reward_model import RewardModel

        if version.path is None:
            return RewardModel.create(reward_model_config(config), device=device)
        return RewardModel.load(version.path, device=device)
    from rlhf_core.policy import Policy

    path = str(version.path) if version.path is not None else None
    return Policy.load(policy_config(config, path), config.data_dir / "cache", device=device)


class ModelServer:
    """The models this process serves, per project and kind.

    A served version whose checkpoint fails its content check is refused: the process keeps
    serving the version it had loaded (or the base model), logs why, calls ``on_refused`` (the
    app counts it in ``/metrics``) and checks the checkpoint again after ``REFUSAL_RETRY_S``.
    :meth:`served_version` names what is actually served, so predictions say so too.
    """

    def __init__(
        self,
        config: BackendConfig,
        registry: Registry,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self._lock = threading.Lock()
        # kind -> project -> (version, model): the reward model and the policy served
        self._loaded: dict[str, dict[int, tuple[str, Any]]] = {REWARD_MODEL: {}, POLICY: {}}
        self._base: dict[str, Any] = {}  # kind -> the base model, built once
        self._refused: dict[tuple[int, str], tuple[str, float]] = {}  # -> (version, when)
        self._on_refused = on_refused
        self._other_policy: tuple[str, Any] | None = None  # an earlier version (the arena's)
        self._embeddings: Any = None  # rlhf_core.embedding_store.EmbeddingStore, opened lazily

    def embedding_store(self) -> Any:
        """This process's handle on the embedding cache (opened on first use)."""
        if self._embeddings is None:
            from rlhf_core.embedding_store import EmbeddingStore

            with self._lock:
                if self._embeddings is None:
                    self._embeddings = EmbeddingStore(embedding_store_path(self.config))
        return self._embeddings

    @property
    def cache_dir(self) -> Path:
        return self.config.data_dir / "cache"

    def served_version(self, project_id: int) -> str:
        """The versions this process serves: the registry's, but a refused one's stand-in. The
        reward model is loaded first (every caller scores with it), so predictions name the
        stand-in of a refused checkpoint from the first one on."""
        self.reward_model(project_id)
        return served_version_string(
            self._serving(project_id, REWARD_MODEL), self._serving(project_id, POLICY)
        )

    def _serving(self, project_id: int, kind: str) -> str:
        served = self.registry.served(project_id, kind).version
        refused = self._refused.get((project_id, kind))
        if refused is None or refused[0] != served:
            return served
        kept = self._loaded[kind].get(project_id)
        return kept[0] if kept is not None else BASE_VERSIONS[kind]

    def reward_model(self, project_id: int) -> tuple[str, Any]:
        return self._model(project_id, REWARD_MODEL)

    def policy(self, project_id: int) -> tuple[str, Any]:
        return self._model(project_id, POLICY)

    def _model(self, project_id: int, kind: str) -> tuple[str, Any]:
        """(version, model) of ``kind`` for the project: the served version, loaded once and
        swapped in with one assignment; a refused version's stand-in meanwhile."""
        loaded = self._loaded[kind]
        served = self.registry.served(project_id, kind)
        current = loaded.get(project_id)
        if current is not None and current[0] == served.version:
            return current
        if current is not None and self._refusal_stands(project_id, served):
            return current
        with self._lock:
            current = loaded.get(project_id)
            if current is not None and current[0] == served.version:
                return current
            try:
                current = (served.version, self._load(served))
            except ArtifactError as exc:
                current = self._refuse(project_id, served, exc, current)
            else:
                self._refused.pop((project_id, kind), None)
                logger.info("project %s: serving %s", project_id, served.version)
            loaded[project_id] = current  # one assignment: the swap
        return current

    def _refusal_stands(self, project_id: int, served: ModelVersion) -> bool:
        refused = self._refused.get((project_id, served.kind))
        if refused is None or refused[0] != served.version:
            return False
        return time.monotonic() - refused[1] < REFUSAL_RETRY_S

    def _refuse(
        self,
        project_id: int,
        served: ModelVersion,
        error: ArtifactError,
        current: tuple[str, Any] | None,
    ) -> tuple[str, Any]:
        """Keep the version loaded before (or the base model) in place of ``served``."""
        kind = served.kind
        if current is None:
            base = self.registry.get(project_id, kind, BASE_VERSIONS[kind])
            assert base is not None
            current = (base.version, self._load(base))
        self._refused[(project_id, kind)] = (served.version, time.monotonic())
        logger.error(
            "project %s: refused to load %s (%s); serving %s instead until it loads",
            project_id,
            served.version,
            error,
            current[0],
        )
        if self._on_refused is not None:
            self._on_refused(kind)
        return current

    def _load(self, version: ModelVersion) -> Any:
        if not version.is_base:
            return load_version(self.config, version)
        if version.kind not in self._base:
            self._base[version.kind] = load_version(self.config, version)
        return self._base[version.kind]

    def head_rewards(self, project_id: int, items: list[tuple[str, list[str]]]) -> list[np.ndarray]:
        """Per-head rewards (n_i, K) for every item, from one batched backbone pass."""
        _, model = self.reward_model(project_id)
        return model.score_heads(items)

    def score_and_embed(
        self, project_id: int, items: list[tuple[str, list[str]]]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per-head rewards (n_i, K) and response embeddings (n_i, H) for every item; texts
        already in the embedding cache are not encoded again."""
        _, model = self.reward_model(project_id)
        return model.score_and_embed(items, self.embedding_store())

    def posterior(self, project_id: int) -> Any:
        """The served reward model's Laplace posterior (rlhf_core.selection measures against it)."""
        _, model = self.reward_model(project_id)
        return model.posterior()

    def generate(self, project_id: int, prompts: list[str], n: int) -> list[list[str]]:
        _, policy = self.policy(project_id)
        return policy.generate(prompts, n)

    def generate_with(
        self, project_id: int, version: str, prompts: list[str], n: int
    ) -> list[list[str]]:
        """Candidates from a given policy version of the project (the arena's opponents); the
        last one loaded stays loaded, since a pre-annotation batch asks for it again."""
        if version == self.registry.served(project_id, POLICY).version:
            return self.generate(project_id, prompts, n)
        key = f"{project_id}:{version}"
        if self._other_policy is None or self._other_policy[0] != key:
            found = self.registry.get(project_id, POLICY, version)
            if found is None:
                raise LookupError(f"project {project_id} has no policy version {version!r}")
            self._other_policy = (key, self._load(found))
        return self._other_policy[1].generate(prompts, n)

    def arena_opponents(self, project_id: int) -> list[str]:
        """Earlier promoted policy versions (the base policy included), not the served one;
        only those whose checkpoint is still on disk."""
        served = self.registry.served(project_id, POLICY).version
        promoted = [
            v.version
            for v in self.registry.versions(project_id, POLICY)
            if v.status == PROMOTED and v.version != served and v.path and v.path.is_dir()
        ]
        base = BASE_VERSIONS[POLICY]
        return [*promoted, base] if served != base else promoted
