"""The training order: shard-windowed shuffle, rank split, pad/drop policy, exact resume."""

import numpy as np
import pytest

from kdcache.sampler import ResumableSampler, sample_order

SHARDS = [7, 3, 0, 5, 9, 4, 6, 2, 8]     # uneven, one empty shard


def shard_of(shard_sizes):
    """Global index -> shard number."""
    return np.repeat(np.arange(len(shard_sizes)), shard_sizes)


def steps(sampler: ResumableSampler) -> list[list[int]]:
    """This rank's samples, cut into its per-step batches."""
    order = list(sampler)
    return [order[i:i + sampler.batch_size] for i in range(0, len(order), sampler.batch_size)]


def test_sample_order_is_a_deterministic_permutation_per_seed_and_epoch():
    a = sample_order(SHARDS, seed=3, epoch=0)
    assert sorted(a) == list(range(sum(SHARDS)))
    assert a == sample_order(SHARDS, seed=3, epoch=0)
    assert a != sample_order(SHARDS, seed=3, epoch=1)
    assert a != sample_order(SHARDS, seed=4, epoch=0)


def test_sample_order_never_needs_more_than_window_shards_open_at_once():
    sizes = [5, 8, 1, 6, 7, 3, 9, 4, 2, 6, 5]
    owner = shard_of(sizes)
    for window in (1, 2, 3, 4):
        order = sample_order(sizes, seed=1, epoch=2, window=window)
        left = dict(enumerate(sizes))          # shard -> rows not yet visited
        open_shards, most_open = set(), 0
        for i in order:
            s = int(owner[i])
            open_shards.add(s)
            most_open = max(most_open, len(open_shards))
            left[s] -= 1
            if left[s] == 0:
                open_shards.discard(s)
        assert most_open <= window
    assert most_open > 1                     # window 4 really mixes shards


def test_sample_order_windows_touch_at_most_window_shards_between_block_boundaries():
    sizes = [4, 4, 4, 4, 4, 4, 4, 4, 4, 4]        # equal sizes: blocks of window * 4 rows
    owner = shard_of(sizes)
    order = np.array(sample_order(sizes, seed=0, epoch=0, window=3))
    bounds = [0, 12, 24, 36, 40]
    for a, b in zip(bounds, bounds[1:]):
        assert len(set(owner[order[a:b]])) == (b - a) // 4


def test_sample_order_of_an_empty_table_is_empty():
    assert sample_order([], seed=0, epoch=0) == []
    assert sample_order([0, 0], seed=0, epoch=0) == []


def test_ranks_get_equal_counts_and_disjoint_samples_whose_union_per_step_is_the_single_process_step():
    world, per_rank = 3, 4
    single = ResumableSampler(SHARDS, seed=5, batch_size=world * per_rank)
    ranks = [ResumableSampler(SHARDS, seed=5, rank=r, world_size=world, batch_size=per_rank) for r in range(world)]
    counts = {len(s) for s in ranks}
    assert counts == {len(list(ranks[0]))} and len(ranks[0]) % per_rank == 0
    all_samples = [i for s in ranks for i in s]
    assert len(all_samples) == len(set(all_samples))                        # disjoint, nothing twice
    rank_steps = [steps(s) for s in ranks]
    for step, expected in enumerate(steps(single)):
        union = sorted(i for r in range(world) for i in rank_steps[r][step])
        assert union == sorted(expected)


def test_the_remainder_of_the_last_global_batch_is_dropped():
    sampler = ResumableSampler([10, 7], seed=0, world_size=2, batch_size=4, rank=1)   # 17 samples, step 8
    assert sampler.epoch_samples == 16 and len(sampler) == 8
    assert len(list(sampler)) == 8


def test_a_dataset_smaller_than_one_global_batch_is_wrapped_to_one_step():
    ranks = [ResumableSampler([3, 2], seed=0, rank=r, world_size=2, batch_size=4) for r in range(2)]
    got = [list(s) for s in ranks]
    assert [len(g) for g in got] == [4, 4]
    assert set(got[0] + got[1]) == set(range(5))                              # every sample at least once


def test_an_empty_dataset_gives_an_empty_epoch():
    sampler = ResumableSampler([], seed=0, batch_size=4)
    assert len(sampler) == 0 and list(sampler) == []


def test_resume_from_state_dict_mid_epoch_continues_with_exactly_the_remaining_sequence():
    world, per_rank = 2, 3
    uninterrupted = [list(ResumableSampler(SHARDS, seed=9, rank=r, world_size=world, batch_size=per_rank))
                     for r in range(world)]
    first = ResumableSampler(SHARDS, seed=9, world_size=world, batch_size=per_rank)
    for _ in range(2):                                                        # two optimizer steps
        first.advance(world * per_rank)
    state = first.state_dict()
    assert state == {"epoch": 0, "samples_seen": 12}
    for r in range(world):
        resumed = ResumableSampler(SHARDS, seed=9, rank=r, world_size=world, batch_size=per_rank)
        resumed.load_state_dict(state)
        resumed.set_epoch(0)                                                  # same epoch: keeps the position
        assert list(resumed) == uninterrupted[r][2 * per_rank:]


def test_resume_on_a_different_world_size_with_the_same_global_batch_continues_the_same_global_order():
    single = ResumableSampler(SHARDS, seed=2, batch_size=6)
    single.advance(6)
    remaining = list(single)
    state = single.state_dict()
    ranks = []
    for r in range(3):
        s = ResumableSampler(SHARDS, seed=2, rank=r, world_size=3, batch_size=2)
        s.load_state_dict(state)
        ranks.append(steps(s))
    for step, expected in enumerate(remaining[i:i + 6] for i in range(0, len(remaining), 6)):
        assert sorted(i for r in range(3) for i in ranks[r][step]) == sorted(expected)


def test_set_epoch_reshuffles_and_restarts_the_epoch():
    sampler = ResumableSampler(SHARDS, seed=0, batch_size=4)
    epoch0 = list(sampler)
    sampler.advance(len(epoch0))
    assert list(sampler) == []                                                # epoch used up
    sampler.set_epoch(1)
    assert sampler.state_dict() == {"epoch": 1, "samples_seen": 0}
    epoch1 = list(sampler)
    assert len(epoch1) == len(epoch0) and epoch1 != epoch0


def test_an_iteration_in_progress_is_not_shifted_by_advance():
    sampler = ResumableSampler(SHARDS, seed=0, batch_size=4)
    expected = list(sampler)
    it = iter(sampler)
    got = [next(it) for _ in range(4)]
    sampler.advance(4)
    got += list(it)
    assert got == expected


def test_bad_rank_or_batch_size_is_refused():
    with pytest.raises(ValueError):
        ResumableSampler(SHARDS, rank=2, world_size=2)
    with pytest.raises(ValueError):
        ResumableSampler(SHARDS, batch_size=0)
