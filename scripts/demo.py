"""`make demo`: Label Studio and this backend on this machine, with a sample RLHF project.

Offline and self-contained: starts Label Studio (from ``.venv-ls``) on a fresh data dir under
``demo-data/``, starts ``rlhf-backend serve``, creates a project from
``label_configs/<template>.xml`` with its sample tasks (some with two responses, some with only a
prompt), connects the backend, pre-annotates (candidates for prompt-only tasks, predictions for
all), and prints the URL and login. Ctrl-C stops both servers; the data stays in ``demo-data/``
(delete it for a fresh start).

    python scripts/demo.py --label-studio .venv-ls/bin/label-studio [--template pairwise]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
from label_studio_sdk.client import LabelStudio

REPO = Path(__file__).resolve().parents[1]
USER = "demo@example.com"
RLHF = str(Path(sys.executable).parent / "rlhf-backend")  # the console script in this venv


def wait_healthy(url: str, process: subprocess.Popen, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{what} exited with code {process.returncode}; see its log in demo-data/")
        try:
            if requests.get(url, timeout=5).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    sys.exit(f"{what} did not answer {url} within {timeout_s:.0f} s")


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label-studio", required=True, help="the label-studio executable")
    parser.add_argument("--template", default="pairwise", help="a name in label_configs/")
    parser.add_argument("--data-dir", type=Path, default=REPO / "demo-data")
    parser.add_argument("--ls-port", type=int, default=8080)
    parser.add_argument("--backend-port", type=int, default=9090)
    parser.add_argument("--no-wait", action="store_true", help="exit once everything is set up")
    parser.add_argument(
        "--screenshot", type=Path, help="save the labeling screen here (scripts/screenshot.py)"
    )
    parser.add_argument("--screenshot-task", type=int, help="the Nth task (default: lowest score)")
    args = parser.parse_args()

    fresh = not (args.data_dir / "credentials.json").exists()
    if fresh:
        shutil.rmtree(args.data_dir, ignore_errors=True)
        (args.data_dir / "label-studio").mkdir(parents=True)
        credentials = {"password": secrets.token_urlsafe(12), "token": secrets.token_hex(20)}
        (args.data_dir / "credentials.json").write_text(json.dumps(credentials))
    credentials = json.loads((args.data_dir / "credentials.json").read_text())
    ls_url = f"http://127.0.0.1:{args.ls_port}"
    backend_url = f"http://127.0.0.1:{args.backend_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "RLHF_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    ls_env = {
        **env,
        # Let Label Studio call a backend on loopback, and accept the legacy API token.
        "ML_BLOCK_LOCAL_IP": "false",
        "USE_DEFAULT_BANNED_SUBNETS": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_USERNAME": USER,
        "LABEL_STUDIO_PASSWORD": credentials["password"],
        "LABEL_STUDIO_USER_TOKEN": credentials["token"],
        # Nothing leaves the machine.
        "COLLECT_ANALYTICS": "false",
        "LATEST_VERSION_CHECK": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
    }
    print("starting Label Studio (the first start migrates its database: minutes)...")
    label_studio = start(
        [
            args.label_studio,
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--port",
            str(args.ls_port),
            "--data-dir",
            str(args.data_dir / "label-studio"),
        ],
        ls_env,
        args.data_dir / "label-studio.log",
    )
    print("starting the backend...")
    backend = start(
        [
            str(Path(sys.executable).parent / "rlhf-backend"),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(args.backend_port),
            "--data-dir",
            str(args.data_dir / "backend"),
        ],
        env,
        args.data_dir / "backend.log",
    )
    processes = [label_studio, backend]
    try:
        wait_healthy(backend_url + "/health", backend, "the backend", 600)
        wait_healthy(ls_url + "/health", label_studio, "Label Studio", 1800)
        ls = LabelStudio(base_url=ls_url, api_key=credentials["token"], timeout=600)
        project_id = ensure_project(ls, ls_url, credentials["token"], backend_url, args.template)
        print(f"pre-annotating project {project_id} (candidates + predictions)...")
        subprocess.run(
            [
                str(Path(sys.executable).parent / "rlhf-backend"),
                "preannotate",
                "--project",
                str(project_id),
                "--data-dir",
                str(args.data_dir / "backend"),
            ],
            env=env,
            check=True,
        )
        print(
            f"\nReady: open {ls_url}/projects/{project_id}/data\n"
            f"  login:    {USER}\n  password: {credentials['password']}\n"
            f"  backend:  {backend_url} (connected to the project)\n"
        )
        if args.screenshot:
            shot = [sys.executable, str(REPO / "scripts" / "screenshot.py"), "--url", ls_url]
            shot += ["--project", str(project_id), "--user", USER, "--out", str(args.screenshot)]
            shot += ["--credentials", str(args.data_dir / "credentials.json")]
            if args.screenshot_task:
                shot += ["--task", str(args.screenshot_task)]
            subprocess.run(shot, env=env, check=True)
        if not args.no_wait:
            print("Ctrl-C stops both servers.")
            while all(p.poll() is None for p in processes):
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    return 0


def ensure_project(ls: LabelStudio, ls_url: str, token: str, backend_url: str, name: str) -> int:
    """The demo project (made once), with its tasks imported and the backend connected."""
    title = f"RLHF demo: {name}"
    for project in ls.projects.list():
        if project.title == title:
            return int(project.id)
    config = (REPO / "label_configs" / f"{name}.xml").read_text()
    tasks = json.loads((REPO / "label_configs" / f"{name}.tasks.json").read_text())
    project = ls.projects.create(title=title, label_config=config)
    ls.projects.import_tasks(id=project.id, request=tasks)
    answer = requests.post(
        f"{ls_url}/api/ml",
        headers={"Authorization": f"Token {token}"},
        json={"project": project.id, "url": backend_url, "title": "rlhf"},
        timeout=600,
    )
    answer.raise_for_status()
    return int(project.id)


if __name__ == "__main__":
    sys.exit(main())
