"""`kdcache convert --from tinyllava SRC DST`: a TinyLLaVA Factory checkpoint as a kdcache LLaVA bundle.

The LLaVA-KD students are released in TinyLLaVA Factory's format. What this reads, and where in
TinyLLaVA/TinyLLaVA_Factory it is defined:

* config.json, `TinyLlavaConfig` (tinyllava/model/configuration_tinyllava.py): model_type "tinyllava";
  `text_config` / `vision_config` as dicts (the LM's and SigLIP tower's configs, saved as diffs to their
  classes' defaults); `connector_type` ("mlp2x_gelu"); `vision_feature_layer` (default -2) and
  `vision_feature_select_strategy` (default "patch"); `hidden_size`, `vision_hidden_size`.
* Weight names, from the modules of `TinyLlavaForConditionalGeneration` (tinyllava/model/modeling_tinyllava.py):
  ``language_model.*`` (a Qwen2ForCausalLM, tinyllava/model/llm/qwen2.py: ``language_model.model.*``,
  ``language_model.lm_head.weight``, absent when tied); ``vision_tower._vision_tower.vision_model.*`` (a
  transformers SiglipVisionModel held as ``_vision_tower``, tinyllava/model/vision_tower/base.py and
  siglip.py; its attention-pooling ``head.*`` is saved but unused); ``connector._connector.{0,2}.*``
  (tinyllava/model/connector/base.py, mlp.py: nn.Sequential(Linear(vision, hidden), GELU, Linear(hidden,
  hidden)) for "mlp2x_gelu").
* The forward (modeling_tinyllava.py `encode_images`, vision_tower/base.py `forward`): hidden_states
  [vision_feature_layer] of the tower; "patch" drops the first position (``[:, 1:]``; SigLIP has no CLS
  token, so a real patch is dropped: 728 tokens for so400m-patch14-384), "cls_patch" keeps all. These are
  exactly LLaVA's "default" and "full". The features replace the one IMAGE_TOKEN_INDEX (-200) position;
  LLaVA instead has one ``<image>`` token per feature, so the LM sees the same sequence.

Weights are read from safetensors only (no pickle), and no remote code is run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdcache.errors import KdcacheError

FORMATS = ("tinyllava",)
CONNECTORS = {"mlp2x_gelu"}
# TinyLLaVA's vision_feature_select_strategy -> LLaVA's (vision_tower/base.py `forward`).
SELECT_STRATEGIES = {"patch": "default", "cls_patch": "full"}
_LM_PREFIX = "language_model."
_TOWER_PREFIX = "vision_tower._vision_tower."
_CONNECTOR_PREFIX = "connector._connector."


def convert(fmt: str, src: str | Path, dst: str | Path) -> Path:
    """Convert checkpoint `src` in format `fmt` into a kdcache (LLaVA) checkpoint directory `dst`."""
    if fmt not in FORMATS:
        raise KdcacheError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")
    return convert_tinyllava(src, dst)


def convert_tinyllava(src: str | Path, dst: str | Path) -> Path:
    """A TinyLLaVA Factory checkpoint directory `src` -> a kdcache / transformers LLaVA directory `dst`."""
    from transformers import AutoModel, AutoModelForCausalLM, Qwen2Config, SiglipVisionConfig

    from kdcache import models

    src, dst = Path(src), Path(dst)
    config = _read_config(src)
    text_config, vision_config = _sub_configs(config, src, Qwen2Config, SiglipVisionConfig)
    fmt_layer = config.get("vision_feature_layer", -2)
    fmt_select = config.get("vision_feature_select_strategy", "patch")
    if fmt_select not in SELECT_STRATEGIES:
        raise KdcacheError(f"{src}: vision_feature_select_strategy {fmt_select!r} is not supported "
                           f"(supported: {', '.join(SELECT_STRATEGIES)})")
    if not isinstance(fmt_layer, int):
        raise KdcacheError(f"{src}: vision_feature_layer must be one integer, got {fmt_layer!r}")

    weights = _read_safetensors(src)
    dtype = next((t.dtype for t in weights.values() if t.is_floating_point()), torch.float32)
    lm_state, tower_state, connector_state = _split_weights(weights, src)

    language_model = AutoModelForCausalLM.from_config(text_config, dtype=dtype)
    if text_config.tie_word_embeddings and "lm_head.weight" in lm_state:
        if not torch.equal(lm_state["lm_head.weight"], lm_state.get("model.embed_tokens.weight")):
            raise KdcacheError(f"{src}: text_config ties the LM head to the embeddings but the checkpoint's differ")
    _load(language_model, lm_state, f"{src} (language_model)",
          optional={"lm_head.weight"} if text_config.tie_word_embeddings else set())
    vision = AutoModel.from_config(vision_config, dtype=dtype)
    _load(vision, tower_state, f"{src} (vision_tower)")

    tokenizer, image_processor = _tokenizer_and_processor(src, vision_config.image_size)
    bundle = models.compose(vision, language_model, tokenizer, image_processor, source=f"tinyllava:{src}")
    llava = bundle.model
    llava.config.vision_feature_layer = fmt_layer
    llava.config.vision_feature_select_strategy = SELECT_STRATEGIES[fmt_select]
    llava.config.image_seq_length = models.visual_len_of(llava.config)
    if set(connector_state) != {"0.weight", "0.bias", "2.weight", "2.bias"}:
        raise KdcacheError(f"{src}: connector weights are {sorted(connector_state)}, not those of mlp2x_gelu")
    projector = llava.model.multi_modal_projector
    _load(projector, {"linear_1.weight": connector_state.get("0.weight"), "linear_1.bias": connector_state.get("0.bias"),
                      "linear_2.weight": connector_state.get("2.weight"), "linear_2.bias": connector_state.get("2.bias")},
          f"{src} (connector)")
    bundle.projector_trained = True
    models.save_bundle(bundle, dst, stages=[])
    return dst


def _split_weights(weights: dict, src: Path) -> tuple[dict, dict, dict]:
    """TinyLLaVA's state dict -> (LM, tower, connector) state dicts under their own module names."""
    lm_state, tower_state, connector_state, unknown = {}, {}, {}, []
    for key, tensor in weights.items():
        if key.startswith(_LM_PREFIX):
            lm_state[key[len(_LM_PREFIX):]] = tensor
        elif key.startswith(_TOWER_PREFIX):
            name = key[len(_TOWER_PREFIX):].removeprefix("vision_model.")
            if not name.startswith("head."):          # SigLIP's pooling head: unused by TinyLLaVA and LLaVA
                tower_state[name] = tensor
        elif key.startswith(_CONNECTOR_PREFIX):
            connector_state[key[len(_CONNECTOR_PREFIX):]] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise KdcacheError(f"{src}: weights outside the TinyLLaVA layout (language_model.*, vision_tower._vision_tower.*, "
                           f"connector._connector.*): {', '.join(sorted(unknown)[:5])}")
    return lm_state, tower_state, connector_state


def _tokenizer_and_processor(src: Path, image_size: int):
    """SRC's tokenizer, and its image processor or else SigLIP's (TinyLLaVA takes it from the tower's repo)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from kdcache import models

    try:
        with models._quiet_transformers():   # it reads config.json, whose model_type transformers does not know
            tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise KdcacheError(f"cannot load the tokenizer of {src}: {e}") from None
    if (src / "preprocessor_config.json").is_file():
        return tokenizer, AutoImageProcessor.from_pretrained(src, trust_remote_code=False)
    return tokenizer, models.siglip_image_processor(image_size)


def _read_config(src: Path) -> dict:
    file = src / "config.json"
    if not file.is_file():
        raise KdcacheError(f"{src} is not a checkpoint directory (no config.json)")
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KdcacheError(f"cannot read {file}: {e}") from None
    if config.get("model_type") != "tinyllava":
        raise KdcacheError(f"{src} is a {config.get('model_type')!r} checkpoint, not a TinyLLaVA one (model_type 'tinyllava')")
    connector = config.get("connector_type")
    if connector not in CONNECTORS:
        raise KdcacheError(f"{src}: connector_type {connector!r} cannot become LLaVA's projector; "
                           f"supported: {', '.join(sorted(CONNECTORS))}")
    return config


def _sub_configs(config: dict, src: Path, text_class, vision_class):
    text, vision = config.get("text_config"), config.get("vision_config")
    if not isinstance(text, dict) or text.get("model_type") != "qwen2":
        kind = text.get("model_type") if isinstance(text, dict) else None
        raise KdcacheError(f"{src}: the language model is {kind!r}; kdcache needs a Qwen2 one (text_config.model_type 'qwen2')")
    if not isinstance(vision, dict) or vision.get("model_type") not in ("siglip_vision_model", "siglip"):
        kind = vision.get("model_type") if isinstance(vision, dict) else None
        raise KdcacheError(f"{src}: the vision tower is {kind!r}; kdcache needs SigLIP (vision_config.model_type "
                           f"'siglip_vision_model')")
    vision = dict(vision.get("vision_config", vision))
    for key in ("model_name_or_path", "model_name_or_path2", "model_type"):    # TinyLLaVA's own additions
        vision.pop(key, None)
    text = {k: v for k, v in text.items() if k != "model_type"}
    return text_class.from_dict(text), vision_class.from_dict({**vision, "vision_use_head": False})


def _read_safetensors(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
            raise KdcacheError(f"cannot read {index}: {e}") from None
        paths = [src / name for name in files]
    else:
        paths = sorted(src.glob("*.safetensors"))
    if not paths:
        pickles = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt*"))
        if pickles:
            raise KdcacheError(f"{src} has only pickle weights ({', '.join(pickles[:3])}) and kdcache reads "
                               f"safetensors only (a pickle can run code when loaded); convert them to safetensors first")
        raise KdcacheError(f"{src} has no safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for path in paths:
        if not path.is_file():
            raise KdcacheError(f"{src}: {path.name} is named by the safetensors index but missing")
        weights.update(load_file(str(path)))
    return weights


def _load(module: torch.nn.Module, state: dict, what: str, optional: set[str] = frozenset()) -> None:
    """load_state_dict, strict, with one-line errors; `optional` keys may be missing (a tied LM head)."""
    absent = sorted(k for k, v in state.items() if v is None)
    state = {k: v for k, v in state.items() if v is not None}
    expected = {k: v for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state) - set(optional)) + absent
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KdcacheError(f"{what}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
              if v.shape != expected[k].shape]
    if shapes:
        raise KdcacheError(f"{what}: weight shapes do not match the config: {'; '.join(shapes[:3])}")
    module.load_state_dict(state, strict=False)
    if "lm_head.weight" in optional and "lm_head.weight" not in state:
        module.tie_weights()
