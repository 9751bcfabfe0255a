"""`kdcache convert --from tinyllava`: a tiny checkpoint in TinyLLaVA Factory's layout, converted, computes the same.

The tiny checkpoint is written as TinyLLaVA Factory (TinyLLaVA/TinyLLaVA_Factory) saves one:
* config.json: the fields of `TinyLlavaConfig` (tinyllava/model/configuration_tinyllava.py), with
  `text_config` / `vision_config` as the sub-configs' diff dicts (what save_pretrained writes) and the
  tower's `model_name_or_path(2)` that `_load_vision_config` adds;
* weights (safetensors) named after `TinyLlavaForConditionalGeneration`'s modules
  (tinyllava/model/modeling_tinyllava.py): ``language_model.*`` (Qwen2ForCausalLM, tinyllava/model/llm/qwen2.py;
  no ``lm_head`` when tied), ``vision_tower._vision_tower.vision_model.*`` (transformers 4's SiglipVisionModel,
  pooling head included; tinyllava/model/vision_tower/base.py, siglip.py), ``connector._connector.{0,2}.*``
  (tinyllava/model/connector/base.py, mlp.py).
The reference logits follow TinyLLaVA's forward by hand on the same modules: `VisionTower.forward`
(hidden_states[vision_feature_layer], "patch" drops position 0, "cls_patch" keeps all), the connector,
then `prepare_inputs_labels_for_multimodal`: the features replace the IMAGE_TOKEN_INDEX (-200) position.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel
from typer.testing import CliRunner

from kdcache import models
from kdcache.cli import app
from kdcache.convert import convert
from kdcache.errors import KdcacheError
from kdcache.templates import IMAGE_TOKEN
from kdcache.toy import models as toy_models

IMAGE_TOKEN_INDEX = -200          # tinyllava/utils/constants.py
HEAD_ROWS = 608                   # padded past the tokenizer, as Qwen's heads are


def build_tinyllava(root, *, layer=-2, select="patch", tied=True, connector="mlp2x_gelu", seed=0):
    """(directory, vision, connector, language model) of a tiny TinyLLaVA Factory checkpoint."""
    torch.manual_seed(seed)
    vision = SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=3, num_attention_heads=2)).eval()
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=HEAD_ROWS, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)).eval()
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 48)).eval()
    state = {f"language_model.{k}": v for k, v in lm.state_dict().items() if not (tied and k == "lm_head.weight")}
    state |= {f"vision_tower._vision_tower.vision_model.{k}": v for k, v in vision.state_dict().items()}
    state |= {f"connector._connector.{k}": v for k, v in mlp.state_dict().items()}
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(root / "model.safetensors"),
              metadata={"format": "pt"})
    vision_config = {**vision.config.to_diff_dict(), "model_name_or_path": "google/siglip-so400m-patch14-384",
                     "model_name_or_path2": ""}
    config = {
        "architectures": ["TinyLlavaForConditionalGeneration"], "model_type": "tinyllava",
        "llm_model_name_or_path": "Qwen/Qwen2-0.5B", "tokenizer_name_or_path": "Qwen/Qwen2-0.5B",
        "vision_model_name_or_path": "google/siglip-so400m-patch14-384", "vision_model_name_or_path2": "",
        "connector_type": connector, "text_config": lm.config.to_diff_dict(), "vision_config": vision_config,
        "hidden_size": 48, "vision_hidden_size": 32, "vocab_size": HEAD_ROWS, "ignore_index": -100,
        "image_token_index": IMAGE_TOKEN_INDEX, "pad_token": "<|endoftext|>", "pad_token_id": 0,
        "tokenizer_padding_side": "right", "tokenizer_model_max_length": 2048, "tokenizer_use_fast": False,
        "vision_feature_layer": layer, "vision_feature_select_strategy": select, "image_aspect_ratio": "square",
        "resampler_hidden_size": None, "num_queries": None, "num_resampler_layers": None, "use_cache": False,
        "cache_dir": None, "tune_type_llm": "full", "tune_type_connector": "full", "tune_type_vision_tower": "frozen",
        "tune_vision_tower_from_layer": -1, "torch_dtype": "float32", "transformers_version": "4.40.1",
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    toy_models.build_toy_tokenizer(image_token=False).save_pretrained(root)
    return root, vision, mlp, lm


def tinyllava_logits(vision, mlp, lm, before, after, pixels, *, layer, select):
    """TinyLLaVA's forward for one sample with one image (IMAGE_TOKEN_INDEX between `before` and `after`)."""
    features = vision(pixels, output_hidden_states=True).hidden_states[layer]
    features = features[:, 1:] if select == "patch" else features
    features = mlp(features)[0]
    embed = lm.get_input_embeddings()
    embeds = torch.cat([embed(torch.tensor(before)), features, embed(torch.tensor(after))])
    return lm(inputs_embeds=embeds[None]).logits


@pytest.mark.parametrize("layer, select, tied", [(-2, "patch", True), (-1, "cls_patch", False)])
def test_converted_checkpoint_computes_tinyllavas_logits(tmp_path, layer, select, tied):
    src, vision, mlp, lm = build_tinyllava(tmp_path / "src", layer=layer, select=select, tied=tied)
    convert("tinyllava", src, tmp_path / "dst")
    bundle = models.load_bundle(str(tmp_path / "dst"))
    config = bundle.model.config
    visual_len = 3 if select == "patch" else 4                      # 2x2 patches; "patch" drops the first
    assert config.vision_feature_select_strategy == {"patch": "default", "cls_patch": "full"}[select]
    assert config.vision_feature_layer == layer and config.image_seq_length == visual_len
    assert bundle.projector_trained and bundle.stages == []
    assert IMAGE_TOKEN in bundle.tokenizer.get_vocab() and len(bundle.tokenizer) < HEAD_ROWS
    assert bundle.image_processor.size == {"height": 32, "width": 32}
    assert config.text_config.tie_word_embeddings == tied
    saved = load_file(str(tmp_path / "dst" / "model.safetensors"))
    assert not any(".head." in k for k in saved)                       # SigLIP's pooling head is dropped

    tokenizer = bundle.tokenizer
    before = tokenizer("USER: ")["input_ids"]
    after = tokenizer("\nWhat color is the circle? ASSISTANT: red")["input_ids"]
    pixels = torch.randn(1, 3, 32, 32)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids = torch.tensor([before + [image_id] * visual_len + after])
    with torch.no_grad():
        expected = tinyllava_logits(vision, mlp, lm, before, after, pixels, layer=layer, select=select)
        got = bundle.model(input_ids=ids, pixel_values=pixels).logits
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    print(f"max |logits diff| = {diff:.3g}")
    assert diff < 1e-4


def test_other_connectors_are_refused_by_name(tmp_path):
    src, *_ = build_tinyllava(tmp_path / "src", connector="resampler")
    with pytest.raises(KdcacheError, match="connector_type 'resampler' .*supported: mlp2x_gelu"):
        convert("tinyllava", src, tmp_path / "dst")


def test_a_pickle_only_checkpoint_is_refused(tmp_path):
    src, *_ = build_tinyllava(tmp_path / "src")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(KdcacheError, match="only pickle weights .*pytorch_model.bin.* safetensors only"):
        convert("tinyllava", src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_cli_converts_and_reports_errors_in_one_line(tmp_path):
    src, *_ = build_tinyllava(tmp_path / "src")
    result = CliRunner().invoke(app, ["convert", "--from", "tinyllava", str(src), str(tmp_path / "dst")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "dst" / models.HISTORY_FILE).read_text())["projector_trained"] is True
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"not read")
    proc = subprocess.run([sys.executable, "-m", "kdcache.cli", "convert", "--from", "tinyllava", str(src),
                           str(tmp_path / "dst2")], capture_output=True, text=True)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "pickle" in lines[0], proc.stderr


def test_convert_help_has_examples_and_imports_no_torch():
    code = ("import sys; from typer.testing import CliRunner; from kdcache.cli import app; "
            "r = CliRunner().invoke(app, ['convert', '--help']); assert r.exit_code == 0, r.output; "
            "assert 'kdcache convert --from tinyllava' in r.output.split('Examples:')[1], r.output; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
