"""Probe: the quickstart with plan overrides: python exp/qs.py OUT SEED '{"student_sft_steps": 300}'"""
import json, os, sys, time
import torch
if os.environ.get("THREADS"): torch.set_num_threads(int(os.environ["THREADS"]))
from dataclasses import replace
from kdcache.toy.recipe import Plan, run_quickstart
out, seed = sys.argv[1], int(sys.argv[2])
plan = replace(Plan(), **json.loads(sys.argv[3] if len(sys.argv) > 3 else "{}"))
t = time.time()
r = run_quickstart(out, seed=seed, plan=plan, progress=False)
print(json.dumps({"seed": seed, "plan": sys.argv[3:], "acc": r["accuracy"], "per_type": r["per_type"], "wall": round(time.time() - t), "seconds": r["seconds"]}))
