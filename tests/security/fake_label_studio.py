"""A stand-in for Label Studio's REST API on a real loopback listener, recording every request.

It answers what the backend calls (ML backends, webhooks, tasks, project updates) with the
shapes Label Studio 1.23 uses, so a test sees exactly which host received which credential and
which headers the backend put on a webhook.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeLabelStudio:
    ml_backend_urls: list[str] = field(default_factory=list)
    webhooks: list[dict[str, Any]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                seen = Seen(self.command, self.path, dict(self.headers.items()), body)
                with fake.lock:
                    fake.seen.append(seen)
                    status, answer = fake.route(seen)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _answer

        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def route(self, seen: Seen) -> tuple[int, Any]:
        parts = urlsplit(seen.path)
        path, query = parts.path.rstrip("/"), parse_qs(parts.query)
        project = int(query.get("project", ["1"])[0])
        if path == "/api/ml" and seen.method == "GET":
            return 200, [
                {"id": n + 1, "url": url, "project": project, "title": "rlhf"}
                for n, url in enumerate(self.ml_backend_urls)
            ]
        if path == "/api/webhooks" and seen.method == "GET":
            return 200, self.webhooks
        if path == "/api/webhooks" and seen.method == "POST":
            hook = {**seen.body, "id": len(self.webhooks) + 1}
            self.webhooks.append(hook)
            return 201, hook
        if path.startswith("/api/webhooks/") and seen.method in ("PATCH", "PUT"):
            hook = next(h for h in self.webhooks if h["id"] == int(path.rsplit("/", 1)[1]))
            hook.update(seen.body)
            return 200, hook
        if path == "/api/tasks" and seen.method == "GET":
            return (
                (200, {"tasks": [], "total": 0})
                if query.get("page", ["1"]) == ["1"]
                else (
                    404,
                    {"detail": "Invalid page."},
                )
            )
        if path.startswith("/api/projects/"):
            return 200, {"id": int(path.rsplit("/", 1)[1]), **(seen.body or {})}
        return 404, {"detail": "not found"}

    def authorizations(self) -> list[str]:
        with self.lock:
            return [s.headers.get("Authorization", "") for s in self.seen]

    def webhook_writes(self) -> list[Seen]:
        with self.lock:
            return [
                s
                for s in self.seen
                if s.path.startswith("/api/webhooks") and s.method in ("POST", "PATCH", "PUT")
            ]
