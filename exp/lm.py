"""Probe: curriculum text pretraining of a toy preset's LM (kdcache.toy.pretrain.pretrain_lm), reading probe at the end."""
import json, random, sys, time
from pathlib import Path
import torch
from transformers import Qwen2ForCausalLM
from kdcache.templates import build_prompt
from kdcache.toy import data as toy_data, weights
from kdcache.toy.models import TOY_PRESETS, build_toy_bundle
from kdcache.toy.pretrain import LMPlan, pretrain_lm

torch.set_num_threads(1)
name, steps, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
lr = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-3
p = TOY_PRESETS[name]
b = build_toy_bundle(p["text"], seed=p["seed"], source=name)
qlm = Qwen2ForCausalLM(b.model.config.text_config)
qlm.model, qlm.lm_head = b.model.model.language_model, b.model.lm_head
tok = b.tokenizer

def read(n=200):
    rng = random.Random("readtest"); hits = {}
    for _ in range(n):
        s = toy_data._random_scene(rng, 64)
        t = toy_data._conversations(rng, s, 1)
        q = toy_data.caption(s) + "\n" + t[0]["value"].replace("<image>\n", "")
        ids = build_prompt([], q, tok, template="qwen2_base", has_image=False) if False else None
        from kdcache.templates import render, HUMAN
        text = render([(HUMAN, q)], template="qwen2_base", has_image=False, eos_token=tok.eos_token, generation_prompt=True).text
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        o = qlm.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        hits.setdefault(t[1]["qtype"], []).append(tok.decode(o[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() == t[1]["value"])
    return {k: round(sum(v) / len(v), 2) for k, v in sorted(hits.items())}

t0 = time.time()
ao = len(sys.argv) > 5 and sys.argv[5] == "answers"
losses = pretrain_lm(qlm, tok, LMPlan(steps=steps, lr=lr, answers_only=ao), progress=False)
qlm.eval()
print(json.dumps({"name": name, "answers_only": ao, "steps": steps, "lr": lr, "s": round(time.time() - t0), "loss_end": round(sum(losses[-50:]) / 50, 3),
                  "read": read()}), flush=True)
weights.save(weights.language_model_state(b.model), name, out, dtype=torch.float32)
