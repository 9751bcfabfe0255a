"""benchmarks/bench_teachers.py: the sharpness of a cache's response targets against a float64 reference, the
dump temperature and KD weights reaching the jobs, one seed of the recipe end to end (small plan)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import yaml

import codec_samples as cs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_teachers  # noqa: E402

from kdcache.reader import CacheReader  # noqa: E402
from kdcache.toy.recipe import small_plan  # noqa: E402
from kdcache.writer import ShardWriter, finalize_cache, write_rank_report  # noqa: E402


def test_target_sharpness_is_the_entropy_of_top_k_plus_tail_and_the_confident_share(tmp_path):
    cache = tmp_path / "cache"
    with ShardWriter(cache, rank=0, k_response=cs.K_R, k_visual=cs.K_V, codec="lossless") as writer:
        for sample in cs.samples():
            writer.write(sample)
    write_rank_report(cache, 0, skipped=[])
    finalize_cache(cache, dict(cs.MANIFEST))
    rows = np.concatenate([s["response_topk_logprobs"].astype(np.float64) for s in CacheReader(cache)])
    entropies, confident = [], 0
    for row in rows:                                            # plain Python, one row at a time
        probs = [float(np.exp(x)) for x in row]
        tail = max(1.0 - sum(probs), 1e-12)
        entropies.append(-sum(p * float(x) for p, x in zip(probs, row) if p > 0) - tail * float(np.log(tail)))
        confident += max(probs) > 0.99
    got = bench_teachers.target_sharpness(str(cache))
    assert np.isfinite(got["entropy_nats"]) and np.isneginf(rows).any()      # underflowed entries included
    assert got == {"entropy_nats": round(sum(entropies) / len(entropies), 3),
                   "top1_over_0.99": round(confident / len(rows), 3)}


def test_one_seed_dumps_at_the_temperature_and_distils_with_the_weights(tmp_path):
    args = bench_teachers.parse_args(["--seeds", "1", "--pt", "2", "--sft", "2", "--dft", "3", "--temperature", "2", "--alpha",
                                      "4", "--beta", "0.5", "--gamma", "0", "--out", str(tmp_path)])
    row = bench_teachers.one_seed(args, 1, base=small_plan())
    assert row["seed"] == 1 and set(row) >= {"teacher", "baseline", "distilled", "gain", "paired_se", "targets"}
    runs = tmp_path / "seed1" / "runs"
    steps = {run: len((runs / run / "metrics.jsonl").read_text().splitlines())
             for run in ("baseline-pt", "baseline-sft", "distilled-dpt", "distilled-sft", "distilled-dft")}
    assert steps == {"baseline-pt": 2, "baseline-sft": 5, "distilled-dpt": 2, "distilled-sft": 2, "distilled-dft": 3}
    for run in ("distilled-dpt", "distilled-dft"):
        config = yaml.safe_load((runs / run / "config.yaml").read_text())
        assert (config["alpha"], config["beta"], config["gamma"]) == (4.0, 0.5, 0.0)
    assert yaml.safe_load((runs / "distilled-sft" / "config.yaml").read_text())["alpha"] == 1.0
    manifest = CacheReader(str(tmp_path / "seed1" / "caches" / "questions")).manifest
    assert manifest["temperature"] == {"response": 2.0, "visual": 2.0}
