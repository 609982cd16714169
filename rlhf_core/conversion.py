"""The one conversion from a Label Studio annotation to the records the trainer learns from.

Four record kinds come out, each tagged with where it came from (project, task, annotation,
annotator) so that nothing a human said is anonymous or unattributable:

``preference``: ``{"prompt", "chosen", "rejected", "tie", "source", "control", ...}``
``ranking``:    ``{"prompt", "ranking", "source", "control", ...}``: a Ranker's answer as it was
                given, ``ranking`` the groups of response texts, best group first. It is stored
                once (linear in the items), not as its implied pairs (quadratic: 600 ranked
                items imply 179,700); :func:`ranking_pairs` derives the pairs when a job trains,
                at most ``RLHF_MAX_RANKING_PAIRS`` per ranking.
``feedback``:   ``{"prompt", "response", "feedback", "control", ...}`` (``response`` is None for
                feedback on the whole item)
``unpaired``:   ``{"prompt", "response", "desirable", "source", "control", ...}``: a verdict on
                one response (``source``: ``thumbs``, ``rating`` with its ``rating``, or
                ``both_bad``, one record per response of a "both bad" answer), which KTO
                learns from; never a pair.

A graded choice (``A is slightly better``) adds ``"strength"`` (``significantly``, ``better``,
``slightly``, ``negligibly``) and ``"margin"`` (its Bradley–Terry margin,
``rlhf_core.label_schema.STRENGTH_MARGINS``) to its preference records.

Example, with the pairwise template and ``selected: right``:

>>> from rlhf_core.label_schema import parse_label_config
>>> schema = parse_label_config(
...     '<View><Text name="prompt" value="$prompt"/>'
...     '<Pairwise name="comparison" toName="answer1,answer2"/>'
...     '<Text name="answer1" value="$answer1"/><Text name="answer2" value="$answer2"/></View>')
>>> convert(
...     [{"from_name": "comparison", "type": "pairwise", "value": {"selected": "right"}}],
...     {"prompt": "hi", "answer1": "hello", "answer2": "go away"},
...     schema,
...     Provenance(project=1, task=1, annotation=7, annotator=3),
... )  # doctest: +NORMALIZE_WHITESPACE
[('preference', {'project': 1, 'task': 1, 'annotation': 7, 'annotator': 3,
  'prompt': 'hi', 'chosen': 'go away', 'rejected': 'hello', 'tie': False,
  'source': 'pairwise', 'control': 'comparison'})]

Ties are kept (``tie: True``; ``chosen``/``rejected`` are then just the two responses in config
order). A comparison with an empty response (a prompt-only task whose responses were not
generated yet) yields no preference. Cancelled (skipped) annotations produce no records; that
is decided in ``rlhf_core.intake``, not here.
"""

from __future__ import annotations

import logging
import random
import zlib
from bisect import bisect_right
from collections import defaultdict
from dataclasses import asdict, dataclass
from itertools import accumulate, combinations
from typing import Any

from rlhf_core.config import BackendConfig
from rlhf_core.errors import AnnotationMismatch
from rlhf_core.label_schema import (
    BOTH_BAD,
    STRENGTH_MARGINS,
    TIE,
    RankerControl,
    RLHFSchema,
    TextField,
    UnpairedControl,
)

logger = logging.getLogger(__name__)

Record = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class Provenance:
    project: int
    task: int | None
    annotation: int
    annotator: int | None
    ground_truth: bool = False  # Label Studio's gold mark; on the records only when set

    def fields(self) -> dict[str, Any]:
        """What every record of the annotation carries (``ground_truth`` only on gold)."""
        found = asdict(self)
        if not self.ground_truth:
            del found["ground_truth"]
        return found


def convert(
    result: list[dict[str, Any]],
    task_data: dict[str, Any],
    schema: RLHFSchema,
    provenance: Provenance,
) -> list[Record]:
    """Turn one annotation's ``result`` on a task into preference and feedback records."""
    by_control: dict[str, dict[str, Any]] = {}
    for item in result:
        if isinstance(item, dict) and isinstance(item.get("value"), dict):
            by_control[str(item.get("from_name"))] = item["value"]
    prompt = field_text(task_data, schema.prompt)
    base = provenance.fields()

    pairs = [*_pairwise_pairs(by_control, task_data, schema)]
    pairs += _choices_pairs(by_control, task_data, schema)
    pairs += _rating_pairs(by_control, task_data, schema)
    pairs = _drop_empty(pairs)
    strengths = _picked_strengths(by_control, schema)
    records: list[Record] = [
        (
            "preference",
            {
                **base,
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "tie": tie,
                "source": source,
                "control": control,
                **strengths.get(control, {}),
            },
        )
        for chosen, rejected, tie, source, control in pairs
    ]
    records += [
        ("unpaired", {**base, "prompt": prompt, **verdict})
        for verdict in _both_bad(by_control, task_data, schema)
        + _unpaired_verdicts(by_control, task_data, schema)
    ]
    records += [
        (
            "ranking",
            {**base, "prompt": prompt, "ranking": groups, "source": "ranker", "control": name},
        )
        for name, groups in _rankings(by_control, task_data, schema)
    ]
    for control in schema.feedback:
        text = _textarea_text(by_control.get(control.name))
        if text:
            response = field_text(task_data, control.target) if control.target else None
            records.append(
                (
                    "feedback",
                    {
                        **base,
                        "prompt": prompt,
                        "response": response,
                        "feedback": text,
                        "control": control.name,
                    },
                )
            )
    return records


Pair = tuple[str, str, bool, str, str]  # chosen, rejected, tie, source, control


def _drop_empty(pairs: list[Pair]) -> list[Pair]:
    """A comparison with a blank response teaches nothing (its task had no responses yet)."""
    kept = [p for p in pairs if p[0].strip() and p[1].strip()]
    if len(kept) < len(pairs):
        logger.warning(
            "dropped %d comparison(s) with an empty response: the task's responses were not "
            "filled in when it was annotated",
            len(pairs) - len(kept),
        )
    return kept


def _pairwise_pairs(
    by_control: dict[str, dict[str, Any]], task_data: dict[str, Any], schema: RLHFSchema
) -> list[Pair]:
    buttons = _picked_buttons(by_control, schema)
    pairs = []
    for control in schema.pairwise:
        left = field_text(task_data, control.left)
        right = field_text(task_data, control.right)
        if BOTH_BAD in buttons:
            continue
        if TIE in buttons:
            pairs.append((left, right, True, "pairwise", control.name))
            continue
        selected = by_control.get(control.name, {}).get("selected")
        if selected is None:
            continue
        if selected not in ("left", "right"):
            raise AnnotationMismatch(
                f"Pairwise {control.name!r}: selected must be 'left' or 'right', got {selected!r}"
            )
        chosen, rejected = (left, right) if selected == "left" else (right, left)
        pairs.append((chosen, rejected, False, "pairwise", control.name))
    return pairs


def _picked(by_control: dict[str, dict[str, Any]], name: str) -> list[str]:
    """The choices a Choices control's answer picked."""
    picked = by_control.get(name, {}).get("choices") or []
    if not isinstance(picked, list) or not all(isinstance(v, str) for v in picked):
        raise AnnotationMismatch(f"Choices {name!r}: value.choices must be a list of strings")
    return picked


def _picked_buttons(by_control: dict[str, dict[str, Any]], schema: RLHFSchema) -> set[int]:
    """TIE and/or BOTH_BAD, where a Choices of only such buttons (next to a Pairwise) is ticked."""
    picked = set()
    for control in schema.choices:
        if control in schema.preference_choices:
            continue
        for value in _picked(by_control, control.name):
            picked.add(control.choice_to_index.get(value, TIE))
    return picked


def _picked_strengths(
    by_control: dict[str, dict[str, Any]], schema: RLHFSchema
) -> dict[str, dict[str, Any]]:
    """Per graded Choices control answered: the strength and margin its pairs carry."""
    found = {}
    for control in schema.preference_choices:
        picked = _picked(by_control, control.name)
        strength = control.choice_to_strength.get(picked[0]) if picked else None
        if strength is not None:
            found[control.name] = {"strength": strength, "margin": STRENGTH_MARGINS[strength]}
    return found


def _both_bad(
    by_control: dict[str, dict[str, Any]], task_data: dict[str, Any], schema: RLHFSchema
) -> list[dict[str, Any]]:
    """A "both bad" answer: each response, undesirable (blank responses left out)."""
    verdicts = []
    for control in schema.choices:  # a "both bad" button next to a Pairwise names its two
        picked = _picked(by_control, control.name)
        if BOTH_BAD not in {control.choice_to_index.get(v) for v in picked}:
            continue
        for field in control.responses:
            text = field_text(task_data, field)
            if text.strip():
                verdict = {"desirable": False, "source": "both_bad", "control": control.name}
                verdicts.append({"response": text, **verdict})
    return verdicts


def _unpaired_verdicts(
    by_control: dict[str, dict[str, Any]], task_data: dict[str, Any], schema: RLHFSchema
) -> list[dict[str, Any]]:
    verdicts = []
    for control in schema.unpaired:
        value = by_control.get(control.name)
        if not value:
            continue
        verdict = _verdict(control, value)
        text = field_text(task_data, control.target)
        if verdict is not None and text.strip():
            verdicts.append({"response": text, **verdict, "control": control.name})
    return verdicts


def _verdict(control: UnpairedControl, value: dict[str, Any]) -> dict[str, Any] | None:
    """Thumbs: the choice's verdict. Rating: above the scale's middle is desirable, below it
    undesirable; the middle itself (3 of 5) says neither and gives no record."""
    if control.choice_to_desirable:
        picked = _picked({control.name: value}, control.name)
        if not picked:
            return None
        if picked[0] not in control.choice_to_desirable:
            raise AnnotationMismatch(f"Choices {control.name!r}: unknown choice {picked[0]!r}")
        return {"desirable": control.choice_to_desirable[picked[0]], "source": "thumbs"}
    rating = value.get("rating")
    if rating is None:
        return None
    if isinstance(rating, bool) or not isinstance(rating, int | float):
        raise AnnotationMismatch(f"Rating {control.name!r}: rating must be a number")
    middle = (1 + control.max_rating) / 2
    if rating == middle:
        return None
    return {"desirable": rating > middle, "source": "rating", "rating": rating}


def _choices_pairs(
    by_control: dict[str, dict[str, Any]], task_data: dict[str, Any], schema: RLHFSchema
) -> list[Pair]:
    pairs = []
    for control in schema.preference_choices:
        picked = by_control.get(control.name, {}).get("choices") or []
        if not isinstance(picked, list):
            raise AnnotationMismatch(f"Choices {control.name!r}: value.choices must be a list")
        if not picked:
            continue
        value = picked[0]
        if not isinstance(value, str) or value not in control.choice_to_index:
            raise AnnotationMismatch(f"Choices {control.name!r}: unknown choice {value!r}")
        texts = [field_text(task_data, r) for r in control.responses]
        index = control.choice_to_index[value]
        if index == BOTH_BAD:
            continue  # not a pair: its responses are undesirable examples (_both_bad)
        if index == TIE:
            pairs += [(a, b, True, "choices", control.name) for a, b in combinations(texts, 2)]
        else:
            pairs += [
                (texts[index], other, False, "choices", control.name)
                for i, other in enumerate(texts)
                if i != index
            ]
    return pairs


def _rankings(
    by_control: dict[str, dict[str, Any]], task_data: dict[str, Any], schema: RLHFSchema
) -> list[tuple[str, list[list[str]]]]:
    """Each answered Ranker's groups of response texts, best first (blank responses left out)."""
    rankings = []
    for control in schema.rankers:
        value = by_control.get(control.name, {}).get("ranker")
        if value is None:
            continue
        texts = list_item_texts(task_data, control.items)
        groups = _ranked_groups(value, control)
        unknown = [item for group in groups for item in group if item not in texts]
        if unknown:
            raise AnnotationMismatch(
                f"Ranker {control.name!r}: items {unknown[:20]} are not in the task's "
                f"{control.items.key!r} list"
            )
        ranked = [[texts[i] for i in group if texts[i].strip()] for group in groups]
        ranked = [group for group in ranked if group]
        if len(ranked) >= 2:
            rankings.append((control.name, ranked))
    return rankings


def ranking_pairs(record: dict[str, Any], max_pairs: int) -> list[dict[str, Any]]:
    """The preference records a ``ranking`` record implies: every item beats every item of a
    later group. Above ``max_pairs`` implied pairs, a sample of ``max_pairs`` of them, drawn
    without replacement and the same on every call (seeded by the annotation and control).

    >>> ranking_pairs({"annotation": 7, "prompt": "p", "ranking": [["a"], ["b", "c"]],
    ...                "source": "ranker", "control": "rank"}, 10)  # doctest: +NORMALIZE_WHITESPACE
    [{'annotation': 7, 'prompt': 'p', 'source': 'ranker', 'control': 'rank', 'chosen': 'a',
      'rejected': 'b', 'tie': False}, {'annotation': 7, 'prompt': 'p', 'source': 'ranker',
      'control': 'rank', 'chosen': 'a', 'rejected': 'c', 'tie': False}]
    """
    groups = record["ranking"]
    base = {k: v for k, v in record.items() if k != "ranking"}
    starts = list(accumulate((len(g) for g in groups), initial=0))  # first flat index per group
    flat = [text for group in groups for text in group]
    group_of = [g for g, group in enumerate(groups) for _ in group]
    # Pair (i, j), i in an earlier group than j, numbered in row order: row i has the items
    # after i's group; all pairs are enumerated only when they fit the bound.
    row_lengths = [len(flat) - starts[g + 1] for g in group_of]
    total = sum(row_lengths)
    if total <= max_pairs:
        chosen = [
            (i, j) for i in range(len(flat)) for j in range(starts[group_of[i] + 1], len(flat))
        ]
    else:
        seed = zlib.crc32(f"{record.get('annotation')}:{record.get('control')}".encode())
        picks = random.Random(seed).sample(range(total), max_pairs)
        row_ends = list(accumulate(row_lengths))
        chosen = []
        for k in sorted(picks):
            i = bisect_right(row_ends, k)
            offset = k - (row_ends[i] - row_lengths[i])
            chosen.append((i, starts[group_of[i] + 1] + offset))
    return [{**base, "chosen": flat[i], "rejected": flat[j], "tie": False} for i, j in chosen]


def preference_pairs(
    preferences: list[dict[str, Any]],
    rankings: list[dict[str, Any]],
    max_per_ranking: int = BackendConfig.max_ranking_pairs,
) -> list[dict[str, Any]]:
    """What a training job learns from: the stored pairs and the pairs each ranking implies."""
    pairs = list(preferences)
    for record in rankings:
        pairs += ranking_pairs(record, max_per_ranking)
    return pairs


def _ranked_groups(value: Any, control: RankerControl) -> list[list[str]]:
    """Groups of item ids, best group first; items in one group are not compared.

    Accepts the list form (``[id, ...]``, one item per group), the plain dict form (Label
    Studio 1.23 keys it by the Ranker's name, ``{ranker_name: [id, ...]}``; the List's name
    is read too) and the bucket form (``{bucket: [id, ...], "_": [...]}``, buckets ranked in
    config order; the unplaced ``"_"`` column is ignored).
    """
    if isinstance(value, list):
        return [[str(item)] for item in value]
    if not isinstance(value, dict):
        raise AnnotationMismatch(f"Ranker {control.name!r}: value.ranker must be a list or dict")
    if control.buckets:
        return [_ranked_column(value, bucket, control) for bucket in control.buckets]
    for key in (control.name, control.items.name):
        if key in value:
            return [[item] for item in _ranked_column(value, key, control)]
    columns = [k for k in value if k != "_"]
    if len(columns) != 1:
        raise AnnotationMismatch(
            f"Ranker {control.name!r}: expected the key {control.name!r} in value.ranker, "
            f"got {sorted(value)}"
        )
    return [[item] for item in _ranked_column(value, columns[0], control)]


def _ranked_column(value: dict[str, Any], key: str, control: RankerControl) -> list[str]:
    items = value.get(key) or []
    if not isinstance(items, list):
        raise AnnotationMismatch(f"Ranker {control.name!r}: value.ranker[{key!r}] must be a list")
    return [str(item) for item in items]


def _rating_pairs(
    by_control: dict[str, dict[str, Any]], task_data: dict[str, Any], schema: RLHFSchema
) -> list[Pair]:
    """Responses compared by rating; the k-th Rating of each response is one criterion."""
    criteria: dict[int, list[tuple[float, str, str]]] = defaultdict(list)
    seen_per_target: dict[str, int] = defaultdict(int)
    for control in schema.ratings:
        criterion = seen_per_target[control.target.name]
        seen_per_target[control.target.name] += 1
        rating = by_control.get(control.name, {}).get("rating")
        if rating is None:
            continue
        if isinstance(rating, bool) or not isinstance(rating, int | float):
            raise AnnotationMismatch(f"Rating {control.name!r}: rating must be a number")
        text = field_text(task_data, control.target)
        criteria[criterion].append((float(rating), text, control.name))
    pairs = []
    for rated in criteria.values():
        pairs += _rated_pairs(rated)
    return pairs


def _rated_pairs(rated: list[tuple[float, str, str]]) -> list[Pair]:
    pairs = []
    for (r_a, text_a, name_a), (r_b, text_b, name_b) in combinations(rated, 2):
        control = f"{name_a},{name_b}"
        if r_a == r_b:
            pairs.append((text_a, text_b, True, "rating", control))
        elif r_a > r_b:
            pairs.append((text_a, text_b, False, "rating", control))
        else:
            pairs.append((text_b, text_a, False, "rating", control))
    return pairs


def _textarea_text(value: dict[str, Any] | None) -> str:
    if not value:
        return ""
    text = value.get("text")
    if isinstance(text, list):
        text = "\n".join(str(t) for t in text)
    return str(text or "").strip()


def field_text(task_data: dict[str, Any], field: TextField) -> str:
    """The text an object tag shows for a task.

    Paragraphs are joined as ``author: text`` lines, read with the tag's ``nameKey`` and
    ``textKey`` (``role: content`` for a chat transcript).
    """
    if field.key not in task_data:
        raise AnnotationMismatch(
            f"task data has no {field.key!r} field, which the label config's "
            f"<{field.tag} name={field.name!r}> shows"
        )
    value = task_data[field.key]
    if isinstance(value, list):
        return "\n".join(
            f"{p.get(field.name_key, '')}: {p.get(field.text_key, '')}"
            if isinstance(p, dict)
            else str(p)
            for p in value
        )
    return "" if value is None else str(value)


def list_item_texts(task_data: dict[str, Any], field: TextField) -> dict[str, str]:
    """A List object's items as ``{id: text}`` (the text is the item's body, else its title)."""
    items = task_data.get(field.key)
    if not isinstance(items, list):
        raise AnnotationMismatch(f"task data field {field.key!r} must be a list of items")
    texts = {}
    for index, item in enumerate(items):
        if isinstance(item, dict):
            item_id = str(item.get("id", index))
            texts[item_id] = str(item.get("body") or item.get("text") or item.get("title") or "")
        else:
            texts[str(index)] = str(item)
    return texts
