"""A stand-in for Label Studio's REST API: a real HTTP server on loopback, recording every request.

It answers what the backend calls, with the shapes Label Studio 1.23 uses: projects (read, and
``model_version`` set), tasks paged as ``{"tasks", "total"}`` with their annotations and
predictions, task data updates, predictions, the project's ML backends and its webhooks. Every
request is kept in ``seen`` (method, path with query, headers, JSON body), so a test sees which
host received which credential and which headers the backend put on a webhook. ``down = True``
makes it answer 503 to everything, like a Label Studio that is restarting.

    with FakeLabelStudio(projects=[1]) as ls:
        ls.add_task(1, 1, {"prompt": "..."})
        ...  # point the backend at ls.url
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Seen:
    method: str
    path: str  # with the query string
    headers: dict[str, str]
    body: Any


class FakeLabelStudio:
    """Listening from construction until :meth:`stop` (or the end of a ``with`` block)."""

    def __init__(self, projects: Iterable[int] = (), ml_backend_urls: Iterable[str] = ()) -> None:
        self.projects: dict[int, dict[str, Any]] = {}
        self.tasks: dict[int, dict[str, Any]] = {}
        self.predictions: list[dict[str, Any]] = []
        self.ml_backend_urls = list(ml_backend_urls)
        self.webhooks: list[dict[str, Any]] = []
        self.seen: list[Seen] = []
        self.down = False
        self.lock = threading.Lock()  # held while a request is recorded and answered
        for project_id in projects:
            self.add_project(project_id)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeLabelStudio:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- what a test sets up and reads back ----------------------------------------------------

    def add_project(self, project_id: int) -> None:
        self.projects[project_id] = {"id": project_id, "model_version": ""}

    def add_task(self, task_id: int, project_id: int, data: dict[str, Any]) -> None:
        self.tasks[task_id] = {
            "id": task_id,
            "project": project_id,
            "data": data,
            "annotations": [],
        }

    def annotate(self, task_id: int, annotation: dict[str, Any]) -> None:
        annotations = self.tasks[task_id]["annotations"]
        annotations[:] = [a for a in annotations if a["id"] != annotation["id"]] + [annotation]

    def delete_annotation(self, task_id: int, annotation_id: int) -> None:
        annotations = self.tasks[task_id]["annotations"]
        annotations[:] = [a for a in annotations if a["id"] != annotation_id]

    def model_version(self, project_id: int) -> str:
        return self.projects[project_id]["model_version"]

    def authorizations(self) -> list[str]:
        """The ``Authorization`` header of every request, in order ("" where there was none)."""
        with self.lock:
            return [s.headers.get("Authorization", "") for s in self.seen]

    def webhook_writes(self) -> list[Seen]:
        with self.lock:
            return [
                s
                for s in self.seen
                if s.path.startswith("/api/webhooks") and s.method in ("POST", "PATCH", "PUT")
            ]

    # -- the API -------------------------------------------------------------------------------

    def answer(self, seen: Seen) -> tuple[int, Any]:
        """The status and JSON answer to a request (KeyError or StopIteration: an unknown id)."""
        parts = urlsplit(seen.path)
        path, query, method, body = (
            parts.path.rstrip("/"),
            parse_qs(parts.query),
            seen.method,
            seen.body,
        )
        if m := re.fullmatch(r"/api/projects/(\d+)", path):
            project = self.projects[int(m[1])]
            if method == "PATCH":
                project.update(body)
            return 200, project
        if path == "/api/tasks" and method == "GET":
            return self._task_page(query)
        if m := re.fullmatch(r"/api/tasks/(\d+)/annotations", path):
            return 200, self.tasks[int(m[1])]["annotations"]
        if (m := re.fullmatch(r"/api/tasks/(\d+)", path)) and method == "PATCH":
            self.tasks[int(m[1])]["data"] = body["data"]
            return 200, self._task(self.tasks[int(m[1])])
        if path == "/api/predictions" and method == "POST":
            self.predictions.append(body)
            return 201, {"id": len(self.predictions), **body}
        if path == "/api/ml" and method == "GET":
            project_id = int(query.get("project", ["1"])[0])
            return 200, [
                {"id": n + 1, "url": url, "project": project_id, "title": "rlhf"}
                for n, url in enumerate(self.ml_backend_urls)
            ]
        if path == "/api/webhooks" and method == "GET":
            return 200, self.webhooks
        if path == "/api/webhooks" and method == "POST":
            hook = {**body, "id": len(self.webhooks) + 1}
            self.webhooks.append(hook)
            return 201, hook
        if (m := re.fullmatch(r"/api/webhooks/(\d+)", path)) and method in ("PATCH", "PUT"):
            hook = next(h for h in self.webhooks if h["id"] == int(m[1]))
            hook.update(body)
            return 200, hook
        raise KeyError(path)

    def _task_page(self, query: dict[str, list[str]]) -> tuple[int, Any]:
        project_id = int(query["project"][0])
        page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["100"])[0])
        tasks = [self._task(t) for t in self.tasks.values() if t["project"] == project_id]
        shown = tasks[(page - 1) * size : page * size]
        if page > 1 and not shown:  # Label Studio ends paging so; label-studio-sdk stops on it
            return 404, {"detail": "Invalid page."}
        return 200, {"tasks": shown, "total": len(tasks)}

    def _task(self, task: dict[str, Any]) -> dict[str, Any]:
        annotations = task["annotations"]
        predictions = [p for p in self.predictions if p["task"] == task["id"]]
        return {
            "id": task["id"],
            "project": task["project"],
            "data": task["data"],
            "is_labeled": bool(annotations),
            "total_annotations": sum(not a.get("was_cancelled") for a in annotations),
            "cancelled_annotations": sum(bool(a.get("was_cancelled")) for a in annotations),
            "predictions": predictions,
        }


def _handler(fake: FakeLabelStudio) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            seen = Seen(
                self.command, self.path, dict(self.headers.items()), json.loads(raw or "null")
            )
            with fake.lock:
                fake.seen.append(seen)
                if fake.down:
                    status, answer = 503, {"detail": "down"}
                else:
                    try:
                        status, answer = fake.answer(seen)
                    except (KeyError, StopIteration):  # an unknown id
                        status, answer = 404, {"detail": "not found"}
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

    return Handler
