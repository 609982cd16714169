"""Calls from the backend to Label Studio, through label-studio-sdk.

The one job here for now: make sure annotation events reach us. Label Studio sends its project
webhooks without any auth header, so with basic auth on, every annotation would bounce with 401.
After ``/setup`` the backend therefore finds (or creates) the project's webhook pointing at its
``/webhook`` and puts the right ``Authorization`` header on it. This runs in a background thread
with retries: Label Studio is waiting for our ``/setup`` answer and may create its own webhook
only afterwards.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from label_studio_sdk.client import LabelStudio

from ml_backend.config import BackendConfig

logger = logging.getLogger(__name__)

RETRY_DELAYS_S = (0.5, 2.0, 5.0, 15.0, 60.0)


def client(hostname: str, access_token: str, timeout: float = 30.0) -> LabelStudio:
    return LabelStudio(base_url=hostname.rstrip("/"), api_key=access_token, timeout=timeout)


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
    """Keeps each connected project's webhook pointed at us, with our auth header.

    Label Studio calls ``/setup`` often (each time its model list is read, before each batch of
    predictions), so a project whose webhook is being fixed, or was confirmed in the last
    ``CONFIRMED_TTL_S`` seconds, is not checked again by this process.
    """

    CONFIRMED_TTL_S = 300.0

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._busy: set[tuple[int, str, str]] = set()
        self._confirmed_at: dict[tuple[int, str, str], float] = {}

    def headers(self) -> dict[str, str]:
        if not self.config.auth_enabled:
            return {}
        pair = f"{self.config.basic_auth_user}:{self.config.basic_auth_pass}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}

    def schedule(
        self,
        project_id: int,
        hostname: str | None,
        access_token: str | None,
        webhook_url: str,
    ) -> threading.Thread | None:
        hostname = self.config.label_studio_url or hostname
        access_token = self.config.label_studio_api_key or access_token
        if not hostname or not access_token:
            logger.warning(
                "project %s: no Label Studio URL/token, cannot register the webhook; "
                "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY",
                project_id,
            )
            return None
        if self.config.public_url:
            webhook_url = self.config.public_url.rstrip("/") + "/webhook"
        key = (project_id, hostname, webhook_url)
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
            args=(key, access_token),
            name=f"webhook-sync-{project_id}",
            daemon=True,
        )
        thread.start()
        return thread

    def _run_once(self, key: tuple[int, str, str], access_token: str) -> None:
        project_id, hostname, url = key
        confirmed = False
        try:
            confirmed = self._run(project_id, hostname, access_token, url)
        finally:
            with self._lock:
                self._busy.discard(key)
                if confirmed:
                    self._confirmed_at[key] = time.monotonic()

    def _run(self, project_id: int, hostname: str, access_token: str, url: str) -> bool:
        """Fix the project's webhook, retrying; True once it is right."""
        # Label Studio creates its own webhook just after our /setup answer; the first attempt
        # only fixes that one, so that a race never leaves two webhooks delivering every event.
        for attempt, delay in enumerate(RETRY_DELAYS_S):
            time.sleep(delay)
            try:
                ls = client(hostname, access_token)
                if ensure_webhook(ls, project_id, url, self.headers(), create=attempt > 0):
                    return True
            except Exception as exc:  # network or API error: retry, then give up loudly
                logger.warning(
                    "project %s: could not register webhook at %s (%s); retrying%s",
                    project_id,
                    hostname,
                    _describe(exc),
                    _hint(exc),
                )
        logger.error(
            "project %s: giving up registering the webhook; annotations will not arrive "
            "until a webhook to %s exists in Label Studio",
            project_id,
            url,
        )
        return False


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
            ": Label Studio refused the token; set LABEL_STUDIO_API_KEY to a personal access "
            "token, or enable legacy API tokens in Label Studio"
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
        for task in self.ls.tasks.list(project=project_id, fields="all", page_size=self.page_size):
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


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    return obj.model_dump() if hasattr(obj, "model_dump") else dict(obj)
