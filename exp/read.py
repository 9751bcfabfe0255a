import random, torch
from kdcache.models import load_bundle
from kdcache.toy import data as toy_data
from kdcache.templates import SYSTEM_PROMPT
b = load_bundle("/tmp/exp/toy-teacher-lmt")
m = b.model; tok = b.tokenizer
rng = random.Random("readtest")
hits = {}
for _ in range(150):
    s = toy_data._random_scene(rng, 64)
    turns = toy_data._conversations(rng, s, 1)
    q = turns[0]["value"].replace("<image>\n", ""); a = turns[1]["value"]; qt = turns[1]["qtype"]
    text = SYSTEM_PROMPT + "USER: " + toy_data.caption(s) + "\n" + q + " ASSISTANT:"
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = m.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    pred = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    hits.setdefault(qt, []).append(pred == a)
print({k: round(sum(v)/len(v), 2) for k, v in hits.items()})
