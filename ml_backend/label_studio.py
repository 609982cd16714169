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
    """Keeps each connected project's webhook pointed at us, with our auth header."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config

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
        url = self.config.public_url.rstrip("/") + "/webhook" if self.config.public_url else webhook_url
        thread = threading.Thread(
            target=self._run,
            args=(project_id, hostname, access_token, url),
            name=f"webhook-sync-{project_id}",
            daemon=True,
        )
        thread.start()
        return thread

    def _run(self, project_id: int, hostname: str, access_token: str, url: str) -> None:
        # Label Studio creates its own webhook just after our /setup answer; the first attempt
        # only fixes that one, so that a race never leaves two webhooks delivering every event.
        for attempt, delay in enumerate(RETRY_DELAYS_S):
            time.sleep(delay)
            try:
                ls = client(hostname, access_token)
                if ensure_webhook(ls, project_id, url, self.headers(), create=attempt > 0):
                    return
            except Exception as exc:  # network or API error: retry, then give up loudly
                logger.warning(
                    "project %s: could not register webhook at %s (%s); retrying",
                    project_id,
                    hostname,
                    type(exc).__name__,
                )
        logger.error(
            "project %s: giving up registering the webhook; annotations will not arrive "
            "until a webhook to %s exists in Label Studio",
            project_id,
            url,
        )
