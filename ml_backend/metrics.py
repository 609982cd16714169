"""Prometheus metrics (prometheus-client).

Request counters and latency histograms are per-process objects; under gunicorn they are
aggregated across workers with prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``
is set by ``rlhf-backend serve`` before any worker starts). Values that the store already knows
(annotations by kind, queue depth, model versions) are read from it at scrape time, so every
worker reports the same numbers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from rlhf_core.registry import POLICY, REJECTED, REWARD_MODEL, Registry
from rlhf_core.store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Label values come from closed sets: a label made from request text would let one request
# (a 10 KB action, a string Prometheus cannot encode) add a series or break every scrape.
WEBHOOK_ACTIONS = frozenset(
    {
        "ANNOTATION_CREATED",
        "ANNOTATIONS_CREATED",
        "ANNOTATION_UPDATED",
        "ANNOTATION_DELETED",
        "ANNOTATIONS_DELETED",
        "START_TRAINING",
        "PROJECT_CREATED",
        "PROJECT_UPDATED",
        "PROJECT_DELETED",
        "TASKS_CREATED",
        "TASKS_DELETED",
        "LABEL_LINK_CREATED",
        "LABEL_LINK_UPDATED",
        "LABEL_LINK_DELETED",
    }
)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER = "other"


def action_label(action: str) -> str:
    """The webhook action as a metric label: Label Studio's own actions, anything else ``other``."""
    return action if action in WEBHOOK_ACTIONS else OTHER


def method_label(method: str) -> str:
    return method if method in HTTP_METHODS else OTHER


def kind_label(kind: str) -> str:
    return kind if kind in (REWARD_MODEL, POLICY) else OTHER


class Metrics:
    def __init__(self, store: Store, models: Registry, max_annotators: int = 50) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rlhf_http_requests",
            "HTTP requests served",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "rlhf_http_request_duration_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 30),
            registry=self.registry,
        )
        self.webhook_events = Counter(
            "rlhf_webhook_events",
            "Webhook events received, by action",
            ["action"],
            registry=self.registry,
        )
        self.artifacts_refused = Counter(
            "rlhf_artifacts_refused",
            "Loads of a model checkpoint refused because its content differs from the hash "
            "recorded when it was written (the previous version or the base model kept serving)",
            ["kind"],
            registry=self.registry,
        )
        self._store_collector = StoreCollector(store, models, max_annotators)

    def exposition(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
        else:
            registry = self.registry
        output = generate_latest(registry)
        return output + generate_latest(self._store_collector)  # type: ignore[arg-type]


class StoreCollector(Collector):
    """Gauges computed from the store when Prometheus scrapes."""

    def __init__(self, store: Store, models: Registry, max_annotators: int = 50) -> None:
        self.store = store
        self.models = models
        self.max_annotators = max_annotators

    def collect(self) -> Iterator[Metric]:
        stored = GaugeMetricFamily(
            "rlhf_annotations_stored",
            "Live annotations in the store, by the kind of training record they yield",
            labels=["kind"],
        )
        for kind, count in sorted(self.store.annotation_counts_by_kind().items()):
            stored.add_metric([kind], count)
        yield stored
        yield GaugeMetricFamily(
            "rlhf_training_queue_depth",
            "Training jobs queued or running",
            value=self.store.queue_depth(),
        )
        yield from _training_progress(self.store)
        versions = GaugeMetricFamily(
            "rlhf_model_version_info",
            "The model version served for each project (value is always 1)",
            labels=["project", "model_version"],
        )
        pinned = GaugeMetricFamily(
            "rlhf_model_pinned_info",
            "A version pinned by `rlhf-backend serve-version`, with its reason (value is 1)",
            labels=["project", "kind", "model_version", "reason"],
        )
        disk = GaugeMetricFamily(
            "rlhf_model_artifacts_bytes",
            "Disk used by the project's model checkpoints (RLHF_KEEP_VERSIONS bounds it)",
            labels=["project"],
        )
        for project_id in self.store.project_ids():
            versions.add_metric([str(project_id), self.models.served_version(project_id)], 1)
            for kind, pin in self.models.pins(project_id).items():
                pinned.add_metric([str(project_id), kind, pin.version, pin.reason[:200]], 1)
            disk.add_metric([str(project_id)], self.models.disk_usage(project_id))
        yield versions
        yield pinned
        yield disk
        pending = GaugeMetricFamily(
            "rlhf_label_studio_syncs_pending",
            "Promotions whose Label Studio sync (model_version, predictions) is not confirmed yet",
            labels=["project"],
        )
        for project_id in self.store.project_ids():
            pending.add_metric([str(project_id)], len(self.models.pending_syncs(project_id)))
        yield pending
        yield from _gate_evidence(self.store, self.models)
        yield from _reliability(self.store, self.models, self.max_annotators)


GATE_GAUGES = {
    "promoted": ("rlhf_gate_passed", "1 if the newest version of the kind passed its gate"),
    "n": ("rlhf_gate_n", "Items the newest gate decision rested on (pairs or prompts x samples)"),
    "ci_low": ("rlhf_gate_ci_low", "Lower end of the gate's interval (see the rule label)"),
    "ci_high": ("rlhf_gate_ci_high", "Upper end of the gate's interval (see the rule label)"),
}


def _gate_evidence(store: Store, models: Registry) -> Iterator[Metric]:
    """The evidence of each project's newest gate decision per kind (the registry has all)."""
    families = {
        key: GaugeMetricFamily(name, help, labels=["project", "kind", "version", "rule"])
        for key, (name, help) in GATE_GAUGES.items()
    }
    for project_id in store.project_ids():
        for kind in (REWARD_MODEL, POLICY):
            recorded = models.versions(project_id, kind)
            if not recorded:
                continue
            newest = recorded[-1]
            evidence = newest.metrics.get("gate") or {}
            labels = [str(project_id), kind, newest.version, str(evidence.get("rule", ""))]
            values = {**evidence, "promoted": float(newest.status != REJECTED)}
            for key, family in families.items():
                value = values.get(key)
                if isinstance(value, int | float) and value == value:
                    family.add_metric(labels, float(value))
    yield from families.values()


PROGRESS_GAUGES = {
    "step": ("rlhf_training_step", "Optimizer steps done by the running training job"),
    "total": ("rlhf_training_total_steps", "Optimizer steps the running training job will take"),
    "loss": ("rlhf_training_loss", "Latest training loss of the running job"),
    "eta_s": ("rlhf_training_eta_seconds", "Estimated seconds left in the running phase"),
}


def _training_progress(store: Store) -> Iterator[Metric]:
    """Step, total, loss and ETA of each running job, labelled by project, job and phase."""
    families = {
        key: GaugeMetricFamily(name, help, labels=["project", "job", "phase"])
        for key, (name, help) in PROGRESS_GAUGES.items()
    }
    for job, progress in store.running_progress():
        labels = [str(job.project_id), str(job.job_id), str(progress.get("phase", ""))]
        for key, family in families.items():
            value = progress.get(key)
            if isinstance(value, int | float) and value == value:  # skip NaN (no ETA yet)
                family.add_metric(labels, float(value))
    yield from families.values()


def _reliability(store: Store, models: Registry, max_annotators: int) -> Iterator[Metric]:
    """What the served reward model was trained with: each annotator's estimated reliability
    (at most ``max_annotators`` per project, flagged ones first, then those with most labels,
    so a crowd of thousands cannot flood Prometheus with series) and inter-annotator agreement.
    Annotator ids are Label Studio's user ids, cut to 64 characters."""
    reliability = GaugeMetricFamily(
        "rlhf_annotator_reliability",
        "Estimated probability that the annotator's label names the better response "
        "(0.5: random clicks; below: A and B swapped)",
        labels=["project", "annotator"],
    )
    flagged = GaugeMetricFamily(
        "rlhf_annotator_flagged",
        "An annotator the served reward model's training flagged (careless or swapped; value 1)",
        labels=["project", "annotator", "flag"],
    )
    agreement = GaugeMetricFamily(
        "rlhf_annotator_agreement",
        "Inter-annotator agreement on comparisons judged more than once: percent (share of "
        "agreeing pairs of verdicts) and Krippendorff's alpha",
        labels=["project", "measure"],
    )
    for project_id in store.project_ids():
        found = models.served(project_id, REWARD_MODEL).metrics.get("reliability") or {}
        rows = sorted(
            (found.get("annotators") or {}).values(),
            key=lambda row: (not row.get("flag"), -row.get("labels", 0), row["annotator"]),
        )
        for row in rows[:max_annotators]:
            labels = [str(project_id), str(row["annotator"])[:64]]
            reliability.add_metric(labels, float(row["reliability"]))
            if row.get("flag"):
                flagged.add_metric([*labels, row["flag"]], 1)
        for measure in ("percent", "alpha"):
            value = (found.get("agreement") or {}).get(measure)
            if isinstance(value, int | float):
                agreement.add_metric([str(project_id), measure], float(value))
    yield reliability
    yield flagged
    yield agreement
