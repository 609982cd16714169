"""Operating a project's versions: pin one (or roll back), unpin, keep disk use in check.

A pin makes an earlier or a rejected version the served one, with the reason recorded in the
registry; Label Studio then follows through the same path a promotion takes
(:func:`trainer.label_studio_sync.after_promotion`: a Label Studio sync in the outbox, tried at
once and retried by the workers until Label Studio shows the served version).

Retention (``RLHF_KEEP_VERSIONS``): after each promotion, the checkpoint directories of versions
that are neither served, pinned, nor among the newest N of their kind are deleted. Their registry
rows stay, so the history (config, data snapshot, metrics, reason) is never lost; only the
weights are.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_core.config import BackendConfig
from rlhf_core.registry import (
    BASE_VERSIONS,
    POLICY,
    REWARD_MODEL,
    ModelVersion,
    Registry,
    directory_bytes,
)
from rlhf_core.store import Store
from trainer.label_studio_sync import after_promotion

logger = logging.getLogger(__name__)

KINDS = (REWARD_MODEL, POLICY)


class VersionError(ValueError):
    """A version cannot be pinned or exported; the message says why and what exists."""


def parse_version(text: str) -> dict[str, str]:
    """``rm-0002.policy-0001`` (both kinds), ``rm-0002`` or ``policy-0001`` (one kind).

    >>> parse_version("rm-0002.policy-base")
    {'rm': 'rm-0002', 'policy': 'policy-base'}
    >>> parse_version("policy-0003")
    {'policy': 'policy-0003'}
    """
    wanted: dict[str, str] = {}
    for part in text.strip().split("."):
        kind = part.split("-", 1)[0]
        if kind not in KINDS or part == kind or kind in wanted:
            raise VersionError(
                f"{text!r} is not a version: give a model version such as "
                "'rm-0002.policy-0001', or one part of it ('rm-0002', 'policy-0001')"
            )
        wanted[kind] = part
    return wanted


def resolve(registry: Registry, project_id: int, text: str) -> dict[str, ModelVersion]:
    """The registry's versions named by ``text``, each with its artifacts still on disk."""
    found: dict[str, ModelVersion] = {}
    for kind, version in parse_version(text).items():
        entry = registry.get(project_id, kind, version)
        if entry is None:
            known = [v.version for v in registry.versions(project_id, kind)]
            raise VersionError(
                f"project {project_id} has no {version}; versions of this kind: "
                f"{', '.join([BASE_VERSIONS[kind], *known])}"
            )
        if entry.path is not None and not has_artifacts(entry):
            raise VersionError(
                f"{version}'s checkpoint was deleted by retention (RLHF_KEEP_VERSIONS); its "
                "registry row remains, but it can no longer be served or exported"
            )
        found[kind] = entry
    return found


def has_artifacts(version: ModelVersion) -> bool:
    return version.path is None or (version.path / "config.json").is_file()


def pin(
    config: BackendConfig, store: Store, registry: Registry, project_id: int, text: str, reason: str
) -> dict[str, Any]:
    """Serve the versions named by ``text`` from now on; Label Studio follows."""
    if not reason.strip():
        raise VersionError("say why (--reason): the registry keeps it next to the pin")
    for kind, entry in resolve(registry, project_id, text).items():
        registry.pin(project_id, kind, entry.version, reason.strip())
        logger.info("project %s: pinned %s (%s)", project_id, entry.version, reason.strip())
    after_promotion(config, registry, project_id)
    return status(registry, project_id)


def unpin(config: BackendConfig, store: Store, registry: Registry, project_id: int) -> dict:
    """Back to the last promoted versions; Label Studio follows."""
    removed = registry.unpin(project_id)
    if removed:
        after_promotion(config, registry, project_id)
    return {**status(registry, project_id), "unpinned": [p.version for p in removed]}


def status(registry: Registry, project_id: int) -> dict[str, Any]:
    pins = registry.pins(project_id)
    return {
        "project": project_id,
        "served": registry.served_version(project_id),
        "pinned": {kind: {"version": p.version, "reason": p.reason} for kind, p in pins.items()},
        "last_promoted": {kind: registry.last_promoted(project_id, kind).version for kind in KINDS},
        "disk_bytes": registry.disk_usage(project_id),
    }


# -- retention ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pruned:
    version: str
    path: Path
    bytes: int


def apply_retention(registry: Registry, project_id: int, keep: int) -> list[Pruned]:
    """Delete the checkpoints of versions neither served, pinned nor among the newest ``keep``
    of their kind (``keep`` 0: keep everything). Registry rows are kept."""
    if keep <= 0:
        return []
    pins = registry.pins(project_id)
    pruned = []
    for kind in KINDS:
        versions = registry.versions(project_id, kind)  # oldest first
        protected = {v.version for v in versions[-keep:]}
        protected.add(registry.served(project_id, kind).version)
        protected.add(registry.last_promoted(project_id, kind).version)
        if kind in pins:
            protected.add(pins[kind].version)
        for version in versions:
            if version.version in protected or version.path is None:
                continue
            if not version.path.exists():
                continue
            size = directory_bytes(version.path)
            shutil.rmtree(version.path)
            pruned.append(Pruned(version.version, version.path, size))
            logger.info(
                "project %s: deleted %s's checkpoint (%d bytes; retention keeps %d)",
                project_id,
                version.version,
                size,
                keep,
            )
    return pruned
