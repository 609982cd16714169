"""Webhook intake latency over HTTP against a real ``rlhf-backend serve``.

    python bench/webhook_latency.py --requests 2000 --threads 4
    python bench/webhook_latency.py --requests 2000 --threads 4 \
        --database-url sqlite --database-url postgresql

``--database-url`` (repeat it to compare databases in one run, each with a fresh server and
data dir): ``sqlite`` (the default: the store file in the data dir), ``sqlite:full`` (the same
with ``RLHF_STORE_SYNC=full``: an fsync per commit, as PostgreSQL's default does), a
``postgresql://`` URL of yours (each run gets a fresh database created on that server), or
``postgresql`` (a throwaway cluster started here from Debian's ``postgresql`` package, with
PostgreSQL's default durability: fsync and synchronous_commit on), or
``postgresql:NAME=VALUE[,...]`` (a database of that cluster whose sessions have these settings,
e.g. ``postgresql:synchronous_commit=off``). All the servers are up together, and each phase
is split into ``--rounds`` rounds in which the databases take turns, so a change in the
machine's load falls on each of them alike; the webhook p99 on each PostgreSQL over each
SQLite's is printed per phase (target: at most 2).

Starts the server (gunicorn, the configured number of workers, default 2; the embedded job
worker off unless ``--with-worker``) on a free loopback port with a temporary data dir, connects
a project with the captured Label Studio 1.23.2 ``/setup`` request, then sends ``--requests``
webhooks built from the captured ``ANNOTATION_CREATED`` payload, half of them creating a new
annotation and half updating one created earlier (later ``updated_at``, other choice):

1. sequentially from one client,
2. from ``--threads`` concurrent clients.

Each webhook opens its own connection, as Label Studio sends them (``--keep-alive``: one
connection per client). Every answer must be 200 ``stored`` and the store must hold every
annotation afterwards. Prints p50/p95/p99/max latency (ms, client side, from sending the request
to reading the answer), throughput and connection resets as a Markdown table, with the machine
and its load. Target: p99 < 50 ms on a 2-core machine, no resets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TARGET_P99_MS = 50.0
MAX_P99_RATIO = 2.0  # PostgreSQL's webhook p99 against SQLite's, same run
WARMUP = 50

BENCH_WEBHOOK_SECRET = "bench-webhook-secret-0123456789"


def captured(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())["body"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``rlhf-backend serve`` in its own process group, stopped with the group."""

    def __init__(
        self,
        data_dir: Path,
        workers: int | None,
        with_worker: bool,
        database_url: str,
        store_sync: str = "normal",
    ) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(data_dir / "server.log", "wb")  # noqa: SIM115 (closed in stop)
        script = Path(sys.executable).parent / "rlhf-backend"
        argv = (
            [str(script), "serve"]
            if script.exists()
            else [sys.executable, "-m", "rlhf_cli.main", "serve"]
        )
        argv += [
            "--host",
            "127.0.0.1",
            "--port",
            self.url.rsplit(":", 1)[1],
            "--data-dir",
            str(data_dir),
        ]
        if workers is not None:
            argv += ["--workers", str(workers)]
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "LOG_LEVEL": "WARNING",
            "RLHF_EMBEDDED_WORKER": "1" if with_worker else "0",
            "RLHF_WEBHOOK_SECRET": BENCH_WEBHOOK_SECRET,  # webhooks sent as Label Studio's would be
            "RLHF_DATABASE_URL": database_url,
            "RLHF_STORE_SYNC": store_sync,
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.process = subprocess.Popen(
            argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_healthy(self, timeout_s: float = 300.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise SystemExit(
                    f"server exited with {self.process.returncode}; see {self.log.name}"
                )
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise SystemExit(f"server not healthy after {timeout_s:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=10)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


def webhooks(first_id: int, n: int) -> list[dict[str, Any]]:
    """``n`` webhooks: even positions create annotation ``first_id + k``, odd ones update it."""
    template = captured("05_webhook_annotation_created")
    bodies = []
    for position in range(n):
        annotation_id = first_id + position // 2
        update = position % 2 == 1
        body = json.loads(json.dumps(template))
        body["action"] = "ANNOTATION_UPDATED" if update else "ANNOTATION_CREATED"
        annotation = body["annotation"]
        annotation["id"] = annotation["task"] = annotation_id
        annotation["updated_at"] = f"2026-11-23T10:{44 + update}:12.926390Z"
        annotation["result"][0]["value"]["selected"] = "left" if update else "right"
        body["task"]["id"] = annotation_id
        bodies.append(body)
    return bodies


def post_all(
    url: str, bodies: list[dict[str, Any]], keep_alive: bool, latencies: list[float]
) -> int:
    """Send ``bodies`` in order; returns how many attempts failed without an answer (each is
    sent again, at most 3 times). Without ``keep_alive`` every webhook opens its own
    connection, as Label Studio's ``requests.post`` does."""
    failed = 0
    with requests.Session() as session:
        post = session.post if keep_alive else requests.post
        for body in bodies:
            data = json.dumps(body).encode()
            for attempt in range(3):
                started = time.perf_counter()
                try:
                    response = post(
                        f"{url}/webhook",
                        data=data,
                        headers={
                            "Content-Type": "application/json",
                            "X-RLHF-Webhook-Secret": BENCH_WEBHOOK_SECRET,
                        },
                        timeout=30,
                    )
                    break
                except requests.ConnectionError:
                    failed += 1
                    if attempt == 2:
                        raise
            elapsed = time.perf_counter() - started
            if response.status_code != 200 or response.json().get("status") != "stored":
                raise RuntimeError(f"unexpected answer {response.status_code}: {response.text}")
            latencies.append(elapsed * 1000)
    return failed


@dataclass
class Result:
    name: str
    clients: int
    latencies_ms: list[float]
    wall_s: float
    failed: int  # attempts that got no answer (connection reset), sent again
    database: str = "sqlite"

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    def row(self) -> str:
        n = len(self.latencies_ms)
        p50, p95, p99 = (self.percentile(q) for q in (50, 95, 99))
        return (
            f"| {self.database} | {self.name} | {self.clients} | {n} | "
            f"{p50:.1f} | {p95:.1f} | {p99:.1f} | "
            f"{max(self.latencies_ms):.1f} | {statistics.fmean(self.latencies_ms):.1f} | "
            f"{n / self.wall_s:.0f} | {self.failed} | {'yes' if p99 < TARGET_P99_MS else 'NO'} |"
        )


def run_phase(
    url: str, name: str, bodies: list[dict[str, Any]], clients: int, keep_alive: bool
) -> Result:
    # A create and its update go to the same client, in order: each answer must be "stored".
    shares = [[b for i, b in enumerate(bodies) if (i // 2) % clients == k] for k in range(clients)]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failed = [0] * clients
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            failed[k] = post_all(url, shares[k], keep_alive, latencies[k])
        except BaseException as exc:  # reported below, after every thread stopped
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return Result(name, clients, [ms for share in latencies for ms in share], wall, sum(failed))


def machine() -> dict[str, str]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    return {"nproc": str(os.cpu_count()), "cpu": model, "python": platform.python_version()}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def stored_count(database_url: str) -> int:
    sys.path.insert(0, str(ROOT))
    from rlhf_core.store import Store

    return len(Store(database_url).annotations(1))


class Databases:
    """The databases named on the command line, each made fresh for its run."""

    def __init__(self) -> None:
        self.cluster: Any = None  # tests/postgres.py's PostgresServer, started on first use

    def fresh(self, spec: str, data_dir: Path) -> str:
        if spec in ("sqlite", "sqlite:full"):
            return f"sqlite:///{data_dir / 'store.sqlite3'}"
        if spec.split(":", 1)[0] == "postgresql" and "://" not in spec:
            url = self._cluster().create_database("bench")
            settings = spec.split(":", 1)[1].split(",") if ":" in spec else []
            return _with_settings(url, dict(item.split("=", 1) for item in settings))
        return _new_database(spec)

    def _cluster(self) -> Any:
        """A throwaway PostgreSQL cluster (tests/postgres.py) with its default durability."""
        if self.cluster is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from postgres import PostgresServer, find_binaries

            binaries = find_binaries()
            if binaries is None:
                raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
            self.cluster = PostgresServer(binaries, free_port()).start(durable=True)
        return self.cluster

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()


def _new_database(server_url: str) -> str:
    """A new database on the PostgreSQL server of ``server_url``; returns its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"rlhf_bench_{os.getpid()}_{time.monotonic_ns()}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def _with_settings(url: str, settings: dict[str, str]) -> str:
    """``url``, its database set to give each session these settings (``ALTER DATABASE``)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as conn:
        for name, value in settings.items():
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                    sql.Identifier(conn.info.dbname), sql.Identifier(name), sql.Literal(value)
                )
            )
    return url


def label(spec: str) -> str:
    """How a database is named in the results: a server URL by its host, never its password."""
    if "://" not in spec:
        return spec
    from sqlalchemy.engine import make_url

    parsed = make_url(spec)
    return f"{parsed.get_backend_name()} at {parsed.host}:{parsed.port or 5432}"


@dataclass
class Target:
    """One database under test: its server, on a data dir of its own."""

    spec: str
    data_dir: Path
    database_url: str
    server: Server
    startup_s: float = 0.0

    @property
    def name(self) -> str:
        return label(self.spec)


def start_targets(
    args: argparse.Namespace, databases: Databases, root: Path, targets: list[Target]
) -> None:
    """A server for each database (added to ``targets`` as it starts), set up and warmed."""
    for k, spec in enumerate(args.database_url or ["sqlite"]):
        data_dir = root / f"{k}-{spec.split(':', 1)[0]}"
        data_dir.mkdir()
        url = databases.fresh(spec, data_dir)
        sync = "full" if spec == "sqlite:full" else "normal"
        server = Server(data_dir, args.workers, args.with_worker, url, sync)
        targets.append(Target(spec, data_dir, url, server))
    for target in targets:
        target.startup_s = target.server.wait_healthy()
        setup = captured("01_setup")
        del setup["hostname"], setup["access_token"]
        requests.post(f"{target.server.url}/setup", json=setup, timeout=30).raise_for_status()
        run_phase(target.server.url, "warm-up", webhooks(1, WARMUP), 1, args.keep_alive)


def run_rounds(args: argparse.Namespace, targets: list[Target]) -> list[Result]:
    """Each phase in ``args.rounds`` rounds, the databases taking turns (the first of one round
    goes last in the next), so a change in the machine's load falls on all of them alike."""
    results: dict[tuple[str, str], Result] = {}
    per_round = [len(part) for part in _split(list(range(args.requests)), args.rounds)]
    first = {"sequential": 100_000, "concurrent": 200_000}
    for round_index, n in enumerate(per_round):
        turn = targets[round_index % len(targets) :] + targets[: round_index % len(targets)]
        for phase, clients in (("sequential", 1), ("concurrent", args.threads)):
            start_id = first[phase] + sum(per_round[:round_index])
            for target in turn:
                part = run_phase(
                    target.server.url, phase, webhooks(start_id, n), clients, args.keep_alive
                )
                key = (target.name, phase)
                if key not in results:
                    results[key] = Result(phase, clients, [], 0.0, 0, target.name)
                results[key].latencies_ms += part.latencies_ms
                results[key].wall_s += part.wall_s
                results[key].failed += part.failed
    for target in targets:
        expected = WARMUP // 2 + sum(2 * (n // 2 + n % 2) for n in per_round)
        stored = stored_count(target.database_url)
        if stored != expected:
            raise SystemExit(f"{target.name}: store holds {stored} annotations, not {expected}")
    return [results[(t.name, phase)] for t in targets for phase in ("sequential", "concurrent")]


def _split(items: list[int], parts: int) -> list[list[int]]:
    size, extra = divmod(len(items), parts)
    cuts = [size * k + min(k, extra) for k in range(parts + 1)]
    return [items[cuts[k] : cuts[k + 1]] for k in range(parts)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="webhooks per phase")
    parser.add_argument("--threads", type=int, default=4, help="clients in the concurrent phase")
    parser.add_argument(
        "--workers", type=int, default=None, help="gunicorn workers (default: RLHF_WORKERS)"
    )
    parser.add_argument(
        "--with-worker", action="store_true", help="also run the embedded job worker"
    )
    parser.add_argument("--keep-alive", action="store_true", help="reuse one connection per client")
    parser.add_argument(
        "--database-url",
        action="append",
        metavar="URL",
        help="sqlite (default), postgresql (a throwaway cluster started here) or a "
        "postgresql:// server URL; repeat to compare in one run",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="split each phase into this many rounds, the databases taking turns",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a p99 misses the target")
    args = parser.parse_args(argv)

    if len(set(args.database_url or ["sqlite"])) != len(args.database_url or ["sqlite"]):
        parser.error("name each database once")
    databases = Databases()
    with tempfile.TemporaryDirectory(prefix="webhook-bench-") as tmp:
        targets: list[Target] = []
        try:
            start_targets(args, databases, Path(tmp), targets)
            load_before = load_average()
            results = run_rounds(args, targets)
            load_after = load_average()
        except BaseException:
            for target in targets:
                target.server.log.flush()
                tail = (target.data_dir / "server.log").read_text(errors="replace")[-4000:]
                print(f"{target.name} server log (tail):\n{tail}", file=sys.stderr)
            raise
        finally:
            for target in targets:
                target.server.stop()
            databases.stop()

    info = machine()
    print(f"machine: {info['nproc']} CPUs, {info['cpu']}, Python {info['python']}")
    print(
        f"workers: {args.workers or 'default'}; "
        f"connections: {'kept alive per client' if args.keep_alive else 'one per webhook'}"
    )
    for target in targets:
        print(f"{target.name}: server healthy after {target.startup_s:.0f} s")
    print(f"load average (1/5/15 min) before: {load_before}; after: {load_after}")
    print(f"{args.rounds} rounds, the databases taking turns in each")
    print(
        "\n| database | phase | clients | requests | p50 ms | p95 ms | p99 ms | max ms | mean ms "
        f"| req/s | resets | p99 < {TARGET_P99_MS:.0f} ms |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for result in results:
        print(result.row())
    for line in p99_ratios(results):
        print(line)
    missed = [r for r in results if r.percentile(99) >= TARGET_P99_MS or r.failed]
    return 1 if args.check and missed else 0


def p99_ratios(results: list[Result]) -> list[str]:
    """Each phase's p99 on each PostgreSQL over its p99 on each SQLite (target: at most 2)."""
    lines = []
    for result in results:
        if result.database.startswith("sqlite"):
            continue
        for baseline in results:
            if baseline.database.startswith("sqlite") and baseline.name == result.name:
                ratio = result.percentile(99) / baseline.percentile(99)
                verdict = "within" if ratio <= MAX_P99_RATIO else "OVER"
                lines.append(
                    f"{result.name}: {result.database} p99 / {baseline.database} p99 = "
                    f"{ratio:.2f} ({verdict} the {MAX_P99_RATIO:g}x target)"
                )
    return lines


if __name__ == "__main__":
    sys.exit(main())
