import json, torch
from kdcache.toy import data as toy_data
from kdcache.toy.models import toy_vision_tower
from kdcache.models import siglip_image_processor
import random
torch.manual_seed(0)
tower = toy_vision_tower().eval(); proc = siglip_image_processor(64)
rng = random.Random("probe")
scenes = [toy_data._random_scene(rng, 64) for _ in range(3000)]
imgs = [toy_data.render(s, 64) for s in scenes]
px = proc(images=imgs, return_tensors="pt")["pixel_values"]
with torch.no_grad():
    hs = tower(pixel_values=px, output_hidden_states=True).hidden_states
cols = list(toy_data.COLORS); shapes = list(toy_data.SHAPES)
def targets(attr, vals):
    # per column: index of value or len(vals) if empty
    y = torch.full((len(scenes), 3), len(vals))
    for i, s in enumerate(scenes):
        for o in s["objects"]:
            y[i, toy_data.POSITIONS.index(o["position"])] = vals.index(o[attr])
    return y
for layer in (0, 1, 2):
    f = hs[layer]  # (N, 16, 64)
    X = f.reshape(len(scenes), -1)
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    for attr, vals in (("color", cols), ("shape", shapes), ("size", list(toy_data.SIZES))):
        y = targets(attr, vals)
        accs = []
        for c in range(3):
            W = torch.zeros(X.shape[1], len(vals) + 1, requires_grad=True)
            opt = torch.optim.Adam([W], lr=1e-2)
            for _ in range(300):
                loss = torch.nn.functional.cross_entropy(X[:2500] @ W, y[:2500, c]) + 1e-3 * W.pow(2).sum()
                opt.zero_grad(); loss.backward(); opt.step()
            accs.append(round(((X[2500:] @ W).argmax(1) == y[2500:, c]).float().mean().item(), 3))
        print("layer", layer, attr, accs)
