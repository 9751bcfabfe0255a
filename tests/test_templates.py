"""Templates (version 2): the conversation rendered to one string, tokenised as one string, the
supervised rows found from character offsets; every generation prompt a prefix of the sequence.

Run on the toy tokenizer (GPT-2 style byte-level BPE) and on a Qwen-style tokenizer (transformers'
`Qwen2Tokenizer` class with Qwen's pre-tokenizer, vocabulary trained locally: tests/local_tokenizers.py).
"""

import pytest

from kdcache import templates
from kdcache.errors import KdcacheError, SampleError
from kdcache.templates import IMAGE_TOKEN, SYSTEM_PROMPT, build_prompt, build_sequence
from local_tokenizers import merging_tokenizer
from template_v1 import v1_build_sequence

VISUAL_LEN = 7
EOS = "<|endoftext|>"


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


ONE_TURN = [human("<image>\nWhat color is the star?"), gpt("The star is red.")]
TWO_TURNS = [*ONE_TURN, human("How many circles are there?"), gpt("There are three circles.")]
THREE_TURNS = [*TWO_TURNS, human("Is it small?"), gpt("3 of them are.")]
# Answers whose first characters meet the separator's space differently in the two tokenizers' pre-tokenizers.
ANSWERS = ["red", "3", "12 apples", " leading space", "two  spaces", "\nnew line", "(b) a circle", "...", "",
           "北京", "café", "😀 yes", "trailing space ", "red<|endoftext|>again", "USER: nested ASSISTANT: x"]


def image_id(tokenizer):
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def sequence(tokenizer, conversations, template="qwen2_base", has_image=True, **kwargs):
    return build_sequence(conversations, tokenizer, template=template, image_token_id=image_id(tokenizer),
                          visual_len=VISUAL_LEN, has_image=has_image, sample_id=kwargs.pop("sample_id", "s1"), **kwargs)


def prompt(tokenizer, turns, k, template="qwen2_base", has_image=True):
    """build_prompt for answer k of `turns`."""
    return build_prompt(turns[: 2 * k], turns[2 * k]["value"], tokenizer, template=template,
                        image_token_id=image_id(tokenizer), visual_len=VISUAL_LEN, has_image=has_image)


def supervised_text(tokenizer, seq) -> str:
    """What the response rows predict: the tokens at response_rows + 1."""
    return tokenizer.decode([seq.input_ids[t + 1] for t in seq.response_rows])


def collapsed(seq, tokenizer) -> list[int]:
    """The sequence with its visual_len image tokens back to the one placeholder id."""
    ids = seq.input_ids
    if not seq.visual_len:
        return ids
    return ids[: seq.visual_start] + [image_id(tokenizer)] + ids[seq.visual_start + seq.visual_len:]


def whole(tokenizer, text) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- the sequence is the whole-string tokenisation


def test_qwen2_base_sequence_is_the_rendered_conversation_tokenised_as_one_string(tokenizer):
    seq = sequence(tokenizer, THREE_TURNS)
    text = (SYSTEM_PROMPT + "USER: <image>\nWhat color is the star? ASSISTANT: The star is red.<|endoftext|>"
            "USER: How many circles are there? ASSISTANT: There are three circles.<|endoftext|>"
            "USER: Is it small? ASSISTANT: 3 of them are.<|endoftext|>")
    assert collapsed(seq, tokenizer) == whole(tokenizer, text)
    assert seq.visual_start == len(whole(tokenizer, SYSTEM_PROMPT + "USER: "))
    assert seq.input_ids[seq.visual_start: seq.visual_start + VISUAL_LEN] == [image_id(tokenizer)] * VISUAL_LEN


def test_supervised_text_is_each_answer_after_its_separator_space_and_its_end_token(tokenizer):
    seq = sequence(tokenizer, THREE_TURNS)
    assert supervised_text(tokenizer, seq) == (f" The star is red.{EOS} There are three circles.{EOS}"
                                               f" 3 of them are.{EOS}")
    assert seq.response_rows == sorted(set(seq.response_rows))
    assert seq.response_rows[-1] == len(seq.input_ids) - 2                # the last row predicts the last eos
    assert not set(seq.response_rows) & set(range(seq.visual_start, seq.visual_start + VISUAL_LEN - 1))


def test_the_measured_boundary_merge_on_the_toy_tokenizer(toy_tokenizer):
    """Issue 14's example: segment by segment, " ASSISTANT: " then "red" gives ..., 27, 222, 317 (": ", "Ġ",
    "red"); the whole string gives ..., 27, 432 (":", "Ġred"). Version 2 is the whole string, and the
    first supervised token is "Ġred", which holds the separator's space."""
    conversation = [human("<image>\nWhat color is the star?"), gpt("red")]
    v1 = v1_build_sequence(conversation, toy_tokenizer, template="qwen2_base", image_token_id=1,
                           visual_len=VISUAL_LEN, has_image=True, sample_id="s")
    v2 = sequence(toy_tokenizer, conversation)
    assert v1.input_ids[-4:] == [27, 222, 317, 0] and v2.input_ids[-3:] == [27, 432, 0]
    assert toy_tokenizer.convert_ids_to_tokens([27, 222, 317, 432]) == [":", "Ġ", "red", "Ġred"]
    assert whole(toy_tokenizer, " ASSISTANT: ") == [427, 27, 222] and whole(toy_tokenizer, " ASSISTANT:") == [427, 27]
    assert [v2.input_ids[t + 1] for t in v2.response_rows] == [432, 0]
    assert [v1.input_ids[t + 1] for t in v1.response_rows] == [317, 0]


def test_plain_ids_are_the_same_in_both_versions(tokenizer):
    """The image token splits the text in both, so version 1 plain caches hold version 2 ids."""
    for conversation in ([human("<image>\nDescribe the image."), gpt("A small blue square.")],
                         [human("Describe."), gpt(" 3 red stars\n")]):
        v2 = sequence(tokenizer, conversation, "plain")
        v1 = v1_build_sequence(conversation, tokenizer, template="plain", image_token_id=image_id(tokenizer),
                               visual_len=VISUAL_LEN, has_image=True, sample_id="s")
        assert (v2.input_ids, v2.response_rows, v2.visual_start) == (v1.input_ids, v1.response_rows, v1.visual_start)


def test_plain_supervises_the_caption_and_newline_and_drops_the_question(tokenizer):
    seq = sequence(tokenizer, [human("<image>\nDescribe the image."), gpt("A small blue square.")], "plain")
    assert seq.input_ids[:VISUAL_LEN] == [image_id(tokenizer)] * VISUAL_LEN
    assert tokenizer.decode(seq.input_ids[VISUAL_LEN:]) == "A small blue square.\n"
    assert supervised_text(tokenizer, seq) == "A small blue square.\n"
    assert seq.response_rows[0] == VISUAL_LEN - 1      # the last image row predicts the first caption token
    assert tokenizer.eos_token_id not in seq.input_ids


# --- generation prompts


@pytest.mark.parametrize("has_image", [True, False])
def test_build_prompt_is_a_prefix_of_build_sequence_for_every_turn(tokenizer, has_image):
    turns = THREE_TURNS if has_image else [human("What is two and two?"), gpt("four"), *THREE_TURNS[2:]]
    full = sequence(tokenizer, turns, has_image=has_image)
    starts = []
    for k in range(3):
        ids = prompt(tokenizer, turns, k, has_image=has_image)
        assert full.input_ids[: len(ids)] == ids
        assert tokenizer.decode(ids).endswith(f"{turns[2 * k]['value'].split(chr(10))[-1]} ASSISTANT:")
        answer = whole(tokenizer, " " + turns[2 * k + 1]["value"]) + [tokenizer.eos_token_id]
        assert full.input_ids[len(ids): len(ids) + len(answer)] == answer
        starts.append(len(ids) - 1)                    # the prompt's last row predicts the answer's first token
    assert [t for t in starts if t in full.response_rows] == starts


@pytest.mark.parametrize("answer", ANSWERS)
def test_prompt_prefix_and_supervision_hold_for_answers_of_every_shape(tokenizer, answer):
    turns = [human("<image>\nWhat is it?"), gpt(answer), human("And then?"), gpt(answer)]
    full = sequence(tokenizer, turns)
    assert supervised_text(tokenizer, full) == f" {answer}{EOS} {answer}{EOS}"
    for k in (0, 1):
        ids = prompt(tokenizer, turns, k)
        assert full.input_ids[: len(ids)] == ids and len(ids) - 1 in full.response_rows


def test_plain_prompt_is_the_image_tokens(tokenizer):
    assert prompt(tokenizer, ONE_TURN, 0, "plain") == [image_id(tokenizer)] * VISUAL_LEN
    assert sequence(tokenizer, ONE_TURN, "plain").input_ids[:VISUAL_LEN] == [image_id(tokenizer)] * VISUAL_LEN
    with pytest.raises(KdcacheError, match="no image"):
        prompt(tokenizer, [human("q"), gpt("a")], 0, "plain", has_image=False)


def test_a_tokenizer_merging_across_the_generation_prompt_is_refused_naming_the_sample():
    tokenizer = merging_tokenizer()
    with pytest.raises(SampleError, match=r"sample 'm-1'.*straddles the end of a generation prompt"):
        sequence(tokenizer, [human("<image>\nWhat color?"), gpt("red")], sample_id="m-1")


# --- placeholders, text-only, refusals


@pytest.mark.parametrize("template", ["plain", "qwen2_base"])
def test_image_tokens_are_expanded_to_visual_len_at_visual_start(tokenizer, template):
    seq = sequence(tokenizer, TWO_TURNS, template)
    positions = [t for t, i in enumerate(seq.input_ids) if i == image_id(tokenizer)]
    assert seq.visual_len == VISUAL_LEN
    assert positions == list(range(seq.visual_start, seq.visual_start + VISUAL_LEN))
    assert not set(seq.response_rows) & set(positions[:-1])


def test_image_placeholder_is_moved_to_the_start_of_the_first_question(tokenizer):
    expected = sequence(tokenizer, TWO_TURNS)
    trailing = [human("What color is the star?\n<image>"), *TWO_TURNS[1:]]
    in_second = [human("What color is the star?"), TWO_TURNS[1], human("<image>\nHow many circles are there?"),
                 TWO_TURNS[3]]
    missing = [human("What color is the star?"), *TWO_TURNS[1:]]
    for conversations in (trailing, in_second, missing):
        assert sequence(tokenizer, conversations) == expected


def test_more_than_one_image_placeholder_is_refused(toy_tokenizer):
    with pytest.raises(SampleError, match=r"'two'.*<image> appears 2 times; a sample has one image"):
        sequence(toy_tokenizer, [human("<image>\nq"), gpt("a"), human("<image> again"), gpt("b")], sample_id="two")


def test_text_only_sample_has_no_visual_positions(tokenizer):
    seq = sequence(tokenizer, [human("How many sides has a square?"), gpt("four")], has_image=False)
    assert (seq.visual_start, seq.visual_len) == (0, 0)
    assert image_id(tokenizer) not in seq.input_ids
    assert supervised_text(tokenizer, seq) == f" four{EOS}"
    assert tokenizer.decode(seq.input_ids).startswith(SYSTEM_PROMPT + "USER: How many sides")


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
    with pytest.raises(KdcacheError, match="unknown template 'llama3'"):
        templates.chat_template("llama3")


# --- template versions


def test_a_cache_without_template_version_is_version_1_and_unknown_versions_are_refused():
    assert templates.cache_template_version({}) == 1
    assert templates.cache_template_version({"template_version": 2}) == templates.TEMPLATE_VERSION == 2
    with pytest.raises(KdcacheError, match="template_version 3 is not one this kdcache knows"):
        templates.cache_template_version({"template_version": 3})


def test_combine_versions_refuses_a_mix_of_qwen2_base_versions_and_lets_plain_through():
    combine = templates.combine_versions
    assert combine(None, "qwen2_base", 1, model="m", source="c") == 1
    assert combine(2, "qwen2_base", 2, model="m", source="c") == 2
    assert combine(1, "plain", 2, model="m", source="c") == 1
    assert combine(None, "plain", 1, model="m", source="c") is None
    with pytest.raises(KdcacheError, match=r"m was trained on template version 2 sequences .* but cache C holds "
                                           r"version 1 sequences; a model must not mix them: dump the cache again"):
        combine(2, "qwen2_base", 1, model="m", source="cache C")
    with pytest.raises(KdcacheError, match="version 1 sequences .* holds version 2"):
        combine(1, None, 2, model="m", source="dataset d")
