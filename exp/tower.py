import sys, time, json, torch
from pathlib import Path
from kdcache.models import siglip_image_processor
from kdcache.toy import weights
from kdcache.toy.models import TOY_VISION, toy_vision_tower
from kdcache.toy.pretrain import pretrain_tower, TowerPlan
torch.set_num_threads(1)
t = time.time(); tower = toy_vision_tower()
l = pretrain_tower(tower, siglip_image_processor(TOY_VISION["image_size"]), TowerPlan(), progress=False)
weights.save(tower.state_dict(), "tower", Path(sys.argv[1]), dtype=torch.float32)
print(json.dumps({"s": round(time.time() - t), "loss": [l[0], sum(l[-20:]) / 20]}))
