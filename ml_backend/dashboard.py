"""The dashboard: ``/dashboard`` (the projects), ``/dashboard/<id>`` (one project) and its JSON,
``/api/projects/<id>/summary``.

Server-rendered HTML; the charts are plotly figures built here and drawn in the browser by the
plotly.js that ships inside the plotly Python package, served by this backend itself
(``/dashboard/plotly.min.js``), so the page needs no network beyond the backend. While a job is
queued or running the page reloads itself every few seconds. Basic auth applies as to every
endpoint but ``/health`` (``ml_backend.app``).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import plotly
import plotly.graph_objects as go
import plotly.io as pio
from flask import Blueprint, Response, current_app, jsonify, render_template, send_file

from rlhf_core.errors import NotFound
from rlhf_core.intake import MAX_ID
from rlhf_core.store import JOB_QUEUED, JOB_RUNNING
from rlhf_core.summary import busy, project_summary

REFRESH_S = 5
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
STATUS_COLOURS = {"promoted": "#2ca02c", "rejected": "#d62728", "candidate": "#7f7f7f"}

blueprint = Blueprint("dashboard", __name__, template_folder="templates")


def _services() -> Any:
    return current_app.extensions["rlhf"]


def _summary(project_id: int) -> dict[str, Any]:
    services = _services()
    if project_id > MAX_ID or services.store.project(project_id) is None:
        raise NotFound(f"project {project_id} is unknown: connect the backend to it first")
    return project_summary(services.store, services.registry, project_id)


@blueprint.get("/api/projects/<int:project_id>/summary")
def summary_json(project_id: int) -> Response:
    return jsonify(_summary(project_id))


@blueprint.get("/dashboard")
def projects() -> str:
    services = _services()
    rows = [
        {
            "project": project_id,
            "served": services.registry.served_version(project_id),
            "labels": sum(n for n, _ in services.store.annotator_counts(project_id).values()),
            "jobs": sum(
                job["status"] in (JOB_QUEUED, JOB_RUNNING)
                for job in services.store.job_history(project_id, limit=20)
            ),
        }
        for project_id in services.store.project_ids()
    ]
    return render_template("dashboard_projects.html", projects=rows)


@blueprint.get("/dashboard/<int:project_id>")
def project(project_id: int) -> str:
    summary = _summary(project_id)
    return render_template(
        "dashboard_project.html",
        s=summary,
        refresh_s=REFRESH_S if busy(summary) else None,
        charts=charts(summary),
        when=_when,
    )


@blueprint.get("/dashboard/plotly.min.js")
def plotly_js() -> Response:
    return send_file(PLOTLY_JS, mimetype="text/javascript", max_age=7 * 24 * 3600)


def charts(summary: dict[str, Any]) -> dict[str, str]:
    """HTML fragments, one per chart (empty charts are left out)."""
    figures = {
        "chart-accuracy": accuracy_figure(summary["versions"]),
        "chart-learning-curve": learning_curve_figure(summary["versions"]),
        "chart-leaderboard": leaderboard_figure(summary["leaderboard"]),
        "chart-win-rates": win_rate_figure(summary["leaderboard"]),
        "chart-annotators": annotator_figure(summary["annotators"]),
    }
    return {
        div_id: pio.to_html(
            figure,
            include_plotlyjs=False,
            full_html=False,
            div_id=div_id,
            default_height=320,
            config={"displaylogo": False, "responsive": True},
        )
        for div_id, figure in figures.items()
        if figure is not None
    }


def _layout(figure: go.Figure, title: str, **layout: Any) -> go.Figure:
    figure.update_layout(
        title=title,
        template="plotly_white",
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        legend={"orientation": "h", "y": -0.2},
        **layout,
    )
    return figure


def accuracy_figure(versions: list[dict[str, Any]]) -> go.Figure | None:
    """Held-out accuracy with its 95% interval and ECE, per reward-model version."""
    rows = [v for v in versions if v["kind"] == "rm" and v["accuracy"] is not None]
    if not rows:
        return None
    names = [v["version"] for v in rows]
    accuracy = [v["accuracy"] for v in rows]
    ci = [v["accuracy_ci"] or [a, a] for v, a in zip(rows, accuracy)]
    figure = go.Figure()
    figure.add_trace(
        go.Scatter(
            x=names,
            y=accuracy,
            mode="markers+lines",
            name="held-out accuracy",
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [high - a for (_, high), a in zip(ci, accuracy)],
                "arrayminus": [a - low for (low, _), a in zip(ci, accuracy)],
            },
            marker={"size": 11, "color": [STATUS_COLOURS.get(v["status"]) for v in rows]},
            text=[f"{v['status']}: {v['reason']}" for v in rows],
            hovertemplate="%{x}: %{y:.3f}<br>%{text}<extra></extra>",
        )
    )
    figure.add_trace(
        go.Scatter(
            x=names,
            y=[v["ece"] for v in rows],
            mode="markers+lines",
            name="calibration error (ECE)",
            line={"dash": "dot"},
        )
    )
    return _layout(
        figure,
        "Reward model per version (green: promoted, red: rejected)",
        xaxis={"type": "category"},
        yaxis={"range": [0, 1.05], "title": "held-out"},
    )


def learning_curve_figure(versions: list[dict[str, Any]]) -> go.Figure | None:
    """Held-out accuracy against the number of labels each version was trained on."""
    rows = [v for v in versions if v["kind"] == "rm" and v["accuracy"] is not None]
    if not rows:
        return None
    figure = go.Figure(
        go.Scatter(
            x=[v["labels"] for v in rows],
            y=[v["accuracy"] for v in rows],
            mode="markers+lines+text",
            text=[v["version"] for v in rows],
            textposition="top center",
            name="held-out accuracy",
        )
    )
    return _layout(
        figure,
        "Learning curve",
        xaxis={"title": "labels used"},
        yaxis={"title": "held-out accuracy", "range": [0, 1.05]},
    )


def leaderboard_figure(rows: list[dict[str, Any]]) -> go.Figure | None:
    """Human-judged ratings of the policy versions with 95% bootstrap intervals."""
    if not rows:
        return None
    ordered = list(reversed(rows))  # best on top
    figure = go.Figure(
        go.Scatter(
            x=[r["rating"] for r in ordered],
            y=[r["policy"] for r in ordered],
            mode="markers",
            name="rating",
            marker={"size": 12},
            error_x={
                "type": "data",
                "symmetric": False,
                "array": [r["ci_high"] - r["rating"] for r in ordered],
                "arrayminus": [r["rating"] - r["ci_low"] for r in ordered],
            },
            customdata=[r["comparisons"] for r in ordered],
            hovertemplate="%{y}: %{x:.0f} (%{customdata} comparisons)<extra></extra>",
        )
    )
    return _layout(
        figure,
        "Policy leaderboard (people's choices, length-controlled)",
        xaxis={"title": "rating (Elo scale)"},
        yaxis={"type": "category"},
    )


def win_rate_figure(rows: list[dict[str, Any]]) -> go.Figure | None:
    """Per policy version: how often people preferred it, and how often the reward model did."""
    if not rows:
        return None
    names = [r["policy"] for r in rows]
    figure = go.Figure(
        [
            go.Bar(x=names, y=[r["human_win_rate"] for r in rows], name="people"),
            go.Bar(x=names, y=[r["rm_win_rate"] for r in rows], name="reward model"),
        ]
    )
    return _layout(
        figure,
        "Win rate in the arena",
        barmode="group",
        yaxis={"range": [0, 1], "title": "win rate"},
    )


def annotator_figure(rows: list[dict[str, Any]]) -> go.Figure | None:
    if not rows:
        return None
    names = [f"annotator {r['annotator']}" for r in rows]
    figure = go.Figure(go.Bar(x=names, y=[r["labels"] for r in rows], name="labels"))
    return _layout(figure, "Labels per annotator", yaxis={"title": "labels"})


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return ""
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
