"""The dashboard and its JSON, after real webhooks and a real (tiny) training job.

One project is built once for the module: annotations from three annotators arrive through
``/webhook``, a worker trains the reward model (tiny encoder), a second job fails for good, a
third is running with progress, and arena tasks pit ``policy-0001`` against the base policy. The
last test loads the page in headless Chromium (Debian's) and reads the charts' data back out of
the rendered plots.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import threading
from pathlib import Path

import pytest
from conftest import TEST_WEBHOOK_SECRET, WEBHOOK_HEADERS
from werkzeug.serving import make_server

from ml_backend.app import create_app
from rlhf_core.arena import text_hash
from rlhf_core.config import BackendConfig
from rlhf_core.registry import POLICY, PROMOTED
from rlhf_core.tiny import ensure_tiny_encoder
from trainer.jobs import registry_for, train_job
from trainer.worker import Worker

CONFIG = """<View><Text name="prompt" value="$prompt"/>
<Pairwise name="comparison" toName="answer1,answer2"/>
<Text name="answer1" value="$answer1"/><Text name="answer2" value="$answer2"/></View>"""
USER, PASSWORD = "lead", "s3cret"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
ARENA_TASKS = range(1001, 1031)
NEW_POLICY_WINS = 24  # of the 30 arena tasks


@pytest.fixture(scope="module")
def project(tmp_path_factory, annotation_event):
    """The app, its config, and what was sent to it."""
    data_dir = tmp_path_factory.mktemp("dashboard")
    config = BackendConfig(
        data_dir=data_dir,
        reward_backbone=str(ensure_tiny_encoder(data_dir / "models-cache")),
        reward_heads=4,
        policy_training="off",
        train_every=25,
        basic_auth_user=USER,
        basic_auth_pass=PASSWORD,
        webhook_secret=TEST_WEBHOOK_SECRET,
    )
    app = create_app(config)
    http = app.test_client()
    assert http.post("/setup", json={"project": "1.1", "schema": CONFIG}, headers=AUTH).is_json

    def annotate(annotation_id, task_id, data, selected, annotator, cancelled=False):
        event = annotation_event(
            annotation_id,
            task_id=task_id,
            task_data=data,
            selected=selected,
            completed_by=annotator,
            was_cancelled=cancelled,
            label_config=CONFIG,
        )
        headers = {**AUTH, **WEBHOOK_HEADERS}
        assert http.post("/webhook", json=event, headers=headers).status_code == 200

    store = app.extensions["rlhf"].store
    trainer = Worker(config, {"train": lambda job: train_job(config, job)})
    rng = random.Random(0)
    for i in range(40):  # annotator 7 prefers the polite answer; 8 agrees on 8 of 10
        polite, rude = f"thank you, here is step {i}", f"go away {i}, no"
        left = rng.random() < 0.5
        data = {"prompt": f"question {i}", "answer1": polite if left else rude}
        data["answer2"] = rude if left else polite
        annotate(i + 1, i + 21, data, "left" if left else "right", 7)
        if i < 10:
            agrees = i < 8
            annotate(
                500 + i,
                i + 21,
                data,
                ("left" if left else "right") if agrees else ("right" if left else "left"),
                8,
            )
        if i in (24, 39):  # jobs queued by the 25th and the 50th usable annotation
            assert trainer.run(once=True) == 1
    annotate(600, 1, {"prompt": "question 0", "answer1": "a", "answer2": "b"}, "left", 9, True)

    def out_of_memory(job):
        raise RuntimeError("out of memory (simulated)")

    store.enqueue_training(1, "test again")
    Worker(config, {"train": out_of_memory}).run(once=True)
    running = store.start_job(1, "train", "cli", "test-worker")
    store.set_job_progress(
        running.job_id,
        {"phase": "reward model", "step": 30, "total": 120, "loss": 0.5, "eta_s": 42},
    )

    registry = registry_for(config)
    path = data_dir / "models" / "project-1" / "policy-0001"
    registry.record(
        1,
        POLICY,
        "policy-0001",
        path,
        {},
        {"annotations": list(range(1, 41)), "records": 50},
        {"gate": {"win_rate": 0.61, "prompts": 8}},
        PROMOTED,
        "win rate 0.61 > 0.5",
    )
    for n, task in enumerate(ARENA_TASKS):  # the new policy's answer wins 24 of 30
        # Lengths vary independently of the version: length alone explains nothing here.
        new = f"answer {n} from the new policy" + " with more words" * (n % 3 == 0)
        old = f"answer {n} from the base" + " with many more words here" * (n % 3 == 1)
        new_left = n % 2 == 0
        data = {"prompt": f"arena {n}", "answer1": new if new_left else old}
        data["answer2"] = old if new_left else new
        store.replace_arena_responses(
            1,
            task,
            [
                {
                    "text_hash": text_hash(new),
                    "policy_version": "policy-0001",
                    "chars": len(new),
                    "rm_reward": 1.0,
                    "rm_version": "rm-0001",
                },
                {
                    "text_hash": text_hash(old),
                    "policy_version": "policy-base",
                    "chars": len(old),
                    "rm_reward": 0.0,
                    "rm_version": "rm-0001",
                },
            ],
        )
        new_won = n < NEW_POLICY_WINS
        annotate(2000 + n, task, data, "left" if new_left == new_won else "right", 7)
    return app, config


@pytest.fixture
def http(project):
    return project[0].test_client()


def summary(http):
    response = http.get("/api/projects/1/summary", headers=AUTH)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def test_summary_needs_basic_auth(http):
    assert http.get("/api/projects/1/summary").status_code == 401
    assert http.get("/dashboard").status_code == 401
    assert http.get("/dashboard/1").status_code == 401


def test_summary_lists_the_trained_versions_with_their_evidence(project, http):
    result = summary(http)
    versions = {v["version"]: v for v in result["versions"]}
    served_rm = registry_for(project[1]).served(1, "rm").version
    for name, labels in (("rm-0001", 35), ("rm-0002", 50)):
        rm = versions[name]
        assert rm["kind"] == "rm" and rm["status"] in ("promoted", "rejected")
        assert rm["served"] == (name == served_rm)
        assert rm["labels"] == labels  # the usable annotations the job trained and tested on
        assert rm["heldout_pairs"] > 0 and 0.0 <= rm["accuracy"] <= 1.0
        low, high = rm["accuracy_ci"]
        assert low <= rm["accuracy"] <= high and high - low > 0
        assert rm["ece"] is not None and rm["reason"]
    assert result["served"] == f"{served_rm}.policy-0001"
    policy = versions["policy-0001"]
    assert (policy["kind"], policy["gate_win_rate"], policy["labels"]) == ("policy", 0.61, 40)


def test_summary_lists_jobs_with_progress_and_failure_reasons(http):
    jobs = summary(http)["jobs"]
    by_status = {}
    for job in jobs:
        by_status.setdefault(job["status"], []).append(job)
    assert [j["trigger"] for j in by_status["done"]] == ["annotations", "annotations"]
    [failed] = by_status["failed"]
    assert "out of memory" in failed["error"] and failed["attempts"] == 3
    [running] = by_status["running"]
    assert (running["phase"], running["step"], running["total"], running["eta_s"]) == (
        "reward model",
        30,
        120,
        42,
    )
    # Training after the arena's 25th label (re-scoring after a promotion is a Label Studio
    # sync from the outbox, not a job).
    assert sorted(j["kind"] for j in by_status["queued"]) == ["train"]


def test_summary_lists_annotators_with_labels_and_agreement(http):
    annotators = {a["annotator"]: a for a in summary(http)["annotators"]}
    assert {a: (r["labels"], r["skipped"]) for a, r in annotators.items()} == {
        7: (70, 0),
        8: (10, 0),
        9: (1, 1),
    }
    assert annotators[8]["agreement"] == pytest.approx(0.8)
    assert annotators[8]["agreement_n"] == 10
    assert annotators[9]["pairs"] == 0 and annotators[9]["agreement"] is None
    assert annotators[7]["model_agreement"] is not None  # the reward model's held-out view


def test_leaderboard_ranks_the_policy_people_prefer_with_the_reward_models_view(http):
    result = summary(http)
    board = {row["policy"]: row for row in result["leaderboard"]}
    assert [row["policy"] for row in result["leaderboard"]] == ["policy-0001", "policy-base"]
    new, base = board["policy-0001"], board["policy-base"]
    assert new["comparisons"] == base["comparisons"] == len(ARENA_TASKS)
    assert new["wins"] == NEW_POLICY_WINS
    assert new["ci_low"] > base["ci_high"]
    assert new["ci_low"] <= new["rating"] <= new["ci_high"]
    assert new["rm_win_rate"] > 0.7 > base["rm_win_rate"]
    assert result["arena"]["tasks"] == len(ARENA_TASKS)


def test_unknown_project_is_a_json_404(http):
    response = http.get("/api/projects/99/summary", headers=AUTH)
    assert response.status_code == 404
    assert response.get_json()["error"] == "NotFound"
    assert http.get("/dashboard/99", headers=AUTH).status_code == 404
    assert http.get(f"/api/projects/{2**70}/summary", headers=AUTH).status_code == 404


def test_dashboard_pages_render_and_refresh_while_a_job_runs(http):
    listing = http.get("/dashboard", headers=AUTH).get_data(as_text=True)
    assert 'href="/dashboard/1"' in listing and "policy-0001" in listing
    page = http.get("/dashboard/1", headers=AUTH).get_data(as_text=True)
    assert '<meta http-equiv="refresh"' in page
    assert '<script src="/dashboard/plotly.min.js">' in page
    assert "http://" not in page.split("<body>")[0] and "https://" not in page.split("<body>")[0]
    assert "out of memory (simulated)" in page
    script = http.get("/dashboard/plotly.min.js", headers=AUTH)
    assert script.status_code == 200 and script.mimetype == "text/javascript"
    assert b"plotly.js" in script.get_data()[:400]


def test_a_new_project_has_an_empty_dashboard_not_an_error(client):
    assert "No project yet" in client.get("/dashboard").get_data(as_text=True)
    client.post("/setup", json={"project": "3.1", "schema": CONFIG})
    page = client.get("/dashboard/3").get_data(as_text=True)
    assert "No trained version yet" in page and "No job yet" in page
    assert "No human verdict between two policy versions yet" in page
    assert '<meta http-equiv="refresh"' not in page  # nothing is running
    assert client.get("/api/projects/3/summary").get_json() == {
        "project": 3,
        "served": "rm-untrained.policy-base",
        "pinned": {},
        "disk_bytes": 0,
        "versions": [],
        "jobs": [],
        "annotators": [],
        "agreement": {"items": 0, "labels": 0, "percent": None, "alpha": None},
        "leaderboard": [],
        "arena": {"tasks": 0, "length_coefficient": None, "length_ci": None},
        "labels": {
            "pairs": 0,
            "graded_pairs": 0,
            "ties": 0,
            "both_bad": 0,
            "desirable": 0,
            "undesirable": 0,
        },
    }


# -- in a real browser ---------------------------------------------------------------------------


@pytest.fixture
def live_url(project):
    server = make_server("127.0.0.1", 0, project[0], threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


@pytest.fixture
def chromium(tmp_path):
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium and chromium-driver (.ci/run installs)")
        pytest.skip("needs Debian's chromium and chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.set_page_load_timeout(60)
    # Basic auth on every request the page makes, as a browser that logged in would send it.
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": AUTH})
    yield browser
    browser.quit()


PLOT_DATA = """
const plot = document.getElementById(arguments[0]);
if (!plot || !plot._fullLayout) return null;  // plotly never drew it
const box = plot.getBoundingClientRect();
const points = Array.from(plot.querySelectorAll('.scatterlayer .point, .barlayer .point'));
const within = e => {
  const r = e.getBoundingClientRect();
  return r.left >= box.left && r.right <= box.right && r.top >= box.top && r.bottom <= box.bottom;
};
return {
  traces: plot.data.map(t => ({name: t.name || null, x: t.x, y: t.y})),
  ticks: Array.from(plot.querySelectorAll('.xtick text, .ytick text')).map(e => e.textContent),
  points: points.length,
  visible: points.filter(within).length,  // drawn inside the chart's box, not cut off
};
"""


@pytest.mark.slow  # starts Chromium
def test_a_browser_draws_the_charts_with_the_projects_data(http, live_url, chromium):
    from selenium.webdriver.support.ui import WebDriverWait

    chromium.get(f"{live_url}/dashboard/1")
    WebDriverWait(chromium, 30).until(
        lambda b: b.execute_script(PLOT_DATA, "chart-leaderboard") is not None
    )
    expected = summary(http)

    board = chromium.execute_script(PLOT_DATA, "chart-leaderboard")
    [ratings] = board["traces"]
    drawn = dict(zip(ratings["y"], ratings["x"]))
    assert drawn == {row["policy"]: row["rating"] for row in expected["leaderboard"]}
    assert {"policy-0001", "policy-base"} <= set(board["ticks"])  # the axis the browser drew
    assert board["points"] == board["visible"] == 2

    win_rates = chromium.execute_script(PLOT_DATA, "chart-win-rates")
    people, model = win_rates["traces"]
    assert (people["name"], model["name"]) == ("people", "reward model")
    assert people["y"] == [row["human_win_rate"] for row in expected["leaderboard"]]

    accuracy = chromium.execute_script(PLOT_DATA, "chart-accuracy")
    rm = [v for v in expected["versions"] if v["kind"] == "rm"]
    assert accuracy["traces"][0]["x"] == [v["version"] for v in rm]
    assert accuracy["traces"][0]["y"] == [v["accuracy"] for v in rm]
    assert {"rm-0001", "rm-0002"} <= set(accuracy["ticks"]) and accuracy["points"] == accuracy[
        "visible"
    ] == 4

    curve = chromium.execute_script(PLOT_DATA, "chart-learning-curve")
    assert curve["traces"][0]["x"] == [v["labels"] for v in rm]

    annotators = chromium.execute_script(PLOT_DATA, "chart-annotators")
    assert annotators["traces"][0]["y"] == [70, 10, 1]
    assert "annotator 7" in annotators["ticks"]

    table = chromium.find_element("id", "jobs").text
    assert "out of memory (simulated)" in table and "30/120" in table

    screenshot = os.environ.get("RLHF_DASHBOARD_SCREENSHOT")
    if screenshot:  # the README's picture (docs/dashboard.png) is taken this way
        Path(screenshot).write_bytes(chromium.get_screenshot_as_png())
