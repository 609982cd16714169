"""/predict throughput over HTTP vs. the bare backbone forward on the same texts, in one run.

    python bench/predict_throughput.py --tasks 512 --tasks-per-request 32

1. Bare: the reward model's backbone (tokenizer + encoder forward, batched like the server
   does) over every (prompt, response) text of the tasks, in this process.
2. Ours: a real ``rlhf-backend serve`` (gunicorn, one worker, default models) answering
   ``POST /predict`` for the same tasks, sequentially, end to end over HTTP.

Both run with the same torch thread count. Prints pairs/second for each and the ratio (target
>= 0.8), and the serving worker's peak memory (VmHWM; target < 1.5 GB).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic_world import TOPICS, make_response
from rlhf_core.config import BackendConfig
from rlhf_core.reward_model import RewardModel
from rlhf_core.serving import reward_model_config

CONFIG = """<View><Text name="prompt" value="$prompt"/>
<Pairwise name="comparison" toName="answer1,answer2"/>
<Text name="answer1" value="$answer1"/><Text name="answer2" value="$answer2"/></View>"""


def make_tasks(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        topic = rng.choice(list(TOPICS))
        a, _ = make_response(rng, topic)
        b, _ = make_response(rng, topic)
        data = {"prompt": f"Any advice about {topic}?", "answer1": a, "answer2": b}
        tasks.append({"id": i + 1, "data": data, "project": 1})
    return tasks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_forward(tasks: list[dict], repeats: int) -> float:
    model = RewardModel.create(reward_model_config(BackendConfig()))
    prompts = [t["data"]["prompt"] for t in tasks for _ in (1, 2)]
    responses = [t["data"][k] for t in tasks for k in ("answer1", "answer2")]
    tokenizer, backbone = model.tokenizer, model.backbone
    batch = model.config.batch_size
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(prompts), batch):
                encoded = tokenizer(
                    prompts[i : i + batch],
                    responses[i : i + batch],
                    padding=True,
                    truncation=True,
                    max_length=model.config.max_length,
                    return_tensors="pt",
                )
                backbone(**encoded)
        best = min(best, time.perf_counter() - started)
    return len(tasks) / best


def served(tasks: list[dict], per_request: int, repeats: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as data_dir:
        port = free_port()
        env = {
            **os.environ,
            "RLHF_WORKERS": "1",
            "RLHF_EMBEDDED_WORKER": "0",
            "HF_HUB_OFFLINE": "1",
            "LOG_LEVEL": "WARNING",
        }
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rlhf_cli.main",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                data_dir,
            ],
            env=env,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if requests.get(url + "/health", timeout=5).ok:
                        break
                except requests.RequestException:  # not listening yet, or workers importing
                    time.sleep(0.2)
            session = requests.Session()
            body = {"project": "1.1700000000", "label_config": CONFIG}
            session.post(url + "/predict", json={**body, "tasks": tasks[:2]}, timeout=300)  # load
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                for i in range(0, len(tasks), per_request):
                    response = session.post(
                        url + "/predict",
                        json={**body, "tasks": tasks[i : i + per_request]},
                        timeout=300,
                    )
                    response.raise_for_status()
                best = min(best, time.perf_counter() - started)
            children = subprocess.run(
                ["pgrep", "-P", str(server.pid)], capture_output=True, text=True
            ).stdout.split()
            peak_kb = max(_vm_hwm_kb(int(pid)) for pid in children) if children else 0
            return len(tasks) / best, peak_kb
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


def _vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=512)
    parser.add_argument("--tasks-per-request", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tasks = make_tasks(args.tasks)
    ours, peak_kb = served(tasks, args.tasks_per_request, args.repeats)
    bare = bare_forward(tasks, args.repeats)
    print(
        f"torch threads: {torch.get_num_threads()}, tasks: {args.tasks}, "
        f"tasks per request: {args.tasks_per_request}"
    )
    print("| path | tasks (pairs)/s |")
    print("| --- | --- |")
    print(f"| bare backbone forward (tokenize + encode both responses) | {bare:.1f} |")
    print(f"| POST /predict over HTTP (gunicorn, 1 worker) | {ours:.1f} |")
    print(f"\nratio ours / bare: {ours / bare:.2f} (target >= 0.8)")
    print(f"serving worker peak memory (VmHWM): {peak_kb / 1024:.0f} MiB (target < 1536 MiB)")


if __name__ == "__main__":
    main()
