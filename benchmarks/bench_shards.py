"""Cache size and I/O at LLaVA-scale shapes: bytes per sample / token by role and codec, write and read
rates, fidelity of each codec, loader rate.

Synthetic samples with the real shapes (vocabulary 151,936; 728 visual rows; ~200 response rows;
k = 64 for both roles; the 728 x 728 relation; an embedded ~60 KB JPEG; ~980 tokens) and
realistic value distributions (see `Synth`), written with `ShardWriter` (zstd 3) once per codec
(`v1`, `lossless`, `compact`: bytes per sample and per token by role, write and read rates, the
relation's cosine to the exact one and the top-k KL of what is read back, see `measure_codec`) and,
with `--codec` (default `lossless`, the dump's default), read back three ways:

* `CacheReader.read_sample` alone (decompress, validate, copy out): `read_samples_per_s`;
* `CacheDataset.__getitem__` (+ JPEG decode and SigLIP preprocessing at 384 px);
* `make_loader` with 2 workers, `ResumableSampler` order, `collate`: batches delivered per second.

Write and read rates are per core: samples per process-CPU second of a single-threaded process
(pyarrow threads off, as the reader uses them; numpy's BLAS threads 1 unless OPENBLAS_NUM_THREADS /
OMP_NUM_THREADS / MKL_NUM_THREADS say otherwise). The loader rate is wall-clock with its 2 worker
processes on the machine's 2 cores. Last stdout line: one JSON object, its `codecs` key one entry per
codec, `relation_spectrum` the low-rank sizes as a function of the assumed spectral decay (`compact_kb`:
the relation under compact's codec, `lowrank8`; `int8col_kb` the one it replaced) and `ids_codecs_kb`
the top-k ids under each ids codec (`shuffle32`, `freqdict`). `codecs` also holds `sampled`: the same
samples with their visual rows sampled as `kdcache dump --visual-targets sampled` stores them (N = 16 draws
per row, the dump's default, from `bench_sampled.Rows`' full distributions: Synth's visual top-64 plus a
power-law tail), response rows top-k, `compact` codecs, a format 3 cache; its KL for the visual rows is the
sampled loss's estimate for a student equal to the teacher (`sampled_estimate`, as `kdcache.fidelity`
reports a sampled role), not a top-k KL.

    python benchmarks/bench_shards.py [--samples 128] [--batch-size 4] [--workers 2] [--codec lossless]
                                      [--relation-decay 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Rates are per core of a single-threaded process: numpy's BLAS (lowrank8's eigendecomposition and matmul)
# must be single-threaded too, which only works before numpy loads (idle BLAS threads spin, and their CPU time
# counted: 112 instead of 441 reads/s for `compact` on the 2-core machine of benchmarks/README.md, issue 10).
for _blas_threads in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_blas_threads, "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from synth import IMAGE_TOKEN, K, L, R, V, Synth  # noqa: E402

from kdcache import codecs, schema, writer  # noqa: E402
from kdcache.batches import CacheDataset, make_loader  # noqa: E402
from kdcache.records import coerce_sample  # noqa: E402
from kdcache.models import siglip_image_processor  # noqa: E402
from kdcache.sampler import ResumableSampler  # noqa: E402
from kdcache.reader import CacheReader  # noqa: E402

GOAL_READ = 200.0
CODECS = ("v1", "lossless", "compact")
DRAWS = 16                               # the dump's default --draws: the `sampled` entry's visual rows
SAMPLED, SAMPLED_CODEC = "sampled", "compact"     # visual rows sampled (N = DRAWS), response top-k, compact
SAMPLED_TARGETS = schema.targets_entry({"response": "topk", "visual": "sampled"}, {"response": K, "visual": DRAWS}, 0)
GOAL_BYTES = {"lossless": 330e3, "compact": 150e3}     # per sample, image excluded (issue 10)
GOAL_COSINE, GOAL_KL = 0.999, 1e-3
ROLE_COLUMNS = {"response": schema.TOPK_COLUMNS["response"], "visual": schema.TOPK_COLUMNS["visual"],
                "relation": (schema.RELATION, schema.RELATION_NORM), "image": (schema.IMAGE,),
                "sequence": (schema.SAMPLE_ID, schema.INPUT_IDS, schema.RESPONSE_ROWS, schema.VISUAL_START,
                             schema.VISUAL_LEN, schema.IMAGE_SHA256)}


def sampled_samples(samples: list[dict], synth: Synth, draws: int = DRAWS, seed: int = 1) -> tuple[list, dict]:
    """The samples with their visual rows sampled (RS-KD): each sample's visual rows as full distributions
    (`bench_sampled.Rows`: Synth's visual top-64 plus a power-law tail over the vocabulary), `draws` draws
    per row as the dump stores them (float16 log p, descending, repeats adjacent); response rows, relation
    and image unchanged. -> (samples, exact: sample id -> relation, response and drawn float64 log-probs)."""
    from bench_sampled import Rows

    rows_synth = Synth(seed)                       # its own draws: the other codecs' numbers stay as they were
    rng, out, exact = np.random.default_rng(seed), [], {}
    for sample in samples:
        ids, logp, _ = Rows(rows_synth, rng).draw(draws)                # (L, draws) each
        out.append({**sample, "visual_topk_ids": ids, "visual_topk_logprobs": logp})
        exact[sample["sample_id"]] = {**synth.exact[sample["sample_id"]], "visual": logp}
    return out, exact


def column_sizes(records: list[dict], codec_name: str = "v1") -> dict[str, tuple[float, float]]:
    """Per column, mean raw and zstd-3 bytes per sample (Arrow IPC compresses each buffer alone), each
    encoded column as `codec_name` stores it."""
    codec = pa.Codec("zstd", 3)
    column_codecs = schema.column_codecs(codec_name) or {}
    out = {}
    for name in schema.COLUMNS:
        raw = comp = 0
        for record in records:
            value = record[name]
            if name in column_codecs and value is not None:
                value = codecs.encode(column_codecs[name], value)
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
    parser.add_argument("--codec", choices=CODECS, default="lossless", help="codec of the dataset/loader passes")
    parser.add_argument("--relation-decay", type=float, default=1.0, help="assumed spectral decay of the relation")
    return parser.parse_args()


# --- measurements (in main's order: write, read, dataset, loader)


def measure_write(cache: Path, samples: list[dict], codec: str = "v1", k_visual: int = K,
                  targets: dict | None = None) -> tuple[dict, float, float]:
    """ShardWriter over all samples + rank report + finalize_cache: (manifest, CPU s, wall s). `targets`: the
    manifest's entry for sampled rows (`schema.targets_entry`; None: top-k)."""
    def write():
        with writer.ShardWriter(cache, rank=0, k_response=K, k_visual=k_visual, codec=codec) as shard_writer:
            for sample in samples:
                shard_writer.write(sample)
        writer.write_rank_report(cache, 0, skipped=[])
        return writer.finalize_cache(cache, {"world_size": 1, "vocab_size": V, "visual_len": L,
                                             "image_token_id": IMAGE_TOKEN, "images_embedded": True,
                                             "temperature": {"response": 1.0, "visual": 1.0},
                                             **({} if targets is None else {"targets": targets})})

    return common.measure(write)


def read_samples(cache: Path, indices) -> None:
    reader = CacheReader(cache)
    for i in indices:
        reader.read_sample(i)


def relation_cosine(stored: np.ndarray, exact: np.ndarray) -> float:
    """Cosine of the full symmetric matrix of a stored triangle to the exact (L, L) one."""
    full = np.zeros_like(exact)
    rows, cols = np.triu_indices(len(exact))
    full[rows, cols] = stored
    full[cols, rows] = stored
    return float((full * exact).sum() / (np.linalg.norm(full) * np.linalg.norm(exact)))


def topk_kl(stored: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """(N,) KL(stored || exact) in nats per row, both renormalised over the row's k entries."""
    q = np.exp(stored.astype(np.float64))
    q /= q.sum(axis=1, keepdims=True)
    log_p = exact - np.log(np.exp(exact).sum(axis=1, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, q * (np.log(q) - log_p), 0.0)
    return terms.sum(axis=1)


def sampled_estimate(stored: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """(N,) the sampled loss's KL estimate for a student equal to the teacher, per row of draws: (1/N) Σ_j
    (log p̂(x_j) - log p(x_j)), stored against exact log-probs (`kdcache.fidelity`'s measure of a sampled
    role). Signed, 0 for exact values: what the codec adds to the loss's value (its gradient never reads the
    stored log-probs); the estimate's Monte-Carlo noise is bench_sampled.py's."""
    return (stored.astype(np.float64) - exact).mean(axis=1)


def measure_codec(root: Path, codec: str, samples: list[dict], exact: dict[str, dict], *, name: str | None = None,
                  k_visual: int = K, targets: dict | None = None) -> dict:
    """One codec: write a cache of `samples`, read it in the sampler's order (timed), then compare every
    sample read back with the exact values (`exact`: sample id -> relation, per role float64 log-probs of
    the stored entries): the relation's cosine; per row, the top-k KL (`topk_kl`), or for a sampled role
    (`targets`) the sampled loss's estimate for a student equal to the teacher (`sampled_estimate`)."""
    cache = root / (name or codec)
    manifest, write_cpu, _ = measure_write(cache, samples, codec, k_visual, targets)
    kinds = schema.target_kinds(manifest)
    order = list(ResumableSampler([e["num_samples"] for e in manifest["shards"]], seed=0))
    read_samples(cache, range(4))
    _, read_cpu, _ = common.measure(lambda: read_samples(cache, order))
    reader, cosines, kls = CacheReader(cache), [], {"response": [], "visual": []}
    for i in range(len(reader)):
        got = reader.read_sample(i)
        want = exact[got["sample_id"]]
        cosines.append(relation_cosine(got["relation"].astype(np.float64), want["relation"]))
        for role in kls:
            row_kl = sampled_estimate if kinds[role] == "sampled" else topk_kl
            kls[role].append(row_kl(got[schema.TOPK_COLUMNS[role][1]], want[role]))
    stats, n = manifest["stats"], len(samples)
    kl_all = np.concatenate(kls["response"] + kls["visual"])
    excl_image = (stats["num_bytes"] - stats["image_bytes"]) / n
    return {"bytes_per_sample_excl_image": round(excl_image),
            "bytes_per_token": round(excl_image / (stats["tokens"] / n), 1),
            "bytes_per_sample": round(stats["bytes_per_sample"]), "read_samples_per_s": round(n / read_cpu, 1),
            "write_samples_per_s": round(n / write_cpu, 1), "relation_cosine_min": round(min(cosines), 7),
            "kl_mean_nats": float(f"{kl_all.mean():.3g}"), "kl_max_nats": float(f"{kl_all.max():.3g}"),
            "kl_mean_nats_by_role": {role: float(f"{np.concatenate(v).mean():.3g}") for role, v in kls.items()},
            "format_version": manifest["format_version"]}


def role_bytes(sizes: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Compressed bytes per sample by role (`ROLE_COLUMNS`) from `column_sizes`."""
    return {role: round(sum(sizes[c][1] for c in columns)) for role, columns in ROLE_COLUMNS.items()}


def relation_spectrum(synth: Synth, decays=(0.5, 1.0, 1.5), count: int = 3) -> dict:
    """Per assumed decay: the rank a truncated eigendecomposition needs for cosine >= 0.999 (mean, max over
    `count` relations), what a float16 factor Z (L x r) of that rank takes, the stored relation's compressed
    size under `shuffle16` (lossless), `int8col` (compact before) and `lowrank8` (compact: its rank, size,
    cosine to the exact matrix and encode CPU time per sample)."""
    zstd, rows, out = pa.Codec("zstd", 3), np.triu_indices(L), {}
    for decay in decays:
        ranks, lossless, int8col, low, low_ranks, low_cos, low_cpu = [], [], [], [], [], [], []
        for _ in range(count):
            exact = synth.exact_relation(decay)
            energy = np.sort(np.linalg.eigvalsh(exact) ** 2)[::-1]
            ranks.append(int(np.searchsorted(np.sqrt(np.cumsum(energy) / energy.sum()), GOAL_COSINE) + 1))
            stored = exact[rows].astype(np.float16)
            lossless.append(len(zstd.compress(codecs.encode(codecs.SHUFFLE16, stored), asbytes=True)))
            int8col.append(len(zstd.compress(codecs.encode(codecs.INT8COL, stored), asbytes=True)))
            payload, cpu, _ = common.measure(lambda: codecs.encode(codecs.LOWRANK8, stored))
            low.append(len(zstd.compress(payload, asbytes=True)))
            low_ranks.append(int(np.frombuffer(payload[4:8], np.uint32)[0]))
            low_cos.append(relation_cosine(codecs.decode(codecs.LOWRANK8, np.frombuffer(payload, np.uint8))
                                           .astype(np.float64), exact))
            low_cpu.append(cpu)
        out[str(decay)] = {"rank_for_cosine_0.999_mean": round(float(np.mean(ranks)), 1),
                           "rank_for_cosine_0.999_max": max(ranks),
                           "lowrank_float16_kb": round(max(ranks) * L * 2 / 1e3, 1),
                           "lossless_kb": round(np.mean(lossless) / 1e3, 1),
                           "compact_kb": round(np.mean(low) / 1e3, 1), "int8col_kb": round(np.mean(int8col) / 1e3, 1),
                           "lowrank8_rank_mean": round(float(np.mean(low_ranks)), 1),
                           "lowrank8_rank_max": max(low_ranks), "lowrank8_cosine_min": round(min(low_cos), 6),
                           "lowrank8_encode_ms": round(1e3 * float(np.mean(low_cpu)), 1)}
    return out


def ids_codecs(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per role, zstd-3 kB per sample of the top-k ids under each ids codec (`shuffle32`, `freqdict`)."""
    zstd, out = pa.Codec("zstd", 3), {}
    for role, (ids_column, _) in schema.TOPK_COLUMNS.items():
        out[role] = {name: round(float(np.mean([len(zstd.compress(codecs.encode(name, r[ids_column]), asbytes=True))
                                                for r in records])) / 1e3, 1)
                     for name in codecs.KIND_CODECS["ids"]}
    return out


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


def print_codec_tables(results: dict, roles: dict, spectrum: dict, decay: float) -> None:
    rows = []
    for codec, r in results.items():
        goal = GOAL_BYTES.get(codec)
        met = (r["read_samples_per_s"] >= GOAL_READ and (goal is None or r["bytes_per_sample_excl_image"] <= goal)
               and (codec != "compact" or (r["relation_cosine_min"] >= GOAL_COSINE and r["kl_mean_nats"] <= GOAL_KL)))
        size = f"{r['bytes_per_sample_excl_image'] / 1e3:,.1f}" + (f" (<= {goal / 1e3:.0f})" if goal else "")
        label = f"{codec} (visual N = {DRAWS}, {SAMPLED_CODEC})" if codec == SAMPLED else codec
        rows.append([label, size,
                     f"{r['bytes_per_token']:,.0f}", *(f"{roles[codec][role] / 1e3:,.1f}" for role in ROLE_COLUMNS),
                     f"{r['write_samples_per_s']:,.1f}", f"{r['read_samples_per_s']:,.1f}",
                     f"{r['relation_cosine_min']:.6f}", f"{r['kl_mean_nats']:.2e}",
                     "-" if codec == SAMPLED else "yes" if met else "no"])
    common.print_table(f"Codecs (relation spectral decay {decay}): kB per sample excl. image, by role (zstd 3 per "
                       "buffer), rates per core", ["codec", "kB/sample", "B/token", *(f"{r} kB" for r in ROLE_COLUMNS),
                                                   "write/s", "read/s", "rel. cos min", "KL mean", "targets"], rows)
    print(f"KL mean: per top-k row KL(read || exact top-k), both renormalised over the k entries; per sampled row "
          f"({SAMPLED}'s visual rows) the sampled loss's estimate for a student equal to the teacher, (1/N) sum "
          "(log p_read - log p_exact) over the draws, signed (what the codec adds to the loss's value).")
    common.print_table("Relation: rank for cosine >= 0.999 and stored size, by assumed spectral decay n^-decay",
                       ["decay", "rank mean / max", "low-rank Z fp16 kB", "lossless kB", "int8col kB",
                        "lowrank8 kB", "lowrank8 rank mean / max", "lowrank8 cos min", "lowrank8 encode ms"],
                       [[d, f"{v['rank_for_cosine_0.999_mean']} / {v['rank_for_cosine_0.999_max']}",
                         v["lowrank_float16_kb"], v["lossless_kb"], v["int8col_kb"], v["compact_kb"],
                         f"{v['lowrank8_rank_mean']} / {v['lowrank8_rank_max']}", f"{v['lowrank8_cosine_min']:.6f}",
                         v["lowrank8_encode_ms"]] for d, v in spectrum.items()])


def print_ids_table(ids: dict[str, dict[str, float]]) -> None:
    names = list(next(iter(ids.values())))
    common.print_table("Top-k ids by ids codec: kB per sample (zstd 3, 16 samples)", ["role", *names],
                       [[role, *(f"{sizes[n]:.1f}" for n in names)] for role, sizes in ids.items()])


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
    synth = Synth(decay=args.relation_decay)
    samples = [synth.sample(i) for i in range(args.samples)]

    with tempfile.TemporaryDirectory(prefix="kdcache-bench-shards-") as tmp:
        cache = Path(tmp) / "cache"
        manifest, write_cpu, write_wall = measure_write(cache, samples, args.codec)
        coerced = [coerce_sample(s, k_response=K, k_visual=K) for s in samples[:16]]
        sizes = column_sizes(coerced, args.codec)
        order, reads = measure_reads(cache, manifest, args.samples)
        dataset, ds_cpu, ds_wall = measure_dataset(cache, order)
        loader = measure_loader(dataset, args.batch_size, args.workers)
        results = {codec: measure_codec(Path(tmp), codec, samples, synth.exact) for codec in CODECS}
        drawn, drawn_exact = sampled_samples(samples, synth)
        results[SAMPLED] = measure_codec(Path(tmp), SAMPLED_CODEC, drawn, drawn_exact, name=SAMPLED, k_visual=DRAWS,
                                         targets=SAMPLED_TARGETS)
    roles = {codec: role_bytes(column_sizes(coerced, codec)) for codec in CODECS}
    roles[SAMPLED] = role_bytes(column_sizes([coerce_sample(s, k_response=K, k_visual=DRAWS) for s in drawn[:16]],
                                             SAMPLED_CODEC))
    spectrum = relation_spectrum(synth)
    ids = ids_codecs(coerced)

    stats = manifest["stats"]
    timed = {"write": (write_cpu, write_wall), **reads, "dataset": (ds_cpu, ds_wall)}   # (CPU s, wall s)
    print_column_table(sizes)
    print_cache_table(args, stats, synth, {k: c for k, (c, _) in timed.items()}, loader)
    print_codec_tables(results, roles, spectrum, args.relation_decay)
    print_ids_table(ids)
    print(json.dumps({**result_json(args, info, stats, sizes, timed, loader, started), "codec": args.codec,
                      "relation_decay": args.relation_decay, "codecs": results, "bytes_by_role": roles,
                      "relation_spectrum": spectrum, "ids_codecs_kb": ids}))


if __name__ == "__main__":
    main()
