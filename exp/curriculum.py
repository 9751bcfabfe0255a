import sys, time, random, torch
from kdcache.toy.models import TOY_PRESETS, build_toy_bundle
from kdcache.toy import data as toy_data
from kdcache.templates import SYSTEM_PROMPT, END_TOKEN
from transformers import Qwen2ForCausalLM
name, steps, lr, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
p = TOY_PRESETS[name]
b = build_toy_bundle(p["text"], seed=p["seed"], source=name)
qlm = Qwen2ForCausalLM(b.model.config.text_config)
qlm.model = b.model.model.language_model; qlm.lm_head = b.model.lm_head
tok = b.tokenizer
def dialog(rng, max_objects):
    while True:
        s = toy_data._random_scene(rng, 64)
        if len(s["objects"]) <= max_objects: break
    turns = toy_data._conversations(rng, s, 5)
    parts = ["USER: " + toy_data.caption(s) + "\n"]
    for h, g in zip(turns[::2], turns[1::2]):
        parts.append(h["value"].replace("<image>\n", "") + " ASSISTANT: " + g["value"] + END_TOKEN)
        parts.append("USER: ")
    return "".join(parts[:-1])
def read():
    rng = random.Random("readtest"); hits = {}
    for _ in range(150):
        s = toy_data._random_scene(rng, 64)
        turns = toy_data._conversations(rng, s, 1)
        q = turns[0]["value"].replace("<image>\n", ""); a = turns[1]["value"]; qt = turns[1]["qtype"]
        ids = tok("USER: " + toy_data.caption(s) + "\n" + q + " ASSISTANT:", return_tensors="pt", add_special_tokens=False)
        out = qlm.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        hits.setdefault(qt, []).append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() == a)
    return {k: round(sum(v)/len(v), 2) for k, v in sorted(hits.items())}
opt = torch.optim.AdamW(qlm.parameters(), lr=lr, weight_decay=0.01)
rng = random.Random(0); torch.manual_seed(0); t = time.time()
qlm.train()
for step in range(steps):
    maxo = 1 if (mode == "cur" and step < steps // 3) else (2 if (mode == "cur" and step < 2 * steps // 3) else 3)
    batch = [dialog(rng, maxo) for _ in range(32)]
    enc = tok(batch, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    loss = qlm(**enc, labels=labels).loss
    loss.backward(); torch.nn.utils.clip_grad_norm_(qlm.parameters(), 1.0); opt.step(); opt.zero_grad()
    if (step + 1) % (steps // 4) == 0:
        qlm.eval(); print(mode, step + 1, round(time.time() - t), round(loss.item(), 3), read(), flush=True); qlm.train()
