"""Webhook intake latency over HTTP against a real ``rlhf-backend serve``.

    python bench/webhook_latency.py --requests 2000 --threads 4

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

    def __init__(self, data_dir: Path, workers: int | None, with_worker: bool) -> None:
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

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    def row(self) -> str:
        n = len(self.latencies_ms)
        p50, p95, p99 = (self.percentile(q) for q in (50, 95, 99))
        return (
            f"| {self.name} | {self.clients} | {n} | {p50:.1f} | {p95:.1f} | {p99:.1f} | "
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


def stored_count(data_dir: Path) -> int:
    sys.path.insert(0, str(ROOT))
    from rlhf_core.store import Store

    return len(Store(data_dir / "store.sqlite3").annotations(1))


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
    parser.add_argument("--check", action="store_true", help="exit 1 when a p99 misses the target")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="webhook-bench-") as tmp:
        data_dir = Path(tmp)
        server = Server(data_dir, args.workers, args.with_worker)
        try:
            startup_s = server.wait_healthy()
            setup = captured("01_setup")
            del setup["hostname"], setup["access_token"]
            requests.post(f"{server.url}/setup", json=setup, timeout=30).raise_for_status()
            load_before = load_average()
            keep = args.keep_alive
            run_phase(server.url, "warm-up", webhooks(1, WARMUP), 1, keep)
            n = args.requests
            results = [
                run_phase(server.url, "sequential", webhooks(100_000, n), 1, keep),
                run_phase(server.url, "concurrent", webhooks(200_000, n), args.threads, keep),
            ]
            load_after = load_average()
            expected = WARMUP // 2 + 2 * (n // 2 + n % 2)
            if stored_count(data_dir) != expected:
                raise SystemExit(
                    f"store holds {stored_count(data_dir)} annotations, not {expected}"
                )
        except BaseException:
            server.log.flush()
            tail = (data_dir / "server.log").read_text(errors="replace")[-4000:]
            print(f"server log (tail):\n{tail}", file=sys.stderr)
            raise
        finally:
            server.stop()

    info = machine()
    print(f"machine: {info['nproc']} CPUs, {info['cpu']}, Python {info['python']}")
    print(
        f"server: healthy after {startup_s:.0f} s; workers: {args.workers or 'default'}; "
        f"connections: {'kept alive per client' if args.keep_alive else 'one per webhook'}"
    )
    print(f"load average (1/5/15 min) before: {load_before}; after: {load_after}\n")
    print(
        "| phase | clients | requests | p50 ms | p95 ms | p99 ms | max ms | mean ms | req/s "
        f"| resets | p99 < {TARGET_P99_MS:.0f} ms |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for result in results:
        print(result.row())
    missed = [r for r in results if r.percentile(99) >= TARGET_P99_MS or r.failed]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
