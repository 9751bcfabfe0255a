"""Cache size and I/O at LLaVA-scale shapes: bytes per sample / token, write and read rates, loader rate.

Synthetic samples with the real shapes (vocabulary 151,936; 728 visual rows; ~200 response rows;
k = 64 for both roles; the 728 x 728 relation; an embedded ~60 KB JPEG; ~980 tokens) and
realistic value distributions (see `synthetic_sample`), written with `ShardWriter` (zstd 3) and
read back three ways:

* `CacheReader.read_sample` alone (decompress, validate, copy out): `read_samples_per_s`;
* `CacheDataset.__getitem__` (+ JPEG decode and SigLIP preprocessing at 384 px);
* `make_loader` with 2 workers, `ResumableSampler` order, `collate`: batches delivered per second.

Write and read rates are per core: samples per process-CPU second of a single-threaded process
(pyarrow threads off, as the reader uses them). The loader rate is wall-clock with its 2 worker
processes on the machine's 2 cores. Last stdout line: one JSON object.

    python benchmarks/bench_shards.py [--samples 128] [--batch-size 4] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from kdcache import schema, writer  # noqa: E402
from kdcache.batches import CacheDataset, make_loader  # noqa: E402
from kdcache.records import coerce_sample  # noqa: E402
from kdcache.models import siglip_image_processor  # noqa: E402
from kdcache.sampler import ResumableSampler  # noqa: E402
from kdcache.reader import CacheReader  # noqa: E402

GOAL_READ = 200.0
V, K, L, R = 151936, 64, common.VISUAL_LEN, common.RESPONSE_TOKENS
PREFIX, QUESTION = 31, 21
IMAGE_TOKEN = 151646                     # Qwen1.5's added "<image>" position, any id outside the text works


class Synth:
    """Value distributions close to a trained LLaVA teacher's, cheaply.

    * token ids follow a Zipf law (rank r has weight (r + 10)^-1.1) over a fixed permutation of the
      vocabulary, so common tokens recur across rows and samples as in real top-k lists;
    * a row's top-k log-probs are descending: top-1 probability ~ Beta(5, 2) for response rows
      (mean 0.71) and Beta(2, 5) for visual rows (0.29); the other k - 1 fall off as r^-s,
      s ~ U(1, 2), and the tail mass outside the top-k is ~ U(0.005, 0.05) (response) or
      U(0.1, 0.5) (visual); stored as float16 like the dump does;
    * the relation is `F Fᵀ / ||F Fᵀ||_F` for spatially smooth 27 x 27 patch features F (d = 32) on a
      common offset (visual-logit Gram matrices are dominated by the mean logit vector), float16.
    """

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        weights = (np.arange(V) + 10.0) ** -1.1
        self.cdf = np.cumsum(weights / weights.sum())
        self.vocab = self.rng.permutation(V).astype(np.int32)
        self.images = [common.make_image(seed * 100 + i) for i in range(8)]

    def token_ids(self, n: int) -> np.ndarray:
        return self.vocab[np.minimum(np.searchsorted(self.cdf, self.rng.random(n)), V - 1)]

    def topk(self, rows: int, top1: tuple[float, float], tail: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.empty((rows, K), np.int32)
        for i in range(rows):
            candidates = self.token_ids(4 * K)
            _, first = np.unique(candidates, return_index=True)
            unique = candidates[np.sort(first)]
            while len(unique) < K:                                   # rare: top up with uniform ids
                extra = self.rng.integers(0, V, K, dtype=np.int32)
                unique = np.concatenate([unique, extra[~np.isin(extra, unique)]])
            ids[i] = unique[:K]
        p1 = self.rng.beta(*top1, size=(rows, 1))
        tail_mass = self.rng.uniform(*tail, size=(rows, 1))
        decay = np.arange(2, K + 1)[None, :] ** -self.rng.uniform(1.0, 2.0, size=(rows, 1))   # (rows, K - 1)
        rest = decay / decay.sum(axis=1, keepdims=True) * np.clip(1.0 - p1 - tail_mass, 1e-3, None)
        probs = np.concatenate([np.maximum(p1, rest[:, :1]), rest], axis=1)
        probs = np.sort(probs, axis=1)[:, ::-1]
        return ids, np.log(probs).astype(np.float16)

    def relation(self) -> tuple[np.ndarray, float]:
        side = int(np.sqrt(L + 1))                                   # 27
        coarse = self.rng.normal(size=(7, 7, 32))
        grid = torch.nn.functional.interpolate(torch.tensor(coarse, dtype=torch.float32).permute(2, 0, 1)[None],
                                               size=(side, side), mode="bicubic", align_corners=True)[0]
        features = grid.permute(1, 2, 0).reshape(-1, 32).numpy()[1:] + self.rng.normal(0, 0.3, (L, 32))
        features = features + 3.0                                    # common offset
        matrix = features @ features.T                               # (L, L)
        norm = float(np.linalg.norm(matrix))
        rows, cols = np.triu_indices(L)
        return (matrix / norm)[rows, cols].astype(np.float16), norm

    def sample(self, index: int) -> dict:
        import hashlib

        response_len = R + int(self.rng.integers(-20, 21))           # ~200 response rows
        input_ids = np.concatenate([self.token_ids(PREFIX), np.full(L, IMAGE_TOKEN, np.int32),
                                    self.token_ids(QUESTION + response_len)]).astype(np.int32)
        T = len(input_ids)
        r_ids, r_lp = self.topk(response_len, (5, 2), (0.005, 0.05))
        v_ids, v_lp = self.topk(L, (2, 5), (0.1, 0.5))
        relation, norm = self.relation()
        image = self.images[index % len(self.images)]
        return {
            "sample_id": f"s{index:06d}", "input_ids": input_ids,
            "response_rows": np.arange(T - response_len - 1, T - 1, dtype=np.int32),
            "visual_start": PREFIX, "visual_len": L, "image": image, "image_sha256": hashlib.sha256(image).digest(),
            "response_topk_ids": r_ids, "response_topk_logprobs": r_lp,
            "visual_topk_ids": v_ids, "visual_topk_logprobs": v_lp, "relation": relation, "relation_norm": norm,
        }


def column_sizes(records: list[dict]) -> dict[str, tuple[float, float]]:
    """Per column, mean raw and zstd-3 bytes per sample (Arrow IPC compresses each buffer alone)."""
    codec = pa.Codec("zstd", 3)
    out = {}
    for name in schema.COLUMNS:
        raw = comp = 0
        for record in records:
            value = record[name]
            data = (value.tobytes() if isinstance(value, np.ndarray) else value if isinstance(value, bytes)
                    else np.asarray(value).tobytes() if value is not None else b"")
            raw += len(data)
            comp += len(codec.compress(data, asbytes=True)) if len(data) > 64 else len(data)
        out[name] = (raw / len(records), comp / len(records))
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


# --- measurements (in main's order: write, read, dataset, loader)


def measure_write(cache: Path, samples: list[dict]) -> tuple[dict, float, float]:
    """ShardWriter over all samples + rank report + finalize_cache: (manifest, CPU s, wall s)."""
    def write():
        with writer.ShardWriter(cache, rank=0, k_response=K, k_visual=K) as shard_writer:
            for sample in samples:
                shard_writer.write(sample)
        writer.write_rank_report(cache, 0, skipped=[])
        return writer.finalize_cache(cache, {"world_size": 1, "vocab_size": V, "visual_len": L,
                                             "image_token_id": IMAGE_TOKEN, "images_embedded": True,
                                             "temperature": {"response": 1.0, "visual": 1.0}})

    return common.measure(write)


def read_samples(cache: Path, indices) -> None:
    reader = CacheReader(cache)
    for i in indices:
        reader.read_sample(i)


def measure_reads(cache: Path, manifest: dict, num_samples: int) -> tuple[list[int], dict[str, tuple[float, float]]]:
    """The reader alone, sequential then in the sampler's (shuffled) order: (order, {name: (CPU s, wall s)})."""
    order = list(ResumableSampler([e["num_samples"] for e in manifest["shards"]], seed=0))
    read_samples(cache, range(4))                                 # warm the page cache
    _, seq_cpu, seq_wall = common.measure(lambda: read_samples(cache, range(num_samples)))
    _, rnd_cpu, rnd_wall = common.measure(lambda: read_samples(cache, order))
    return order, {"read_file_order": (seq_cpu, seq_wall), "read_sampler_order": (rnd_cpu, rnd_wall)}


def measure_dataset(cache: Path, order: list[int]) -> tuple[CacheDataset, float, float]:
    """`CacheDataset[i]` in the sampler's order (+ JPEG decode, SigLIP preprocessing): (dataset, CPU s, wall s)."""
    processor = siglip_image_processor(common.VISION["image_size"])
    dataset = CacheDataset(CacheReader(cache), processor)
    _, ds_cpu, ds_wall = common.measure(lambda: [dataset[i] for i in order])
    return dataset, ds_cpu, ds_wall


def measure_loader(dataset: CacheDataset, batch_size: int, workers: int) -> dict[str, float]:
    """One pass of `make_loader` (collated batches): worker start-up, steady and overall batches per wall second."""
    sampler = ResumableSampler(dataset.shard_sizes, seed=0, batch_size=batch_size)
    loader = make_loader(dataset, sampler, batch_size=batch_size, num_workers=workers, pad_id=0)
    start = time.perf_counter()
    arrivals = []
    for batch in loader:
        arrivals.append(time.perf_counter())
    startup = arrivals[0] - start
    steady = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else float("nan")
    total_rate = len(arrivals) / (arrivals[-1] - start)
    del loader
    return {"startup": startup, "steady": steady, "total_rate": total_rate}


# --- report


def print_column_table(sizes: dict[str, tuple[float, float]]) -> None:
    rows = [[name, f"{raw / 1e3:,.1f}", f"{comp / 1e3:,.1f}", f"{comp / raw:.2f}" if raw else "-"]
            for name, (raw, comp) in sizes.items() if raw > 0]
    rows.append(["total (columns)", f"{sum(r for r, _ in sizes.values()) / 1e3:,.1f}",
                 f"{sum(c for _, c in sizes.values()) / 1e3:,.1f}", ""])
    common.print_table("Bytes per sample by column (mean of 16 samples; zstd 3 per buffer as Arrow IPC does)",
                       ["column", "raw kB", "zstd kB", "ratio"], rows)


def print_cache_table(args, stats: dict, synth: Synth, cpu: dict[str, float], loader: dict[str, float]) -> None:
    n, steady = args.samples, loader["steady"]
    common.print_table(
        f"Cache of {n} samples: {stats['tokens'] / n:.0f} tokens, {L} visual + ~{R} response rows, k = {K}, relation, "
        f"~{np.mean([len(i) for i in synth.images]) / 1e3:.0f} kB JPEG each",
        ["measure", "value"],
        [["shard bytes per sample", f"{stats['bytes_per_sample'] / 1e3:,.1f} kB"],
         ["shard bytes per token", f"{stats['bytes_per_token']:,.0f} B"],
         ["mean tail mass (response / visual)", f"{stats['mean_tail_mass']['response']:.3f} / "
                                                f"{stats['mean_tail_mass']['visual']:.3f}"],
         ["write (ShardWriter + finalize), per core",
          f"{n / cpu['write']:,.1f} samples/CPU-s ({stats['num_bytes'] / cpu['write'] / 1e6:,.0f} MB/CPU-s)"],
         ["read_sample, file order, per core", f"{n / cpu['read_file_order']:,.1f} samples/CPU-s"],
         ["read_sample, sampler order, per core",
          f"{n / cpu['read_sampler_order']:,.1f} samples/CPU-s (goal >= {GOAL_READ:.0f})"],
         ["CacheDataset[i] (+ JPEG + SigLIP 384), per core", f"{n / cpu['dataset']:,.1f} samples/CPU-s"],
         [f"DataLoader, {args.workers} workers, batch {args.batch_size}, steady",
          f"{steady:,.2f} batches/s = {steady * args.batch_size:,.1f} samples/s (wall)"],
         [f"DataLoader incl. worker start ({loader['startup']:.2f} s)", f"{loader['total_rate']:,.2f} batches/s"]])


def result_json(args, info: dict, stats: dict, sizes: dict, timed: dict[str, tuple[float, float]],
                loader: dict[str, float], started: float) -> dict:
    n, steady = args.samples, loader["steady"]
    read_rate = n / timed["read_sampler_order"][0]
    return {
        "benchmark": "bench_shards", **info, "threads": args.threads, "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "read_samples_per_s": round(read_rate, 1), "read_samples_per_s_goal": GOAL_READ,
        "read_samples_per_s_goal_met": read_rate >= GOAL_READ,
        "read_samples_per_s_file_order": round(n / timed["read_file_order"][0], 1),
        "write_samples_per_s": round(n / timed["write"][0], 1),
        "dataset_samples_per_s": round(n / timed["dataset"][0], 1),
        "loader_batches_per_s": round(steady, 3), "loader_samples_per_s": round(steady * args.batch_size, 2),
        "loader_batches_per_s_incl_startup": round(loader["total_rate"], 3), "loader_workers": args.workers,
        "batch_size": args.batch_size,
        "bytes_per_sample": round(stats["bytes_per_sample"]), "bytes_per_token": round(stats["bytes_per_token"], 1),
        "tokens_per_sample": round(stats["tokens"] / n, 1), "samples": n,
        "column_kb_per_sample": {k: [round(r / 1e3, 2), round(c / 1e3, 2)] for k, (r, c) in sizes.items() if r},
        "wall_s": {"write": round(timed["write"][1], 2), "read_file_order": round(timed["read_file_order"][1], 2),
                   "read_sampler_order": round(timed["read_sampler_order"][1], 2),
                   "dataset": round(timed["dataset"][1], 2)},
        "elapsed_wall_s": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    args = parse_args()
    common.set_threads(args.threads)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    started = time.perf_counter()
    info = common.machine()
    synth = Synth()
    samples = [synth.sample(i) for i in range(args.samples)]

    with tempfile.TemporaryDirectory(prefix="kdcache-bench-shards-") as tmp:
        cache = Path(tmp) / "cache"
        manifest, write_cpu, write_wall = measure_write(cache, samples)
        sizes = column_sizes([coerce_sample(s, k_response=K, k_visual=K) for s in samples[:16]])
        order, reads = measure_reads(cache, manifest, args.samples)
        dataset, ds_cpu, ds_wall = measure_dataset(cache, order)
        loader = measure_loader(dataset, args.batch_size, args.workers)

    stats = manifest["stats"]
    timed = {"write": (write_cpu, write_wall), **reads, "dataset": (ds_cpu, ds_wall)}   # (CPU s, wall s)
    print_column_table(sizes)
    print_cache_table(args, stats, synth, {k: c for k, (c, _) in timed.items()}, loader)
    print(json.dumps(result_json(args, info, stats, sizes, timed, loader, started)))


if __name__ == "__main__":
    main()
