"""The HTTP latency floor of this machine: a bare Flask app under gunicorn, nothing else.

    python bench/http_floor.py --requests 2000

A ``hello`` app (one JSON route, no store, no auth, no metrics) served by gunicorn with the same
worker class, workers and threads as ``rlhf-backend serve``, hit sequentially, one connection per
request, like ``bench/webhook_latency.py``. Whatever p99 this shows is the machine's (scheduling,
CPU steal of the virtual machine), not the backend's: compare the two in one sitting.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import requests

APP = textwrap.dedent(
    """
    from flask import Flask
    app = Flask(__name__)

    @app.post("/webhook")
    def webhook():
        return {"status": "stored"}
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--port", type=int, default=18777)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "hello.py").write_text(APP)
        gunicorn = str(Path(sys.executable).parent / "gunicorn")
        argv = [gunicorn, "-k", "gthread", "-w", "2", "--threads", "4"]
        argv += ["-b", f"127.0.0.1:{args.port}", "hello:app"]
        server = subprocess.Popen(argv, cwd=tmp, start_new_session=True, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{args.port}/webhook"
        try:
            for _ in range(300):
                try:
                    requests.post(url, json={}, timeout=5)
                    break
                except requests.RequestException:
                    time.sleep(0.1)
            latencies = []
            for _ in range(args.requests):
                started = time.perf_counter()
                requests.post(url, json={"action": "ANNOTATION_CREATED"}, timeout=30)
                latencies.append((time.perf_counter() - started) * 1000)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    latencies.sort()
    n = len(latencies)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    print("| server | requests | p50 ms | p95 ms | p99 ms | max ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| bare Flask + gunicorn gthread (2x4) | {n} | {latencies[n // 2]:.1f} | "
        f"{latencies[int(n * 0.95)]:.1f} | {latencies[int(n * 0.99)]:.1f} | {latencies[-1]:.1f} |"
    )


if __name__ == "__main__":
    main()
