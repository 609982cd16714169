"""Every labeling template in label_configs/: valid for Label Studio 1.23, learnable by the
backend, shipped with importable sample tasks, and converted to the records its README promises.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from label_studio_sdk.label_interface import LabelInterface

from rlhf_core.conversion import Provenance, convert
from rlhf_core.label_schema import parse_label_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "label_configs"
TEMPLATES = sorted(path.stem for path in CONFIG_DIR.glob("*.xml"))
REQUIRED = {"pairwise", "ranking", "rating", "pairwise_custom_fields", "graded", "thumbs"}

PROVENANCE = Provenance(project=5, task=101, annotation=2024, annotator=7)
IDS = {"project": 5, "task": 101, "annotation": 2024, "annotator": 7}


def config(name: str) -> str:
    return (CONFIG_DIR / f"{name}.xml").read_text(encoding="utf-8")


def tasks(name: str) -> list[dict[str, Any]]:
    return json.loads((CONFIG_DIR / f"{name}.tasks.json").read_text(encoding="utf-8"))


def data_fields(xml: str) -> dict[str, ElementTree.Element]:
    """Task data key -> the object tag showing it (what Label Studio expects in every task)."""
    root = ElementTree.fromstring(xml)
    return {
        element.attrib["value"][1:]: element
        for element in root.iter()
        if "name" in element.attrib and element.attrib.get("value", "").startswith("$")
    }


def test_the_documented_templates_exist():
    assert set(TEMPLATES) >= REQUIRED


# The config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_passes_label_studio_validation(name):
    LabelInterface(config(name)).validate()  # the SDK's copy of Label Studio's own checks


@pytest.mark.parametrize("name", TEMPLATES)
def test_every_control_points_to_object_tags_the_way_the_editor_needs(name):
    root = ElementTree.fromstring(config(name))
    objects = {
        e.attrib["name"]: e.tag for e in root.iter() if "name" in e.attrib and "value" in e.attrib
    }
    controls = [e for e in root.iter() if "toName" in e.attrib]

    assert controls
    for control in controls:
        targets = control.attrib["toName"].split(",")
        assert control.attrib.get("name"), f"<{control.tag}> has no name"
        assert set(targets) <= set(objects), f"<{control.tag}> points to {targets}"
        if control.tag == "Pairwise":
            assert len(set(targets)) == 2
        if control.tag == "Ranker":
            assert [objects[t] for t in targets] == ["List"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_is_learnable(name):
    schema = parse_label_config(config(name))

    assert schema.learns_preferences or schema.unpaired
    assert schema.feedback


@pytest.mark.parametrize("name", TEMPLATES)
def test_readme_has_a_section_for_the_template(name):
    readme = (CONFIG_DIR / "README.md").read_text(encoding="utf-8")

    assert f"## `{name}.xml`" in readme


# The sample tasks -----------------------------------------------------------------------------


def is_blank(value: Any) -> bool:
    return value in ("", [])


def check_value(key: str, value: Any, element: ElementTree.Element) -> None:
    """The value has the shape its object tag renders (and Label Studio 1.23 imports)."""
    if element.tag == "Text":
        assert isinstance(value, str), key
    elif element.tag == "Paragraphs":
        name_key = element.attrib.get("nameKey", "author")
        text_key = element.attrib.get("textKey", "text")
        assert value and all(set(turn) == {name_key, text_key} for turn in value), key
    elif element.tag == "List":
        assert isinstance(value, list), key
        assert all(set(item) == {"id", "title", "body"} for item in value), key
        assert len({item["id"] for item in value}) == len(value), f"{key}: ids repeat"
    else:
        raise AssertionError(f"no check for <{element.tag}> yet")


@pytest.mark.parametrize("name", TEMPLATES)
def test_every_task_has_every_field_the_config_shows(name):
    fields = data_fields(config(name))
    loaded = tasks(name)

    assert isinstance(loaded, list)
    for task in loaded:
        assert list(task) == ["data"]
        assert set(task["data"]) == set(fields)
        for key, value in task["data"].items():
            check_value(key, value, fields[key])


@pytest.mark.parametrize("name", TEMPLATES)
def test_tasks_are_complete_or_prompt_only(name):
    schema = parse_label_config(config(name))
    complete, prompt_only = 0, 0
    for task in tasks(name):
        data = task["data"]
        responses = [value for key, value in data.items() if key != schema.prompt.key]
        assert not is_blank(data[schema.prompt.key])
        if all(is_blank(value) for value in responses):
            prompt_only += 1
        else:
            assert not any(is_blank(value) for value in responses), data
            complete += 1

    assert complete >= 5
    assert prompt_only >= 3


# Conversion of a realistic annotation --------------------------------------------------------


def item(from_name: str, to_name: str, kind: str, value: dict[str, Any]) -> dict[str, Any]:
    """One result item as Label Studio 1.23 stores it in an annotation."""
    return {
        "id": f"{from_name}-1",
        "from_name": from_name,
        "to_name": to_name,
        "type": kind,
        "origin": "manual",
        "value": value,
    }


def preference(prompt: str, chosen: str, rejected: str, source: str, control: str, tie=False):
    record = {**IDS, "prompt": prompt, "chosen": chosen, "rejected": rejected, "tie": tie}
    return ("preference", {**record, "source": source, "control": control})


def feedback(prompt: str, response: str | None, text: str, control: str):
    return (
        "feedback",
        {**IDS, "prompt": prompt, "response": response, "feedback": text, "control": control},
    )


def pairwise_case() -> tuple[int, list, list]:
    data = tasks("pairwise")[0]["data"]
    result = [
        item("comparison", "comparison", "pairwise", {"selected": "left"}),
        item("feedback_answer2", "answer2", "textarea", {"text": ["Never says what it is."]}),
    ]
    records = [
        preference(data["prompt"], data["answer1"], data["answer2"], "pairwise", "comparison"),
        feedback(data["prompt"], data["answer2"], "Never says what it is.", "feedback_answer2"),
    ]
    return 0, result, records


def pairwise_tie_case() -> tuple[int, list, list]:
    data = tasks("pairwise")[4]["data"]
    result = [
        item("comparison", "comparison", "pairwise", {"selected": "right"}),
        item("tie", "prompt", "choices", {"choices": ["Tie / equally good"]}),
    ]
    records = [
        preference(
            data["prompt"], data["answer1"], data["answer2"], "pairwise", "comparison", tie=True
        )
    ]
    return 4, result, records


def pairwise_custom_fields_case() -> tuple[int, list, list]:
    data = tasks("pairwise_custom_fields")[3]["data"]
    result = [
        item("preference", "question", "choices", {"choices": ["A is better"]}),
        item("feedback_b", "response_b", "textarea", {"text": ["Sydney is not the capital."]}),
    ]
    records = [
        preference(
            data["question"], data["response_a"], data["response_b"], "choices", "preference"
        ),
        feedback(data["question"], data["response_b"], "Sydney is not the capital.", "feedback_b"),
    ]
    return 3, result, records


def rating_case() -> tuple[int, list, list]:
    data = tasks("rating")[1]["data"]
    result = [
        item("rating_answer1", "answer1", "rating", {"rating": 5}),
        item("rating_answer2", "answer2", "rating", {"rating": 2}),
        item("feedback_answer2", "answer2", "textarea", {"text": ["The starter is only hungry."]}),
    ]
    prompt, answer1, answer2 = data["prompt"], data["answer1"], data["answer2"]
    records = [
        preference(prompt, answer1, answer2, "rating", "rating_answer1,rating_answer2"),
        feedback(prompt, answer2, "The starter is only hungry.", "feedback_answer2"),
    ]
    return 1, result, records


def ranking_case() -> tuple[int, list, list]:
    data = tasks("ranking")[0]["data"]
    body = {c["id"]: c["body"] for c in data["candidates"]}
    ranker = {"_": [], "best": ["c1", "c2"], "good": ["c4"], "weak": [], "unacceptable": ["c3"]}
    result = [
        item("rank", "candidates", "ranker", {"ranker": ranker}),
        item("notes", "prompt", "textarea", {"text": ["Mention that strings are immutable."]}),
    ]
    prompt = data["prompt"]
    # Stored as the ranking (best > good > unacceptable; the empty "weak" tier dropped); the
    # training job derives c1>c4, c2>c4, c1>c3, c2>c3, c4>c3 from it.
    ranking = [[body["c1"], body["c2"]], [body["c4"]], [body["c3"]]]
    records = [
        (
            "ranking",
            {**IDS, "prompt": prompt, "ranking": ranking, "source": "ranker", "control": "rank"},
        )
    ]
    records.append(feedback(prompt, None, "Mention that strings are immutable.", "notes"))
    return 0, result, records


def pairwise_chat_case() -> tuple[int, list, list]:
    data = tasks("pairwise_chat")[2]["data"]
    prompt = "user: What is 15% of 80?\nassistant: 15% of 80 is 12.\nuser: And 15% more than 80?"
    result = [item("comparison", "comparison", "pairwise", {"selected": "left"})]
    records = [preference(prompt, "80 + 12 = 92.", data["answer2"], "pairwise", "comparison")]
    return 2, result, records


def unpaired(prompt: str, response: str, desirable: bool, source: str, control: str, **extra):
    verdict = {"desirable": desirable, "source": source, "control": control, **extra}
    return ("unpaired", {**IDS, "prompt": prompt, "response": response, **verdict})


def graded_case() -> tuple[int, list, list]:
    data = tasks("graded")[2]["data"]
    result = [
        item("preference", "prompt", "choices", {"choices": ["B is slightly better"]}),
        item("feedback_answer1", "answer1", "textarea", {"text": ["Misses the second step."]}),
    ]
    prompt, answer1, answer2 = data["prompt"], data["answer1"], data["answer2"]
    kind, record = preference(prompt, answer2, answer1, "choices", "preference")
    records = [
        (kind, {**record, "strength": "slightly", "margin": 1 / 3}),
        feedback(prompt, answer1, "Misses the second step.", "feedback_answer1"),
    ]
    return 2, result, records


def graded_tie_case() -> tuple[int, list, list]:
    data = tasks("graded")[0]["data"]
    result = [item("preference", "prompt", "choices", {"choices": ["Tie: equally good"]})]
    records = [
        preference(
            data["prompt"], data["answer1"], data["answer2"], "choices", "preference", tie=True
        )
    ]
    return 0, result, records


def graded_both_bad_case() -> tuple[int, list, list]:
    data = tasks("graded")[3]["data"]
    result = [item("preference", "prompt", "choices", {"choices": ["Both are bad"]})]
    prompt = data["prompt"]
    records = [
        unpaired(prompt, data["answer1"], False, "both_bad", "preference"),
        unpaired(prompt, data["answer2"], False, "both_bad", "preference"),
    ]
    return 3, result, records


def thumbs_case() -> tuple[int, list, list]:
    data = tasks("thumbs")[1]["data"]
    result = [
        item("verdict", "response", "choices", {"choices": ["Thumbs down: bad response"]}),
        item("feedback", "response", "textarea", {"text": ["Say how long to wait."]}),
    ]
    prompt, response = data["prompt"], data["response"]
    records = [
        unpaired(prompt, response, False, "thumbs", "verdict"),
        feedback(prompt, response, "Say how long to wait.", "feedback"),
    ]
    return 1, result, records


def thumbs_up_case() -> tuple[int, list, list]:
    data = tasks("thumbs")[0]["data"]
    result = [item("verdict", "response", "choices", {"choices": ["Thumbs up: good response"]})]
    return 0, result, [unpaired(data["prompt"], data["response"], True, "thumbs", "verdict")]


CASES = {
    "graded": graded_case,
    "graded_tie": graded_tie_case,
    "graded_both_bad": graded_both_bad_case,
    "thumbs": thumbs_case,
    "thumbs_up": thumbs_up_case,
    "pairwise": pairwise_case,
    "pairwise_tie": pairwise_tie_case,
    "pairwise_custom_fields": pairwise_custom_fields_case,
    "rating": rating_case,
    "ranking": ranking_case,
    "pairwise_chat": pairwise_chat_case,
}


def template_of(case: str) -> str:
    variants = {
        "pairwise_tie": "pairwise",
        "graded_tie": "graded",
        "graded_both_bad": "graded",
        "thumbs_up": "thumbs",
    }
    return variants.get(case, case)


def test_every_template_has_a_conversion_case():
    assert set(TEMPLATES) <= {template_of(case) for case in CASES}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sample_annotation_fits_the_template(case):
    _, result, _ = CASES[case]()
    interface = LabelInterface(config(template_of(case)))
    # Label Studio stores a Pairwise result with to_name = the control's own name, which the
    # SDK's validator does not know; everything else is checked against the config.
    checked = [r for r in result if r["type"] != "pairwise"]

    assert interface.validate_prediction({"result": checked}, return_errors=True) == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_sample_annotation_converts_to_exact_records(case):
    index, result, expected = CASES[case]()
    name = template_of(case)
    schema = parse_label_config(config(name))

    assert convert(result, tasks(name)[index]["data"], schema, PROVENANCE) == expected
