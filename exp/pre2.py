import sys, time, torch, random
from kdcache.toy.models import TOY_PRESETS, build_toy_bundle
from kdcache.toy.pretrain import pretrain_lm, LMPlan
from kdcache.toy import data as toy_data
from kdcache.templates import SYSTEM_PROMPT
from transformers import Qwen2ForCausalLM
name, steps, lr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
p = TOY_PRESETS[name]
b = build_toy_bundle(p["text"], seed=p["seed"], source=name)
qlm = Qwen2ForCausalLM(b.model.config.text_config)
qlm.model = b.model.model.language_model; qlm.lm_head = b.model.lm_head
tok = b.tokenizer
def read():
    rng = random.Random("readtest"); hits = {}
    for _ in range(150):
        s = toy_data._random_scene(rng, 64)
        turns = toy_data._conversations(rng, s, 1)
        q = turns[0]["value"].replace("<image>\n", ""); a = turns[1]["value"]; qt = turns[1]["qtype"]
        ids = tok(SYSTEM_PROMPT + "USER: " + toy_data.caption(s) + "\n" + q + " ASSISTANT:", return_tensors="pt", add_special_tokens=False)
        out = qlm.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        hits.setdefault(qt, []).append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() == a)
    return {k: round(sum(v)/len(v), 2) for k, v in sorted(hits.items())}
t = time.time()
for chunk in range(4):
    losses = pretrain_lm(qlm, tok, LMPlan(steps=steps, lr=lr, seed=chunk), progress=False)
    print(name, chunk, "t", round(time.time()-t), "loss", round(sum(losses[-50:])/50, 3), read(), flush=True)
