"""Calls from the backend to Label Studio, through label-studio-sdk.

Make sure annotation events reach us, proven: Label Studio creates its project webhooks without
any header, so every annotation would bounce with 401. After ``/setup`` the backend therefore
finds (or creates) the project's webhook pointing at its ``/webhook`` and puts the project's
``X-RLHF-Webhook-Secret`` (and, with basic auth on, the ``Authorization``) header on it. This
runs in a background thread with retries: Label Studio is waiting for our ``/setup`` answer and
may create its own webhook only afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from label_studio_sdk.client import LabelStudio

from rlhf_core.config import BackendConfig
from rlhf_core.credentials import WEBHOOK_SECRET_HEADER, Connection

logger = logging.getLogger(__name__)

RETRY_DELAYS_S = (0.5, 2.0, 5.0, 15.0, 60.0)


def client(connection: Connection, timeout: float = 30.0) -> LabelStudio:
    """A Label Studio client, made only from a :class:`Connection`: a host and its token."""
    return LabelStudio(
        base_url=connection.url.rstrip("/"), api_key=connection.token, timeout=timeout
    )


def _same_endpoint(url_a: str, url_b: str) -> bool:
    a, b = urlsplit(url_a), urlsplit(url_b)
    local = {"localhost", "127.0.0.1", "0.0.0.0", "::1"}
    host_a, host_b = a.hostname or "", b.hostname or ""
    same_host = host_a == host_b or (host_a in local and host_b in local)
    return same_host and a.port == b.port and a.path.rstrip("/") == b.path.rstrip("/")


def ensure_webhook(
    ls: LabelStudio,
    project_id: int,
    webhook_url: str,
    headers: dict[str, str],
    create: bool = True,
) -> int | None:
    """Make the project's webhook to ``webhook_url`` carry ``headers``; return its id.

    With ``create`` False, only a webhook Label Studio already made is fixed (None if absent).
    """
    for hook in ls.webhooks.list(project=str(project_id)):
        if hook.project == project_id and _same_endpoint(hook.url, webhook_url):
            if (hook.headers or {}) != headers or not hook.is_active or not hook.send_payload:
                ls.webhooks.update(
                    id=hook.id,
                    url=hook.url,
                    headers=headers,
                    is_active=True,
                    send_payload=True,
                    send_for_all_actions=True,
                )
                logger.info("updated webhook %s of project %s", hook.id, project_id)
            return hook.id
    if not create:
        return None
    hook = ls.webhooks.create(
        url=webhook_url,
        project=project_id,
        headers=headers,
        is_active=True,
        send_payload=True,
        send_for_all_actions=True,
    )
    logger.info("created webhook %s for project %s", hook.id, project_id)
    return hook.id


class WebhookSync:
    """Keeps each connected project's webhook pointed at us, with our secret and auth headers.

    The webhook's URL is ``RLHF_PUBLIC_URL``/webhook when set, else the URL Label Studio itself
    holds for this backend among the project's ML backends (the one the /setup request came
    to) plus ``/webhook``: never a URL made from a request's ``Host`` header, which anyone can
    send. Label Studio calls ``/setup`` often (each time its model list is read, before each
    batch of predictions), so a project whose webhook is being fixed, or was confirmed in the
    last ``CONFIRMED_TTL_S`` seconds, is not checked again by this process.
    """

    CONFIRMED_TTL_S = 300.0

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._busy: set[tuple[int, str, str, str]] = set()
        self._confirmed_at: dict[tuple[int, str, str, str], float] = {}

    def schedule(
        self,
        project_id: int,
        connection: Connection | None,
        headers: dict[str, str],
        backend_url: str,
    ) -> threading.Thread | None:
        """Fix the project's webhook in the background. ``backend_url``: the URL the /setup
        request came to, used only to pick this backend among those Label Studio holds."""
        if connection is None:
            logger.warning(
                "project %s: no Label Studio URL/token, cannot put the %s header on its "
                "webhook; set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, or RLHF_WEBHOOK_SECRET "
                "and add that header by hand (README: Security)",
                project_id,
                WEBHOOK_SECRET_HEADER,
            )
            return None
        fingerprint = hashlib.sha256(json.dumps(headers, sort_keys=True).encode()).hexdigest()
        key = (project_id, connection.url, backend_url, fingerprint)
        with self._lock:
            confirmed_at = self._confirmed_at.get(key)
            recent = (
                confirmed_at is not None and time.monotonic() - confirmed_at < self.CONFIRMED_TTL_S
            )
            if key in self._busy or recent:
                return None
            self._busy.add(key)
        thread = threading.Thread(
            target=self._run_once,
            args=(key, connection, headers),
            name=f"webhook-sync-{project_id}",
            daemon=True,
        )
        thread.start()
        return thread

    def _run_once(
        self, key: tuple[int, str, str, str], connection: Connection, headers: dict[str, str]
    ) -> None:
        project_id, _, backend_url, _ = key
        confirmed = False
        try:
            confirmed = self._run(project_id, connection, headers, backend_url)
        finally:
            with self._lock:
                self._busy.discard(key)
                if confirmed:
                    self._confirmed_at[key] = time.monotonic()

    def _run(
        self, project_id: int, connection: Connection, headers: dict[str, str], backend_url: str
    ) -> bool:
        """Fix the project's webhook, retrying; True once it is right."""
        # Label Studio registers the ML backend and creates its own webhook just after our /setup
        # answer; the first attempt only fixes that one, so that a race never leaves two webhooks
        # delivering every event.
        url = None
        for attempt, delay in enumerate(RETRY_DELAYS_S):
            time.sleep(delay)
            try:
                ls = client(connection)
                url = self._webhook_url(ls, project_id, backend_url)
                if url and ensure_webhook(ls, project_id, url, headers, create=attempt > 0):
                    return True
            except Exception as exc:  # network or API error: retry, then give up loudly
                logger.warning(
                    "project %s: could not register webhook at %s (%s); retrying%s",
                    project_id,
                    connection.url,
                    _describe(exc),
                    _hint(exc),
                )
        if url is None and not self.config.public_url:
            logger.error(
                "project %s: giving up registering the webhook: none of the project's ML "
                "backends in Label Studio is at %s; set RLHF_PUBLIC_URL to the URL Label Studio "
                "reaches this backend at",
                project_id,
                backend_url,
            )
        else:
            logger.error(
                "project %s: giving up registering the webhook; annotations will not arrive "
                "until a webhook to %s with the %s header exists in Label Studio",
                project_id,
                url,
                WEBHOOK_SECRET_HEADER,
            )
        return False

    def _webhook_url(self, ls: LabelStudio, project_id: int, backend_url: str) -> str | None:
        if self.config.public_url:
            return self.config.public_url.rstrip("/") + "/webhook"
        for backend in ls.ml.list(project=project_id):
            if backend.url and _same_endpoint(backend.url, backend_url):
                return backend.url.rstrip("/") + "/webhook"
        return None


def _describe(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)  # label_studio_sdk ApiError
    return f"{type(exc).__name__} {status}" if status is not None else type(exc).__name__


def _hint(exc: Exception) -> str:
    """What a person can do about the usual refusals (Label Studio 1.23 behaviour)."""
    status = getattr(exc, "status_code", None)
    if status == 401:
        # /setup carries the project creator's *legacy* token, which Label Studio itself refuses
        # unless legacy tokens are enabled for the organization.
        return (
            ": Label Studio refused the token; set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a "
            "personal access token), or enable legacy API tokens in Label Studio"
        )
    if status == 400:
        # Label Studio's SSRF check refuses webhooks to private or loopback addresses; it then
        # also silently skips the webhook it would make itself when the model is connected.
        return (
            ": Label Studio refused the webhook URL; for a backend on a private network start "
            "Label Studio with SSRF_PROTECTION_ENABLED=false or USE_DEFAULT_BANNED_SUBNETS=false"
        )
    return ""


class LabelStudioTasks:
    """Tasks, predictions and the project's model version in Label Studio (pre-annotation)."""

    def __init__(self, ls: LabelStudio, page_size: int = 100) -> None:
        self.ls = ls
        self.page_size = page_size

    def unlabeled_tasks(self, project_id: int) -> Iterator[dict[str, Any]]:
        # label-studio-sdk annotates tasks.list as returning SyncPagerExt[T] with T unbound.
        listed: Any = self.ls.tasks.list(project=project_id, fields="all", page_size=self.page_size)
        for task in listed:
            if not task.is_labeled:
                yield {
                    "id": task.id,
                    "data": dict(task.data or {}),
                    "predictions": [_as_dict(p) for p in task.predictions or []],
                }

    def update_task_data(self, task_id: int, data: dict[str, Any]) -> None:
        self.ls.tasks.update(id=str(task_id), data=data)

    def create_prediction(self, task_id: int, prediction: dict[str, Any]) -> None:
        self.ls.predictions.create(
            task=task_id,
            result=prediction["result"],
            score=prediction["score"],
            model_version=prediction["model_version"],
        )

    def set_project_model_version(self, project_id: int, model_version: str) -> None:
        self.ls.projects.update(id=project_id, model_version=model_version)

    def project_model_version(self, project_id: int) -> str | None:
        """The ``model_version`` Label Studio shows for the project, read back from it."""
        return self.ls.projects.get(id=project_id).model_version or None

    def annotated_tasks(self, project_id: int) -> Iterator[dict[str, Any]]:
        """Every task of the project that has annotations, with them (both paged by the API).

        Annotations are JSON-shaped like a webhook's (ISO timestamps as strings)."""
        listed: Any = self.ls.tasks.list(project=project_id, page_size=self.page_size)
        for task in listed:
            if not (task.total_annotations or 0) + (task.cancelled_annotations or 0):
                continue
            annotations = self.ls.annotations.list(id=task.id)
            yield {
                "id": task.id,
                "data": dict(task.data or {}),
                "annotations": [a.model_dump(mode="json") for a in annotations],
            }


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    return obj.model_dump() if hasattr(obj, "model_dump") else dict(obj)
