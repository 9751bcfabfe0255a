"""Probe: does PT (projector only) align the frozen text-pretrained LM? caption loss first/last of PT on captions."""
import json, sys
from dataclasses import replace
from pathlib import Path
import torch
from kdcache.models import save_bundle
from kdcache.toy import weights
from kdcache.toy.models import TOY_PRESETS, build_toy_bundle
from kdcache.toy.recipe import Plan, Recipe
torch.set_num_threads(1)
name, lm_dir, out, steps, lr = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
p = TOY_PRESETS[name]
b = build_toy_bundle(p["text"], seed=p["seed"], source=name)
b.model.model.vision_tower.load_state_dict(weights.load("tower", Path("/tmp/tw/tower")))
if lm_dir.name != "none":
    _, unexpected = b.model.load_state_dict(weights.load(name, lm_dir), strict=False); assert not unexpected
save_bundle(b, out / "init", stages=[])
r = Recipe(out, plan=replace(Plan(), num_train=1500), seed=0, progress=False)
r.data(); w = r.world
r.plan = replace(r.plan, lr_pt=lr)
r.train("pt", "pt", str(out / "init"), steps, data=str(w["captions"]), images=str(w["images_dir"]))
rows = [json.loads(l) for l in open(out / "runs" / "pt" / "metrics.jsonl") if l.strip()]
print(json.dumps({"lm": str(lm_dir), "steps": steps, "lr": lr, "first": rows[0]["loss"], "q": [round(sum(x["loss"] for x in rows[i:i + 20]) / len(rows[i:i + 20]), 3) for i in range(0, len(rows), max(1, len(rows) // 5))], "s": r.seconds}))
