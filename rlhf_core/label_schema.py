"""What a project's label config asks annotators for, read with label-studio-sdk's LabelInterface.

Field names always come from the config: a project whose texts are ``$question``,
``$response_a`` and ``$response_b`` is served exactly like one with ``$prompt``, ``$answer1``
and ``$answer2``. What the backend recognises:

* **Pairwise** over two text objects: ``selected: left`` prefers the first ``toName`` object.
* **Ranker** over a **List**: items earlier in the order (or in an earlier **Bucket**) are better.
* **Rating** on each of two or more responses: higher rating is better, equal ratings tie.
  With several Ratings per response (helpfulness, harmlessness), the k-th Rating of a response
  is compared with the k-th Rating of every other response.
* **Choices** whose every choice names a response or a tie (``A is better``, ``Response 2``,
  ``Tie``; a ``Choice``'s ``alias`` is read first): the chosen response is better. A Choices
  with only tie-like choices is an optional "tie" button next to a Pairwise.
* **Graded Choices**: choices that also say how much better (``A is significantly better``,
  ``A is better``, ``A is slightly better``, ``A is negligibly better / unsure``, as Llama 2
  collected them): each strength becomes a margin of the Bradley–Terry loss
  (:data:`STRENGTH_MARGINS`). A choice such as ``Both are bad`` / ``Neither is acceptable`` is
  "both bad" (:data:`BOTH_BAD`): kept as undesirable examples, not a pair.
* **Unpaired verdicts** on a single response: a Choices on it whose choices are a thumbs up and
  a thumbs down (``Good`` / ``Bad``, ``👍`` / ``👎``, ``Acceptable`` / ``Unacceptable``), or a
  Rating when only one response is rated (above the middle of the scale is desirable, below it
  undesirable, the middle neutral). The policy learns from them with KTO.
* **TextArea** on a response: language feedback on that response; on anything else: feedback
  on the whole item.

The prompt is the first Text, HyperText or Paragraphs object that is not a response.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from label_studio_sdk.label_interface import LabelInterface

from rlhf_core.errors import LabelConfigTooLarge, UnsupportedLabelConfig

TEXT_OBJECTS = ("Text", "HyperText", "Paragraphs")
TIE = -1
BOTH_BAD = -2

# Llama 2's four levels (Touvron et al. 2023, table 27, "margin small"): the margin m of
# -log sigmoid(r_chosen - r_rejected - m). A choice naming a response without a strength word
# is "better" when its control offers other strengths, else it carries no margin.
STRENGTH_MARGINS = {"significantly": 1.0, "better": 2 / 3, "slightly": 1 / 3, "negligibly": 0.0}
_STRENGTH_WORDS = {
    "significantly": re.compile(r"\b(significantly|much|far|strongly|clearly)\b", re.I),
    "slightly": re.compile(r"\b(slightly|somewhat|a little)\b", re.I),
    "negligibly": re.compile(r"\b(negligibly|marginally|barely|unsure|not sure)\b", re.I),
}
_BOTH_BAD_WORDS = re.compile(
    r"\bboth\b.*\b(bad|poor|wrong|unacceptable|unusable)\b"
    r"|\bneither\b.*\b(good|acceptable|usable|ok|okay|fine)\b",
    re.I,
)
_UNDESIRABLE_WORDS = re.compile(
    r"\b(bad|no|not|unacceptable|unhelpful|wrong|incorrect|dislike|down|reject)\b|\U0001f44e", re.I
)
_DESIRABLE_WORDS = re.compile(
    r"\b(good|yes|acceptable|helpful|correct|like|up|approve|accept)\b|\U0001f44d", re.I
)

_TIE_WORDS = re.compile(r"\b(tie|tied|equal|equally|same|both|neither|draw|no preference)\b", re.I)
_POSITION_WORDS = [
    re.compile(r"\b(A|1|left|first|one)\b|^a\b", re.I),
    re.compile(r"\b(B|2|right|second|two)\b|^b\b", re.I),
    re.compile(r"\b(C|3|third|three)\b", re.I),
    re.compile(r"\b(D|4|fourth|four)\b", re.I),
]


@dataclass(frozen=True)
class TextField:
    """An object tag that shows a text from the task: its tag name and the task data key.

    ``is_variable`` is False for a tag whose value is fixed text in the config (an instruction
    such as ``<Text name="help" value="Read both answers"/>``), not a ``$field`` of the task.
    ``name_key``/``text_key`` are a Paragraphs tag's ``nameKey``/``textKey`` (who speaks, what
    they say: ``role``/``content`` for chat transcripts).
    """

    name: str
    key: str
    tag: str
    is_variable: bool = True
    name_key: str = "author"
    text_key: str = "text"


@dataclass(frozen=True)
class PairwiseControl:
    name: str
    left: TextField
    right: TextField


@dataclass(frozen=True)
class RankerControl:
    name: str
    items: TextField  # the List object; its data is a list of {"id", "title", "body"}
    buckets: tuple[str, ...]  # Bucket names, best first; empty: one ordered list


@dataclass(frozen=True)
class RatingControl:
    name: str
    target: TextField
    max_rating: int


@dataclass(frozen=True)
class ChoicesPreference:
    name: str
    responses: tuple[TextField, ...]
    choice_to_index: dict[str, int]  # choice value -> index into responses, TIE or BOTH_BAD
    to_name: str  # the object the control points at: where Label Studio expects its results
    # Graded choices: choice value -> strength (a STRENGTH_MARGINS key); empty when ungraded.
    choice_to_strength: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class UnpairedControl:
    """A verdict on one response: thumbs up/down (a Choices) or a rating (a Rating).

    ``choice_to_desirable`` maps each choice of a Choices to desirable (True) or not; it is
    empty for a Rating, whose ``max_rating`` sets the scale."""

    name: str
    target: TextField
    choice_to_desirable: dict[str, bool] = field(default_factory=dict)
    max_rating: int = 0


@dataclass(frozen=True)
class FeedbackControl:
    name: str
    target: TextField | None  # a response, or None for feedback on the whole item


@dataclass(frozen=True)
class RLHFSchema:
    prompt: TextField
    responses: tuple[TextField, ...]
    pairwise: tuple[PairwiseControl, ...]
    rankers: tuple[RankerControl, ...]
    ratings: tuple[RatingControl, ...]
    choices: tuple[ChoicesPreference, ...]
    feedback: tuple[FeedbackControl, ...]
    unpaired: tuple[UnpairedControl, ...] = ()

    @property
    def learns_preferences(self) -> bool:
        return bool(self.pairwise or self.rankers or self.rated_pairs or self.preference_choices)

    @property
    def rated_pairs(self) -> bool:
        """Two or more responses are rated: ratings compare them (one alone is unpaired)."""
        return len({r.target.name for r in self.ratings}) >= 2

    @property
    def preference_choices(self) -> tuple[ChoicesPreference, ...]:
        """Choices that pick a response (not only a tie or "both bad" button)."""
        return tuple(c for c in self.choices if any(i >= 0 for i in c.choice_to_index.values()))


PARSE_CACHE_BYTES = 16 * 1024 * 1024


def parse_label_config(xml: str) -> RLHFSchema:
    """Read an RLHF schema from a label config, or raise UnsupportedLabelConfig naming the gap.

    Parsed schemas are cached per process, keyed by the config's digest and bounded by the
    configs' total size (``PARSE_CACHE_BYTES``), not by their number: a few huge configs cannot
    hold hundreds of megabytes."""
    return _CACHE.get(xml)


def check_label_config(xml: str, max_bytes: int) -> RLHFSchema:
    """``parse_label_config`` for a config from a request: refused (413) above ``max_bytes``."""
    size = len(xml.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise LabelConfigTooLarge(
            f"label config is {size} bytes; the backend accepts up to {max_bytes} "
            "(RLHF_MAX_LABEL_CONFIG_BYTES)"
        )
    return parse_label_config(xml)


class _ParseCache:
    """Least-recently-used schemas whose configs add up to at most ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._entries: OrderedDict[str, tuple[int, RLHFSchema]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, xml: str) -> RLHFSchema:
        key = hashlib.sha256(xml.encode("utf-8", "surrogatepass")).hexdigest()
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit[1]
        schema = _parse(xml)
        size = len(xml)
        if size <= self.budget:
            with self._lock:
                if key not in self._entries:
                    self._entries[key] = (size, schema)
                    self._bytes += size
                while self._bytes > self.budget:
                    _, (dropped, _) = self._entries.popitem(last=False)
                    self._bytes -= dropped
        return schema


_CACHE = _ParseCache(PARSE_CACHE_BYTES)


def _parse(xml: str) -> RLHFSchema:
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises bare XML/parsing errors of several types
        raise UnsupportedLabelConfig(f"label config is not valid Label Studio XML: {exc}") from exc
    objects = {obj.name: _text_field(obj) for obj in interface.objects}
    controls = list(interface.controls)

    pairwise = tuple(_pairwise(c, objects) for c in controls if c.tag == "Pairwise")
    # Bucket tags are not exposed by LabelInterface: read them from the tree it parsed (lxml).
    # One parser path: a second parser may refuse what the first accepted (non-ASCII names).
    root = interface._tree
    rankers = tuple(_ranker(c, objects, root) for c in controls if c.tag == "Ranker")
    ratings = tuple(
        RatingControl(c.name, _single_target(c, objects), _max_rating(c))
        for c in controls
        if c.tag == "Rating"
    )
    responses = _responses(pairwise, rankers, ratings)
    choices = tuple(
        choice
        for c in controls
        if c.tag == "Choices"
        and (choice := _choices_preference(c, objects, responses, pairwise)) is not None
    )
    if not responses:
        for choice in choices:
            responses = choice.responses
    unpaired = _unpaired(controls, objects, ratings, responses, choices)
    responses += tuple(
        {u.target.name: u.target for u in unpaired if u.target not in responses}.values()
    )
    response_names = {r.name for r in responses}
    feedback = tuple(
        FeedbackControl(c.name, _feedback_target(c, objects, response_names))
        for c in controls
        if c.tag == "TextArea"
    )
    prompt = next(
        (field for field in _task_texts(objects) if field.name not in response_names),
        None,
    )
    if prompt is None:
        raise UnsupportedLabelConfig(
            "label config has no <Text> tag for the prompt: add e.g. "
            '<Text name="prompt" value="$prompt"/> next to the responses'
        )
    schema = RLHFSchema(prompt, responses, pairwise, rankers, ratings, choices, feedback, unpaired)
    if not schema.learns_preferences and not any(f.target for f in feedback) and not unpaired:
        raise UnsupportedLabelConfig(
            "label config has no control tag the RLHF backend can learn from: add a <Pairwise> "
            "over two responses, a <Ranker> over a <List>, a <Rating> per response, a <Choices> "
            "naming the better response, a thumbs up/down <Choices> or a <Rating> on one "
            "response, or a <TextArea> on a response (see label_configs/)"
        )
    return schema


def _max_rating(control: Any) -> int:
    raw = control.attr.get("maxRating", 5)
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise UnsupportedLabelConfig(
            f"<Rating name={control.name!r}>: maxRating must be a whole number, got {raw!r}"
        ) from None


def _text_field(obj: Any) -> TextField:
    value = obj.value or ""
    return TextField(
        name=obj.name,
        key=value.lstrip("$"),
        tag=obj.tag,
        is_variable=value.startswith("$"),
        name_key=obj.attr.get("nameKey", "author"),
        text_key=obj.attr.get("textKey", "text"),
    )


def _task_texts(objects: dict[str, TextField]) -> list[TextField]:
    """Text objects that show a task field (not fixed instruction text), in config order."""
    return [f for f in objects.values() if f.tag in TEXT_OBJECTS and f.is_variable]


def _targets(control: Any, objects: dict[str, TextField]) -> list[TextField]:
    targets = []
    for name in control.to_name or []:
        if name not in objects:
            raise UnsupportedLabelConfig(
                f"<{control.tag} name={control.name!r}> points to {name!r}, "
                "which is not an object tag in the config"
            )
        targets.append(objects[name])
    return targets


def _single_target(control: Any, objects: dict[str, TextField]) -> TextField:
    targets = _targets(control, objects)
    if len(targets) != 1:
        raise UnsupportedLabelConfig(
            f"<{control.tag} name={control.name!r}> must point to exactly one object (toName)"
        )
    return targets[0]


def _pairwise(control: Any, objects: dict[str, TextField]) -> PairwiseControl:
    targets = _targets(control, objects)
    if len(targets) != 2 or any(t.tag not in TEXT_OBJECTS for t in targets):
        raise UnsupportedLabelConfig(
            f"<Pairwise name={control.name!r}> must point to two <Text> responses, "
            'e.g. toName="answer1,answer2"'
        )
    return PairwiseControl(control.name, targets[0], targets[1])


def _ranker(control: Any, objects: dict[str, TextField], root: Any) -> RankerControl:
    target = _single_target(control, objects)
    if target.tag != "List":
        raise UnsupportedLabelConfig(
            f"<Ranker name={control.name!r}> must point to a <List> of candidate responses"
        )
    element = next((e for e in root.iter("Ranker") if e.attrib.get("name") == control.name), None)
    if element is None:
        return RankerControl(control.name, target, ())
    buckets = tuple(b.attrib["name"] for b in element.iter("Bucket") if "name" in b.attrib)
    return RankerControl(control.name, target, buckets)


def _responses(
    pairwise: tuple[PairwiseControl, ...],
    rankers: tuple[RankerControl, ...],
    ratings: tuple[RatingControl, ...],
) -> tuple[TextField, ...]:
    found: dict[str, TextField] = {}
    for p in pairwise:
        found.setdefault(p.left.name, p.left)
        found.setdefault(p.right.name, p.right)
    for r in rankers:
        found.setdefault(r.items.name, r.items)
    for rating in ratings:
        if rating.target.tag in TEXT_OBJECTS:
            found.setdefault(rating.target.name, rating.target)
    return tuple(found.values())


def _choice_texts(control: Any) -> dict[str, list[str]]:
    """Each choice as stored in results (its alias, else its value) -> the texts to read it by."""
    return {
        key: [t for t in (tag.attr.get("alias"), tag.attr.get("value")) if t]
        for key, tag in control.labels_attrs.items()
    }


def _choices_preference(
    control: Any,
    objects: dict[str, TextField],
    responses: tuple[TextField, ...],
    pairwise: tuple[PairwiseControl, ...],
) -> ChoicesPreference | None:
    """A Choices control is a preference when every choice names a response or a tie."""
    targets = [t for t in _targets(control, objects) if t.tag in TEXT_OBJECTS]
    candidates = responses or (tuple(targets) if len(targets) >= 2 else ())
    if not candidates:
        texts = _task_texts(objects)  # the first is the prompt, the others the responses
        candidates = tuple(texts[1:]) if len(texts) >= 3 else ()
    if pairwise:
        candidates = (pairwise[0].left, pairwise[0].right)
    choices = _choice_texts(control)
    if not choices or not candidates:
        return None
    mapping: dict[str, int] = {}
    for key, readings in choices.items():
        index = next(
            (i for i in (_choice_index(t, candidates) for t in readings) if i is not None), None
        )
        if index is None:
            return None
        mapping[key] = index
    to_name = control.to_name[0] if control.to_name else candidates[0].name
    strengths = _strengths(choices, mapping)
    return ChoicesPreference(control.name, tuple(candidates), mapping, to_name, strengths)


def _strengths(choices: dict[str, list[str]], mapping: dict[str, int]) -> dict[str, str]:
    """Each response-naming choice's strength, when the control offers more than one."""
    strengths = {
        key: next(
            (s for s, words in _STRENGTH_WORDS.items() if any(words.search(t) for t in texts)),
            "better",
        )
        for key, texts in choices.items()
        if mapping[key] >= 0
    }
    return strengths if len(set(strengths.values())) > 1 else {}


def _choice_index(value: str, candidates: tuple[TextField, ...]) -> int | None:
    if _BOTH_BAD_WORDS.search(value):
        return BOTH_BAD
    if _TIE_WORDS.search(value):
        return TIE
    # Whole words only: a response named "a" is not meant by "Answer B is better".
    named = {
        i
        for i, field in enumerate(candidates)
        if _mentions(value, field.name) or (field.key and _mentions(value, field.key))
    }
    if named:
        return named.pop() if len(named) == 1 else None
    matches = [i for i, pattern in enumerate(_POSITION_WORDS) if pattern.search(value)]
    if len(matches) == 1 and matches[0] < len(candidates):
        return matches[0]
    return None


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.I) is not None


def _feedback_target(
    control: Any, objects: dict[str, TextField], response_names: set[str]
) -> TextField | None:
    targets = _targets(control, objects)
    in_responses = [t for t in targets if t.name in response_names and t.tag != "List"]
    return in_responses[0] if len(in_responses) == 1 else None


def _unpaired(
    controls: list[Any],
    objects: dict[str, TextField],
    ratings: tuple[RatingControl, ...],
    responses: tuple[TextField, ...],
    choices: tuple[ChoicesPreference, ...],
) -> tuple[UnpairedControl, ...]:
    """Verdicts on a single response: a thumbs Choices on a task text that is not the first
    one (the prompt), and each Rating when only one response is rated."""
    found: list[UnpairedControl] = []
    if len({r.target.name for r in ratings}) == 1:
        found += [
            UnpairedControl(r.name, r.target, max_rating=r.max_rating)
            for r in ratings
            if r.target.tag in TEXT_OBJECTS and r.target.is_variable
        ]
    preference_names = {c.name for c in choices}
    texts = _task_texts(objects)
    for control in controls:
        if control.tag != "Choices" or control.name in preference_names:
            continue
        targets = _targets(control, objects)
        if len(targets) != 1 or targets[0] not in texts[1:] or targets[0] in responses:
            continue
        verdicts = {key: _desirable(texts_) for key, texts_ in _choice_texts(control).items()}
        if verdicts and None not in verdicts.values() and len(set(verdicts.values())) == 2:
            found.append(UnpairedControl(control.name, targets[0], verdicts))  # type: ignore[arg-type]
    return tuple(found)


def _desirable(texts: list[str]) -> bool | None:
    """True for a thumbs-up choice, False for a thumbs-down one, None for anything else."""
    if any(_UNDESIRABLE_WORDS.search(t) for t in texts):
        return False
    if any(_DESIRABLE_WORDS.search(t) for t in texts):
        return True
    return None
