"""A small real HTTP server on loopback that answers the Label Studio API calls the backend makes.

It holds projects, tasks (with annotations) and predictions in memory; ``down = True`` makes it
answer 503 to everything, like a Label Studio that is restarting.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


class FakeLabelStudio:
    def __init__(self) -> None:
        self.projects: dict[int, dict[str, Any]] = {}
        self.tasks: dict[int, dict[str, Any]] = {}
        self.predictions: list[dict[str, Any]] = []
        self.down = False
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeLabelStudio:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

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

    # -- the API -------------------------------------------------------------------------------

    def answer(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> Any:
        if m := re.fullmatch(r"/api/projects/(\d+)/?", path):
            project = self.projects[int(m[1])]
            if method == "PATCH":
                project.update(body)
            return project
        if path.rstrip("/") == "/api/tasks" and method == "GET":
            project = int(query["project"][0])
            page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["100"])[0])
            tasks = [self._task(t) for t in self.tasks.values() if t["project"] == project]
            return {"tasks": tasks[(page - 1) * size : page * size], "total": len(tasks)}
        if m := re.fullmatch(r"/api/tasks/(\d+)/annotations/?", path):
            return self.tasks[int(m[1])]["annotations"]
        if (m := re.fullmatch(r"/api/tasks/(\d+)/?", path)) and method == "PATCH":
            self.tasks[int(m[1])]["data"] = body["data"]
            return self._task(self.tasks[int(m[1])])
        if path.rstrip("/") == "/api/predictions" and method == "POST":
            self.predictions.append(body)
            return {"id": len(self.predictions), **body}
        raise KeyError(path)

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
        def log_message(self, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            url = urlsplit(self.path)
            fake.requests.append((self.command, url.path))
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            if fake.down:
                return self._send(503, {"detail": "down"})
            try:
                answer = fake.answer(self.command, url.path, parse_qs(url.query), body)
            except KeyError:
                return self._send(404, {"detail": "not found"})
            self._send(201 if self.command == "POST" else 200, answer)

        def _send(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PATCH = do_POST = _serve

    return Handler
