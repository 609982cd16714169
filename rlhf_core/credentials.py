"""Where a Label Studio token may go, and the webhook secrets the backend hands out.

* A token is sent only to the host it came with in /setup, or to the configured
  ``LABEL_STUDIO_URL``; ``LABEL_STUDIO_API_KEY`` only to ``LABEL_STUDIO_URL``.
* Each project connected through /setup gets a random webhook secret, which the backend puts on
  the project's webhook in Label Studio (header ``X-RLHF-Webhook-Secret``); ml_backend/trust.py
  believes a webhook event only with it.
"""

from __future__ import annotations

import base64
import secrets
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from rlhf_core.config import BackendConfig
from rlhf_core.errors import BadRequest
from rlhf_core.store import Project, Store
from rlhf_core.vault import Vault

WEBHOOK_SECRET_HEADER = "X-RLHF-Webhook-Secret"
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Connection:
    """Where to call Label Studio for a project, and the token that may go there."""

    url: str
    token: str


def normalize_url(value: str, name: str = "hostname") -> str:
    """``scheme://host[:port][/path]`` in one spelling (lower case, no default port, no
    trailing slash); BadRequest for anything that is not an http(s) URL with a host."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        raise BadRequest(f"'{name}' must be an http(s) URL, got {value[:80]!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.username or parts.password:
        raise BadRequest(
            f"'{name}' must be an http(s) URL like http://host:8080, got {value[:80]!r}"
        )
    host = parts.hostname.lower()
    try:
        host.encode("idna")  # what an HTTP client sends; U+FFFD, empty or 64+ char labels fail
    except UnicodeError:
        raise BadRequest(
            f"'{name}' has a host name no HTTP client can send: {value[:80]!r}"
        ) from None
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


class Credentials:
    """Projects' Label Studio credentials and webhook secrets, sealed in the store."""

    def __init__(self, config: BackendConfig, store: Store, vault: Vault) -> None:
        self.config = config
        self.store = store
        self.vault = vault
        self._seal_token = vault.token_sealer(config)
        self._lock = threading.Lock()
        self._opened: dict[str, str] = {}  # sealed webhook secret -> plaintext (per process)

    def connect(
        self, project_id: int, label_config: str, hostname: str | None, token: str | None
    ) -> None:
        """What /setup brought: the label config, a host and the token that came with it."""
        sealed_token = self._seal_token(token) if token else None
        self.store.connect_project(
            project_id,
            label_config,
            normalize_url(hostname) if hostname else None,
            sealed_token,
            self.vault.seal(secrets.token_urlsafe(32)),
        )
        project = self.store.project(project_id)
        if project is not None and self.webhook_secret(project) is None:
            self.store.replace_webhook_secret(
                project_id, self.vault.seal(secrets.token_urlsafe(32))
            )

    def connection(self, project: Project) -> Connection | None:
        """The project's Label Studio and a token that may go there; None when there is none."""
        if self.config.label_studio_api_key:  # the config requires LABEL_STUDIO_URL with it
            return Connection(self.config.label_studio_url, self.config.label_studio_api_key)
        token = self.vault.open(project.token_sealed)
        url = self.config.label_studio_url or project.hostname
        if token is None or not url:
            return None
        return Connection(url, token)

    def webhook_secret(self, project: Project) -> str | None:
        sealed = project.webhook_secret_sealed
        if sealed is None:
            return None
        with self._lock:
            opened = self._opened.get(sealed)
        if opened is None:
            opened = self.vault.open(sealed)
            if opened is not None:
                with self._lock:
                    self._opened[sealed] = opened
        return opened

    def webhook_headers(self, project: Project) -> dict[str, str]:
        """The headers the project's webhook in Label Studio must carry."""
        headers = {}
        secret = self.webhook_secret(project)
        if secret is not None:
            headers[WEBHOOK_SECRET_HEADER] = secret
        if self.config.auth_enabled:
            pair = f"{self.config.basic_auth_user}:{self.config.basic_auth_pass}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        return headers
