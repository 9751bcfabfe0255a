"""Conversation -> token ids, with image tokens expanded and the supervised rows marked (docs/design.md §2).

Two templates, with TinyLLaVA's conventions (the paper's code):

* ``plain`` (PT / DPT): ``[image]*L + tok(caption + "\\n")``; the human turn is dropped, the caption
  and its newline are supervised, no end token.
* ``qwen2_base`` (SFT / DFT; TinyLLaVA's ``phi``): ``tok(SYSTEM + "USER: ") + [image]*L
  + tok("\\n" + q1 + " ASSISTANT: ") + tok(a1) + [eos] + tok("USER: " + q2 + " ASSISTANT: ") + tok(a2) + [eos] ...``;
  answers and their eos are supervised.

Every text segment is tokenised on its own (``add_special_tokens=False``) and the pieces are
concatenated, so the same turns always give the same ids, and a generation prompt (`build_prompt`)
is a prefix of the training sequence. The dump stores these ids and the student trains on them
verbatim: this module is the only place that turns text into ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from kdcache.errors import KdcacheError, SampleError

IMAGE_TOKEN = "<image>"
END_TOKEN = "<|endoftext|>"
SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions. ")
TemplateName = Literal["plain", "qwen2_base"]     # the only list of template names
TEMPLATES: tuple[str, ...] = get_args(TemplateName)
HUMAN, GPT = "human", "gpt"


@dataclass(frozen=True)
class Sequence:
    input_ids: list[int]        # image placeholder already expanded to visual_len image_token_ids
    response_rows: list[int]    # sorted rows t whose NEXT token input_ids[t+1] is supervised
    visual_start: int           # 0 when no image
    visual_len: int             # 0 when no image


def build_sequence(conversations: list[dict], tokenizer, *, template: str, image_token_id: int,
                   visual_len: int, has_image: bool, sample_id: str, max_length: int | None = None) -> Sequence:
    """The full training sequence of one sample.

    `conversations` alternates ``{"from": "human"}`` / ``{"from": "gpt"}`` turns (LLaVA format) and
    ends with a gpt turn. ``plain`` uses only the first answer (the caption). Raises SampleError for
    an empty or malformed conversation, roles that do not alternate, text that is not a string or
    not valid UTF-8, ``<image>`` in an answer or in a sample without image, a sequence with nothing
    to supervise, or one longer than `max_length` tokens.
    """
    turns = _checked_turns(conversations, sample_id, has_image, complete=True)
    segments = _segments(turns, tokenizer, template=template, image_token_id=image_token_id,
                         visual_len=visual_len, has_image=has_image, sample_id=sample_id)
    input_ids: list[int] = []
    response_rows: list[int] = []
    for ids, supervised in segments:
        if supervised:
            # Row t predicts token t+1; the very first token of a sequence has no row predicting it.
            response_rows.extend(t - 1 for t in range(len(input_ids), len(input_ids) + len(ids)) if t > 0)
        input_ids.extend(ids)
    if not response_rows:
        raise SampleError(sample_id, "nothing to supervise: the answer tokenises to no predictable token")
    if max_length is not None and len(input_ids) > max_length:
        raise SampleError(sample_id, f"sequence of {len(input_ids)} tokens exceeds max_length {max_length}")
    visual_start = _visual_start(template, tokenizer) if has_image else 0
    image_tokens = input_ids.count(image_token_id)
    expected = visual_len if has_image else 0
    if image_tokens != expected or input_ids[visual_start: visual_start + expected] != [image_token_id] * expected:
        # The template put the image tokens in place; any other one came from the text (a special token in it).
        raise SampleError(sample_id, f"the text tokenises to the image token (id {image_token_id}): "
                                     f"{image_tokens} image tokens where {expected} were expected")
    return Sequence(input_ids, response_rows, visual_start, visual_len if has_image else 0)


def build_prompt(conversations_so_far: list[dict], question: str, tokenizer, *, template: str,
                 image_token_id: int, visual_len: int, has_image: bool) -> list[int]:
    """Ids to generate the next answer from: everything up to and including ``" ASSISTANT: "``.

    `conversations_so_far` holds the complete earlier turns (human/gpt pairs, possibly none). For
    ``plain`` the prompt is the image tokens alone (the caption follows them directly). The result is
    a prefix of `build_sequence` of the same turns plus the answer.
    """
    if template == "plain":
        if not has_image:
            raise KdcacheError("the plain template prompts with the image alone; this sample has no image")
        return [image_token_id] * visual_len
    turns = _checked_turns([*conversations_so_far, {"from": HUMAN, "value": question}], "<prompt>", has_image,
                           complete=False)
    segments = _segments(turns, tokenizer, template=template, image_token_id=image_token_id,
                         visual_len=visual_len, has_image=has_image, sample_id="<prompt>")
    return [i for ids, _ in segments for i in ids]


def _checked_turns(conversations, sample_id: str, has_image: bool, *, complete: bool) -> list[tuple[str, str]]:
    """(role, text) pairs; `<image>` removed from every question and put before the first one.

    The conversation comes from an untrusted dataset: every turn's text must be a string that
    encodes as UTF-8 (no unpaired surrogate), and `<image>` may appear only in human turns of a
    sample with an image. The SampleError names the sample and the turn.
    """
    if not isinstance(conversations, list):
        raise SampleError(sample_id, f"'conversations' must be a list of turns, got {type(conversations).__name__}")
    if not conversations:
        raise SampleError(sample_id, "empty conversation")
    turns = []
    for i, turn in enumerate(conversations):
        expected = HUMAN if i % 2 == 0 else GPT
        role = turn.get("from") if isinstance(turn, dict) else None
        if role != expected:
            raise SampleError(sample_id, f"turn {i} is from {_short(role)}, expected {expected!r} "
                                         "(turns must alternate human/gpt, starting with human)")
        value = turn.get("value")
        if not isinstance(value, str):
            raise SampleError(sample_id, f"turn {i} has no text 'value' (got {type(value).__name__})")
        bad = _first_unencodable(value)
        if bad is not None:
            raise SampleError(sample_id, f"turn {i} ({role}) is not valid text: unpaired surrogate "
                                         f"{value[bad]!r} at character {bad}")
        if IMAGE_TOKEN in value:
            if role != HUMAN:
                raise SampleError(sample_id, f"turn {i} ({role}) contains {IMAGE_TOKEN}: the image placeholder "
                                             "may only appear in a human turn")
            if not has_image:
                raise SampleError(sample_id, f"turn {i} contains {IMAGE_TOKEN} but the sample has no image")
        turns.append((role, value))
    if complete and turns[-1][0] != GPT:
        raise SampleError(sample_id, f"the last turn is from {HUMAN!r}: it has no answer to supervise")
    # Single image: wherever the dataset put the placeholder, it goes to the start of the first question.
    turns = [(role, text.replace(IMAGE_TOKEN, "").strip() if role == HUMAN and IMAGE_TOKEN in text else text)
             for role, text in turns]
    return turns


def _first_unencodable(text: str) -> int | None:
    """Index of the first character UTF-8 cannot encode (an unpaired surrogate), None if there is none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _segments(turns: list[tuple[str, str]], tokenizer, *, template: str, image_token_id: int, visual_len: int,
              has_image: bool, sample_id: str) -> list[tuple[list[int], bool]]:
    """The sequence as (ids, supervised) pieces, in order."""
    image = [image_token_id] * visual_len if has_image else []
    if template == "plain":
        caption = next((text for role, text in turns if role == GPT), None)
        if caption is None:
            return [(image, False)]                   # build_sequence reports "nothing to supervise"
        return [(image, False), (_tok(tokenizer, caption + "\n"), True)]
    if template != "qwen2_base":
        raise KdcacheError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise KdcacheError(f"tokenizer has no eos token; the qwen2_base template ends answers with {END_TOKEN}")
    segments: list[tuple[list[int], bool]] = []
    for i, (role, text) in enumerate(turns):
        if role == GPT:
            segments.append((_tok(tokenizer, text) + [eos], True))
        elif i == 0 and has_image:
            segments += [(_tok(tokenizer, SYSTEM_PROMPT + "USER: ") + image, False),
                         (_tok(tokenizer, "\n" + text + " ASSISTANT: "), False)]
        else:
            prefix = SYSTEM_PROMPT + "USER: " if i == 0 else "USER: "
            segments.append((_tok(tokenizer, prefix + text + " ASSISTANT: "), False))
    return segments


def _visual_start(template: str, tokenizer) -> int:
    return 0 if template == "plain" else len(_tok(tokenizer, SYSTEM_PROMPT + "USER: "))


def _tok(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))
