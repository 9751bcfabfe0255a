"""Conversation -> token ids, with image tokens expanded and the supervised rows marked (docs/design.md §2).

Two templates, with TinyLLaVA's conventions (the paper's code). Each renders a conversation to ONE
string, which is tokenised as one string, as LLaVA, TinyLLaVA and every evaluator tokenise it:

* ``plain`` (PT / DPT): ``"<image>" + caption + "\\n"``; the human turn is dropped; supervised: the
  caption and its newline (no end token). The generation prompt is ``"<image>"``.
* ``qwen2_base`` (SFT / DFT; TinyLLaVA's ``phi``): ``SYSTEM + "USER: <image>\\n" + q1 + " ASSISTANT: "
  + a1 + "<|endoftext|>" + "USER: " + q2 + " ASSISTANT: " + a2 + "<|endoftext|>" ...``. The generation
  prompt of answer k is everything up to ``" ASSISTANT:"``; supervised: every token after it through
  the end token, i.e. the tokens of ``" " + a_k + "<|endoftext|>"``.

The generation prompt ends at ``":"``, not at the separator's space: byte-level BPE joins that space
to the answer's first word (toy tokenizer: ``" ASSISTANT: red"`` is ``[427, 27, 432]`` = ``ĠASSISTANT
: Ġred``, where ``" ASSISTANT: "`` alone is ``[427, 27, 222]`` = ``... : Ġ``), so a prompt ending in a
space is not a prefix of the conversation's tokens. The supervised rows are found from the
tokenizer's character offsets; every generation prompt is checked to tokenise to an exact prefix of
the conversation's ids (a tokenizer that merges across it raises SampleError).

The ``<image>`` placeholder is rendered once and tokenised as the image token (an added special
token, which splits the text around it), then expanded to `visual_len` copies: what LlavaProcessor
does by expanding the placeholder in the text. `chat_template` is the same rendering in Jinja, for
`save_pretrained` checkpoints (tokenizer and processor) and the evaluators that apply it.

Template version 2 is this whole-string tokenisation. Version 1 (caches without ``template_version``)
tokenised every segment on its own: its ``qwen2_base`` ids differ at each answer's first token,
its ``plain`` ids are the same. The dump stores the ids and the student trains on them verbatim, so
an old cache needs no builder here; `combine_versions` keeps a model from mixing the two.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Literal, get_args

from kdcache.errors import KdcacheError, SampleError

IMAGE_TOKEN = "<image>"
END_TOKEN = "<|endoftext|>"
SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions. ")
USER = "USER: "
ASSISTANT = " ASSISTANT:"            # the generation prompt ends here; the answer follows after one space
TemplateName = Literal["plain", "qwen2_base"]     # the only list of template names
TEMPLATES: tuple[str, ...] = get_args(TemplateName)
TEMPLATE_VERSION = 2                 # whole-string tokenisation; 1 = segment by segment (caches before it)
HUMAN, GPT = "human", "gpt"


@dataclass(frozen=True)
class Sequence:
    input_ids: list[int]        # image placeholder already expanded to visual_len image_token_ids
    response_rows: list[int]    # sorted rows t whose NEXT token input_ids[t+1] is supervised
    visual_start: int           # 0 when no image
    visual_len: int             # 0 when no image


@dataclass(frozen=True)
class Rendered:
    text: str                            # the conversation as one string, one IMAGE_TOKEN where the image goes
    answers: list[tuple[int, int]]       # per answer: (end of its generation prompt, end of its supervised text)


def build_sequence(conversations: list[dict], tokenizer, *, template: str, image_token_id: int,
                   visual_len: int, has_image: bool, sample_id: str, max_length: int | None = None) -> Sequence:
    """The full training sequence of one sample: the rendered conversation tokenised as one string.

    `conversations` alternates ``{"from": "human"}`` / ``{"from": "gpt"}`` turns (LLaVA format) and
    ends with a gpt turn. ``plain`` uses only the first answer (the caption). Raises SampleError for
    an empty or malformed conversation, roles that do not alternate, text that is not a string or
    not valid UTF-8, ``<image>`` in an answer, in a sample without image or more than once, a token
    straddling a generation prompt's end, a sequence with nothing to supervise, or one longer than
    `max_length` tokens.
    """
    turns = _checked_turns(conversations, sample_id, has_image, complete=True)
    rendered = render(turns, template=template, has_image=has_image, eos_token=_eos_token(tokenizer))
    ids, offsets = _encode(tokenizer, rendered.text, offsets=True)
    supervised = _supervised_tokens(ids, offsets, rendered, tokenizer, sample_id)
    visual_start = _image_position(ids, image_token_id, has_image, sample_id)
    shift = visual_len - 1 if has_image else 0            # tokens after the placeholder move by this much
    expanded = [t + shift if has_image and t > visual_start else t for t in supervised]
    # Row t predicts token t+1; the very first token of a sequence has no row predicting it.
    response_rows = [t - 1 for t in expanded if t > 0]
    if not response_rows:
        raise SampleError(sample_id, "nothing to supervise: the answer tokenises to no predictable token")
    input_ids = _expand(ids, visual_start, image_token_id, visual_len) if has_image else ids
    if max_length is not None and len(input_ids) > max_length:
        raise SampleError(sample_id, f"sequence of {len(input_ids)} tokens exceeds max_length {max_length}")
    return Sequence(input_ids, response_rows, visual_start, visual_len if has_image else 0)


def build_prompt(conversations_so_far: list[dict], question: str, tokenizer, *, template: str,
                 image_token_id: int, visual_len: int, has_image: bool) -> list[int]:
    """Ids to generate the next answer from: everything up to and including ``" ASSISTANT:"``.

    `conversations_so_far` holds the complete earlier turns (human/gpt pairs, possibly none). For
    ``plain`` the prompt is the image tokens alone (the caption follows them directly). The result is
    a prefix of `build_sequence` of the same turns plus the answer (checked there for every answer).
    """
    if template == "plain" and not has_image:
        raise KdcacheError("the plain template prompts with the image alone; this sample has no image")
    turns = _checked_turns([*conversations_so_far, {"from": HUMAN, "value": question}], "<prompt>", has_image,
                           complete=False)
    text = render(turns, template=template, has_image=has_image, eos_token=_eos_token(tokenizer),
                  generation_prompt=True).text
    ids, _ = _encode(tokenizer, text, offsets=False)
    position = _image_position(ids, image_token_id, has_image, "<prompt>")
    return _expand(ids, position, image_token_id, visual_len) if has_image else ids


def render(turns: list[tuple[str, str]], *, template: str, has_image: bool, eos_token: str,
           generation_prompt: bool = False) -> Rendered:
    """The conversation as one string, and where each answer's prompt and supervised text end.

    `turns` are checked (role, text) pairs (`_checked_turns`: placeholders already removed). With
    `generation_prompt`, the text ends with the prompt for the next answer (the last turn is human).
    """
    image = IMAGE_TOKEN if has_image else ""
    if template == "plain":
        caption = next((text for role, text in turns if role == GPT), None)
        if generation_prompt or caption is None:
            return Rendered(image, [])                 # build_sequence reports "nothing to supervise"
        text = image + caption + "\n"
        return Rendered(text, [(len(image), len(text))])
    if template != "qwen2_base":
        raise KdcacheError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    parts, answers, length = [], [], 0
    for i, (role, text) in enumerate(turns):
        if role == GPT:
            piece = f"{ASSISTANT} {text}{eos_token}"
            answers.append((length + len(ASSISTANT), length + len(piece)))
        elif i == 0:
            piece = SYSTEM_PROMPT + USER + (image + "\n" if has_image else "") + text
        else:
            piece = USER + text
        parts.append(piece)
        length += len(piece)
    if generation_prompt:
        parts.append(ASSISTANT)
    return Rendered("".join(parts), answers)


def _supervised_tokens(ids: list[int], offsets: list[tuple[int, int]], rendered: Rendered, tokenizer,
                       sample_id: str) -> list[int]:
    """Indices of the supervised tokens: those of text[start:end] for every answer, checked.

    No token may straddle a `start` or an `end`, and each generation prompt text[:start] must
    tokenise on its own to exactly the tokens before its answer: what an evaluator feeds the model.
    An answer ends with the end token, a special token that splits the text (checked), so text[:start]
    is checked from the previous answer's end on, and the whole check costs one more tokenisation.
    """
    starts, ends = [a for a, _ in offsets], [b for _, b in offsets]
    supervised: list[int] = []
    checked_chars = checked_tokens = 0                 # text[:checked_chars] is ids[:checked_tokens], checked
    for k, (start, end) in enumerate(rendered.answers):
        for edge, what in ((start, "the end of a generation prompt"), (end, "the end of an answer")):
            j = bisect.bisect_right(ends, edge)          # the first token ending after `edge`
            if j < len(ids) and starts[j] < edge:
                raise SampleError(sample_id, f"token {j} ({tokenizer.convert_ids_to_tokens(ids[j])!r}) straddles "
                                             f"{what} at character {edge}; the template cannot separate them")
        first, last = bisect.bisect_left(starts, start), bisect.bisect_right(ends, end)
        prompt, _ = _encode(tokenizer, rendered.text[checked_chars:start], offsets=False)
        if prompt != ids[checked_tokens:first]:
            raise SampleError(sample_id, f"the generation prompt of answer {k + 1} (ending at character {start}) "
                                         "does not tokenise to the tokens before that answer in the conversation")
        if k + 1 < len(rendered.answers) and ids[last - 1] != tokenizer.eos_token_id:
            raise KdcacheError(f"the tokenizer does not turn its eos text {tokenizer.eos_token!r} into its eos id "
                               f"{tokenizer.eos_token_id} (does it split special tokens?)")
        supervised += range(first, last)
        checked_chars, checked_tokens = end, last
    return supervised


def _image_position(ids: list[int], image_token_id: int, has_image: bool, sample_id: str) -> int:
    """Where the single image token is (0 without image); any other one came from the text."""
    found = [i for i, token in enumerate(ids) if token == image_token_id]
    if len(found) != (1 if has_image else 0):
        raise SampleError(sample_id, f"the text tokenises to the image token (id {image_token_id}): "
                                     f"{len(found)} image placeholders where {int(has_image)} was expected")
    return found[0] if has_image else 0


def _expand(ids: list[int], position: int, image_token_id: int, visual_len: int) -> list[int]:
    return ids[:position] + [image_token_id] * visual_len + ids[position + 1:]


def _encode(tokenizer, text: str, *, offsets: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of `text` as one string (no special tokens added), and each token's character span."""
    if offsets and not getattr(tokenizer, "is_fast", False):
        raise KdcacheError(f"the templates need a fast (tokenizers) tokenizer for character offsets, "
                           f"got {type(tokenizer).__name__}")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
    return list(encoding["input_ids"]), [tuple(span) for span in encoding.get("offset_mapping", [])]


def _eos_token(tokenizer) -> str:
    if tokenizer.eos_token is None:
        raise KdcacheError(f"tokenizer has no eos token; the qwen2_base template ends answers with {END_TOKEN}")
    return str(tokenizer.eos_token)


def _checked_turns(conversations, sample_id: str, has_image: bool, *, complete: bool) -> list[tuple[str, str]]:
    """(role, text) pairs; `<image>` removed from every question (`render` puts it before the first one).

    The conversation comes from an untrusted dataset: every turn's text must be a string that
    encodes as UTF-8 (no unpaired surrogate), and `<image>` may appear only in human turns of a
    sample with an image, at most once in all. The SampleError names the sample and the turn.
    """
    if not isinstance(conversations, list):
        raise SampleError(sample_id, f"'conversations' must be a list of turns, got {type(conversations).__name__}")
    if not conversations:
        raise SampleError(sample_id, "empty conversation")
    turns = [_checked_turn(i, turn, sample_id, has_image) for i, turn in enumerate(conversations)]
    if complete and turns[-1][0] != GPT:
        raise SampleError(sample_id, f"the last turn is from {HUMAN!r}: it has no answer to supervise")
    placeholders = sum(text.count(IMAGE_TOKEN) for _, text in turns)
    if placeholders > 1:
        raise SampleError(sample_id, f"{IMAGE_TOKEN} appears {placeholders} times; a sample has one image")
    # Single image: wherever the dataset put the placeholder, it goes to the start of the first question.
    return [(role, text.replace(IMAGE_TOKEN, "").strip() if IMAGE_TOKEN in text else text) for role, text in turns]


def _checked_turn(i: int, turn, sample_id: str, has_image: bool) -> tuple[str, str]:
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
    return role, value


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


# --- versions


def cache_template_version(manifest: dict) -> int:
    """The template version of a cache's ids: its manifest's ``template_version``, 1 for caches dumped before it."""
    version = manifest.get("template_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= TEMPLATE_VERSION:
        raise KdcacheError(f"cache template_version {version!r} is not one this kdcache knows "
                           f"(1..{TEMPLATE_VERSION}); upgrade kdcache")
    return version


def combine_versions(model_version: int | None, template: str | None, version: int, *, model: str, source: str,
                     hint: str | None = None) -> int | None:
    """The template version a model holds after training on `source`'s `template` sequences of `version`.

    A model's version is None until it trains on versioned sequences (a composed model, one trained
    only on ``plain`` sequences, whose ids are the same in every version, or one saved before kdcache
    recorded versions). A model of one version meeting another version's ``qwen2_base`` sequences is
    refused (KdcacheError, ending with `hint`): its answers would start with a token it was never
    taught to predict there.
    """
    if template == "plain":
        return model_version
    if model_version is not None and model_version != version:
        if hint is None:
            hint = ("dump the cache again with this kdcache" if version < TEMPLATE_VERSION else
                    "train it on version 1 caches only, or start again from a model without version 1 training")
        raise KdcacheError(f"{model} was trained on template version {model_version} sequences "
                           f"({_VERSION_WORDS[model_version]}) but {source} holds version {version} sequences; "
                           f"a model must not mix them: {hint}")
    return version


def dump_template_version(teacher_version: int | None, template: str, *, teacher: str) -> int:
    """The version a dump writes (this kdcache's), refusing a teacher trained on another version's
    ``qwen2_base`` sequences: its targets at each answer's first token would teach the other version."""
    combine_versions(teacher_version, template, TEMPLATE_VERSION, model=f"teacher {teacher}",
                     source=f"this dump ({template})", hint="train the teacher's sft stage again with this kdcache")
    return TEMPLATE_VERSION


_VERSION_WORDS = {1: "each segment tokenised on its own, as kdcache did before it tokenised whole conversations",
                  2: "the whole conversation tokenised as one string"}


# --- the same rendering as a Jinja chat template (tokenizer and processor of a saved checkpoint)

def chat_template(template: str) -> str:
    """`render` as a Jinja chat template, for `apply_chat_template` of HF messages.

    Messages are ``{"role": "user" | "assistant", "content": str | [{"type": "image"}, {"type":
    "text", "text": ...}, ...]}``. Every image (an image part, or ``<image>`` in a text) is rendered as
    one ``<image>`` placeholder at the start of the first question, as training puts the sample's
    image; text parts are joined by spaces; a text holding ``<image>`` loses it and is stripped.
    Assistant text is wrapped in ``{% generation %}`` (``return_assistant_tokens_mask``), and
    ``add_generation_prompt`` ends the text as `build_prompt` does. ``qwen2_base`` refuses a system
    message (its system prompt is fixed) and roles that do not alternate.
    """
    if template == "plain":
        return (_JINJA_COUNT_IMAGES + "{{- '<image>' * ns.images -}}"
                "{%- for message in messages -%}" + _JINJA_TEXT +
                "{%- if message['role'] == 'assistant' and not ns.answered -%}"
                "{%- generation -%}{{- text + '\\n' -}}{%- endgeneration -%}{%- set ns.answered = true -%}"
                "{%- endif -%}{%- endfor -%}")
    if template != "qwen2_base":
        raise KdcacheError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    assert '"' not in SYSTEM_PROMPT and "\\" not in SYSTEM_PROMPT
    return (_JINJA_COUNT_IMAGES + "{%- for message in messages -%}"
            "{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}"
            "{{- raise_exception('kdcache qwen2_base template: messages must alternate user/assistant, starting "
            "with user (no system message: the system prompt is fixed)') -}}{%- endif -%}" + _JINJA_TEXT +
            "{%- if message['role'] == 'user' -%}"
            f"{{%- if loop.first -%}}{{{{- \"{SYSTEM_PROMPT}{USER}\" + '<image>\\n' * ns.images + text -}}}}"
            f"{{%- else -%}}{{{{- '{USER}' + text -}}}}{{%- endif -%}}"
            f"{{%- else -%}}{{{{- '{ASSISTANT}' -}}}}"
            "{%- generation -%}{{- ' ' + text + eos_token -}}{%- endgeneration -%}{%- endif -%}{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{- '{ASSISTANT}' -}}}}{{%- endif -%}}")


_JINJA_COUNT_IMAGES = (
    "{%- set ns = namespace(images=0, answered=false) -%}{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set ns.images = ns.images + message['content'].count('<image>') -%}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.images = ns.images + 1 -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.images = ns.images + part['text'].count('<image>') -%}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}")
_JINJA_TEXT = (
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- if '<image>' in text -%}{%- set text = text.replace('<image>', '') | trim -%}{%- endif -%}")
