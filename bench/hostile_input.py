"""Storage of one huge ranking, and a /predict on thousands of long tasks (issue 19).

    python bench/hostile_input.py --items 600 --tasks 2000 --response-chars 4000

1. **Ranking storage.** One ``ANNOTATION_CREATED`` webhook ordering ``--items`` responses goes
   through the app (Flask test client, the real store). Baseline, in the same run and the same
   store code: the same annotation written with every implied pair as its own record, which is
   what the backend stored before rankings were kept as rankings. Reported: records and bytes
   the store grew by (database + WAL, after a checkpoint), and the ratio.
2. **/predict on a large selection.** ``--tasks`` tasks, each a prompt and two responses of
   ``--response-chars`` characters, in one ``/predict`` to an app with the default settings
   (``RLHF_PREDICT_TIME_BUDGET_S``), as Label Studio's *Retrieve Predictions* sends them. The
   project is connected (a Label Studio URL is known), so what the time budget leaves is handed
   to a queued pre-annotation job. Reported: seconds to the answer, tasks predicted and handed
   off, this process's RSS before, right after, and after the answer (memory returned).

Prints a Markdown table. In-process: no HTTP or gunicorn overhead, which a real server adds on
top (small next to seconds of scoring).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ml_backend.app import create_app
from rlhf_core.config import BackendConfig
from rlhf_core.conversion import Provenance, convert, ranking_pairs
from rlhf_core.label_schema import parse_label_config
from rlhf_core.store import IncomingAnnotation, Store

RANKING = (
    '<View><Text name="prompt" value="$prompt"/>'
    '<List name="candidates" value="$candidates" title="Candidates"/>'
    '<Ranker name="rank" toName="candidates"/></View>'
)
PAIRWISE = (
    '<View><Text name="prompt" value="$prompt"/>'
    '<Pairwise name="comparison" toName="answer1,answer2"/>'
    '<Text name="answer1" value="$answer1"/><Text name="answer2" value="$answer2"/></View>'
)


def store_bytes(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def ranking_event(items: int) -> dict[str, Any]:
    candidates = [{"id": f"c{k}", "body": f"candidate response number {k}"} for k in range(items)]
    return {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 1, "label_config": RANKING},
        "task": {"id": 1, "data": {"prompt": "Rank these.", "candidates": candidates}},
        "annotation": {
            "id": 1,
            "completed_by": 1,
            "updated_at": "2026-12-02T10:00:00Z",
            "result": [
                {
                    "from_name": "rank",
                    "to_name": "candidates",
                    "type": "ranker",
                    "value": {"ranker": {"rank": [c["id"] for c in candidates]}},
                }
            ],
        },
    }


def bench_ranking(items: int, root: Path) -> dict[str, Any]:
    event = ranking_event(items)
    app = create_app(BackendConfig(data_dir=root / "ranking"))
    path = app.extensions["rlhf"].store.path
    http = app.test_client()
    http.post("/setup", json={"project": "1", "schema": RANKING})
    services = app.extensions["rlhf"]
    # The header /setup's project webhook carries in Label Studio.
    headers = services.credentials.webhook_headers(services.store.project(1))
    empty = store_bytes(path)
    started = time.perf_counter()
    answer = http.post("/webhook", json=event, headers=headers).get_json()
    seconds = time.perf_counter() - started
    grown = store_bytes(path) - empty
    records = answer["records"]

    # Baseline: the same annotation stored with every implied pair as a record (the old layout).
    baseline = Store(root / "baseline" / "store.sqlite3").initialize()
    baseline.upsert_project(1, RANKING)
    base_empty = store_bytes(baseline.path)
    [(_, ranking)] = convert(
        event["annotation"]["result"],
        event["task"]["data"],
        parse_label_config(RANKING),
        Provenance(1, 1, 1, 1),
    )
    pairs = [("preference", p) for p in ranking_pairs(ranking, max_pairs=10**9)]
    incoming = IncomingAnnotation(
        1, 1, 1, 1, event["task"]["data"], event["annotation"]["result"], False, "x", RANKING
    )
    started = time.perf_counter()
    baseline.upsert_annotation(incoming, pairs)
    base_seconds = time.perf_counter() - started
    base_grown = store_bytes(baseline.path) - base_empty
    return {
        "records": records,
        "bytes": grown,
        "seconds": seconds,
        "base_records": len(pairs),
        "base_bytes": base_grown,
        "base_seconds": base_seconds,
    }


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def long_text(seed: int, chars: int) -> str:
    words = [f"w{(seed * 7919 + k * 104729) % 5000}" for k in range(chars // 5 + 1)]
    return " ".join(words)[:chars]


def bench_predict(tasks: int, chars: int, root: Path) -> dict[str, Any]:
    config = BackendConfig.from_env(data_dir=root / "predict")
    app = create_app(config)
    http = app.test_client()
    setup = {"project": "1", "schema": PAIRWISE, "hostname": "http://127.0.0.1:9"}
    setup["access_token"] = "unused"
    http.post("/setup", json=setup)
    # Warm: the reward model is loaded by the first request, as a worker's first /predict does.
    warm = {"id": 0, "data": {"prompt": "p", "answer1": "a", "answer2": "b"}}
    http.post("/predict", json={"project": "1", "tasks": [warm]})
    body = {
        "project": "1.1700000000",
        "tasks": [
            {
                "id": n + 1,
                "data": {
                    "prompt": long_text(n, 300),
                    "answer1": long_text(n + 1, chars),
                    "answer2": long_text(n + 2, chars),
                },
            }
            for n in range(tasks)
        ],
    }
    payload = json.dumps(body).encode()
    del body
    before = rss_mb()
    started = time.perf_counter()
    answer = http.post("/predict", data=payload, content_type="application/json").get_json()
    seconds = time.perf_counter() - started
    after = rss_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    predicted = sum(1 for r in answer["results"] if r)
    return {
        "payload_mb": len(payload) / 2**20,
        "budget_s": config.predict_time_budget_s,
        "seconds": seconds,
        "predicted": predicted,
        "handed_off": answer.get("handed_off", {}).get("tasks", 0),
        "rss_before": before,
        "rss_peak": peak,
        "rss_after": after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=600)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--response-chars", type=int, default=4000)
    parser.add_argument("--skip-predict", action="store_true")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        r = bench_ranking(args.items, Path(tmp))
        print(f"\n| {args.items}-item ranking | records | store growth | write |")
        print("| --- | --- | --- | --- |")
        print(
            f"| as a ranking | {r['records']} | {r['bytes'] / 2**20:.2f} MiB | "
            f"{r['seconds']:.2f} s |"
        )
        print(
            f"| as implied pairs (before) | {r['base_records']} | "
            f"{r['base_bytes'] / 2**20:.2f} MiB | {r['base_seconds']:.2f} s |"
        )
        print(f"| ratio | | {r['base_bytes'] / r['bytes']:.0f}x smaller | |")
        if args.skip_predict:
            return
        p = bench_predict(args.tasks, args.response_chars, Path(tmp))
        print(
            f"\n| /predict, {args.tasks} tasks, 2 x {args.response_chars}-char responses "
            f"({p['payload_mb']:.1f} MiB) | value |"
        )
        print("| --- | --- |")
        print(f"| time budget | {p['budget_s']:g} s |")
        print(f"| answered after | {p['seconds']:.1f} s |")
        print(f"| tasks predicted / handed off | {p['predicted']} / {p['handed_off']} |")
        print(
            f"| RSS before / peak / after | {p['rss_before']:.0f} / {p['rss_peak']:.0f} / "
            f"{p['rss_after']:.0f} MB |"
        )


if __name__ == "__main__":
    main()
