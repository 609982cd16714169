"""The webhook proof: which webhook events are believed (where a Label Studio token may go,
and the secrets themselves, are rlhf_core/credentials.py).

* Each project connected through /setup gets a random webhook secret, which the backend puts on
  the project's webhook in Label Studio (header ``X-RLHF-Webhook-Secret``). An annotation or
  project event is believed only with that secret, or with ``RLHF_WEBHOOK_SECRET``.
* ``START_TRAINING`` comes from Label Studio's ML client, which sends no custom header: it is
  accepted for a connected project without proof, and only queues (at most one) training job.
"""

from __future__ import annotations

import hmac
from typing import Any

from rlhf_core.credentials import WEBHOOK_SECRET_HEADER, Credentials
from rlhf_core.errors import UnprovenWebhook
from rlhf_core.intake import (
    ANNOTATION_CREATED,
    ANNOTATION_DELETED,
    ANNOTATION_UPDATED,
    ANNOTATIONS_DELETED,
    PROJECT_UPDATED,
    START_TRAINING,
    project_payload,
)
from rlhf_core.store import Project

# Events that write training data or the project's label config.
GUARDED_ACTIONS = frozenset(
    {
        ANNOTATION_CREATED,
        ANNOTATION_UPDATED,
        ANNOTATIONS_DELETED,
        ANNOTATION_DELETED,
        PROJECT_UPDATED,
    }
)


def admit_webhook(credentials: Credentials, payload: dict[str, Any], presented: str | None) -> bool:
    """Whether the event proves its origin; raises UnprovenWebhook when it must and does not.

    Returns False for events that need no proof (START_TRAINING for a connected project,
    actions nothing is stored for): the caller must then not let them change the project.
    """
    action = payload.get("action")
    if not isinstance(action, str) or (action not in GUARDED_ACTIONS and action != START_TRAINING):
        return False
    project_id = event_project_id(payload)
    if (
        presented
        and credentials.config.webhook_secret
        and _same(presented, credentials.config.webhook_secret)
    ):
        return True
    project = credentials.store.project(project_id)
    secret = credentials.webhook_secret(project) if project is not None else None
    if presented and secret is not None and _same(presented, secret):
        return True
    if action == START_TRAINING and project is not None:
        return False
    raise UnprovenWebhook(_refusal(action, project_id, project, presented))


def _refusal(action: str, project_id: int, project: Project | None, presented: str | None) -> str:
    fix = (
        f"in Label Studio, open the project's Settings > Webhooks, edit the webhook to this "
        f"backend's /webhook and add the header {WEBHOOK_SECRET_HEADER} with the value of "
        "RLHF_WEBHOOK_SECRET (set that variable on the backend)"
    )
    if project is None:
        return (
            f"{action} refused: project {project_id} is not connected to this backend "
            f"(connect the model in Label Studio, which calls /setup), or {fix}"
        )
    problem = "a wrong" if presented else "no"
    return (
        f"{action} for project {project_id} refused: {problem} {WEBHOOK_SECRET_HEADER} "
        "header. The backend adds it to the project's webhook when it can reach Label "
        "Studio (LABEL_STUDIO_URL and a token, on the next /setup); otherwise " + fix
    )


def event_project_id(payload: dict[str, Any]) -> int:
    """The project id of a webhook event (``project`` as an object with ``id``, or an id)."""
    return int(project_payload(payload)["id"])


def _same(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode(), expected.encode())
