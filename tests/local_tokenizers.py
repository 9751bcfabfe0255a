"""Tokenizers the tests build locally (nothing can be downloaded), beside the toy tokenizer of kdcache.toy.

* `qwen_style_tokenizer`: transformers' own `Qwen2Tokenizer` class (Qwen's pre-tokenizer regex, NFC,
  byte-level BPE, ``<|endoftext|>`` as eos, pad and unk, no bos) with a small vocabulary trained here on
  the toy corpus, and ``<image>`` added as a special token as `kdcache.models.compose` adds it. It
  splits text as Qwen1.5/Qwen2.5 tokenizers do: ``" 3"`` is two pre-tokens (``" "``, ``"3"``), where
  the toy tokenizer's GPT-2 regex keeps ``" 3"`` together.
* `merging_tokenizer`: a byte-level BPE with no pre-tokenizer split, trained on template text, so
  its merges cross the end of the generation prompt (``": r"``): what the templates must refuse.
"""

from __future__ import annotations

import json

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from kdcache.templates import END_TOKEN, IMAGE_TOKEN
from kdcache.toy.models import toy_corpus


def qwen_style_tokenizer(*, image_token: bool = True, vocab_size: int = 600) -> Qwen2Tokenizer:
    """`image_token=False` leaves ``<image>`` out, as a hub LLM tokenizer has it, for `compose` to add."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trained.train_from_iterator(toy_corpus(), trainer)
    bpe = json.loads(trained.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=bpe["vocab"], merges=merges)
    if image_token:
        tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    return tokenizer


def merging_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[END_TOKEN, IMAGE_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["USER: What color? ASSISTANT: red"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_TOKEN, pad_token=END_TOKEN,
                                   extra_special_tokens=[IMAGE_TOKEN])
