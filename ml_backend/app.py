"""The HTTP face Label Studio talks to: an app factory, no app or model object at import time."""

from __future__ import annotations

import base64
import hmac
import json
import logging
import re
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from ml_backend import dashboard
from ml_backend.metrics import CONTENT_TYPE, Metrics, action_label, kind_label, method_label
from ml_backend.trust import admit_webhook
from rlhf_core.config import BackendConfig
from rlhf_core.credentials import WEBHOOK_SECRET_HEADER, Credentials
from rlhf_core.db import database_for
from rlhf_core.errors import BackendError, BadRequest, NotFound, TooLarge, Unauthorized
from rlhf_core.intake import MAX_ID, handle_event
from rlhf_core.label_schema import check_label_config
from rlhf_core.label_studio import WebhookSync
from rlhf_core.notify import notify_workers
from rlhf_core.predict import PREDICT_CHUNK, labels_by_task, predict_in_time
from rlhf_core.registry import Registry
from rlhf_core.serving import ModelServer, release_memory
from rlhf_core.store import JOB_PREANNOTATE, JOB_RECONCILE, Store
from rlhf_core.vault import Vault

logger = logging.getLogger(__name__)

MODEL_CLASS = "RLHFBackend"
OPEN_ENDPOINTS = {"health"}  # everything else needs basic auth when it is configured


class Services:
    """What a worker process holds: config, store, metrics, and models (loaded lazily)."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        vault = Vault.for_config(config)
        database = database_for(config, checkpoint_every_s=1.0)
        self.store = Store(database).initialize(seal=vault.token_sealer(config))
        self.credentials = Credentials(config, self.store, vault)
        self.registry = Registry(database, config.artifacts_path)
        self.metrics = Metrics(self.store, self.registry, config.metrics_max_annotators)
        self.models = ModelServer(config, self.registry, on_refused=self._count_refused)
        self.webhook_sync = WebhookSync(config)

    def _count_refused(self, kind: str) -> None:
        self.metrics.artifacts_refused.labels(kind_label(kind)).inc()

    def model_version(self, project_id: int | None = None) -> str:
        """The served version of a project (the base version before any training)."""
        return self.registry.served_version(project_id if project_id is not None else 0)


def create_app(config: BackendConfig | None = None) -> Flask:
    config = config or BackendConfig.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    services = Services(config)
    app.extensions["rlhf"] = services

    _register_hooks(app, services)
    _register_routes(app, services)
    app.register_blueprint(dashboard.blueprint)
    _register_errors(app)
    return app


def _register_hooks(app: Flask, services: Services) -> None:
    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()
        if services.config.auth_enabled and request.endpoint not in OPEN_ENDPOINTS:
            _check_basic_auth(services.config)

    @app.after_request
    def _observe(response: Response) -> Response:
        endpoint = request.endpoint or "unknown"
        services.metrics.requests.labels(
            endpoint, method_label(request.method), str(response.status_code)
        ).inc()
        started = g.get("started")
        if started is not None:
            services.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response


def _check_basic_auth(config: BackendConfig) -> None:
    expected = base64.b64encode(
        f"{config.basic_auth_user}:{config.basic_auth_pass}".encode()
    ).decode()
    header = request.headers.get("Authorization", "")
    if not hmac.compare_digest(header.encode(), f"Basic {expected}".encode()):
        raise Unauthorized("basic auth required: send the BASIC_AUTH_USER/BASIC_AUTH_PASS pair")


def _json_body() -> dict[str, Any]:
    data = request.get_data()
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(data) >= limit:
        # Werkzeug cuts a chunked body off at the limit instead of refusing it.
        raise RequestEntityTooLarge()
    try:
        payload = json.loads(data)
        if _SURROGATE_ESCAPE.search(data):
            payload = clean_strings(payload)
    except (ValueError, RecursionError):  # bad JSON or UTF-8 (ValueError), absurd nesting
        raise BadRequest("request body must be valid JSON in UTF-8") from None
    if not isinstance(payload, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(payload).__name__}")
    return payload


# JSON can spell a UTF-16 surrogate (``"\\ud800"``) that is no character: one alone cannot be
# encoded to UTF-8, so SQLite, tokenizers and Prometheus would each fail on it. Raw UTF-8 bytes
# cannot carry one (json.loads refuses them), so an escape in the body is the only way in.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """The one rule for incoming text: a lone surrogate becomes U+FFFD (the replacement
    character), as a UTF-8 decoder does with bytes it cannot read; all else is kept."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def clean_strings(value: Any) -> Any:
    """``clean_text`` on every string (keys included) of a parsed JSON value."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [clean_strings(v) for v in value]
    if isinstance(value, dict):
        return {clean_text(k): clean_strings(v) for k, v in value.items()}
    return value


def parse_project_id(value: Any) -> int:
    """Label Studio sends ``project`` as ``"<id>.<timestamp>"`` in /setup and /predict."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID:
        return value
    if isinstance(value, str):
        head = value.split(".", 1)[0]
        if head.isascii() and head.isdigit() and len(head) <= 19 and int(head) <= MAX_ID:
            return int(head)
    raise BadRequest(f"'project' must be a project id like '1' or '1.1700000000', got {value!r}")


def _register_routes(app: Flask, services: Services) -> None:
    @app.get("/")
    @app.get("/health", endpoint="health")
    def index() -> Response:
        return jsonify(status="UP", model_class=MODEL_CLASS, model_version=services.model_version())

    @app.post("/setup")
    def setup() -> Response:
        body = _json_body()
        project_id = parse_project_id(body.get("project"))
        schema = body.get("schema")
        if not isinstance(schema, str) or not schema.strip():
            raise BadRequest("'schema' (the project's label config XML) is required")
        hostname = _optional_str(body, "hostname")
        access_token = _optional_str(body, "access_token")
        # 413 above RLHF_MAX_LABEL_CONFIG_BYTES; 422 naming what is missing
        check_label_config(schema, services.config.max_label_config_bytes)
        credentials = services.credentials
        credentials.connect(project_id, schema, hostname, access_token)
        project = services.store.project(project_id)
        assert project is not None  # connect() stored it
        services.webhook_sync.schedule(
            project_id,
            credentials.connection(project),
            credentials.webhook_headers(project),
            backend_url=request.url_root,
        )
        if credentials.connection(project) is not None:  # else the job could not reach it
            _reconcile_after_setup(services, project_id)
        return jsonify(model_version=services.model_version(project_id))

    @app.post("/predict")
    def predict() -> Response:
        body = _json_body()
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise BadRequest("'tasks' must be a list of task objects")
        limit = services.config.predict_max_tasks
        if len(tasks) > limit:
            raise TooLarge(
                f"{len(tasks)} tasks in one /predict; the backend takes up to {limit} "
                "(RLHF_PREDICT_MAX_TASKS): select fewer tasks, or run `rlhf-backend preannotate`"
            )
        project_id, label_config = _predict_project(body, tasks)
        schema = check_label_config(label_config, services.config.max_label_config_bytes)
        version = services.models.served_version(project_id)
        try:
            timed = predict_in_time(
                schema,
                tasks,
                lambda items: services.models.score_and_embed(project_id, items),
                version,
                services.config.strategy,
                budget_s=services.config.predict_time_budget_s,
                posterior=services.models.posterior(project_id),
                labels=labels_by_task(
                    services.store,
                    project_id,
                    services.config.max_ranking_pairs,
                    {task.get("id") for task in tasks} - {None},
                ),
                contradiction=services.config.relook_contradiction,
                preselect=bool(services.config.preselect),
            )
            answer: dict[str, Any] = {"results": timed.results}
            if timed.unreached:
                answer["handed_off"] = _hand_off(project_id, timed.unreached)
            return jsonify(answer)
        finally:
            if len(tasks) > PREDICT_CHUNK:
                release_memory()

    def _hand_off(project_id: int, unreached: int) -> dict[str, Any]:
        """Tasks /predict had no time for go to the project's pre-annotation job, which uploads
        their predictions through Label Studio's API (it needs the URL and token /setup sent)."""
        project = services.store.project(project_id)
        reachable = project is not None and services.credentials.connection(project) is not None
        late = (
            f"{unreached} tasks were not predicted within "
            f"{services.config.predict_time_budget_s:g} s (RLHF_PREDICT_TIME_BUDGET_S)"
        )
        if not reachable:
            logger.warning("project %s: %s", project_id, late)
            return {
                "tasks": unreached,
                "job_id": None,
                "message": f"{late} and no Label Studio connection is known for this project: "
                f"run `rlhf-backend preannotate --project {project_id}`",
            }
        job = services.store.enqueue_job(
            project_id, JOB_PREANNOTATE, trigger=f"/predict hand-off: {unreached} tasks"
        )
        job_id = job.job_id if job else None
        notify_workers(services.config, job_id, "predict hand-off")
        logger.info("project %s: %s, handed to pre-annotation", project_id, late)
        message = f"{late}: the queued pre-annotation job uploads their predictions"
        return {"tasks": unreached, "job_id": job_id, "message": message}

    def _predict_project(body: dict[str, Any], tasks: list[dict[str, Any]]) -> tuple[int, str]:
        raw = body.get("project")
        if raw is None and tasks:
            raw = tasks[0].get("project")
        project_id = parse_project_id(raw)
        label_config = body.get("label_config")
        if label_config is None:
            project = services.store.project(project_id)
            if project is None:
                raise NotFound(
                    f"project {project_id} is unknown and the request has no label_config: "
                    "connect the backend to it in Label Studio first"
                )
            label_config = project.label_config
        if not isinstance(label_config, str):
            raise BadRequest("'label_config' must be the label config XML string")
        return project_id, label_config

    @app.post("/webhook")
    def webhook() -> tuple[Response, int]:
        payload = _json_body()
        presented = request.headers.get(WEBHOOK_SECRET_HEADER)
        proven = admit_webhook(services.credentials, payload, presented)  # or 401, nothing stored
        result = handle_event(
            services.store,
            payload,
            services.config.train_every,
            proven,
            services.config.max_label_config_bytes,
        )
        notify_workers(services.config, result.detail.get("job_id"), result.action)
        services.metrics.webhook_events.labels(action_label(result.action)).inc()
        return jsonify(result.as_json()), 200

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(services.metrics.exposition(), content_type=CONTENT_TYPE)


RECONCILE_AFTER_SETUP_GAP_S = 300.0


def _reconcile_after_setup(services: Services, project_id: int) -> None:
    """Annotations made before this connection (or while it was down) come in by a job.

    Label Studio calls /setup before every batch of predictions, so a project gets at most one
    such job per ``RECONCILE_AFTER_SETUP_GAP_S``."""
    config = services.config
    since = services.store.seconds_since_job(project_id, JOB_RECONCILE)
    if since is not None and since < RECONCILE_AFTER_SETUP_GAP_S:
        return
    job = services.store.enqueue_job(project_id, JOB_RECONCILE, trigger="setup")
    notify_workers(config, job.job_id if job else None, "setup")


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string")
    return value


def _register_errors(app: Flask) -> None:
    @app.errorhandler(BackendError)
    def _backend_error(exc: BackendError) -> tuple[Response, int, dict[str, str]]:
        challenge = isinstance(exc, Unauthorized)
        headers = {"WWW-Authenticate": 'Basic realm="rlhf-backend"'} if challenge else {}
        return jsonify(error=type(exc).__name__, message=exc.message), exc.status, headers

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int, list[tuple[str, str]]]:
        # Keep the exception's own headers (Allow on a 405), but answer JSON.
        headers = [(k, v) for k, v in exc.get_headers() if k.lower() != "content-type"]
        return jsonify(error=exc.name, message=exc.description), exc.code or 500, headers

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify(error="InternalError", message="internal error; see the server log"), 500
