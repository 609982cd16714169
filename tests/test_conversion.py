"""convert: one annotation's result on a task -> the exact preference and feedback records.

Results are shaped as Label Studio 1.23 sends them in webhooks (see tests/fixtures/).
"""

from __future__ import annotations

from typing import Any

import pytest

from rlhf_core.conversion import Provenance, convert, field_text, list_item_texts, ranking_pairs
from rlhf_core.errors import AnnotationMismatch
from rlhf_core.label_schema import TextField, parse_label_config

PROVENANCE = Provenance(project=3, task=41, annotation=907, annotator=12)
IDS = {"project": 3, "task": 41, "annotation": 907, "annotator": 12}

PAIRWISE = (
    '<View><Text name="prompt" value="$prompt"/>'
    '<Pairwise name="comparison" toName="answer1,answer2"/>'
    '<Text name="answer1" value="$answer1"/><Text name="answer2" value="$answer2"/>'
    '<TextArea name="fb1" toName="answer1"/><TextArea name="fb2" toName="answer2"/>'
    '<TextArea name="general" toName="prompt"/>'
    '<Choices name="tie" toName="prompt" choice="single"><Choice value="Tie / equally good"/>'
    "</Choices>"
    '<Choices name="safety" toName="prompt"><Choice value="Toxic"/><Choice value="Safe"/>'
    "</Choices></View>"
)
PAIR_TASK = {"prompt": "2+2?", "answer1": "4", "answer2": "5"}


def result(from_name: str, kind: str, value: dict[str, Any], to_name: str = "") -> dict:
    """One result item as Label Studio stores it."""
    return {
        "id": f"r-{from_name}",
        "from_name": from_name,
        "to_name": to_name or from_name,
        "type": kind,
        "origin": "manual",
        "value": value,
    }


def preference(chosen: str, rejected: str, source: str, control: str, tie: bool = False, **kw):
    record = {**IDS, "prompt": kw.get("prompt", "2+2?"), "chosen": chosen, "rejected": rejected}
    return ("preference", {**record, "tie": tie, "source": source, "control": control})


def feedback(response: str | None, text: str, control: str, prompt: str = "2+2?"):
    record = {**IDS, "prompt": prompt, "response": response, "feedback": text}
    return ("feedback", {**record, "control": control})


def run(xml: str, items: list[dict], task: dict) -> list:
    return convert(items, task, parse_label_config(xml), PROVENANCE)


# Pairwise ------------------------------------------------------------------------------------


def test_pairwise_left_prefers_the_first_to_name_object():
    records = run(PAIRWISE, [result("comparison", "pairwise", {"selected": "left"})], PAIR_TASK)

    assert records == [preference("4", "5", "pairwise", "comparison")]


def test_pairwise_right_prefers_the_second_to_name_object():
    records = run(PAIRWISE, [result("comparison", "pairwise", {"selected": "right"})], PAIR_TASK)

    assert records == [preference("5", "4", "pairwise", "comparison")]


def test_tie_button_overrides_the_pairwise_click():
    records = run(
        PAIRWISE,
        [
            result("comparison", "pairwise", {"selected": "right"}),
            result("tie", "choices", {"choices": ["Tie / equally good"]}, "prompt"),
        ],
        PAIR_TASK,
    )

    # A tie keeps the two responses in config order.
    assert records == [preference("4", "5", "pairwise", "comparison", tie=True)]


def test_tie_button_alone_is_a_tie():
    records = run(
        PAIRWISE, [result("tie", "choices", {"choices": ["Tie / equally good"]})], PAIR_TASK
    )

    assert records == [preference("4", "5", "pairwise", "comparison", tie=True)]


def test_unticked_tie_button_leaves_the_click():
    records = run(
        PAIRWISE,
        [
            result("comparison", "pairwise", {"selected": "left"}),
            result("tie", "choices", {"choices": []}),
        ],
        PAIR_TASK,
    )

    assert records == [preference("4", "5", "pairwise", "comparison")]


def test_pairwise_with_an_unknown_side_is_a_mismatch():
    with pytest.raises(AnnotationMismatch) as caught:
        run(PAIRWISE, [result("comparison", "pairwise", {"selected": "middle"})], PAIR_TASK)

    assert caught.value.message == (
        "Pairwise 'comparison': selected must be 'left' or 'right', got 'middle'"
    )


def test_choices_that_are_not_preferences_add_no_records():
    records = run(
        PAIRWISE,
        [
            result("comparison", "pairwise", {"selected": "left"}),
            result("safety", "choices", {"choices": ["Toxic"]}),
        ],
        PAIR_TASK,
    )

    assert records == [preference("4", "5", "pairwise", "comparison")]


def test_empty_result_gives_no_records():
    assert run(PAIRWISE, [], PAIR_TASK) == []


def test_comparison_with_an_empty_response_gives_no_preference():
    task = {"prompt": "2+2?", "answer1": "", "answer2": "   "}
    records = run(
        PAIRWISE,
        [
            result("comparison", "pairwise", {"selected": "left"}),
            result("general", "textarea", {"text": ["Responses are missing."]}, "prompt"),
        ],
        task,
    )

    assert records == [feedback(None, "Responses are missing.", "general")]


# Feedback ------------------------------------------------------------------------------------


def test_textarea_on_a_response_is_feedback_on_that_response():
    records = run(
        PAIRWISE,
        [
            result("fb2", "textarea", {"text": ["Wrong: 2+2 is 4."]}, "answer2"),
            result("fb1", "textarea", {"text": ["Correct but terse.", "Say why."]}, "answer1"),
        ],
        PAIR_TASK,
    )

    # Records follow the config's order; several submitted texts are joined by lines.
    assert records == [
        feedback("4", "Correct but terse.\nSay why.", "fb1"),
        feedback("5", "Wrong: 2+2 is 4.", "fb2"),
    ]


def test_textarea_on_the_prompt_is_feedback_on_the_whole_item():
    records = run(
        PAIRWISE, [result("general", "textarea", {"text": ["  Both ignore units.  "]})], PAIR_TASK
    )

    assert records == [feedback(None, "Both ignore units.", "general")]


def test_blank_textarea_gives_no_feedback():
    records = run(PAIRWISE, [result("fb1", "textarea", {"text": ["  ", ""]})], PAIR_TASK)

    assert records == []


# Ranker --------------------------------------------------------------------------------------

RANKER = (
    '<View><Text name="prompt" value="$prompt"/>'
    '<List name="candidates" value="$candidates" title="Candidates"/>'
    '<Ranker name="rank" toName="candidates"/></View>'
)
RANKER_BUCKETS = (
    '<View><Text name="prompt" value="$prompt"/>'
    '<List name="candidates" value="$candidates" title="Unsorted"/>'
    '<Ranker name="rank" toName="candidates">'
    '<Bucket name="best" title="Best"/><Bucket name="ok" title="OK"/>'
    '<Bucket name="bad" title="Bad"/></Ranker></View>'
)
RANK_TASK = {
    "prompt": "Capital of France?",
    "candidates": [
        {"id": "a", "title": "Candidate 1", "body": "Paris"},
        {"id": "b", "title": "Candidate 2", "body": "Lyon"},
        {"id": "c", "title": "Candidate 3", "body": "Paris, on the Seine"},
        {"id": "d", "title": "Only a title"},
    ],
}


def ranked(chosen: str, rejected: str) -> tuple:
    return preference(chosen, rejected, "ranker", "rank", prompt="Capital of France?")


def run_ranked(xml: str, items: list[dict], task: dict, max_pairs: int = 10_000) -> list:
    """The preference records a training job derives from the converted ranking records."""
    records = run(xml, items, task)
    assert all(kind == "ranking" for kind, _ in records)
    return [("preference", p) for _, r in records for p in ranking_pairs(r, max_pairs)]


ORDER_C_A_B = [
    ranked("Paris, on the Seine", "Paris"),
    ranked("Paris, on the Seine", "Lyon"),
    ranked("Paris", "Lyon"),
]


def test_ranker_is_stored_once_as_its_ordering():
    value = {"ranker": {"rank": ["c", "a", "b"]}}
    records = run(RANKER, [result("rank", "ranker", value, "candidates")], RANK_TASK)

    assert records == [
        (
            "ranking",
            {
                **IDS,
                "prompt": "Capital of France?",
                "ranking": [["Paris, on the Seine"], ["Paris"], ["Lyon"]],
                "source": "ranker",
                "control": "rank",
            },
        )
    ]


def test_a_ranking_of_600_items_gives_a_bounded_fixed_sample_of_distinct_pairs():
    task = {"prompt": "p", "candidates": [{"id": str(i), "body": f"r{i}"} for i in range(600)]}
    value = {"ranker": [str(i) for i in range(600)]}
    [(_, record)] = run(RANKER, [result("rank", "ranker", value)], task)

    pairs = ranking_pairs(record, 1000)

    assert len(pairs) == 1000
    assert pairs == ranking_pairs(record, 1000)  # the same sample on every read
    picked = {(p["chosen"], p["rejected"]) for p in pairs}
    assert len(picked) == 1000
    assert all(int(a[1:]) < int(b[1:]) for a, b in picked)  # the earlier item always wins
    assert len(ranking_pairs(record, 10**6)) == 600 * 599 // 2


def test_ranker_dict_form_keyed_by_ranker_name_as_label_studio_sends_it():
    value = {"ranker": {"rank": ["c", "a", "b"]}}
    records = run_ranked(RANKER, [result("rank", "ranker", value, "candidates")], RANK_TASK)

    assert records == ORDER_C_A_B


def test_ranker_dict_form_keyed_by_list_name():
    value = {"ranker": {"candidates": ["c", "a", "b"]}}
    records = run_ranked(RANKER, [result("rank", "ranker", value, "candidates")], RANK_TASK)

    assert records == ORDER_C_A_B


def test_ranker_list_form():
    records = run_ranked(RANKER, [result("rank", "ranker", {"ranker": ["c", "a", "b"]})], RANK_TASK)

    assert records == ORDER_C_A_B


def test_ranker_item_without_body_is_read_by_its_title():
    records = run_ranked(RANKER, [result("rank", "ranker", {"ranker": ["d", "b"]})], RANK_TASK)

    assert records == [ranked("Only a title", "Lyon")]


def test_ranker_buckets_rank_in_config_order_and_unsorted_items_are_ignored():
    value = {"ranker": {"bad": ["b"], "_": ["d"], "best": ["c", "a"], "ok": []}}
    records = run_ranked(RANKER_BUCKETS, [result("rank", "ranker", value, "candidates")], RANK_TASK)

    # Items in one bucket are not compared with each other.
    assert records == [ranked("Paris, on the Seine", "Lyon"), ranked("Paris", "Lyon")]


def test_ranker_submitted_untouched_with_buckets_gives_nothing():
    value = {"ranker": {"_": ["a", "b", "c", "d"], "best": [], "ok": [], "bad": []}}

    assert run_ranked(RANKER_BUCKETS, [result("rank", "ranker", value)], RANK_TASK) == []


def test_ranker_with_unknown_item_ids_is_a_mismatch():
    with pytest.raises(AnnotationMismatch) as caught:
        run(RANKER, [result("rank", "ranker", {"ranker": {"rank": ["a", "x", "y"]}})], RANK_TASK)

    assert caught.value.message == (
        "Ranker 'rank': items ['x', 'y'] are not in the task's 'candidates' list"
    )


def test_ranker_dict_with_unknown_columns_is_a_mismatch():
    value = {"ranker": {"first": ["a"], "second": ["b"]}}
    with pytest.raises(AnnotationMismatch) as caught:
        run(RANKER, [result("rank", "ranker", value)], RANK_TASK)

    assert caught.value.message == (
        "Ranker 'rank': expected the key 'rank' in value.ranker, got ['first', 'second']"
    )


# Rating --------------------------------------------------------------------------------------

RATING = (
    '<View><Text name="prompt" value="$prompt"/>'
    '<Text name="answer1" value="$answer1"/><Rating name="r1" toName="answer1"/>'
    '<Text name="answer2" value="$answer2"/><Rating name="r2" toName="answer2"/>'
    '<Text name="answer3" value="$answer3"/><Rating name="r3" toName="answer3"/></View>'
)
RATING_TASK = {"prompt": "2+2?", "answer1": "4", "answer2": "5", "answer3": "four"}


def ratings(**stars: float) -> list[dict]:
    return [result(name, "rating", {"rating": value}) for name, value in stars.items()]


def test_higher_rating_is_preferred_for_every_pair_of_rated_responses():
    records = run(RATING, ratings(r1=5, r2=1, r3=3), RATING_TASK)

    assert records == [
        preference("4", "5", "rating", "r1,r2"),
        preference("4", "four", "rating", "r1,r3"),
        preference("four", "5", "rating", "r2,r3"),
    ]


def test_equal_ratings_are_a_tie():
    records = run(RATING, ratings(r1=4, r2=4), RATING_TASK)

    assert records == [preference("4", "5", "rating", "r1,r2", tie=True)]


def test_unrated_response_is_left_out():
    assert run(RATING, ratings(r2=2), RATING_TASK) == []


def test_non_numeric_rating_is_a_mismatch():
    with pytest.raises(AnnotationMismatch) as caught:
        run(RATING, ratings(r1="five", r2=1), RATING_TASK)

    assert caught.value.message == "Rating 'r1': rating must be a number"


def test_several_ratings_per_response_compare_like_with_like():
    xml = (
        '<View><Text name="prompt" value="$prompt"/>'
        '<Text name="answer1" value="$answer1"/>'
        '<Rating name="helpful_1" toName="answer1"/><Rating name="harmless_1" toName="answer1"/>'
        '<Text name="answer2" value="$answer2"/>'
        '<Rating name="helpful_2" toName="answer2"/><Rating name="harmless_2" toName="answer2"/>'
        "</View>"
    )
    items = ratings(helpful_1=2, harmless_1=5, helpful_2=4, harmless_2=5)

    assert run(xml, items, PAIR_TASK) == [
        preference("5", "4", "rating", "helpful_1,helpful_2"),
        preference("4", "5", "rating", "harmless_1,harmless_2", tie=True),
    ]


# Choices -------------------------------------------------------------------------------------

CHOICES = (
    '<View><Text name="question" value="$question"/>'
    '<Text name="response_a" value="$response_a"/><Text name="response_b" value="$response_b"/>'
    '<Choices name="preference" toName="question" choice="single-radio">'
    '<Choice value="Response A is better" alias="left"/>'
    '<Choice value="Response B is better" alias="right"/>'
    '<Choice value="Tie" alias="same"/></Choices></View>'
)
CHOICES_TASK = {"question": "2+2?", "response_a": "4", "response_b": "5"}


def test_choice_stored_under_its_alias_picks_that_response():
    records = run(CHOICES, [result("preference", "choices", {"choices": ["right"]})], CHOICES_TASK)

    assert records == [preference("5", "4", "choices", "preference")]


def test_tie_choice_is_a_tie():
    records = run(CHOICES, [result("preference", "choices", {"choices": ["same"]})], CHOICES_TASK)

    assert records == [preference("4", "5", "choices", "preference", tie=True)]


def test_unknown_choice_is_a_mismatch():
    with pytest.raises(AnnotationMismatch) as caught:
        run(CHOICES, [result("preference", "choices", {"choices": ["A"]})], CHOICES_TASK)

    assert caught.value.message == "Choices 'preference': unknown choice 'A'"


def test_choice_among_three_responses_beats_both_others():
    xml = (
        '<View><Text name="prompt" value="$prompt"/><Text name="answer1" value="$answer1"/>'
        '<Text name="answer2" value="$answer2"/><Text name="answer3" value="$answer3"/>'
        '<Choices name="best" toName="prompt"><Choice value="1"/><Choice value="2"/>'
        '<Choice value="3"/></Choices></View>'
    )
    records = run(xml, [result("best", "choices", {"choices": ["3"]})], RATING_TASK)

    assert records == [
        preference("four", "4", "choices", "best"),
        preference("four", "5", "choices", "best"),
    ]


# Prompt and task fields ----------------------------------------------------------------------


def test_paragraphs_prompt_is_joined_as_speaker_lines():
    xml = (
        '<View><Paragraphs name="chat" value="$dialogue" nameKey="role" textKey="content"/>'
        '<Pairwise name="comparison" toName="answer1,answer2"/>'
        '<Text name="answer1" value="$answer1"/><Text name="answer2" value="$answer2"/></View>'
    )
    task = {
        "dialogue": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "2+2?"},
        ],
        "answer1": "4",
        "answer2": "5",
    }
    records = run(xml, [result("comparison", "pairwise", {"selected": "left"})], task)

    assert records == [
        preference(
            "4",
            "5",
            "pairwise",
            "comparison",
            prompt="user: Hi\nassistant: Hello! How can I help?\nuser: 2+2?",
        )
    ]


def test_field_text_of_paragraphs_with_default_keys():
    field = TextField("dialogue", "dialogue", "Paragraphs")
    task = {"dialogue": [{"author": "Ann", "text": "Hi"}, {"author": "Bob", "text": "Yo"}]}

    assert field_text(task, field) == "Ann: Hi\nBob: Yo"


def test_missing_task_field_is_a_mismatch_naming_the_field():
    with pytest.raises(AnnotationMismatch) as caught:
        run(
            PAIRWISE,
            [result("comparison", "pairwise", {"selected": "left"})],
            {"prompt": "2+2?", "answer1": "4"},
        )

    assert caught.value.message == (
        "task data has no 'answer2' field, which the label config's <Text name='answer2'> shows"
    )


def test_list_item_texts_reads_body_then_text_then_title():
    field = TextField("candidates", "candidates", "List")
    task = {
        "candidates": [
            {"id": 7, "title": "T", "body": "B"},
            {"id": "x", "text": "X"},
            {"title": "only title"},
            "plain string",
        ]
    }

    assert list_item_texts(task, field) == {
        "7": "B",
        "x": "X",
        "2": "only title",
        "3": "plain string",
    }


# -- graded preferences, "both bad" and unpaired verdicts --------------------------------------

PAIRWISE_WITH_BUTTONS = (
    '<View><Text name="prompt" value="$prompt"/>'
    '<Pairwise name="comparison" toName="answer1,answer2"/>'
    '<Text name="answer1" value="$answer1"/><Text name="answer2" value="$answer2"/>'
    '<Choices name="extra" toName="prompt"><Choice value="Tie"/>'
    '<Choice value="Neither is acceptable"/></Choices></View>'
)


def unpaired(response: str, desirable: bool, source: str, control: str, prompt="2+2?", **kw):
    verdict = {"desirable": desirable, "source": source, "control": control, **kw}
    return ("unpaired", {**IDS, "prompt": prompt, "response": response, **verdict})


def test_both_bad_button_next_to_a_pairwise_gives_two_undesirable_examples_and_no_pair():
    items = [
        result("comparison", "pairwise", {"selected": "left"}),
        result("extra", "choices", {"choices": ["Neither is acceptable"]}, "prompt"),
    ]
    assert run(PAIRWISE_WITH_BUTTONS, items, PAIR_TASK) == [
        unpaired("4", False, "both_bad", "extra"),
        unpaired("5", False, "both_bad", "extra"),
    ]


def test_graded_choices_read_their_strength_from_the_alias():
    xml = (
        '<View><Text name="prompt" value="$prompt"/><Text name="answer1" value="$answer1"/>'
        '<Text name="answer2" value="$answer2"/><Choices name="pick" toName="prompt">'
        '<Choice value="Antwort 1 ist viel besser" alias="A is much better"/>'
        '<Choice value="Antwort 1 ist besser" alias="A is better"/>'
        '<Choice value="Antwort 2 ist besser" alias="B is better"/>'
        '<Choice value="Antwort 2 ist viel besser" alias="B is much better"/></Choices></View>'
    )
    items = [result("pick", "choices", {"choices": ["B is much better"]}, "prompt")]
    kind, record = preference("5", "4", "choices", "pick")
    assert run(xml, items, PAIR_TASK) == [
        (kind, {**record, "strength": "significantly", "margin": 1.0})
    ]


def test_ungraded_choices_carry_no_strength():
    xml = (
        '<View><Text name="prompt" value="$prompt"/><Text name="answer1" value="$answer1"/>'
        '<Text name="answer2" value="$answer2"/><Choices name="pick" toName="prompt">'
        '<Choice value="A is better"/><Choice value="B is better"/></Choices></View>'
    )
    items = [result("pick", "choices", {"choices": ["A is better"]}, "prompt")]
    assert run(xml, items, PAIR_TASK) == [preference("4", "5", "choices", "pick")]


SINGLE_RATING = (
    '<View><Text name="prompt" value="$prompt"/><Text name="answer" value="$answer"/>'
    '<Rating name="stars" toName="answer" maxRating="5"/></View>'
)


@pytest.mark.parametrize(("stars", "desirable"), [(5, True), (4, True), (2, False), (1, False)])
def test_a_rating_of_a_single_response_is_an_unpaired_verdict(stars, desirable):
    items = [result("stars", "rating", {"rating": stars}, "answer")]
    assert run(SINGLE_RATING, items, {"prompt": "2+2?", "answer": "4"}) == [
        unpaired("4", desirable, "rating", "stars", rating=stars)
    ]


def test_the_middle_of_the_scale_says_neither_and_gives_no_record():
    items = [result("stars", "rating", {"rating": 3}, "answer")]
    assert run(SINGLE_RATING, items, {"prompt": "2+2?", "answer": "4"}) == []


def test_thumbs_read_by_emoji_and_an_unknown_choice_is_a_mismatch():
    xml = (
        '<View><Text name="prompt" value="$prompt"/><Text name="answer" value="$answer"/>'
        '<Choices name="thumb" toName="answer"><Choice value="\U0001f44d"/>'
        '<Choice value="\U0001f44e"/></Choices></View>'
    )
    task = {"prompt": "2+2?", "answer": "5"}
    down = [result("thumb", "choices", {"choices": ["\U0001f44e"]}, "answer")]
    assert run(xml, down, task) == [unpaired("5", False, "thumbs", "thumb")]
    with pytest.raises(AnnotationMismatch):
        run(xml, [result("thumb", "choices", {"choices": ["meh"]}, "answer")], task)
