"""Can a toy LM learn to bind attributes to objects? The probe behind issue 13's teacher ceiling (~0.72).

The toy teacher fails where a question picks an object by one attribute and asks another ("What color is
the square?" with two objects): in text, with the scene's perfect caption in its context, the stored
teacher LM answers such questions at about the rate of guessing among the values the caption names. This
benchmark trains a toy Qwen2 LM from scratch (toy-teacher's architecture unless overridden) on text only,
through `kdcache.toy.pretrain.train_step` (loss on the answers), on a focused task: scenes of 2-3 objects,
only colour / shape / size questions (each needs the binding), several per caption, and reports at every
`--probe-every` steps the exact match of the next token after "ASSISTANT:" on held-out scenes (one
question each), next to `chance`, the expected accuracy of an LM that answers with a random value among
those of the scene's objects (the no-binding baseline, computed on the same questions).

    python benchmarks/bench_binding.py --stored teacher-lm|student-lm|teacher [--probe 600]
    python benchmarks/bench_binding.py [--steps 600] [--lr 1e-3] [--batch-size 32] [--turns 5]
                                       [--no-system-prompt] [--probe 200] [--probe-every 100]
                                       [--layers N] [--hidden N] [--intermediate N] [--heads N] [--kv-heads N]
                                       [--tied | --no-tied] [--threads 1]

One CPU thread by default; about 0.6 s per step for the default shape (teacher LM, batch 32) on a 2-core EPYC.
`--stored` evaluates a stored LM of the toy world instead (no training; `teacher` is the trained teacher's LM,
read text-only). Both report the accuracy and chance per reference form (which attributes the question
names its object by: "shape", "size+pos", ...). Last stdout line: one JSON object ({"curve": [{"step",
"loss", "accuracy"}], "chance", "final", "by_form": {form: {"n", "accuracy", "chance"}}, ...}).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from kdcache.templates import END_TOKEN, GPT, HUMAN, SYSTEM_PROMPT, Rendered, render  # noqa: E402
from kdcache.toy import data as toy_data  # noqa: E402
from kdcache.toy.pretrain import binding_question, binding_scene, train_step, without_system_prompt  # noqa: E402

def dialogue(rng: random.Random, turns: int, system_prompt: bool) -> Rendered:
    """Caption, then `turns` attribute questions and answers, in the qwen2_base layout (as `pretrain.dialogue`)."""
    drawn = binding_scene(rng)
    pairs = []
    for _ in range(turns):
        q, a, _ = binding_question(rng, drawn)
        pairs += [(HUMAN, q), (GPT, a)]
    pairs[0] = (HUMAN, toy_data.caption(drawn) + "\n" + pairs[0][1])
    rendered = render(pairs, template="qwen2_base", has_image=False, eos_token=END_TOKEN)
    return rendered if system_prompt else without_system_prompt(rendered)


def chance(drawn: dict, qtype: str) -> float:
    """Accuracy of answering with a uniformly random value among those the scene's objects have."""
    return 1.0 / len({o[qtype] for o in drawn["objects"]})


def probe_set(n: int) -> list[tuple[dict, str, str, str]]:
    rng = random.Random("bench-binding-probe")      # held out: the training stream has another seed
    out = []
    for _ in range(n):
        drawn = binding_scene(rng)
        out.append((drawn, *binding_question(rng, drawn)))
    return out


def reference_form(question: str) -> str:
    """Which attributes the question's noun phrase names the object by, e.g. "size+pos", "shape"."""
    words = question.rstrip("?").replace("small or large", "").split()
    kinds = [kind for kind, values in (("color", toy_data.COLORS), ("shape", toy_data.SHAPES),
                                       ("size", toy_data.SIZES)) if any(w in values for w in words[2:])]
    if any(w in ("left", "right", "middle") for w in words):
        kinds.append("pos")
    return "+".join(kinds) or "object"


@torch.no_grad()
def evaluate(lm, tokenizer, probes, system_prompt: bool) -> dict:
    """Exact match of the next token after "ASSISTANT:" -> {"accuracy", "chance", "by_form": {form: {n, accuracy,
    chance}}} over `probes`; `lm` is any module taking input_ids and returning logits (a LLaVA model text-only too)."""
    lm.eval()
    forms: dict[str, list] = {}
    for drawn, q, a, qtype in probes:
        prompt = (SYSTEM_PROMPT if system_prompt else "") + "USER: " + toy_data.caption(drawn) + "\n" + q + " ASSISTANT:"
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        token = int(lm(**ids).logits[0, -1].argmax())
        forms.setdefault(reference_form(q), []).append((tokenizer.decode([token]).strip() == a, chance(drawn, qtype)))
    lm.train()
    every = [x for v in forms.values() for x in v]
    mean = lambda pairs, i: sum(p[i] for p in pairs) / len(pairs)      # noqa: E731
    return {"accuracy": mean(every, 0), "chance": mean(every, 1),
            "by_form": {f: {"n": len(v), "accuracy": mean(v, 0), "chance": mean(v, 1)}
                        for f, v in sorted(forms.items(), key=lambda kv: -len(kv[1]))}}


def build_lm(args):
    """toy-teacher's LM shape (or the overrides), freshly initialised, and the toy tokenizer."""
    from transformers import Qwen2ForCausalLM

    from kdcache.toy.models import TOY_PRESETS, build_toy_tokenizer, toy_text_config

    text = dict(TOY_PRESETS["toy-teacher"]["text"])
    for key, value in (("num_hidden_layers", args.layers), ("hidden_size", args.hidden),
                       ("intermediate_size", args.intermediate), ("num_attention_heads", args.heads),
                       ("num_key_value_heads", args.kv_heads or args.heads), ("tie_word_embeddings", args.tied)):
        if value is not None:
            text[key] = value
    tokenizer = build_toy_tokenizer(image_token=True)
    torch.manual_seed(args.seed)
    lm = Qwen2ForCausalLM(toy_text_config(text, tokenizer))
    return lm, tokenizer, text


def train(args) -> dict:
    lm, tokenizer, text = build_lm(args)
    probes = probe_set(args.probe)
    rng = random.Random(f"bench-binding-train-{args.seed}")
    optimizer = torch.optim.AdamW(lm.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50))
    curve, losses, started = [], [], time.perf_counter()
    lm.train()
    for step in range(1, args.steps + 1):
        batch = [dialogue(rng, args.turns, args.system_prompt) for _ in range(args.batch_size)]
        losses.append(train_step(lm, tokenizer, batch, optimizer, schedule))
        if step % args.probe_every == 0 or step == args.steps:
            recent = losses[-args.probe_every:]
            final = evaluate(lm, tokenizer, probes, args.system_prompt)        # the last one is the result
            point = {"step": step, "loss": sum(recent) / len(recent), "accuracy": final["accuracy"],
                     "seconds": time.perf_counter() - started}
            curve.append(point)
            print(f"step {step:6d}  loss {point['loss']:.3f}  accuracy {point['accuracy']:.3f}", flush=True)
    return {"lm": text, "curve": curve, "chance": final["chance"], "final": final["accuracy"],
            "by_form": final["by_form"], "seconds_per_step": curve[-1]["seconds"] / args.steps}


def stored(args) -> dict:
    """The stored toy LM `args.stored` (kdcache/toy/weights) on the same probes, text only, no training."""
    from kdcache.toy.models import load_toy

    preset = "toy-teacher" if args.stored.startswith("teacher") else "toy-student"
    bundle = load_toy(preset, start=args.stored)
    result = evaluate(bundle.model, bundle.tokenizer, probe_set(args.probe), args.system_prompt)
    return {"stored": args.stored, "final": result["accuracy"], "chance": result["chance"],
            "by_form": result["by_form"]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--turns", type=int, default=5, help="questions per caption")
    parser.add_argument("--no-system-prompt", dest="system_prompt", action="store_false",
                        help="leave the template's system prompt out (training and probe): shorter sequences")
    parser.add_argument("--probe", type=int, default=200, help="held-out questions per measurement")
    parser.add_argument("--probe-every", type=int, default=100)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads, or the preset's)")
    parser.add_argument("--tied", action=argparse.BooleanOptionalAction, default=None,
                        help="tie the input and output embeddings (default: as toy-teacher, untied)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stored", choices=("teacher-lm", "student-lm", "teacher"),
                        help="evaluate this stored toy LM (kdcache/toy/weights) instead of training one")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.turns, args.probe, args.probe_every) < 1:
        parser.error("--steps, --batch-size, --turns, --probe and --probe-every must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    common.set_threads(args.threads)
    result = stored(args) if args.stored else train(args)
    common.print_table(f"exact match by reference form ({args.stored or 'trained here'}; chance: a random value "
                       "among the scene's objects')", ["form", "n", "accuracy", "chance"],
                       [[f, v["n"], f"{v['accuracy']:.3f}", f"{v['chance']:.3f}"] for f, v in result["by_form"].items()]
                       + [["all", sum(v["n"] for v in result["by_form"].values()), f"{result['final']:.3f}",
                           f"{result['chance']:.3f}"]])
    settings = {k: getattr(args, k) for k in ("steps", "lr", "batch_size", "turns", "system_prompt", "probe", "seed",
                                              "stored")}
    print(json.dumps({"benchmark": "binding", "machine": common.machine(), "settings": settings,
                      **common.rounded(result)}))


if __name__ == "__main__":
    main()
