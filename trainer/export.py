"""What a team takes away: the preference data (TRL's formats), and a version as HF checkpoints.

``export_dataset`` writes, from the store's training records (the very rows a training job reads,
so deleted and forgotten annotations are not in it):

* ``preferences.jsonl``: one pair a line, TRL's preference format plus where it came from::

    {"prompt": "hi", "chosen": "hello", "rejected": "go away", "tie": false, "margin": null,
     "source": "pairwise", "control": "comparison", "split": "train", "project": 1, "task": 1,
     "annotation": 7, "annotator": 3, "generated_by": "rm-0001.policy-base",
     "scored_by": "rm-0001.policy-base", "chosen_by": "policy-base", "rejected_by": "policy-base"}

  ``margin`` is the graded pair's Bradley–Terry margin (``graded.xml``), or the rating
  difference for rating-derived pairs (None where the template gives no strength); ``split`` is
  the trainer's stable held-out split; ``generated_by``/``scored_by`` are the model versions
  that wrote the task's responses and scored it, where pre-annotation did, and
  ``chosen_by``/``rejected_by`` the policy version that wrote each response (the arena's
  record where the task was one of its, else the policy of ``generated_by``);
* ``feedback.jsonl``: prompt, response, feedback text, annotator (and provenance);
* ``kto.jsonl``: TRL's unpaired format (``prompt``, ``completion``, ``label``): each decisive pair
  gives its chosen response as desirable and its rejected one as undesirable, as TRL's own
  ``unpair_preference_dataset`` does, then every unpaired verdict (thumbs, a single response's
  rating, each response of a "both bad" answer) with its ``source``;
* ``README.md``: a data card (counts, annotators, label sources, agreement, versions covered);
* with ``hf``: ``hf/``, the three as a ``datasets.DatasetDict`` saved with ``save_to_disk``.

Re-running on the same store writes byte-identical files: rows are in annotation order and the
card states the snapshot's time (its newest annotation), not the wall clock.

``export_version`` writes a version as a Hugging Face checkpoint: the policy at the top of the
directory (``AutoModelForCausalLM.from_pretrained(DIR)`` loads it), the reward model under
``reward_model/`` (backbone via ``save_pretrained``, ``heads.safetensors``, and
``load_reward_model.py``, which needs transformers alone), and a model card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rlhf_core
from rlhf_core.artifacts import write_atomically
from rlhf_core.config import BackendConfig
from rlhf_core.registry import POLICY, REWARD_MODEL, ModelVersion, Registry
from rlhf_core.serving import load_version
from rlhf_core.store import Store, StoredAnnotation

logger = logging.getLogger(__name__)

PREFERENCES, FEEDBACK, KTO, CARD = "preferences.jsonl", "feedback.jsonl", "kto.jsonl", "README.md"
HF_DIR = "hf"
LOADER = Path(rlhf_core.__file__).with_name("hf_reward_loader.py")


class ExportError(ValueError):
    """The export cannot be written; the message says why."""


@dataclass
class DatasetExport:
    out: Path
    preferences: list[dict[str, Any]]
    feedback: list[dict[str, Any]]
    kto: list[dict[str, Any]]
    files: list[Path] = field(default_factory=list)

    @property
    def tasks(self) -> list[int]:
        rows = self.preferences + self.feedback
        return sorted({r["task"] for r in rows if r.get("task") is not None})

    def summary(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "preferences": len(self.preferences),
            "feedback": len(self.feedback),
            "kto": len(self.kto),
            "files": [str(p) for p in self.files],
        }


# -- the data ---------------------------------------------------------------------------------


def export_dataset(
    store: Store,
    registry: Registry,
    project_id: int,
    out: Path,
    hf: bool = False,
    max_ranking_pairs: int = BackendConfig.max_ranking_pairs,
) -> DatasetExport:
    """The project's data in ``out``: the pairs a training job would learn from now (a ranking
    as the pairs it implies, at most ``max_ranking_pairs`` each, as RLHF_MAX_RANKING_PAIRS)."""
    from rlhf_core.conversion import preference_pairs

    if store.project(project_id) is None:
        raise ExportError(f"project {project_id} is unknown here")
    annotations = {a.annotation_id: a for a in store.annotations(project_id)}
    models = store.task_models(project_id)
    authors = {
        (r["task_id"], r["text_hash"]): r["policy_version"]
        for r in store.arena_responses(project_id)
    }
    export = DatasetExport(
        out=Path(out),
        preferences=preference_rows(
            preference_pairs(
                store.records(project_id, "preference"),
                store.records(project_id, "ranking"),
                max_ranking_pairs,
            ),
            annotations,
            models,
            authors,
        ),
        feedback=feedback_rows(store.records(project_id, "feedback")),
        kto=[],
    )
    export.kto = kto_rows(export.preferences) + unpaired_rows(store.records(project_id, "unpaired"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in ((PREFERENCES, export.preferences), (FEEDBACK, export.feedback)):
        export.files.append(_write_jsonl(out / name, rows))
    export.files.append(_write_jsonl(out / KTO, export.kto))
    if hf:
        export.files.append(_save_hf(out / HF_DIR, export))
    elif (out / HF_DIR / "dataset_dict.json").exists():  # an earlier export's: now stale
        shutil.rmtree(out / HF_DIR)
    card = data_card(project_id, export, annotations, registry)
    (out / CARD).write_text(card)
    export.files.append(out / CARD)
    _log_export(registry, project_id, export)
    return export


def preference_rows(
    records: list[dict[str, Any]],
    annotations: dict[int, StoredAnnotation],
    models: dict[int, tuple[str | None, str | None]],
    authors: dict[tuple[int, str], str] | None = None,
) -> list[dict[str, Any]]:
    """Export rows of preference records; ``models``: the versions that pre-annotated each task,
    ``authors``: the policy version that wrote a (task, response hash), from the arena."""
    from rlhf_core.arena import text_hash
    from trainer.reward_training import RewardTrainingConfig, is_heldout

    authors = authors or {}

    def written_by(task: Any, text: str, generated_by: str | None) -> str | None:
        # The arena knows each response's author; otherwise the policy that filled the task.
        found = authors.get((task, text_hash(text)))
        return found or (generated_by.rsplit(".", 1)[-1] if generated_by else None)

    fraction = RewardTrainingConfig().heldout_fraction
    rows = []
    for r in sorted(records, key=lambda r: r["annotation"]):  # stable: record order kept
        generated_by, scored_by = models.get(r.get("task") or -1, (None, None))
        rows.append(
            {
                "prompt": r["prompt"],
                "chosen": r["chosen"],
                "rejected": r["rejected"],
                "tie": bool(r.get("tie")),
                "margin": _margin(r, annotations.get(r["annotation"])),
                "source": r.get("source"),
                "control": r.get("control"),
                # The trainer's own split (Pair.group): the gate's prompts are the held-out ones.
                "split": "heldout"
                if is_heldout(f"{r.get('project')}:{r.get('task')}", fraction)
                else "train",
                "project": r.get("project"),
                "task": r.get("task"),
                "annotation": r["annotation"],
                "annotator": r.get("annotator"),
                "generated_by": generated_by,
                "scored_by": scored_by,
                "chosen_by": written_by(r.get("task"), r["chosen"], generated_by),
                "rejected_by": written_by(r.get("task"), r["rejected"], generated_by),
            }
        )
    return rows


def _margin(record: dict[str, Any], annotation: StoredAnnotation | None) -> float | None:
    """A graded pair's margin, or the rating difference of a rating-derived pair (its
    ``control`` is ``"r_a,r_b"``)."""
    if "margin" in record:
        return float(record["margin"])
    if record.get("source") != "rating" or annotation is None:
        return None
    ratings = {
        item.get("from_name"): (item.get("value") or {}).get("rating")
        for item in annotation.result
        if isinstance(item, dict)
    }
    names = str(record.get("control", "")).split(",")
    values = [v for name in names if isinstance(v := ratings.get(name), int | float)]
    if len(names) != 2 or len(values) != 2:
        return None
    return float(abs(values[0] - values[1]))


def feedback_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "prompt": r["prompt"],
            "response": r.get("response"),
            "feedback": r["feedback"],
            "control": r.get("control"),
            "project": r.get("project"),
            "task": r.get("task"),
            "annotation": r["annotation"],
            "annotator": r.get("annotator"),
        }
        for r in sorted(records, key=lambda r: r["annotation"])
    ]


def kto_rows(preferences: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """TRL's unpaired format: each decisive pair as a desirable and an undesirable completion."""
    rows = []
    for p in preferences:
        if p["tie"]:
            continue
        for completion, label in ((p["chosen"], True), (p["rejected"], False)):
            rows.append(
                {
                    "prompt": p["prompt"],
                    "completion": completion,
                    "label": label,
                    "task": p["task"],
                    "annotation": p["annotation"],
                    "annotator": p["annotator"],
                    "source": p["source"],
                }
            )
    return rows


def unpaired_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """TRL's unpaired format for the verdicts on single responses."""
    return [
        {
            "prompt": r["prompt"],
            "completion": r["response"],
            "label": bool(r["desirable"]),
            "task": r.get("task"),
            "annotation": r["annotation"],
            "annotator": r.get("annotator"),
            "source": r.get("source"),
        }
        for r in sorted(records, key=lambda r: r["annotation"])
    ]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def _save_hf(path: Path, export: DatasetExport) -> Path:
    """The three tables as one ``DatasetDict``; fingerprints from the content, so a re-run
    writes the same files."""
    import datasets

    features = {
        "preferences": _features(
            datasets,
            text=("prompt", "chosen", "rejected", "source", "control", "split"),
            flags=("tie",),
            floats=("margin",),
            ids=("project", "task", "annotation", "annotator"),
            versions=("generated_by", "scored_by", "chosen_by", "rejected_by"),
        ),
        "feedback": _features(
            datasets,
            text=("prompt", "response", "feedback", "control"),
            ids=("project", "task", "annotation", "annotator"),
        ),
        "kto": _features(
            datasets,
            text=("prompt", "completion", "source"),
            flags=("label",),
            ids=("task", "annotation", "annotator"),
        ),
    }
    tables = {"preferences": export.preferences, "feedback": export.feedback, "kto": export.kto}
    splits = {}
    for name, rows in tables.items():
        fingerprint = hashlib.sha256(
            json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()
        ).hexdigest()[:16]
        table = datasets.Dataset.from_list(rows, features=features[name])
        splits[name] = datasets.Dataset(table.data, info=table.info, fingerprint=fingerprint)
    if path.exists():
        shutil.rmtree(path)
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


def _features(
    datasets: Any,
    text: tuple[str, ...] = (),
    flags: tuple[str, ...] = (),
    floats: tuple[str, ...] = (),
    ids: tuple[str, ...] = (),
    versions: tuple[str, ...] = (),
) -> Any:
    columns: dict[str, Any] = {}
    for name in (*text, *versions):
        columns[name] = datasets.Value("string")
    for name in flags:
        columns[name] = datasets.Value("bool")
    for name in floats:
        columns[name] = datasets.Value("float64")
    for name in ids:
        columns[name] = datasets.Value("int64")
    return datasets.Features(columns)


# -- the data card ----------------------------------------------------------------------------


def data_card(
    project_id: int,
    export: DatasetExport,
    annotations: dict[int, StoredAnnotation],
    registry: Registry,
) -> str:
    prefs, feedback = export.preferences, export.feedback
    used = {r["annotation"] for r in prefs + feedback}
    snapshot = max((annotations[a].ls_updated_at for a in used if a in annotations), default="")
    annotators = Counter(str(r["annotator"]) for r in prefs + feedback)
    sources = Counter(str(r["source"]) for r in prefs)
    ties = sum(r["tie"] for r in prefs)
    lines = [
        f"# Preference data of Label Studio project {project_id}",
        "",
        "Exported by `rlhf-backend export` from the backend's store: the records its training "
        "jobs read (deleted annotations excluded). Re-running the export on the same store "
        "writes the same files, so this card gives the snapshot's time (its newest "
        "annotation), not the time of the export.",
        "",
        f"- Snapshot: annotations up to {snapshot or 'none'}",
        f"- Annotations: {len(used)} on {len(export.tasks)} tasks",
        f"- Preference pairs (`{PREFERENCES}`, TRL prompt/chosen/rejected): {len(prefs)} "
        f"({len(prefs) - ties} decisive, {ties} ties), "
        f"{sum(r['split'] == 'heldout' for r in prefs)} of them in the trainer's held-out split",
        f"- Feedback texts (`{FEEDBACK}`): {len(feedback)}",
        f"- Unpaired rows for TRL's KTO (`{KTO}`): {len(export.kto)}, of them "
        f"{sum(r.get('source') == 'thumbs' for r in export.kto)} thumbs, "
        f"{sum(r.get('source') == 'rating' for r in export.kto)} single-response ratings and "
        f"{len({r['annotation'] for r in export.kto if r.get('source') == 'both_bad'})} "
        '"both bad" answers',
        f"- Graded pairs (with a strength): {sum(r['margin'] is not None for r in prefs)}",
        "",
        "## Label sources",
        "",
        "| Source | Pairs |",
        "| --- | --- |",
        *(f"| {name} | {count} |" for name, count in sorted(sources.items())),
        "",
        "## Annotators",
        "",
        "| Annotator (Label Studio user id) | Records |",
        "| --- | --- |",
        *(f"| {name} | {count} |" for name, count in sorted(annotators.items())),
        "",
        "## Agreement",
        "",
        _agreement_text(prefs),
        "",
        _model_agreement_text(registry, project_id),
        "",
        "## Model versions these records trained",
        "",
        _versions_table(registry, project_id, used),
        "",
        "## Files",
        "",
        "| File | Rows | SHA-256 |",
        "| --- | --- | --- |",
    ]
    rows = {PREFERENCES: len(prefs), FEEDBACK: len(feedback), KTO: len(export.kto)}
    for name, count in rows.items():
        digest = hashlib.sha256((export.out / name).read_bytes()).hexdigest()
        lines.append(f"| `{name}` | {count} | `{digest}` |")
    return "\n".join(lines) + "\n"


def _agreement_text(prefs: list[dict[str, Any]]) -> str:
    """Between annotators: the share of pairs of verdicts (a tie is one) on the same two
    responses of a task that agree, and Krippendorff's α (the dashboard's figures)."""
    from rlhf_core.summary import project_agreement

    found = project_agreement(prefs)
    if not found["items"]:
        return "Between annotators: not known (no two annotators compared the same responses)."
    alpha = "undefined" if found["alpha"] is None else f"{found['alpha']:.3f}"
    return (
        f"Between annotators: {found['percent']:.3f} of pairs of verdicts agree, "
        f"Krippendorff's α {alpha}, on {found['items']} comparison(s) judged more than once."
    )


def _model_agreement_text(registry: Registry, project_id: int) -> str:
    served = registry.served(project_id, REWARD_MODEL)
    per = (served.metrics.get("heldout") or {}).get("per_annotator") or {}
    if not per:
        return "With the served reward model: not known (no held-out evaluation yet)."
    shares = ", ".join(f"annotator {a}: {v:.3f}" for a, v in sorted(per.items()))
    return f"With the served reward model {served.version} on held-out pairs: {shares}."


def _versions_table(registry: Registry, project_id: int, used: set[int]) -> str:
    versions = registry.versions(project_id)
    if not versions:
        return "None yet: no model has been trained on this project."
    pins = registry.pins(project_id)
    served = registry.served_version(project_id).split(".")
    lines = [
        "| Version | Status | Trained on annotations | Of them in this export |",
        "| --- | --- | --- | --- |",
    ]
    for v in versions:
        ids = set(v.data_snapshot.get("annotations") or [])
        status = v.status + (" (served)" if v.version in served else "")
        if v.kind in pins and pins[v.kind].version == v.version:
            status += f" (pinned: {pins[v.kind].reason})"
        lines.append(f"| {v.version} | {status} | {len(ids)} | {len(ids & used)} |")
    return "\n".join(lines)


def _log_export(registry: Registry, project_id: int, export: DatasetExport) -> None:
    """Where the project's data went, so ``forget`` can say which files still hold a task."""
    log = exports_log(registry, project_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    entry = {
        "time": time.time(),
        "out": str(export.out.resolve()),
        "files": [str(p.resolve()) for p in export.files],
        "tasks": export.tasks,
    }
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def exports_log(registry: Registry, project_id: int) -> Path:
    """The project's log of exports, beside its checkpoints (RLHF_ARTIFACT_DIR, which several
    machines may share)."""
    return registry.models_dir / "exports" / f"project-{project_id}.jsonl"


def exports_logs(config: BackendConfig, registry: Registry, project_id: int) -> list[Path]:
    """Every log of the project's exports: also the one kept in RLHF_DATA_DIR/exports before
    RLHF_ARTIFACT_DIR existed."""
    name = f"project-{project_id}.jsonl"
    logs = [config.data_dir / "exports" / name, exports_log(registry, project_id)]
    return [log for log in logs if log.is_file()]


# -- a version as Hugging Face checkpoints --------------------------------------------------------


def export_version(
    config: BackendConfig, registry: Registry, project_id: int, version: str, out: Path
) -> dict[str, Any]:
    """The policy (top level) and the reward model (``reward_model/``) of ``version``."""
    from trainer.versions import VersionError, resolve

    try:
        found = resolve(registry, project_id, version)
    except VersionError as exc:
        raise ExportError(str(exc)) from None
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(
            f"{out} exists and is not empty: name a new directory (a version is exported whole, "
            "under a scratch name renamed into place when complete)"
        )
    written: dict[str, Any] = {"out": str(out)}

    def write(scratch: Path) -> None:
        sections = []
        if POLICY in found:
            _export_policy(config, found[POLICY], scratch)
            written["policy"] = str(out)
            sections.append(_policy_card(config, found[POLICY]))
        if REWARD_MODEL in found:
            _export_reward_model(config, found[REWARD_MODEL], scratch)
            written["reward_model"] = str(out / "reward_model")
            sections.append(_reward_card(found[REWARD_MODEL]))
        (scratch / CARD).write_text(_model_card(config, project_id, found, sections))

    written["sha256"] = write_atomically(out, write)  # rlhf_core.artifacts.content_hash
    written["disk_bytes"] = registry.disk_usage(project_id)
    return written


def _export_policy(config: BackendConfig, version: ModelVersion, out: Path) -> str:
    from trainer.policy_training import save_policy

    # On the CPU, whatever the machine has: export needs no accelerator, and must not take a
    # GPU that serving or training uses.
    policy = load_version(config, version, device="cpu")
    save_policy(policy, out)
    return str(out)


def _export_reward_model(config: BackendConfig, version: ModelVersion, out: Path) -> str:
    model = load_version(config, version, device="cpu")
    target = out / "reward_model"
    if target.exists():
        shutil.rmtree(target)
    provenance = {**model.provenance, "version": version.version, "trained": model.trained}
    model.save(target, provenance, include_backbone=True)
    shutil.copyfile(LOADER, target / "load_reward_model.py")
    return str(target)


def _base_policy(config: BackendConfig) -> str:
    return config.policy_model or "tiny-gpt2 (the backend's offline test policy, random weights)"


def _model_card(
    config: BackendConfig, project_id: int, found: dict[str, ModelVersion], sections: list[str]
) -> str:
    front = ["---", "library_name: transformers", "tags:", "- rlhf", "- label-studio"]
    if POLICY in found and config.policy_model and not Path(config.policy_model).exists():
        front.append(f"base_model: {config.policy_model}")  # a Hub id, not a local directory
    front.append("---")
    names = ".".join(found[k].version for k in (REWARD_MODEL, POLICY) if k in found)
    usage = []
    if POLICY in found:
        usage += [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("THIS_DIR")',
            'tokenizer = AutoTokenizer.from_pretrained("THIS_DIR")',
            "```",
            "",
        ]
    if REWARD_MODEL in found:
        usage += [
            "```python",
            "import sys; sys.path.insert(0, 'THIS_DIR/reward_model')",
            "from load_reward_model import load",
            "rm = load('THIS_DIR/reward_model')",
            "rm.rewards('a prompt', ['response a', 'response b'])  # mean over the heads",
            "```",
        ]
    return "\n".join(
        [
            *front,
            "",
            f"# {names}: Label Studio project {project_id}",
            "",
            "Trained by the Label Studio ML backend for RLHF from this project's annotations.",
            "",
            *usage,
            "",
            *sections,
        ]
    )


def _policy_card(config: BackendConfig, version: ModelVersion) -> str:
    gate = version.metrics.get("gate") or {}
    return "\n".join(
        [
            f"## Policy {version.version}",
            "",
            f"- Base model: {_base_policy(config)}",
            f"- Status: {version.status} ({version.reason})",
            f"- Warm start: {version.data_snapshot.get('warm_start', 'the base model')}",
            f"- Training data: {_snapshot_text(version)}",
            f"- Training: {json.dumps(version.config.get('training', {}), sort_keys=True)}",
            f"- Gate evidence: {json.dumps(gate, sort_keys=True) if gate else 'none (base)'}"
            + (f", judged by {version.metrics['judge']}" if "judge" in version.metrics else ""),
            f"- Metrics: `{json.dumps(_without(version.metrics, 'gate'), sort_keys=True)}`",
            "",
        ]
    )


def _reward_card(version: ModelVersion) -> str:
    model = version.config.get("model") or {}
    heldout = version.metrics.get("heldout") or {}
    serving = version.metrics.get("serving_heldout") or {}
    return "\n".join(
        [
            f"## Reward model {version.version} (`reward_model/`)",
            "",
            f"- Backbone: {model.get('backbone', 'sentence-transformers/all-MiniLM-L6-v2')} "
            f"(saved with `save_pretrained` in `reward_model/backbone/`), "
            f"{model.get('num_heads', '?')} Bradley-Terry heads in `heads.safetensors`",
            f"- Status: {version.status} ({version.reason})",
            f"- Training data: {_snapshot_text(version)}",
            f"- Gate evidence: {_heldout_text(heldout, serving)}",
            f"- Metrics: `{json.dumps(version.metrics, sort_keys=True)}`",
            "",
        ]
    )


def _heldout_text(heldout: dict[str, Any], serving: dict[str, Any]) -> str:
    if heldout.get("accuracy") is None:
        return "no decisive held-out pairs yet (promoted on its training data)"
    return (
        f"held-out accuracy {heldout['accuracy']:.3f} (ECE {heldout.get('ece') or 0:.3f}) on "
        f"{heldout.get('n_pairs', 0)} pairs; the model it was gated against: "
        f"{serving.get('accuracy')}"
    )


def _snapshot_text(version: ModelVersion) -> str:
    snapshot = version.data_snapshot
    if not snapshot:
        return "none (untrained base version)"
    return (
        f"{snapshot.get('records', 0)} records from "
        f"{len(snapshot.get('annotations') or [])} annotations"
    )


def _without(values: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k != key}
