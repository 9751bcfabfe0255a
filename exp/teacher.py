"""Probe: toy teacher from the pretrained LM + tower: PT (projector) then SFT in chunks, evaluated after each."""
import json, sys, time
from dataclasses import replace
from pathlib import Path
import torch
from kdcache.models import save_bundle
from kdcache.toy import weights
from kdcache.toy.models import TOY_PRESETS, build_toy_bundle
from kdcache.toy.recipe import Plan, Recipe
torch.set_num_threads(int(sys.argv[6]) if len(sys.argv) > 6 else 1)
out, tw, pt_steps, sft_chunk, chunks = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
p = TOY_PRESETS["toy-teacher"]
b = build_toy_bundle(p["text"], seed=p["seed"], source="toy-teacher")
b.model.model.vision_tower.load_state_dict(weights.load("tower", tw / "tower"))
if (tw / "teacher" / "weights.json").is_file():
    missing, unexpected = b.model.load_state_dict(weights.load("toy-teacher", tw / "teacher"), strict=False)
    assert not unexpected
    print("pretrained LM", flush=True)
save_bundle(b, out / "init", stages=[])
r = Recipe(out, plan=replace(Plan(), num_train=3000, lr_pt=2e-3, lr_ft=1e-3), seed=0, progress=False)
r.data(); w = r.world
def losses(name):
    rows = [json.loads(l) for l in open(out / "runs" / name / "metrics.jsonl") if l.strip()]
    return [round(rows[0]["loss"], 3), round(sum(x["loss"] for x in rows[-10:]) / 10, 3)]
model = r.train("teacher-pt", "pt", str(out / "init"), pt_steps, data=str(w["captions"]), images=str(w["images_dir"]))
print("pt", losses("teacher-pt"), r.seconds, flush=True)
for i in range(chunks):
    model = r.train(f"teacher-sft{i}", "sft", model, sft_chunk, data=str(w["teacher"]), images=str(w["images_dir"]))
    res = r.evaluate("teacher", model)
    print(i, losses(f"teacher-sft{i}"), round(res["accuracy"], 3), {k: round(v["accuracy"], 2) for k, v in res["per_type"].items()}, r.seconds, flush=True)
