"""benchmarks/bench_gpu.py --tiny: the whole GPU benchmark on the CPU with toy-sized models, as a subprocess.

What this checks is the script (every part runs, the JSON is written and is the last stdout line, the
numbers are sane); the speed targets are the benchmark's own business, on a GPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARTS = ("fidelity", "head_gemm", "dump", "student_steps", "train")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-gpu") / "tiny.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--tiny", "--json", str(out),
                           "--budget-s", "600"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), json.loads(out.read_text())


def test_the_tiny_run_completes_every_part_and_writes_the_json_it_prints(tiny_run):
    printed, written = tiny_run
    assert printed == written
    assert printed["benchmark"] == "bench_gpu" and printed["tiny"] is True and printed["device"] == "cpu"
    for part in PARTS:
        assert part in printed["parts"], part
        assert "error" not in printed["parts"][part] and "skipped" not in printed["parts"][part], printed["parts"][part]
        assert printed["parts"][part]["part_wall_s"] > 0
    assert set(printed["summary"]) == {"dump_over_forward_wall", "dft_over_ce_same_rows", "online_over_dft",
                                       "head_topk_max_over_fp16_half_ulp"}
    assert all(isinstance(entry["met"], bool) for entry in printed["summary"].values())


def test_the_tiny_run_measures_sane_values(tiny_run):
    parts = tiny_run[0]["parts"]
    fidelity = parts["fidelity"]
    f32, bf16 = fidelity["dump_float32_vs_float64"], fidelity["dump_bfloat16_vs_float64"]
    assert f32["logprob_abs_err"] <= 8e-3 and f32["topk_agreement"] >= 0.99      # float16 storage rounding only
    assert f32["relation_cos_min"] >= 0.9999 and f32["relation_norm_rel_err"] < 1e-4
    assert 0 < bf16["logprob_abs_err"] < 1 and bf16["topk_agreement"] > 0.8        # a bf16 teacher: close, not equal
    step1 = fidelity["dft_step1"]["components"]["cpu"]
    assert all(math.isfinite(v) and v >= 0 for v in step1.values()) and step1["kl_visual"] > 0
    head = parts["head_gemm"]
    assert head["route"] == "upcast" and head["topk_ids_equal_fraction"] == 1.0     # float32 both ways on the CPU
    assert head["student_losses"]["loss_rel_diff"] == 0.0
    dump = parts["dump"]
    assert dump["samples"] == 8 and dump["rows_per_sample"]["visual"] == 15
    assert set(dump["threads_median"]) >= {"prepare", "teacher", "write"}
    assert 0 < dump["dump_over_forward_wall"] < 1000 and dump["dump_samples_per_s"] > 0
    steps = parts["student_steps"]
    assert all(steps[v]["s_per_step"] > 0 for v in ("sft", "ce_same_rows", "dft", "online"))
    for stage in ("sft", "dft"):
        assert parts["train"][stage]["steps"] == 3 and parts["train"][stage]["samples_per_s_whole_run"] > 0
