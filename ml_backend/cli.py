"""``rlhf-backend``: the one console script. Subcommands import what they need when they run."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from typing import Any

from ml_backend.config import BackendConfig, ConfigError, markdown_table

LOG_FORMAT = "[%(asctime)s] [%(levelname)s] [%(name)s::%(funcName)s::%(lineno)d] %(message)s"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)


def _serve(config: BackendConfig, args: argparse.Namespace) -> int:
    # Multiprocess metrics need their directory in the environment before prometheus_client is
    # imported anywhere, and before gunicorn forks its workers.
    metrics_dir = config.data_dir / "prometheus"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)

    from ml_backend.server import run_gunicorn
    from ml_backend.store import Store

    Store(config.db_path).initialize().close()  # schema created once, before any fork
    return run_gunicorn(config)


def _print_config(config: BackendConfig, args: argparse.Namespace) -> int:
    print(markdown_table())
    return 0


COMMANDS = {
    "serve": (_serve, "Run the HTTP service (gunicorn) Label Studio connects to."),
    "config": (_print_config, "Print the configuration variables as a Markdown table."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-backend", description="Label Studio ML backend for RLHF."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        if name == "serve":
            sub.add_argument("--host", help="override RLHF_HOST")
            sub.add_argument("--port", type=int, help="override RLHF_PORT")
            sub.add_argument("--workers", type=int, help="override RLHF_WORKERS")
            sub.add_argument("--data-dir", help="override RLHF_DATA_DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {
        key: value
        for key in ("host", "port", "workers", "data_dir")
        if (value := getattr(args, key, None)) is not None
    }
    try:
        config = BackendConfig.from_env(**overrides)
    except ConfigError as exc:
        print(f"rlhf-backend: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    handler, _ = COMMANDS[args.command]
    return handler(config, args)


if __name__ == "__main__":
    sys.exit(main())
