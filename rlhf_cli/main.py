"""``rlhf-backend``: the one console script. Subcommands import what they need when they run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_core.config import BackendConfig, ConfigError, markdown_table

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

    import threading

    from ml_backend.server import exposure_warning, run_gunicorn
    from rlhf_core.db import database_for
    from rlhf_core.store import Store
    from rlhf_core.vault import Vault
    from trainer.worker import supervise

    warning = exposure_warning(config)
    if warning:
        logging.getLogger(__name__).warning(warning)
    # The schema and the key file are created once, before any fork.
    vault = Vault.for_config(config)
    Store(database_for(config)).initialize(seal=vault.token_sealer(config))
    stop = threading.Event()
    if config.embedded_worker:
        command = [sys.executable, "-m", "rlhf_cli.main", "worker"]
        env = {**os.environ, "RLHF_DATA_DIR": str(config.data_dir)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        threading.Thread(
            target=supervise, args=(command, stop, env), name="worker-supervisor", daemon=True
        ).start()
    try:
        return run_gunicorn(config)
    finally:
        stop.set()


def _migrate(config: BackendConfig, args: argparse.Namespace) -> int:
    """Bring the database to the newest schema, or (``--from``) copy a SQLite store into it."""
    from rlhf_core.db import Database, DatabaseUrlError, database_for
    from rlhf_core.migrate import MigrationError, copy_store, upgrade

    try:
        target = database_for(config)
        if args.source is None:
            print(f"{target!r}: schema at revision {upgrade(target)}")
            return 0
        counts = copy_store(Database(args.source), target)
    except (DatabaseUrlError, MigrationError) as exc:
        print(f"rlhf-backend migrate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"into": repr(target), "copied": counts}, indent=2))
    return 0


def _worker(config: BackendConfig, args: argparse.Namespace) -> int:
    from rlhf_core.db import database_for
    from rlhf_core.migrate import upgrade
    from trainer.worker import Worker, default_chores, default_handlers

    upgrade(database_for(config))  # the schema first, whichever way jobs arrive

    if config.redis_url:  # jobs arrive through RQ (trainer/dispatch.py)
        from trainer.dispatch import run_rq_worker

        run_rq_worker(config, burst=args.once)
        return 0
    worker = Worker(config, default_handlers(config), default_chores(config))
    worker.install_signal_handlers()
    worker.run(once=args.once)
    return 0


def _enqueue_or_run(config: BackendConfig, args: argparse.Namespace, kind: str) -> int:
    """Queue a job for the project's workers, or (default) run it here with a progress bar."""
    store = _known_project_store(config, args.project)
    if store is None:
        return 2
    if args.queue:
        job = store.enqueue_job(args.project, kind, trigger="cli")
        if job is None:
            print(f"a {kind} job for project {args.project} is already queued", file=sys.stderr)
        else:
            from rlhf_core.notify import notify_workers

            notify_workers(config, job.job_id, "cli")
            print(f"queued {kind} job {job.job_id} for project {args.project}")
        return 0
    from trainer.distributed import launched

    if launched():  # one of the processes that `accelerate launch` started
        if kind != "train":
            print(f"rlhf-backend: {kind} runs in one process; only train spreads", file=sys.stderr)
            return 2
        return _train_across_ranks(config, store, args.project)
    from trainer.worker import Worker, default_handlers  # torch and the models: seconds

    worker = Worker(config, default_handlers(config))
    claimed = store.start_job(args.project, kind, "cli", worker.name)
    if claimed is None:
        print(f"a worker is already running a {kind} job for this project", file=sys.stderr)
        return 1
    worker.run_job(claimed)
    return _print_outcome(store, claimed.job_id)


def _train_across_ranks(config: BackendConfig, store: Any, project_id: int) -> int:
    """``accelerate launch ... -m rlhf_cli.main train``: rank 0 claims and records the job,
    every rank trains the policy (trainer/distributed.py)."""
    from trainer.distributed import join_launched_ranks
    from trainer.jobs import train_job
    from trainer.worker import Worker

    ranks = join_launched_ranks()
    if not ranks.is_main:
        claimed = ranks.share(None)
        if claimed is not None:
            train_job(config, claimed, ranks)
        ranks.finish()  # exit together with rank 0, which gates and saves after training
        return 0
    worker = Worker(config, {"train": lambda job: train_job(config, job, ranks)})
    claimed = ranks.share(store.start_job(project_id, "train", "cli", worker.name))
    if claimed is None:
        print("a worker is already running a train job for this project", file=sys.stderr)
        ranks.finish()
        return 1
    worker.run_job(claimed)  # records the outcome
    outcome = _print_outcome(store, claimed.job_id)
    if outcome == 0:
        ranks.finish()
    # A failure exits non-zero without waiting: accelerate's launcher then stops the other ranks.
    return outcome


def _print_outcome(store: Any, job_id: int) -> int:
    from rlhf_core.store import JOB_DONE

    finished = store.job(job_id)
    assert finished is not None
    outcome = {
        "job": finished.job_id,
        "status": finished.status,
        "error": finished.error,
        "result": finished.result,
    }
    print(json.dumps(outcome, indent=2))
    return 0 if finished.status == JOB_DONE else 1


def _preannotate(config: BackendConfig, args: argparse.Namespace) -> int:
    return _enqueue_or_run(config, args, "preannotate")


def _train(config: BackendConfig, args: argparse.Namespace) -> int:
    return _enqueue_or_run(config, args, "train")


def _simulate(config: BackendConfig, args: argparse.Namespace) -> int:
    from rlhf_core.reward_model import RewardModel
    from rlhf_core.serving import reward_model_config
    from trainer.simulate import (
        SimulationInputError,
        load_annotators,
        load_inputs,
        plot_curves,
        simulate,
    )

    try:
        pool, labels, evaluation = load_inputs(Path(args.pool), Path(args.labels), Path(args.eval))
        annotators = load_annotators(Path(args.labels))
        if args.budget > len(pool):
            raise SimulationInputError(
                f"--budget {args.budget} is larger than the pool ({len(pool)} pairs)"
            )
        model = RewardModel.create(reward_model_config(config))
        result = simulate(
            model,
            pool,
            labels,
            evaluation,
            args.strategy,
            args.budget,
            args.batch_size,
            args.seed,
            annotators=annotators,
        )
    except (SimulationInputError, ValueError) as exc:
        print(f"rlhf-backend simulate: {exc}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps(result, indent=2))
    if args.plot:
        plot_curves([result], Path(args.plot))
    final = result["curve"][-1]
    print(
        f"{args.strategy}: {final['labels']} labels -> eval accuracy {final['eval_accuracy']:.3f}"
    )
    flagged = {a: r["flag"] for a, r in final.get("reliability", {}).items() if r["flag"]}
    if flagged:
        print("flagged annotators: " + ", ".join(f"{a} ({f})" for a, f in flagged.items()))
    return 0


def _known_project_store(config: BackendConfig, project_id: int) -> Any:
    """The store, or None (with the reason printed) when the project is not connected here."""
    from rlhf_core.db import database_for
    from rlhf_core.store import Store
    from rlhf_core.vault import Vault

    seal = Vault.for_config(config).token_sealer(config)
    store = Store(database_for(config)).initialize(seal=seal)
    if store.project(project_id) is None:
        print(
            f"rlhf-backend: project {project_id} is unknown here: connect this backend to it "
            "in Label Studio first (it then calls /setup)",
            file=sys.stderr,
        )
        return None
    return store


def _on_project(
    config: BackendConfig,
    project_id: int,
    command: str,
    errors: type[Exception],
    action: Callable[[Any, Any], dict[str, Any]],
) -> int:
    """``action(store, registry)`` on a connected project; its result printed as JSON, or its
    error (exit status 2)."""
    from trainer.jobs import registry_for

    store = _known_project_store(config, project_id)
    if store is None:
        return 2
    try:
        result = action(store, registry_for(config))
    except errors as exc:
        print(f"rlhf-backend {command}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def _export(config: BackendConfig, args: argparse.Namespace) -> int:
    from trainer.export import ExportError, export_dataset, export_version

    def export(store: Any, registry: Any) -> dict[str, Any]:
        if args.version:
            if args.hf:
                raise ExportError("--hf is for the data, not for --version")
            return export_version(config, registry, args.project, args.version, Path(args.out))
        written = export_dataset(
            store, registry, args.project, Path(args.out), args.hf, config.max_ranking_pairs
        )
        return {**written.summary(), "disk_bytes": registry.disk_usage(args.project)}

    return _on_project(config, args.project, "export", ExportError, export)


def _serve_version(config: BackendConfig, args: argparse.Namespace) -> int:
    from trainer.versions import VersionError, pin, status, unpin

    def serve_version(store: Any, registry: Any) -> dict[str, Any]:
        if args.unpin and args.version:
            raise VersionError("give --version (to pin) or --unpin, not both")
        if args.unpin:
            return unpin(config, store, registry, args.project)
        if args.version:
            return pin(config, store, registry, args.project, args.version, args.reason or "")
        return status(registry, args.project)

    return _on_project(config, args.project, "serve-version", VersionError, serve_version)


def _forget(config: BackendConfig, args: argparse.Namespace) -> int:
    from trainer.forget import forget_task

    def forget(store: Any, registry: Any) -> dict[str, Any]:
        return forget_task(config, store, registry, args.project, args.task)

    return _on_project(config, args.project, "forget", LookupError, forget)


def _reconcile(config: BackendConfig, args: argparse.Namespace) -> int:
    """Read the project's annotations from Label Studio and store what is missing or changed.

    Runs here, whether or not the service runs (the store takes concurrent writers)."""
    from trainer.label_studio_sync import project_tasks
    from trainer.reconcile import reconcile_project

    store = _known_project_store(config, args.project)
    if store is None:
        return 2
    try:
        tasks = project_tasks(config, store, args.project)
        report = reconcile_project(store, args.project, tasks, config.train_every)
    except LookupError as exc:
        print(f"rlhf-backend reconcile: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict()))
    return 0


def _status(config: BackendConfig, args: argparse.Namespace) -> int:
    """What is served, what Label Studio shows, and the syncs still pending (JSON)."""
    from rlhf_core.registry import POLICY, REWARD_MODEL
    from trainer.jobs import registry_for
    from trainer.label_studio_sync import project_tasks

    store = _known_project_store(config, args.project)
    if store is None:
        return 2
    registry = registry_for(config)
    status: dict[str, Any] = {
        "project": args.project,
        "served": registry.served_version(args.project),
    }
    try:
        status["label_studio"] = project_tasks(config, store, args.project).project_model_version(
            args.project
        )
    except Exception as exc:  # Label Studio down or unreachable: say so, show the rest
        status["label_studio"] = None
        status["label_studio_error"] = f"{type(exc).__name__}: {exc}"[:300]
    status["in_sync"] = status["label_studio"] == status["served"]
    status["pending_syncs"] = [s.as_dict() for s in registry.pending_syncs(args.project)]
    status["decisions"] = {
        kind: [
            {
                "version": v.version,
                "status": v.status,
                "reason": v.reason,
                "evidence": v.metrics.get("gate"),
            }
            for v in registry.versions(args.project, kind)[-3:]
        ]
        for kind in (REWARD_MODEL, POLICY)
    }
    print(json.dumps(status, indent=2))
    return 0


def _print_config(config: BackendConfig, args: argparse.Namespace) -> int:
    print(markdown_table())
    return 0


COMMANDS = {
    "serve": (_serve, "Run the HTTP service (gunicorn) Label Studio connects to."),
    "worker": (_worker, "Run training and pre-annotation jobs from the store."),
    "migrate": (
        _migrate,
        "Bring the database (RLHF_DATABASE_URL) to the newest schema; --from copies a SQLite "
        "store into it.",
    ),
    "preannotate": (_preannotate, "Generate candidates and predictions for a project's tasks."),
    "train": (_train, "Retrain the reward model and policy of a project now."),
    "simulate": (_simulate, "Replay active learning against a hidden oracle (JSONL files)."),
    "export": (
        _export,
        "Write a project's preference data (TRL formats, --hf), or a version's checkpoints.",
    ),
    "serve-version": (
        _serve_version,
        "Pin a version as the served one (with a reason), or --unpin; no flag: show the state.",
    ),
    "forget": (_forget, "Remove a task's annotations and records everywhere the backend has them."),
    "reconcile": (
        _reconcile,
        "Store a project's annotations that Label Studio has and the store lacks (JSON counts).",
    ),
    "status": (_status, "What a project serves, what Label Studio shows, and pending syncs."),
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
        if name == "worker":
            sub.add_argument("--once", action="store_true", help="exit when the queue is empty")
            sub.add_argument("--data-dir", help="override RLHF_DATA_DIR")
        if name == "migrate":
            sub.add_argument(
                "--from",
                dest="source",
                help="sqlite:///PATH/store.sqlite3: copy that store into RLHF_DATABASE_URL "
                "(which must hold no store yet)",
            )
            sub.add_argument("--data-dir", help="override RLHF_DATA_DIR")
        if name == "simulate":
            sub.add_argument("--pool", required=True, help="POOL.jsonl: id, prompt, responses")
            sub.add_argument("--labels", required=True, help="LABELS.jsonl: id, preferred")
            sub.add_argument("--eval", required=True, help="EVAL.jsonl: held-out labeled pairs")
            sub.add_argument(
                "--strategy",
                default="default",
                help="random, entropy, margin, variance, bald, batch, eig, adaptive, mixed, "
                "or default",
            )
            sub.add_argument("--budget", type=int, default=400, help="labels to spend")
            sub.add_argument("--batch-size", type=int, default=50, help="labels per round")
            sub.add_argument("--seed", type=int, default=0)
            sub.add_argument("--out", required=True, help="RESULT.json")
            sub.add_argument("--plot", help="CURVE.png (optional)")
        if name in ("export", "serve-version", "forget"):
            sub.add_argument("--project", type=int, required=True, help="Label Studio project id")
            sub.add_argument("--data-dir", help="override RLHF_DATA_DIR")
        if name == "export":
            sub.add_argument("--out", required=True, help="directory to write")
            sub.add_argument("--hf", action="store_true", help="also a `datasets` dataset (hf/)")
            sub.add_argument(
                "--version", help="a model version (rm-0002.policy-0001, or one part) to export"
            )
        if name == "serve-version":
            sub.add_argument("--version", help="the version to serve, e.g. rm-0002.policy-0001")
            sub.add_argument("--reason", help="why (recorded with the pin)")
            sub.add_argument("--unpin", action="store_true", help="serve the last promoted again")
        if name == "forget":
            sub.add_argument("--task", type=int, required=True, help="Label Studio task id")
        if name in ("preannotate", "train", "reconcile", "status"):
            sub.add_argument("--project", type=int, required=True, help="Label Studio project id")
            sub.add_argument("--data-dir", help="override RLHF_DATA_DIR")
        if name in ("preannotate", "train"):
            sub.add_argument("--queue", action="store_true", help="queue it for the workers")
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
