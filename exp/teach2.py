import sys, json, time
from dataclasses import replace
from kdcache.toy.recipe import Recipe, Plan
out, init, num_train = sys.argv[1], sys.argv[2], int(sys.argv[3])
plan = replace(Plan(), num_train=num_train, lr_pt=2e-3, lr_ft=1e-3)
r = Recipe(out, plan=plan, seed=0, progress=False)
r.data(); w = r.world
model = r.train("teacher-pt", "pt", init, 200, data=str(w["captions"]), images=str(w["images_dir"]))
rows = [json.loads(l) for l in open(f"{out}/runs/teacher-pt/metrics.jsonl") if l.strip()]
print("pt", rows[0]["loss"], rows[-1]["loss"], flush=True)
for i in range(6):
    model = r.train(f"teacher-sft{i}", "sft", model, 400, data=str(w["teacher"]), images=str(w["images_dir"]))
    res = r.evaluate("teacher", model)
    rows = [json.loads(l) for l in open(f"{out}/runs/teacher-sft{i}/metrics.jsonl") if l.strip()]
    print(i, round(rows[-1]["loss"], 3), round(res["accuracy"], 3), {k: round(v["accuracy"], 2) for k, v in res["per_type"].items()}, r.seconds, flush=True)
