"""Training checkpoints (student_train.checkpoint): round trip of weights, AdamW state, scheduler, sampler and
RNG; bit-identical resumption; frozen parameters left out; refusal of another trainable set; rotation; and
FSDP2 checkpoints written by 2 torchrun ranks loading into 1 process and back.

Run as a script (under torchrun) this file is the FSDP2 worker: `test_checkpoint.py save|load DIR`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kdcache.errors import KdcacheError
from kdcache.sampler import ResumableSampler
from student_train import checkpoint

REPO = Path(__file__).resolve().parents[1]


class Tiny(torch.nn.Module):
    """A toy LM: embedding (7, 4) tied to the head, a frozen encoder, a trainable projector and a buffer.

    Dims 7 and 5 shard unevenly over 2 FSDP ranks (4 + 3 and 3 + 2 rows).
    """

    def __init__(self, emb_trains: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(7, 4)
        self.enc = torch.nn.Linear(4, 5)
        self.proj = torch.nn.Linear(5, 4)
        self.head = torch.nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.full((4,), 0.5))
        self.enc.requires_grad_(False)
        self.emb.requires_grad_(emb_trains)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:                     # ids (B, T) -> scalar loss
        hidden = self.proj(torch.tanh(self.enc(self.emb(ids)))) * self.scale    # (B, T, 4)
        logits = self.head(hidden)                                              # (B, T, 7)
        return F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())


def adamw(module: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2, betas=(0.8, 0.95),
                             weight_decay=0.1)


def train_steps(module, optimizer, steps: range) -> None:
    for s in steps:                                    # the batch depends on the step only, not on the RNG
        ids = torch.randint(0, 7, (3, 6), generator=torch.Generator().manual_seed(s))
        module(ids).backward()
        optimizer.step()
        optimizer.zero_grad()


def local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def snapshot(module, optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and buffer and every AdamW slot ("{name}.{slot}"), this rank's shard under FSDP."""
    out = {name: local(t.detach()).clone() for name, t in module.state_dict().items()}
    for name, param in module.named_parameters():
        for slot, value in optimizer.state.get(param, {}).items():
            out[f"{name}.{slot}"] = local(value).clone()
    return out


def saved_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {**load_file(path / "trainable.safetensors"), **load_file(path / "optimizer.safetensors")}


# --- one process


def test_checkpoint_round_trip_restores_weights_optimizer_moments_scheduler_sampler_and_rng(tmp_path):
    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
        params = dict(model.named_parameters())
        optimizer = torch.optim.AdamW(params.values(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
        return model, params, optimizer, scheduler

    def step(model, optimizer, scheduler):
        model(torch.randn(3, 4)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    model, params, optimizer, scheduler = setup()
    sampler = ResumableSampler([5, 7], seed=3, batch_size=2)
    for _ in range(3):
        step(model, optimizer, scheduler)
        sampler.advance(2)
    path = checkpoint.save_checkpoint(tmp_path, 3, model, optimizer,
                                      {"scheduler": scheduler.state_dict(), "sampler": sampler.state_dict()})
    assert checkpoint.latest_checkpoint(tmp_path) == path == tmp_path / "checkpoints" / "step-000000003"
    step(model, optimizer, scheduler)                                      # the reference continuation
    expected = {n: p.detach().clone() for n, p in params.items()}
    expected_order = list(sampler)

    model2, params2, optimizer2, scheduler2 = setup()
    torch.manual_seed(123)                                                 # the checkpoint's RNG must win
    state = checkpoint.load_checkpoint(path, model2, optimizer2)
    scheduler2.load_state_dict(state["scheduler"])
    sampler2 = ResumableSampler([5, 7], seed=3, batch_size=2)
    sampler2.load_state_dict(state["sampler"])
    assert state["step"] == 3 and sampler2.state_dict() == {"epoch": 0, "samples_seen": 6}
    assert set(state) == {"scheduler", "sampler", "step"}
    for param in params2.values():
        slots = optimizer2.state[param]
        assert set(slots) == {"step", "exp_avg", "exp_avg_sq"} and float(slots["step"]) == 3
        assert slots["exp_avg"].abs().sum() > 0
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(1e-2 / 4) and optimizer2.param_groups[0]["betas"] == (0.8, 0.95)
    step(model2, optimizer2, scheduler2)                                   # same batch (RNG), same moments
    for name, value in expected.items():
        assert torch.equal(params2[name], value), name
    assert list(sampler2) == expected_order


def test_only_the_newest_complete_checkpoints_are_kept_and_found(tmp_path):
    module = Tiny()
    optimizer = adamw(module)
    for s in (2, 4, 6):
        checkpoint.save_checkpoint(tmp_path, s, module, optimizer, {})
    (tmp_path / "checkpoints" / "step-000000008.tmp").mkdir()            # a save killed half-way
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000000004", "step-000000006", "step-000000008.tmp"]
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-000000006"


def test_resumed_run_takes_bit_identical_steps_to_an_uninterrupted_one(tmp_path):
    whole = Tiny()
    whole_optimizer = adamw(whole)
    train_steps(whole, whole_optimizer, range(4))

    first = Tiny()
    first_optimizer = adamw(first)
    train_steps(first, first_optimizer, range(2))
    path = checkpoint.save_checkpoint(tmp_path, 2, first, first_optimizer, {})
    resumed = Tiny()                                   # frozen weights from the "source", trainable ones at init
    resumed_optimizer = adamw(resumed)
    checkpoint.load_checkpoint(path, resumed, resumed_optimizer)
    train_steps(resumed, resumed_optimizer, range(2, 4))

    expected, got = snapshot(whole, whole_optimizer), snapshot(resumed, resumed_optimizer)
    assert expected.keys() == got.keys() and "emb.weight.exp_avg" in got
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert resumed_optimizer.param_groups[0]["betas"] == (0.8, 0.95)


@pytest.mark.parametrize("emb_trains", [True, False])
def test_frozen_parameters_are_neither_saved_nor_overwritten(emb_trains, tmp_path):
    module = Tiny(emb_trains)
    optimizer = adamw(module)
    train_steps(module, optimizer, range(1))
    path = checkpoint.save_checkpoint(tmp_path, 1, module, optimizer, {})
    trainable = ["emb.weight"] * emb_trains + ["proj.weight", "proj.bias"]   # the tied head: once, as emb
    assert sorted(load_file(path / "trainable.safetensors")) == sorted(trainable)
    assert sorted(load_file(path / "optimizer.safetensors")) == sorted(
        f"{name}.{slot}" for name in trainable for slot in ("step", "exp_avg", "exp_avg_sq"))

    fresh = Tiny(emb_trains)
    with torch.no_grad():
        fresh.enc.weight.fill_(7.0)                    # frozen: whatever the source holds must stay
    checkpoint.load_checkpoint(path, fresh, adamw(fresh))
    assert torch.equal(fresh.enc.weight, torch.full((5, 4), 7.0))
    assert torch.equal(fresh.proj.weight, module.proj.weight) and torch.equal(fresh.head.weight, module.emb.weight)


def test_a_checkpoint_of_another_trainable_set_is_refused_naming_parameters(tmp_path):
    projector_only = Tiny(emb_trains=False)
    optimizer = adamw(projector_only)
    train_steps(projector_only, optimizer, range(1))
    path = checkpoint.save_checkpoint(tmp_path, 1, projector_only, optimizer, {})
    module = Tiny(emb_trains=True)
    before = module.proj.weight.detach().clone()
    with pytest.raises(KdcacheError, match=r"emb\.weight.*another stage"):
        checkpoint.load_checkpoint(path, module, adamw(module))
    assert torch.equal(module.proj.weight, before)                       # refused before touching anything


# --- FSDP2: 2 torchrun ranks (gloo, CPU) <-> 1 process


def torchrun(mode: str, run_dir: Path) -> list[dict[str, torch.Tensor]]:
    """Run this file's worker on 2 ranks; returns each rank's local shards (see `worker`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             __file__, mode, str(run_dir)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return [load_file(run_dir / f"shards-rank{rank}.safetensors") for rank in (0, 1)]


def assert_shards_make(full: dict[str, torch.Tensor], shards: list[dict[str, torch.Tensor]]) -> None:
    """Each full tensor is the ranks' dim-0 shards concatenated (FSDP2 Shard(0)); 0-d steps are replicated."""
    for name, value in full.items():
        parts = [s[name] for s in shards]
        assert torch.equal(value, torch.cat(parts) if value.dim() else parts[0]), name
        assert value.dim() == 0 or all(len(p) < len(value) for p in parts), name      # really sharded


def test_fsdp2_checkpoint_of_two_ranks_loads_into_one_process_and_back(tmp_path):
    # 2 ranks train 2 steps and save: the files hold the shards gathered, exactly
    two = tmp_path / "two"
    shards = torchrun("save", two)
    path = checkpoint.latest_checkpoint(two)
    assert path == checkpoint.checkpoint_dir(two, 2)
    assert_shards_make(saved_tensors(path), shards)

    # 1 process loads them: its parameters and slots are the files' tensors, frozen ones its own
    module, source = Tiny(), Tiny()
    optimizer = adamw(module)
    assert checkpoint.load_checkpoint(path, module, optimizer) == {"written_by": 2, "step": 2}
    got = snapshot(module, optimizer)
    for name, value in saved_tensors(path).items():
        assert torch.equal(got[name], value), name
    assert torch.equal(module.enc.weight, source.enc.weight) and optimizer.param_groups[0]["betas"] == (0.8, 0.95)

    # it trains a step and saves; 2 ranks load that: their shards are the files' tensors, split
    train_steps(module, optimizer, range(2, 3))
    one = tmp_path / "one"
    path = checkpoint.save_checkpoint(one, 3, module, optimizer, {"written_by": 1})
    shards = torchrun("load", one)
    assert_shards_make(saved_tensors(path), shards)
    assert_shards_make({"enc.weight": source.enc.weight.detach()}, shards)
    assert all(torch.equal(s["scale"], source.scale) for s in shards)   # buffers are not sharded


def worker(mode: str, run_dir: Path) -> None:
    """One torchrun rank: FSDP2 like train.py (a unit per block, then the root); writes this rank's shards."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    run_dir.mkdir(parents=True, exist_ok=True)
    module = Tiny()
    fully_shard(module.proj)
    fully_shard(module)
    optimizer = adamw(module)                          # after sharding: it holds the DTensor parameters
    if mode == "save":
        train_steps(module, optimizer, range(2))
        checkpoint.save_checkpoint(run_dir, 2, module, optimizer, {"written_by": 2}, write=rank == 0)
    else:
        state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(run_dir), module, optimizer)
        assert state == {"written_by": 1, "step": 3} and optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    save_file({k: v.contiguous() for k, v in snapshot(module, optimizer).items()},
              run_dir / f"shards-rank{rank}.safetensors")
    dist.barrier()                                     # ranks leaving gloo at different times may abort at exit
    dist.destroy_process_group()
    # Skip the interpreter's teardown: about one full test run in eight, a rank died there with SIGABRT
    # ("terminate called without an active exception") after its files were written (gloo's threads).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
