import pytest

from kdcache.errors import KdcacheError, SampleError
from kdcache.templates import IMAGE_TOKEN, SYSTEM_PROMPT, build_prompt, build_sequence

VISUAL_LEN = 7


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


ONE_TURN = [human("<image>\nWhat color is the star?"), gpt("The star is red.")]
TWO_TURNS = [*ONE_TURN, human("How many circles are there?"), gpt("There are three circles.")]


def sequence(tokenizer, conversations, template="qwen2_base", has_image=True, **kwargs):
    return build_sequence(conversations, tokenizer, template=template,
                          image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), visual_len=VISUAL_LEN,
                          has_image=has_image, sample_id=kwargs.pop("sample_id", "s1"), **kwargs)


def supervised_text(tokenizer, seq) -> str:
    """What the response rows predict: the tokens at response_rows + 1."""
    return tokenizer.decode([seq.input_ids[t + 1] for t in seq.response_rows])


def test_qwen2_base_supervises_exactly_the_answer_and_its_eos(toy_tokenizer):
    seq = sequence(toy_tokenizer, ONE_TURN)
    assert supervised_text(toy_tokenizer, seq) == "The star is red.<|endoftext|>"
    assert seq.response_rows == list(range(seq.response_rows[0], len(seq.input_ids) - 1))
    text = toy_tokenizer.decode(seq.input_ids)
    assert text.startswith(SYSTEM_PROMPT + "USER: " + IMAGE_TOKEN * VISUAL_LEN + "\nWhat color is the star? ASSISTANT: ")


def test_multi_turn_supervises_every_answer_and_never_a_question_or_the_system_prompt(toy_tokenizer):
    seq = sequence(toy_tokenizer, TWO_TURNS)
    assert supervised_text(toy_tokenizer, seq) == "The star is red.<|endoftext|>There are three circles.<|endoftext|>"
    assert toy_tokenizer.decode(seq.input_ids).endswith(
        "red.<|endoftext|>USER: How many circles are there? ASSISTANT: There are three circles.<|endoftext|>")
    assert seq.response_rows == sorted(set(seq.response_rows))


def test_plain_supervises_the_caption_and_newline_and_drops_the_question(toy_tokenizer):
    seq = sequence(toy_tokenizer, [human("<image>\nDescribe the image."), gpt("A small blue square.")], "plain")
    image_id = toy_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert seq.input_ids[:VISUAL_LEN] == [image_id] * VISUAL_LEN
    assert toy_tokenizer.decode(seq.input_ids[VISUAL_LEN:]) == "A small blue square.\n"
    assert supervised_text(toy_tokenizer, seq) == "A small blue square.\n"
    assert seq.response_rows[0] == VISUAL_LEN - 1      # the last image row predicts the first caption token
    assert toy_tokenizer.eos_token_id not in seq.input_ids


@pytest.mark.parametrize("template", ["plain", "qwen2_base"])
def test_image_tokens_are_expanded_to_visual_len_at_visual_start(toy_tokenizer, template):
    seq = sequence(toy_tokenizer, TWO_TURNS, template)
    image_id = toy_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    positions = [t for t, i in enumerate(seq.input_ids) if i == image_id]
    assert seq.visual_len == VISUAL_LEN
    assert positions == list(range(seq.visual_start, seq.visual_start + VISUAL_LEN))
    assert not set(seq.response_rows) & set(positions[:-1])


def test_image_placeholder_is_moved_to_the_start_of_the_first_question(toy_tokenizer):
    expected = sequence(toy_tokenizer, TWO_TURNS)
    trailing = [human("What color is the star?\n<image>"), *TWO_TURNS[1:]]
    in_second = [human("What color is the star?"), TWO_TURNS[1], human("<image>\nHow many circles are there?"),
                 TWO_TURNS[3]]
    missing = [human("What color is the star?"), *TWO_TURNS[1:]]
    for conversations in (trailing, in_second, missing):
        assert sequence(toy_tokenizer, conversations) == expected


def test_text_only_sample_has_no_visual_positions(toy_tokenizer):
    seq = sequence(toy_tokenizer, [human("How many sides has a square?"), gpt("four")], has_image=False)
    assert (seq.visual_start, seq.visual_len) == (0, 0)
    assert toy_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) not in seq.input_ids
    assert supervised_text(toy_tokenizer, seq) == "four<|endoftext|>"
    assert toy_tokenizer.decode(seq.input_ids).startswith(SYSTEM_PROMPT + "USER: How many sides")


def test_image_placeholder_in_a_sample_without_image_is_refused(toy_tokenizer):
    with pytest.raises(SampleError, match="'s1'.*no image"):
        sequence(toy_tokenizer, ONE_TURN, has_image=False)


def test_over_length_sequence_raises_sample_error_naming_the_sample(toy_tokenizer):
    length = len(sequence(toy_tokenizer, TWO_TURNS).input_ids)
    assert len(sequence(toy_tokenizer, TWO_TURNS, max_length=length).input_ids) == length
    with pytest.raises(SampleError, match=f"'long-one'.*{length} tokens exceeds max_length {length - 1}"):
        sequence(toy_tokenizer, TWO_TURNS, max_length=length - 1, sample_id="long-one")


@pytest.mark.parametrize("conversations, reason", [
    ([], "empty conversation"),
    ([gpt("red"), human("what?")], "turn 0 is from 'gpt'"),
    ([human("a"), human("b")], "turn 1 is from 'human'"),
    ([human("<image>\nWhat color?")], "no answer"),
    ([human("q"), {"from": "gpt"}], "no text"),
])
def test_malformed_conversations_raise_sample_error(toy_tokenizer, conversations, reason):
    for template in ("plain", "qwen2_base"):
        with pytest.raises(SampleError, match=reason) as caught:
            sequence(toy_tokenizer, conversations, template, sample_id="bad-7")
        assert caught.value.sample_id == "bad-7"


def test_unknown_template_is_refused(toy_tokenizer):
    with pytest.raises(KdcacheError, match="unknown template 'llama3'"):
        sequence(toy_tokenizer, ONE_TURN, "llama3")


@pytest.mark.parametrize("has_image", [True, False])
def test_build_prompt_is_a_prefix_of_build_sequence(toy_tokenizer, has_image):
    turns = TWO_TURNS if has_image else [human("What is two and two?"), gpt("four"), *TWO_TURNS[2:]]
    full = sequence(toy_tokenizer, turns, has_image=has_image).input_ids
    image_id = toy_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for k in (0, 1):
        prompt = build_prompt(turns[: 2 * k], turns[2 * k]["value"], toy_tokenizer, template="qwen2_base",
                              image_token_id=image_id, visual_len=VISUAL_LEN, has_image=has_image)
        assert full[: len(prompt)] == prompt
        assert toy_tokenizer.decode(prompt).endswith(" ASSISTANT: ")
        answer = toy_tokenizer.encode(turns[2 * k + 1]["value"], add_special_tokens=False)
        assert full[len(prompt): len(prompt) + len(answer)] == answer


def test_plain_prompt_is_the_image_tokens(toy_tokenizer):
    image_id = toy_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    prompt = build_prompt([], "Describe.", toy_tokenizer, template="plain", image_token_id=image_id,
                          visual_len=VISUAL_LEN, has_image=True)
    assert prompt == [image_id] * VISUAL_LEN
    full = sequence(toy_tokenizer, ONE_TURN, "plain").input_ids
    assert full[:VISUAL_LEN] == prompt
