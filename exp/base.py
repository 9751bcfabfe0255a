import json, sys, torch
from dataclasses import replace
from kdcache.toy.recipe import Plan, Recipe
torch.set_num_threads(1)
r = Recipe(sys.argv[1], plan=Plan(), seed=0, progress=False)
r.data()
caches = {"captions": sys.argv[1] + "/caches/captions", "questions": sys.argv[1] + "/caches/questions"}
final = r.student("PT-SFT", caches, tag="base2")
res = r.evaluate("b", final)
print(json.dumps({"acc": res["accuracy"], "per_type": {k: round(v["accuracy"], 2) for k, v in res["per_type"].items()}, "s": r.seconds}))
