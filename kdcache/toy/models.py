"""The toy world's models: a tiny byte-level BPE tokenizer, a shared SigLIP tower, two Qwen2 LMs.

``load_bundle("toy-teacher")`` / ``load_bundle("toy-student")`` reach `load_toy` through
`kdcache.presets` and build them here through the same `models.compose` as the real presets, with the
weights stored in kdcache/toy/weights (`python -m kdcache.toy.build`), so the quickstart and the tests
exercise the real code path on a CPU in seconds. Teacher
and student share the tokenizer and identical tower weights (docs/design.md §1). Unlike Qwen1.5-4B : 0.5B,
the toy teacher's LM has the student's shape (2 x 128): what makes it the stronger model is its training,
an LM pretrained on text until it binds attributes to objects and 4,700 steps of PT and SFT against the
students' 360 (0.888 held out against their ~0.6). Larger toy LMs (4 x 192, 3 x 128) did not learn to bind
within the budgets tried and stayed at 0.72-0.74 (docs/decisions.md, "Visual binding").
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models as bpe_models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from kdcache.errors import KdcacheError, one_line
from kdcache.models import Bundle, compose, siglip_image_processor
from kdcache.toy import weights
from kdcache.templates import END_TOKEN, IMAGE_TOKEN, SYSTEM_PROMPT

# The words the tokenizer is trained to keep whole. A frozen superset of the words kdcache.toy.data
# draws (stars, "top", "four".."ten" never appear there), not derived from it: the vocabulary, and so
# the tokenizer fingerprint that caches record, must not change when the dataset does.
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "above", "below", "middle")
COUNTS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# "colour" is vocabulary, not a spelling slip: a question may use either spelling.
FUNCTION_WORDS = ("what", "color", "colour", "shape", "how", "many", "is", "the", "there", "are", "of", "a", "an",
                  "and", "in", "image", "picture", "shows", "this", "it", "at", "on", "describe", "which", "where",
                  "briefly", "background", "next", "to", "with", "yes", "no", "object", "objects", "one", "each")

VOCAB_SIZE = 600
TOWER_SEED = 1234          # one tower for teacher and student
TOY_VISION = dict(image_size=64, patch_size=16, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=3, num_attention_heads=2)                  # 4x4 patches -> 15 visual tokens
# The architectures of the presets registered in kdcache.presets with the loader `load_toy`.
TOY_PRESETS: dict[str, dict] = {
    "toy-teacher": dict(seed=1, weights="teacher", text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "toy-student": dict(seed=2, weights="student-lm", text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
}


def toy_corpus() -> list[str]:
    """The fixed text the toy tokenizer is trained on: the chat template and the toy world's words."""
    words = [*COLORS, *SHAPES, *SIZES, *POSITIONS, *COUNTS, *FUNCTION_WORDS]
    plurals = [shape + "s" for shape in SHAPES]
    digits = [str(n) for n in range(11)]
    lines = [SYSTEM_PROMPT + "USER: \nWhat color is the circle? ASSISTANT: red"] * 4
    lines += ["USER: How many stars are there? ASSISTANT: There are three stars.",
              "USER: What shape is above the square? ASSISTANT: A small green triangle.",
              "The picture shows a large blue circle at the top left and two small yellow stars.\n",
              "Describe the image briefly.", "Which object is in the middle?"]
    for vocabulary in (words, plurals, digits):
        lines += [" ".join(vocabulary)] * 3 + list(vocabulary) + [" " + w for w in vocabulary]
        lines += [w.capitalize() for w in vocabulary if w.isalpha()]
    # Answers are tokenised on their own (no leading space): make one-word answers single tokens too.
    lines += [*COLORS, *SHAPES, *SIZES, *COUNTS, "yes", "no"] * 2
    return lines


def build_toy_tokenizer(*, image_token: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ``<|endoftext|>`` (eos and pad) and ``<image>``, trained on `toy_corpus` (deterministic).

    `image_token=False` leaves ``<image>`` out (as in a plain LLM tokenizer, for `compose` to add).
    """
    special = [END_TOKEN, IMAGE_TOKEN] if image_token else [END_TOKEN]
    tokenizer = Tokenizer(bpe_models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(toy_corpus(), trainer)
    extra = {"extra_special_tokens": [IMAGE_TOKEN]} if image_token else {}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_TOKEN, pad_token=END_TOKEN, **extra)


def toy_vision_tower(**overrides) -> SiglipVisionModel:
    """The shared SigLIP tower (no pooling head) as initialised from TOWER_SEED, before its pretraining.

    The initialisation: the patch embedding's first 3 x 4 x 4 channels average each color channel
    over the patch's 4 x 4 sub-blocks (a color thumbnail of the patch), the rest stay random. With a
    fully random patch embedding, color is scrambled into the pixel layout and the toy LMs never
    learned to read it (docs/decisions.md, "Toy world"). `kdcache.toy.pretrain.pretrain_tower` trains
    it from there (the stand-in for a pretrained SigLIP: each patch token names the colour, shape and
    size of what the patch shows); the toy presets load that stored tower (`load_toy`).
    """
    config = SiglipVisionConfig(**{**TOY_VISION, **overrides}, vision_use_head=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TOWER_SEED)
        tower = SiglipVisionModel(config)
    _pooling_patch_embedding(tower.embeddings.patch_embedding, blocks=4)
    return tower


@torch.no_grad()
def _pooling_patch_embedding(conv: torch.nn.Conv2d, *, blocks: int) -> None:
    """Make channels [0, 3 * blocks²) of a (hidden, 3, P, P) patch conv the per-channel mean of each sub-block."""
    weight = conv.weight
    hidden, channels, patch, _ = weight.shape
    side = patch // blocks
    if patch % blocks or channels * blocks * blocks > hidden:
        return                                     # shapes the pooling does not fit: stay random
    k = 0
    for c in range(channels):
        for i in range(blocks):
            for j in range(blocks):
                weight[k].zero_()
                conv.bias[k] = 0.0
                weight[k, c, i * side:(i + 1) * side, j * side:(j + 1) * side] = 1.0 / (side * side)
                k += 1


def toy_text_config(text_config: dict, tokenizer) -> Qwen2Config:
    """The Qwen2 config of a toy LM of shape `text_config` over the toy tokenizer (one row per token unless
    `text_config` sets a larger `vocab_size`)."""
    return Qwen2Config(**{"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                          "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
                          "max_position_embeddings": 1024, **text_config})


def build_toy_bundle(text_config: dict, *, seed: int, source: str, vision_config: dict | None = None,
                     dtype: torch.dtype = torch.float32) -> Bundle:
    """A Qwen2 LM from `text_config` joined to the toy tower by `compose`, seeded, without touching global RNG.

    The LM has one row per token unless `text_config` sets a larger `vocab_size` (a padded head).
    """
    vision = {**TOY_VISION, **(vision_config or {})}
    tokenizer = build_toy_tokenizer(image_token=True)
    tower = toy_vision_tower(**vision)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        language_model = Qwen2ForCausalLM(toy_text_config(text_config, tokenizer))
        bundle = compose(tower, language_model, tokenizer, siglip_image_processor(vision["image_size"]),
                         source=source)
    bundle.model.to(dtype)
    return bundle


def load_toy(name: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
             stored: Path = weights.WEIGHTS_DIR, start: str | None = None) -> Bundle:
    """The loader of the toy presets (kdcache.presets), from the weights stored in the package.

    toy-student: the pretrained tower, the text-pretrained student LM and a fresh projector (what
    the recipe's students start from, as the paper's start from Qwen1.5-0.5B). toy-teacher: the
    trained toy teacher (text pretraining, PT, SFT; projector trained), ready to dump from.
    `start` picks other stored weights of the preset's shape (``teacher-lm``: the text-pretrained
    teacher LM with a fresh projector, where `kdcache.toy.build` and ``--train-teacher`` start);
    `stored` is the directory (kdcache.toy.build's --out). `trust_remote_code` is part of every preset
    loader's signature; the toy models are built from the code above, so it is not used.
    """
    preset = TOY_PRESETS[name]
    which = start or preset["weights"]
    bundle = build_toy_bundle(preset["text"], seed=preset["seed"], source=name)
    bundle.model.model.vision_tower.load_state_dict(weights.load("tower", stored))
    unfit = f"the stored toy weights {which!r} in {stored} do not fit {name}"
    try:
        missing, unexpected = bundle.model.load_state_dict(weights.load(which, stored), strict=False)
    except RuntimeError as e:                           # tensors of other shapes
        raise KdcacheError(f"{unfit}: {one_line(e, limit=300)}") from None
    projector = which == "teacher"                      # the only stored weights with a trained projector
    allowed = {k for k in bundle.model.state_dict()
               if k.startswith("model.vision_tower.") or (not projector and "multi_modal_projector" in k)}
    if unexpected or set(missing) - allowed:
        raise KdcacheError(f"{unfit}: {len(missing)} missing, {len(unexpected)} unexpected tensors")
    bundle.projector_trained = projector
    bundle.model.to(dtype)
    return bundle
