"""The training data order: shard-windowed shuffle, equal split across ranks, exact resume.

The order of an epoch is a pure function of (seed, epoch, shard table), so every rank computes
the same global order without talking to the others, and a resumed run recomputes the order it
was killed in. Shuffling is two-level, as in mosaicml/streaming: shards are shuffled, then the
rows of each window of `window` consecutive shards are shuffled together, so a reader only keeps
~`window` shards hot at a time while the order still mixes samples across shards.

Split across ranks (docs/design.md §7, equal counts per rank). With `G = world_size * batch_size` samples
per optimizer step, the global order is cut into steps of G; rank r takes positions r::world_size
of every step, i.e. positions r, r + W, r + 2W, ... of the global order. The union of the ranks'
samples in a step is therefore exactly the step of a single process with the same global batch,
and a run resumed on a different number of ranks (same global batch) continues the same order.

Remainder policy: the global order is truncated to a whole number of steps (the last partial
global batch is dropped), so no sample is seen twice within an epoch and every rank gets the same
count. The exception is a dataset smaller than one global batch: then the order is wrapped
(repeated cyclically) up to exactly one step rather than producing an empty epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def sample_order(shard_sizes: Sequence[int], *, seed: int, epoch: int, window: int = 4) -> list[int]:
    """A permutation of range(sum(shard_sizes)), the global sample order of one epoch.

    Global index i lives in the shard whose cumulative-size range contains it (shard 0 holds
    0..shard_sizes[0]-1, and so on). The shard order is shuffled, then each run of `window`
    consecutive shards of that order contributes one shuffled block of its rows, so every block
    of the result touches at most `window` shards. Deterministic in (seed, epoch, shard_sizes).
    """
    return _order_array(shard_sizes, seed=seed, epoch=epoch, window=window).tolist()


def _order_array(shard_sizes: Sequence[int], *, seed: int, epoch: int, window: int) -> np.ndarray:
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    if (sizes < 0).any():
        raise ValueError(f"shard sizes must be >= 0, got {list(shard_sizes)}")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    rng = np.random.default_rng([int(seed), int(epoch)])  # independent stream per (seed, epoch)
    shard_perm = rng.permutation(len(sizes))
    blocks = []
    for w in range(0, len(shard_perm), window):
        group = shard_perm[w:w + window]
        block = np.concatenate([np.arange(starts[s], starts[s] + sizes[s]) for s in group])
        rng.shuffle(block)
        blocks.append(block)
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)


class ResumableSampler(Sampler[int]):
    """This rank's global sample indices for the current epoch, resumable mid-epoch.

    Args:
        shard_sizes: samples per shard, in the order the dataset numbers them globally.
        seed, window: see `sample_order`.
        rank, world_size: this process's place in the job.
        batch_size: samples ONE rank consumes per optimizer step (per-device batch x gradient
            accumulation); the global step is `world_size * batch_size`.

    `len(self)` is this rank's count per epoch, equal on every rank and a multiple of
    `batch_size`. The sampler cannot know what the training loop has consumed (a DataLoader
    prefetches), so the loop reports it: `advance(n)` after each optimizer step, n counted
    globally (all ranks). `state_dict()` is `{"epoch", "samples_seen"}`; after `load_state_dict`
    iteration starts at the first unseen sample, so a resumed run sees the same sequence as an
    uninterrupted one. Holds no file handles (pure index arithmetic).
    """

    def __init__(self, shard_sizes: Sequence[int], *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1, window: int = 4):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.shard_sizes = [int(s) for s in shard_sizes]
        self.seed, self.window = int(seed), int(window)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.epoch = 0
        self.samples_seen = 0          # global: summed over ranks, since the start of self.epoch

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    @property
    def epoch_samples(self) -> int:
        """Global samples per epoch after the drop/wrap policy (a multiple of the global batch)."""
        n, g = sum(self.shard_sizes), self.global_batch
        if n == 0:
            return 0
        return g if n < g else n - n % g

    def __len__(self) -> int:
        return self.epoch_samples // self.world_size

    def global_order(self) -> np.ndarray:
        """The whole epoch's order after truncation (or wrapping), before the rank split."""
        order = _order_array(self.shard_sizes, seed=self.seed, epoch=self.epoch, window=self.window)
        total = self.epoch_samples
        return np.resize(order, total) if len(order) < total else order[:total]

    def __iter__(self) -> Iterator[int]:
        # Materialised now, so an advance() during iteration cannot shift the running epoch.
        order = self.global_order()
        first = self.samples_seen + (self.rank - self.samples_seen) % self.world_size  # first p >= seen, p = rank mod W
        return iter(order[first::self.world_size].tolist())

    def advance(self, num_samples: int) -> None:
        """Record that the job consumed `num_samples` more samples (global, all ranks together)."""
        self.samples_seen += int(num_samples)

    def set_epoch(self, epoch: int) -> None:
        """Switch to `epoch`, starting it from its first sample; a no-op for the current epoch
        (so calling it after `load_state_dict` does not lose the resume position)."""
        if int(epoch) != self.epoch:
            self.epoch, self.samples_seen = int(epoch), 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.samples_seen = int(state["epoch"]), int(state["samples_seen"])
