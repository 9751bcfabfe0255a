"""Training data from a cache URL: samples per second and bytes moved per epoch, from S3 on loopback (moto)
with a cold and a warm shard cache, against the same cache on local disk.

A cache of LLaVA-shaped synthetic samples (`synth.Synth`: 728 visual rows, ~200 response rows,
k = 64, the relation, an embedded JPEG) is written locally, pushed to moto's S3 server on 127.0.0.1
(a subprocess, tests/servers.py, which counts the bytes it sends), and read for one epoch through
the training data path: `CacheDataset` (rows checked, JPEG decoded, SigLIP preprocessing) ->
DataLoader with N workers in `ResumableSampler` order, with the shard prefetcher on, as `kdcache
train` reads it. Three sources per worker count:

* `local`: the directory itself;
* `cold`: the URL with an empty shard cache (every shard downloaded once, verified, then read);
* `warm`: the URL again, with the shard cache the cold epoch filled (nothing downloaded).

Samples/s = samples of the epoch / seconds from the first batch request to the last batch (opening
the cache, a manifest read, is reported apart as `open_s`). Bytes moved = body bytes the server sent for GET requests during the epoch (the manifest included).
Targets (issue 11): warm within 10% of local (`warm_over_local` >= 0.9), and bytes moved per epoch
<= 1.05 x the cache's size for every worker count. Each epoch is timed `--rounds` times (a fresh
shard cache for each cold round), best of them kept. Last stdout line: one JSON object.

    python benchmarks/bench_remote.py [--samples 96] [--shard-mb 8] [--batch-size 4] [--workers 0 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import synth  # noqa: E402
import common  # noqa: E402
from servers import Server  # noqa: E402

from kdcache import writer  # noqa: E402
from kdcache.batches import CacheDataset, make_loader  # noqa: E402
from kdcache.models import siglip_image_processor  # noqa: E402
from kdcache.reader import CacheReader  # noqa: E402
from kdcache.remote import Remote, RemoteConfig  # noqa: E402
from kdcache.sampler import ResumableSampler  # noqa: E402
from kdcache.transfer import push_cache  # noqa: E402

BUCKET, KEY, SECRET = "bench", "bench-key", "bench-secret"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--shard-mb", type=float, default=8.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def write_cache(cache: Path, samples: int, shard_mb: float) -> dict:
    """`samples` synthetic LLaVA-shaped samples in shards of about `shard_mb` MiB; the manifest."""
    source, K = synth.Synth(), synth.K
    with writer.ShardWriter(cache, rank=0, k_response=K, k_visual=K,
                            shard_size_bytes=int(shard_mb * (1 << 20))) as shard_writer:
        for i in range(samples):
            shard_writer.write(source.sample(i))
    writer.write_rank_report(cache, 0, skipped=[])
    return writer.finalize_cache(cache, {"world_size": 1, "vocab_size": synth.V, "visual_len": synth.L,
                                         "image_token_id": synth.IMAGE_TOKEN, "images_embedded": True,
                                         "temperature": {"response": 1.0, "visual": 1.0}})


def epoch(cache: str, remote: RemoteConfig | None, batch_size: int, workers: int) -> tuple[float, float, int]:
    """One epoch through the training data path: (seconds to open the cache, seconds of the epoch, samples).

    Opening reads the manifest (for S3: also sets up the client, ~0.2 s, once per run); the epoch is
    timed from the first request for a batch to the last batch.
    """
    processor = siglip_image_processor(common.VISION["image_size"])
    start = time.perf_counter()
    dataset = CacheDataset(CacheReader(cache, remote=remote), processor)
    opened = time.perf_counter()
    sampler = ResumableSampler(dataset.shard_sizes, seed=0, batch_size=batch_size)
    dataset.prefetch(sampler)
    loader = make_loader(dataset, sampler, batch_size=batch_size, num_workers=workers, pad_id=0)
    seen = 0
    for batch in loader:
        seen += len(batch["sample_id"])
        sampler.advance(len(batch["sample_id"]))         # as StatefulLoader does: where the prefetcher looks
    elapsed = time.perf_counter() - opened
    del loader, dataset
    return opened - start, elapsed, seen


def get_bytes(server: Server) -> int:
    return sum(n for key, n in server.requests()["bytes"].items() if key.startswith("GET "))


def measure(server: Server, url: str, local: Path, tmp: Path, args, workers: int) -> dict:
    """Best of `rounds` epochs per source: samples/s, and bytes moved per epoch for the URL sources."""
    base = RemoteConfig(storage_option=(f"endpoint_url={server.url}", f"key={KEY}", f"secret={SECRET}"))
    out = {"local": 0.0, "cold": 0.0, "warm": 0.0, "cold_bytes": 0, "warm_bytes": 0, "open_s": {}}
    for r in range(args.rounds):
        opening, seconds, n = epoch(str(local), None, args.batch_size, workers)
        out["local"] = max(out["local"], n / seconds)
        out["open_s"]["local"] = opening
        config = dataclasses.replace(base, cache_dir=str(tmp / f"shard-cache-{workers}-{r}"))
        for source in ("cold", "warm"):
            server.reset()
            opening, seconds, n = epoch(url, config, args.batch_size, workers)
            out[source] = max(out[source], n / seconds)
            out[f"{source}_bytes"] = max(out[f"{source}_bytes"], get_bytes(server))
            out["open_s"][source] = opening
    return out


def main() -> None:
    args = parse_args()
    common.set_threads(args.threads)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    started, info = time.perf_counter(), common.machine()
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-remote-") as scratch:
        tmp = Path(scratch)
        manifest = write_cache(tmp / "cache", args.samples, args.shard_mb)
        server = Server.start("s3")
        try:
            config = RemoteConfig(storage_option=(f"endpoint_url={server.url}", f"key={KEY}", f"secret={SECRET}"))
            Remote(f"s3://{BUCKET}/x", config).fs.mkdir(BUCKET)
            url = f"s3://{BUCKET}/cache"
            push_cache(tmp / "cache", url, remote=config, verify=False)
            for workers in args.workers:
                results[workers] = measure(server, url, tmp / "cache", tmp, args, workers)
        finally:
            server.stop()
    size = manifest["stats"]["num_bytes"]
    rows = [[w, common.fmt(r["local"], 1), common.fmt(r["cold"], 1), common.fmt(r["warm"], 1),
             common.fmt(r["warm"] / r["local"]), common.fmt(r["cold_bytes"] / size), common.fmt(r["warm_bytes"] / size)]
            for w, r in results.items()]
    common.print_table(f"One epoch, {args.samples} samples in {len(manifest['shards'])} shards, "
                       f"{size / 2**20:.1f} MiB (samples/s, best of {args.rounds}; bytes moved / cache size)",
                       ["workers", "local", "S3 cold", "S3 warm", "warm/local", "cold bytes", "warm bytes"], rows)
    summary = {
        "benchmark": "bench_remote", **info, "samples": args.samples, "shards": len(manifest["shards"]),
        "cache_bytes": size, "batch_size": args.batch_size, "rounds": args.rounds,
        "per_workers": {str(w): r for w, r in results.items()},
        "warm_over_local_min": min(r["warm"] / r["local"] for r in results.values()),
        "cold_bytes_over_cache_max": max(r["cold_bytes"] / size for r in results.values()),
        "goals": {"warm_over_local_min": ">= 0.9", "cold_bytes_over_cache_max": "<= 1.05"},
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps(common.rounded(summary)))


if __name__ == "__main__":
    main()
