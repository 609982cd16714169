"""parse_label_config: what a project's label config asks annotators for, and what it rejects."""

from __future__ import annotations

import pytest

from rlhf_core.errors import UnsupportedLabelConfig
from rlhf_core.label_schema import (
    TIE,
    ChoicesPreference,
    FeedbackControl,
    PairwiseControl,
    RankerControl,
    RatingControl,
    TextField,
    parse_label_config,
)

PROMPT = TextField("prompt", "prompt", "Text")
ANSWER1 = TextField("answer1", "answer1", "Text")
ANSWER2 = TextField("answer2", "answer2", "Text")
CANDIDATES = TextField("candidates", "candidates", "List")

PAIRWISE = """
<View>
  <Text name="prompt" value="$prompt"/>
  <Pairwise name="comparison" toName="answer1,answer2"/>
  <Text name="answer1" value="$answer1"/>
  <Text name="answer2" value="$answer2"/>
  {extra}
</View>
"""


def pairwise_config(extra: str = "") -> str:
    return PAIRWISE.format(extra=extra)


def test_pairwise_reads_left_and_right_from_to_name_order():
    schema = parse_label_config(pairwise_config())

    assert schema.prompt == PROMPT
    assert schema.responses == (ANSWER1, ANSWER2)
    assert schema.pairwise == (PairwiseControl("comparison", ANSWER1, ANSWER2),)
    assert (schema.rankers, schema.ratings, schema.choices, schema.feedback) == ((), (), (), ())
    assert schema.learns_preferences


def test_pairwise_to_name_order_wins_over_layout_order():
    schema = parse_label_config(
        '<View><Text name="prompt" value="$prompt"/>'
        '<Text name="answer1" value="$answer1"/><Text name="answer2" value="$answer2"/>'
        '<Pairwise name="comparison" toName="answer2,answer1"/></View>'
    )

    assert schema.pairwise == (PairwiseControl("comparison", ANSWER2, ANSWER1),)


def test_tie_button_is_a_tie_only_choices_not_a_preference_of_its_own():
    schema = parse_label_config(
        pairwise_config(
            '<Choices name="tie" toName="prompt" choice="single">'
            '<Choice value="Tie / equally good"/></Choices>'
        )
    )

    assert schema.choices == (
        ChoicesPreference("tie", (ANSWER1, ANSWER2), {"Tie / equally good": TIE}, "prompt"),
    )
    assert schema.preference_choices == ()


def test_field_names_come_from_the_config():
    schema = parse_label_config(
        '<View><Text name="question" value="$question"/>'
        '<Text name="response_a" value="$response_a"/>'
        '<Text name="response_b" value="$response_b"/>'
        '<Choices name="preference" toName="question" choice="single-radio">'
        '<Choice value="A is better"/><Choice value="B is better"/><Choice value="Tie"/>'
        "</Choices></View>"
    )
    response_a = TextField("response_a", "response_a", "Text")
    response_b = TextField("response_b", "response_b", "Text")

    assert schema.prompt == TextField("question", "question", "Text")
    assert schema.responses == (response_a, response_b)
    assert schema.choices == (
        ChoicesPreference(
            "preference",
            (response_a, response_b),
            {"A is better": 0, "B is better": 1, "Tie": TIE},
            "question",
        ),
    )
    assert schema.preference_choices == schema.choices


def test_choice_alias_is_the_key_and_is_read_first():
    schema = parse_label_config(
        pairwise_config(
            '<Choices name="verdict" toName="prompt">'
            '<Choice value="The first one" alias="right"/>'
            '<Choice value="Neither" alias="equal"/></Choices>'
        )
    )

    # The alias "right" names response 2 even though the value says "first".
    assert schema.choices == (
        ChoicesPreference("verdict", (ANSWER1, ANSWER2), {"right": 1, "equal": TIE}, "prompt"),
    )


def test_choices_naming_responses_by_their_object_names():
    schema = parse_label_config(
        '<View><Text name="prompt" value="$prompt"/>'
        '<Text name="a" value="$a"/><Text name="b" value="$b"/>'
        '<Choices name="better" toName="prompt">'
        '<Choice value="Answer A is better"/><Choice value="Answer B is better"/>'
        "</Choices></View>"
    )

    # Whole words only: the "a" in "Answer B" is not response a.
    assert schema.choices[0].choice_to_index == {"Answer A is better": 0, "Answer B is better": 1}


def test_choices_that_are_not_preferences_are_ignored():
    schema = parse_label_config(
        pairwise_config(
            '<Choices name="safety" toName="prompt">'
            '<Choice value="Toxic"/><Choice value="Safe"/></Choices>'
        )
    )

    assert schema.choices == ()
    assert schema.pairwise == (PairwiseControl("comparison", ANSWER1, ANSWER2),)


def test_choices_with_one_ambiguous_choice_is_not_a_preference():
    schema = parse_label_config(
        pairwise_config(
            '<Choices name="verdict" toName="prompt">'
            '<Choice value="A is better"/><Choice value="A is better than B"/></Choices>'
        )
    )

    assert schema.choices == ()


def test_ranker_over_a_list_without_buckets():
    schema = parse_label_config(
        '<View><Text name="prompt" value="$prompt"/>'
        '<List name="candidates" value="$candidates" title="Candidates"/>'
        '<Ranker name="rank" toName="candidates"/></View>'
    )

    assert schema.prompt == PROMPT
    assert schema.responses == (CANDIDATES,)
    assert schema.rankers == (RankerControl("rank", CANDIDATES, ()),)


def test_ranker_buckets_are_read_best_first_in_config_order():
    schema = parse_label_config(
        '<View><Text name="prompt" value="$prompt"/>'
        '<List name="candidates" value="$candidates" title="Unsorted"/>'
        '<Ranker name="rank" toName="candidates">'
        '<Bucket name="best" title="Best"/><Bucket name="ok" title="OK"/>'
        '<Bucket name="bad" title="Bad"/></Ranker></View>'
    )

    assert schema.rankers == (RankerControl("rank", CANDIDATES, ("best", "ok", "bad")),)


def test_rating_per_response():
    schema = parse_label_config(
        '<View><Text name="prompt" value="$prompt"/>'
        '<Text name="answer1" value="$answer1"/>'
        '<Rating name="r1" toName="answer1" maxRating="10"/>'
        '<Text name="answer2" value="$answer2"/>'
        '<Rating name="r2" toName="answer2"/></View>'
    )

    assert schema.prompt == PROMPT
    assert schema.responses == (ANSWER1, ANSWER2)
    assert schema.ratings == (RatingControl("r1", ANSWER1, 10), RatingControl("r2", ANSWER2, 5))
    assert schema.learns_preferences


def test_textarea_on_a_response_is_feedback_on_it_and_on_the_prompt_on_the_whole_item():
    schema = parse_label_config(
        pairwise_config(
            '<TextArea name="fb1" toName="answer1"/><TextArea name="fb2" toName="answer2"/>'
            '<TextArea name="general" toName="prompt"/>'
        )
    )

    assert schema.feedback == (
        FeedbackControl("fb1", ANSWER1),
        FeedbackControl("fb2", ANSWER2),
        FeedbackControl("general", None),
    )


def test_textarea_on_a_response_alone_is_learnable():
    schema = parse_label_config(
        '<View><Text name="prompt" value="$prompt"/><Text name="answer1" value="$answer1"/>'
        '<Rating name="r1" toName="answer1"/>'
        '<TextArea name="critique" toName="answer1"/></View>'
    )

    assert not schema.learns_preferences
    assert schema.feedback == (FeedbackControl("critique", ANSWER1),)


def test_paragraphs_prompt_keeps_its_name_and_text_keys():
    schema = parse_label_config(
        '<View><Paragraphs name="chat" value="$dialogue" layout="dialogue" '
        'nameKey="role" textKey="content"/>'
        '<Pairwise name="comparison" toName="answer1,answer2"/>'
        '<Text name="answer1" value="$answer1"/><Text name="answer2" value="$answer2"/></View>'
    )

    assert schema.prompt == TextField(
        "chat", "dialogue", "Paragraphs", name_key="role", text_key="content"
    )


def test_fixed_instruction_text_is_not_the_prompt():
    schema = parse_label_config(
        pairwise_config().replace(
            "<View>", '<View><Text name="help" value="Read both answers first."/>', 1
        )
    )

    assert schema.prompt == PROMPT


def unsupported_message(xml: str) -> str:
    with pytest.raises(UnsupportedLabelConfig) as caught:
        parse_label_config(xml)
    return caught.value.message


def test_no_prompt_text_is_unsupported():
    message = unsupported_message(
        '<View><Pairwise name="comparison" toName="answer1,answer2"/>'
        '<Text name="answer1" value="$answer1"/><Text name="answer2" value="$answer2"/></View>'
    )

    assert message == (
        "label config has no <Text> tag for the prompt: add e.g. "
        '<Text name="prompt" value="$prompt"/> next to the responses'
    )


NO_LEARNABLE_CONTROL = (
    "label config has no control tag the RLHF backend can learn from: add a <Pairwise> "
    "over two responses, a <Ranker> over a <List>, a <Rating> per response, a <Choices> "
    "naming the better response, a thumbs up/down <Choices> or a <Rating> on one "
    "response, or a <TextArea> on a response (see label_configs/)"
)


@pytest.mark.parametrize(
    "xml",
    [
        '<View><Text name="text" value="$text"/>'
        '<Choices name="sentiment" toName="text"><Choice value="Positive"/>'
        '<Choice value="Negative"/></Choices></View>',
        '<View><Text name="prompt" value="$prompt"/><TextArea name="notes" toName="prompt"/>'
        "</View>",
    ],
    ids=["classification", "feedback-on-prompt-only"],
)
def test_no_learnable_control_is_unsupported(xml):
    assert unsupported_message(xml) == NO_LEARNABLE_CONTROL


def test_pairwise_pointing_to_one_object_is_unsupported():
    message = unsupported_message(
        '<View><Text name="prompt" value="$prompt"/><Text name="answer1" value="$answer1"/>'
        '<Pairwise name="comparison" toName="answer1"/></View>'
    )

    assert message == (
        "<Pairwise name='comparison'> must point to two <Text> responses, "
        'e.g. toName="answer1,answer2"'
    )


def test_ranker_pointing_to_a_text_is_unsupported():
    message = unsupported_message(
        '<View><Text name="prompt" value="$prompt"/><Text name="answers" value="$answers"/>'
        '<Ranker name="rank" toName="answers"/></View>'
    )

    assert message == "<Ranker name='rank'> must point to a <List> of candidate responses"


def test_to_name_of_a_missing_object_is_unsupported():
    message = unsupported_message(
        '<View><Text name="prompt" value="$prompt"/><Text name="answer1" value="$answer1"/>'
        '<Pairwise name="comparison" toName="answer1,answer9"/></View>'
    )

    assert message == (
        "<Pairwise name='comparison'> points to 'answer9', which is not an object tag in the config"
    )


def test_invalid_xml_is_unsupported():
    message = unsupported_message('<View><Text name="prompt" value="$prompt"></View>')

    assert message.startswith("label config is not valid Label Studio XML: ")
