"""Template version 1, as kdcache built sequences before it tokenised whole conversations (test fixture).

The segment-wise builder of kdcache/templates.py at commit 8b19efd, kept here only to make genuine
version 1 sequences and caches for the tests: every text segment tokenised on its own and the ids
concatenated. kdcache itself needs no version 1 builder (a cache stores its ids; training reads
them verbatim).
"""

from __future__ import annotations

from kdcache.errors import SampleError
from kdcache.templates import GPT, SYSTEM_PROMPT, Sequence, _checked_turns


def v1_build_sequence(conversations, tokenizer, *, template: str, image_token_id: int, visual_len: int,
                      has_image: bool, sample_id: str, max_length: int | None = None) -> Sequence:
    turns = _checked_turns(conversations, sample_id, has_image, complete=True)
    input_ids: list[int] = []
    response_rows: list[int] = []
    for ids, supervised in _segments(turns, tokenizer, template, image_token_id, visual_len, has_image):
        if supervised:
            response_rows.extend(t - 1 for t in range(len(input_ids), len(input_ids) + len(ids)) if t > 0)
        input_ids.extend(ids)
    if max_length is not None and len(input_ids) > max_length:
        raise SampleError(sample_id, f"sequence of {len(input_ids)} tokens exceeds max_length {max_length}")
    visual_start = 0 if template == "plain" or not has_image else len(_tok(tokenizer, SYSTEM_PROMPT + "USER: "))
    return Sequence(input_ids, response_rows, visual_start, visual_len if has_image else 0)


def v1_build_prompt(conversations_so_far, question, tokenizer, *, template: str, image_token_id: int,
                    visual_len: int, has_image: bool) -> list[int]:
    if template == "plain":
        return [image_token_id] * visual_len
    turns = _checked_turns([*conversations_so_far, {"from": "human", "value": question}], "<prompt>", has_image,
                           complete=False)
    return [i for ids, _ in _segments(turns, tokenizer, template, image_token_id, visual_len, has_image) for i in ids]


def _segments(turns, tokenizer, template, image_token_id, visual_len, has_image):
    image = [image_token_id] * visual_len if has_image else []
    if template == "plain":
        caption = next(text for role, text in turns if role == GPT)
        return [(image, False), (_tok(tokenizer, caption + "\n"), True)]
    segments = []
    for i, (role, text) in enumerate(turns):
        if role == GPT:
            segments.append((_tok(tokenizer, text) + [tokenizer.eos_token_id], True))
        elif i == 0 and has_image:
            segments += [(_tok(tokenizer, SYSTEM_PROMPT + "USER: ") + image, False),
                         (_tok(tokenizer, "\n" + text + " ASSISTANT: "), False)]
        else:
            prefix = SYSTEM_PROMPT + "USER: " if i == 0 else "USER: "
            segments.append((_tok(tokenizer, prefix + text + " ASSISTANT: "), False))
    return segments


def _tok(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))
