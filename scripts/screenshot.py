"""Label Studio's labeling screen with the backend's prediction, shot in a real browser.

Drives headless Chromium (Debian's ``chromium`` and ``chromium-driver``) through Selenium: logs
in through Label Studio's own login form, opens a task of the project in the labeling view and
saves what the browser shows. ``make screenshot`` takes the README's picture this way: it runs
the demo with ``--screenshot docs/labeling-screen.png``. Against a demo that is already running:

    python scripts/screenshot.py --url http://127.0.0.1:8080 --project 1 \\
        --credentials demo-data/credentials.json --out docs/labeling-screen.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import requests

USER = "demo@example.com"


def pick_task(url: str, token: str, project: int, position: int | None) -> dict:
    """The ``position``-th task in import order (1-based), or else the lowest-scored task with a
    prediction: the one Label Studio shows first."""
    answer = requests.get(
        f"{url}/api/tasks",
        headers={"Authorization": f"Token {token}"},
        params={"project": project, "fields": "all", "page_size": 100},
        timeout=60,
    )
    answer.raise_for_status()
    body = answer.json()
    tasks = sorted(body["tasks"] if isinstance(body, dict) else body, key=lambda t: t["id"])
    predicted = [t for t in tasks if t.get("predictions")]
    if not predicted:
        sys.exit(f"project {project} has no task with a prediction: pre-annotate it first")
    if position is not None:
        if not 1 <= position <= len(tasks) or not tasks[position - 1].get("predictions"):
            sys.exit(f"project {project} has no predicted task number {position}")
        return tasks[position - 1]
    return min(predicted, key=lambda t: min(p.get("score") or 0.0 for p in t["predictions"]))


def browser(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        sys.exit("needs Debian's chromium and chromium-driver (apt-get install them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service(driver), options=options)


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            sys.exit(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="Label Studio")
    parser.add_argument("--project", type=int, required=True)
    parser.add_argument("--credentials", type=Path, default=Path("demo-data/credentials.json"))
    parser.add_argument("--user", default=USER)
    parser.add_argument("--task", type=int, help="Nth task imported (default: lowest score)")
    parser.add_argument("--out", type=Path, default=Path("docs/labeling-screen.png"))
    parser.add_argument("--size", default="1400x1000", help="window WIDTHxHEIGHT")
    args = parser.parse_args()

    from selenium.webdriver.common.by import By

    credentials = json.loads(args.credentials.read_text())
    task = pick_task(args.url, credentials["token"], args.project, args.task)
    prompt_key = next(k for k in ("prompt", "question", "dialogue") if k in task["data"])
    prompt = task["data"][prompt_key]
    marker = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    width, height = (int(n) for n in args.size.split("x"))

    driver = browser(width, height)
    try:
        driver.get(f"{args.url}/user/login/")
        driver.find_element(By.NAME, "email").send_keys(args.user)
        driver.find_element(By.NAME, "password").send_keys(credentials["password"])
        driver.find_element(By.CSS_SELECTOR, "form [type=submit]").click()
        wait_until(lambda: "/user/login" not in driver.current_url, 60, "the login")
        driver.get(f"{args.url}/projects/{args.project}/data?task={task['id']}")
        wait_until(lambda: marker[:40] in driver.page_source, 120, "the task to render")
        time.sleep(3)  # fonts, and the prediction's highlight
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
    finally:
        driver.quit()
    print(f"saved {args.out} (task {task['id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
