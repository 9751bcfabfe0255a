import json, torch
from pathlib import Path
from kdcache.toy import data as toy_data
from kdcache.evaluate import evaluate_bundle
from kdcache.models import load_bundle
torch.set_num_threads(1)
w = toy_data.generate("/tmp/tw/of", num_train=300, num_eval=200, seed=100)
b = load_bundle("toy-teacher")
for split in ("train", "eval"):
    r = evaluate_bundle(b, w[split], w["images_dir"], template="qwen2_base", progress=False)
    print(split, round(r["accuracy"], 3), {k: round(v["accuracy"], 2) for k, v in r["per_type"].items()}, flush=True)
