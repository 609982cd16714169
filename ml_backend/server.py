"""Gunicorn, run in-process: the master forks workers, each builds its own app after the fork."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from gunicorn.app.base import BaseApplication

from rlhf_core.config import BackendConfig

logger = logging.getLogger(__name__)


def _child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, config: BackendConfig) -> None:
        self.backend_config = config
        super().__init__()

    def load_config(self) -> None:
        c = self.backend_config
        settings = {
            "bind": f"{c.host}:{c.port}",
            "workers": c.workers,
            "threads": c.threads,
            "worker_class": "gthread",
            "preload_app": False,  # app (and later models) built in each worker, after the fork
            "timeout": 120,  # above Label Studio's 100 s predict timeout
            "graceful_timeout": 30,
            "child_exit": _child_exit,
            "accesslog": None,  # no request lines in the log: bodies and tokens never land there
            "loglevel": c.log_level.lower(),
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        import gc

        from ml_backend.app import create_app

        app = create_app(self.backend_config)
        # What exists now (imported modules, the app) lives as long as the worker: keep it out of
        # the garbage collector's full passes, which otherwise stall a request now and then.
        gc.freeze()
        return app


def exposure_warning(config: BackendConfig) -> str | None:
    """What to tell an operator who serves a non-loopback address without basic auth."""
    if config.auth_enabled or _is_loopback(config.host):
        return None
    return (
        f"serving on {config.host}:{config.port} without basic auth: anyone who can reach this "
        "port can connect projects (/setup), request predictions and start training. Set "
        "BASIC_AUTH_USER and BASIC_AUTH_PASS (and the same pair in Label Studio's model "
        "connection), or RLHF_HOST=127.0.0.1 when Label Studio runs on this machine. Webhooks "
        "are checked either way (README: Security)."
    )


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: only its resolver knows, so warn
        return False


def run_gunicorn(config: BackendConfig) -> int:
    logger.info("serving on %s:%s with %s workers", config.host, config.port, config.workers)
    _Gunicorn(config).run()
    return 0
