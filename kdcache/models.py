"""Loading, composing and saving LLaVA checkpoints (docs/design.md §1).

A model is named by a local checkpoint directory, a preset (`kdcache.presets`: a vision tower id +
LLM id composed here with a fresh projector, or a toy model built from code) or a hub id. Every
path ends in a `Bundle`: a `LlavaForConditionalGeneration` (SigLIP tower, GELU MLP projector, Qwen2
LM), its tokenizer and image processor, and whether its projector has been trained yet.

A saved bundle is an ordinary `save_pretrained` directory (safetensors, tokenizer, image
processor, LLaVA processor config) plus `kdcache.json`, the training history. transformers 5 saves
the tower as ``vision_tower.*``; `save_bundle` writes the usual ``vision_tower.vision_model.*``
names, which transformers reads back unchanged and other loaders (vLLM) expect.
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import torch
from transformers import (AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, SiglipVisionConfig, SiglipVisionModel)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
from transformers.utils import is_torchvision_available
from transformers.utils import logging as hf_logging

import kdcache
from kdcache import presets, templates
from kdcache.config import DTypeName
from kdcache.errors import KdcacheError
from kdcache.files import write_json_atomic
from kdcache.templates import IMAGE_TOKEN, TEMPLATES

HISTORY_FILE = "kdcache.json"
# Config keys that say where or with what a config was made, not what the model computes.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_commit_hash", "dtype", "torch_dtype",
                         "_attn_implementation", "_attn_implementation_autoset", "architectures"}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
assert set(_DTYPES) | {"auto"} == set(get_args(DTypeName)), "--dtype names and their torch dtypes disagree"


@dataclass
class Bundle:
    model: LlavaForConditionalGeneration
    tokenizer: object
    image_processor: object
    source: str                          # what load_bundle was given
    revision: str | None = None
    projector_trained: bool = False      # False for a freshly composed model, or a saved one never trained
    stages: list[str] = field(default_factory=list)   # training history, oldest first ("pt", "sft", ...)
    template: str | None = None          # the template of the sequences its last stage trained on
    template_version: int | None = None  # see templates.combine_versions; None: not pinned by its training


# --- loading

def load_bundle(spec: str, *, dtype: torch.dtype = torch.float32, revision: str | None = None,
                trust_remote_code: bool = False) -> Bundle:
    """A checkpoint directory (has config.json), a preset name (kdcache.presets) or a hub id, in that order."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KdcacheError(f"{spec} is a directory but not a checkpoint (no config.json)")
        return _load_pretrained(str(path), source=spec, revision=None, dtype=dtype,
                                trust_remote_code=trust_remote_code)
    preset = presets.PRESETS.get(spec)
    if preset is not None:
        if revision is not None:
            raise KdcacheError(f"--revision {revision!r} applies to a hub checkpoint, not to preset {spec!r} "
                               f"({preset.description})")
        load = presets.loader_of(preset)
        return load(spec, dtype=dtype, trust_remote_code=trust_remote_code)
    if path.exists() or spec.startswith((".", "/", "~")):
        raise KdcacheError(f"{spec} is not a checkpoint directory")
    return _load_pretrained(spec, source=spec, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code)


def _load_pretrained(location: str, *, source: str, revision: str | None, dtype: torch.dtype,
                     trust_remote_code: bool) -> Bundle:
    """A saved LLaVA checkpoint (local or hub), weights from safetensors only."""
    common = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(location, **common)
        if config.model_type != "llava":
            raise KdcacheError(f"{source} is a {config.model_type!r} checkpoint; kdcache needs a LLaVA one "
                               f"(or a preset: {', '.join(presets.PRESETS)})")
        model = LlavaForConditionalGeneration.from_pretrained(location, config=config, dtype=dtype,
                                                              revision=revision, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(location, **common)
        image_processor = AutoImageProcessor.from_pretrained(location, **common)
    except (OSError, ValueError) as e:
        raise KdcacheError(f"cannot load {source!r} as a checkpoint directory, a preset "
                           f"({', '.join(presets.PRESETS)}) or a hub id: {e}") from None
    _ensure_pad_token(tokenizer, source)
    history = _read_history(location, revision)
    return Bundle(model.eval(), tokenizer, image_processor, source=source, revision=revision,
                  projector_trained=bool(history.get("projector_trained", True)),
                  stages=list(history.get("stages", [])), template=history.get("template"),
                  template_version=history.get("template_version"))


def _read_history(location: str, revision: str | None) -> dict:
    """kdcache.json of a checkpoint; {} (an external checkpoint, assumed trained) when there is none."""
    local = Path(location)
    if local.is_dir():
        file = local / HISTORY_FILE
        if not file.is_file():
            return {}
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RemoteEntryNotFoundError

        try:
            file = Path(hf_hub_download(location, HISTORY_FILE, revision=revision))
        except (EntryNotFoundError, LocalEntryNotFoundError, RemoteEntryNotFoundError):
            return {}
    try:
        history = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KdcacheError(f"cannot read {HISTORY_FILE} of {location}: {e}") from None
    if not isinstance(history, dict):
        raise KdcacheError(f"{HISTORY_FILE} of {location} must be a JSON object")
    if history.get("template") not in (None, *TEMPLATES):
        raise KdcacheError(f"{HISTORY_FILE} of {location}: unknown template {history['template']!r}")
    version = history.get("template_version")
    if version is not None and not (type(version) is int and 1 <= version <= templates.TEMPLATE_VERSION):
        raise KdcacheError(f"{HISTORY_FILE} of {location}: template_version {version!r} is not one this kdcache "
                           f"knows (1..{templates.TEMPLATE_VERSION})")
    return history


def compose_preset(name: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> Bundle:
    """The loader of the hub presets: SigLIP tower + LLM from the hub, joined by a fresh projector.

    The starting point of PT / DPT; `name` is a preset of kdcache.presets with two repos.
    """
    vision_id, llm_id = presets.PRESETS[name].repos
    try:
        with _quiet_transformers():   # the tower drops SigLIP's text model and pooling head: expected
            vision = SiglipVisionModel.from_pretrained(vision_id, vision_use_head=False, dtype=dtype,
                                                       use_safetensors=True)
        language_model = AutoModelForCausalLM.from_pretrained(llm_id, dtype=dtype, use_safetensors=True,
                                                              trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(llm_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise KdcacheError(f"cannot load preset {name!r} ({vision_id} + {llm_id}): {e}") from None
    return compose(vision, language_model, tokenizer, siglip_image_processor(vision.config.image_size), source=name)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a --dtype name; `auto` is bf16 on a GPU that supports it, float32 elsewhere."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise KdcacheError(f"unknown --dtype {dtype!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


# --- composing

def compose(vision_model, language_model, tokenizer, image_processor, *, source: str) -> Bundle:
    """Join a SigLIP tower and a causal LM into a LLaVA model with a fresh GELU-MLP projector.

    The tower and LM modules are moved in, not copied (no second copy of the weights is made).
    Adds ``<image>`` to the tokenizer as a special token when it lacks one, resizes the embeddings
    only when the tokenizer outgrows them, and sets the pad token to eos when there is none.
    The projector gets nn.Linear's default init, in the LM's dtype and device, as in LLaVA.
    """
    if not isinstance(vision_model, SiglipVisionModel):
        raise KdcacheError(f"the vision tower must be a SiglipVisionModel, got {type(vision_model).__name__}")
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    _ensure_pad_token(tokenizer, source)
    if len(tokenizer) > language_model.config.vocab_size:
        language_model.resize_token_embeddings(len(tokenizer))

    # SigLIP's attention-pooling head is unused by LLaVA: drop it so that the checkpoint has no such weights.
    vision_config = SiglipVisionConfig.from_dict({**vision_model.config.to_dict(), "vision_use_head": False})
    if vision_model.use_head:     # always set in the flat SiglipVisionModel (transformers >= 5.6) used here
        del vision_model.head
        vision_model.use_head = False
    vision_model.config = vision_config
    config = LlavaConfig(vision_config=vision_config, text_config=language_model.config,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=0)
    config.image_seq_length = visual_len_of(config)

    with torch.device("meta"):                      # a shell: every child is replaced below
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision_model
    model.model.language_model = language_model.model
    model.lm_head = language_model.lm_head
    embed = language_model.get_input_embeddings().weight
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(embed.device, embed.dtype)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert not config.tie_word_embeddings or model.lm_head.weight is embed
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return Bundle(model.eval(), tokenizer, image_processor, source=source, projector_trained=False)


def siglip_image_processor(image_size: int):
    """SigLIP preprocessing (stretch to S x S, bicubic, mean = std = 0.5); the PIL class without torchvision."""
    if is_torchvision_available():
        from transformers import SiglipImageProcessor as processor_class
    else:  # the same preprocessing; named directly so that transformers does not warn about the fallback
        from transformers.models.siglip import SiglipImageProcessorPil as processor_class
    return processor_class(size={"height": image_size, "width": image_size})


def _ensure_pad_token(tokenizer, source: str) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise KdcacheError(f"the tokenizer of {source} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token


@contextmanager
def _quiet_transformers():
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# --- saving

def save_bundle(bundle: Bundle, out_dir: str | Path, *, stages: list[str]) -> None:
    """save_pretrained of model (safetensors), tokenizer, image processor and LLaVA processor, then kdcache.json.

    `stages` is the full training history of the saved weights, oldest first. Every stage trains
    the projector, so a bundle saved with any stage is marked `projector_trained`. The tokenizer and
    the processor carry the chat template of `bundle.template` (`chat_template_of`; the tokenizer
    object keeps it), and kdcache.json the template and its version.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = bundle.model
    # transformers 5 maps model.vision_tower.* to vision_tower.*; keep the usual SigLIP names instead.
    state = {re.sub(r"^model\.vision_tower\.(?!vision_model\.)", "model.vision_tower.vision_model.", k): v
             for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state)
    bundle.tokenizer.chat_template = chat_template_of(bundle)
    bundle.tokenizer.save_pretrained(out)
    bundle.image_processor.save_pretrained(out)
    vision = model.config.vision_config
    LlavaProcessor(image_processor=bundle.image_processor, tokenizer=bundle.tokenizer,
                   patch_size=vision.patch_size, image_token=IMAGE_TOKEN, num_additional_image_tokens=0,
                   vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                   chat_template=bundle.tokenizer.chat_template).save_pretrained(out)
    history = {"kdcache_version": kdcache.__version__, "source": bundle.source,
               "projector_trained": bool(bundle.projector_trained or stages), "stages": list(stages),
               "template": bundle.template, "template_version": bundle.template_version}
    write_json_atomic(out / HISTORY_FILE, history)


def chat_template_of(bundle: Bundle) -> str | None:
    """The Jinja chat template a saved `bundle` carries: its last stage's template (``qwen2_base`` for a
    model no stage has trained), whose rendering tokenised as one string gives its training ids.

    None for a model trained on template version 1 sequences: no template reproduces those ids, and
    one that does not would evaluate the model on prompts it was not trained on.
    """
    if bundle.template_version not in (None, templates.TEMPLATE_VERSION):
        return None
    return templates.chat_template(bundle.template or "qwen2_base")


def note_stage_template(bundle: Bundle, template: str | None, version: int, *, source: str) -> None:
    """Record on `bundle` that its next stage trains on `source`'s `template` sequences of template `version`.

    Refuses (KdcacheError) a model trained on one version's ``qwen2_base`` sequences meeting another's
    (`templates.combine_versions`); `save_bundle` then writes the template and version.
    """
    bundle.template_version = templates.combine_versions(bundle.template_version, template, version,
                                                         model=f"model {bundle.source}", source=source)
    bundle.template = template


# --- describing

def visual_len_of(config) -> int:
    """Visual tokens per image: (image_size // patch_size)**2, minus the first one under "default"."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches - 1 if config.vision_feature_select_strategy == "default" else patches


def tokenizer_fingerprint(tokenizer) -> str:
    """"sha256:<hex>" of the vocabulary (token -> id), the added tokens and the named special tokens.

    Depends only on what the ids mean, so it is the same after save_pretrained / from_pretrained
    and in every process.
    """
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0])),
        "added": sorted([int(i), str(t), bool(t.special)] for i, t in tokenizer.added_tokens_decoder.items()),
        # An unset special token reads as None on every transformers tokenizer.
        "special": {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")},
    }
    return "sha256:" + hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def config_hash(config) -> str:
    """"sha256:<hex>" of the model config, without keys that record provenance or dtype."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    canonical = json.dumps(strip(config.to_dict()), sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


# --- running

def lm_head_weight(model) -> torch.Tensor:
    """(V, D) output embedding (tied or not; no bias in LLaVA's LM head)."""
    return model.get_output_embeddings().weight


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        pixel_values: torch.Tensor | None) -> torch.Tensor:
    """(B, T, D) post-norm LM hidden states, in the model's dtype; no logits are computed.

    `pixel_values` (B_img, 3, S, S) hold one image per sequence that has image tokens, in batch
    order; None for a text-only batch. hidden @ lm_head_weight(model).T gives the logits.
    """
    if pixel_values is not None:
        pixel_values = pixel_values.to(next(model.model.vision_tower.parameters()).dtype)
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                      use_cache=False)
    return out.last_hidden_state
