"""Datasets, collate and DataLoader: the batch dict of docs/design.md §7, from hand samples and caches."""

import hashlib
import json
import pickle
from functools import partial

import numpy as np
import pytest
import torch

from kdcache import models, samples
from kdcache.batches import CacheDataset, JsonDataset, StatefulLoader, collate, make_loader, pad_sequences
from kdcache.errors import KdcacheError, SampleError
from kdcache.sampler import ResumableSampler
from kdcache.reader import CacheReader
from kdcache.writer import ShardWriter, finalize_cache, write_rank_report

PAD = 0
S = 4            # image side of the hand samples


def hand_sample(sample_id, length, response_rows, visual_start=0, visual_len=0, *, k_r=3, k_v=2,
                relation=True, targets=True):
    """A per-sample dict as the datasets return it, with recognisable values."""
    g = torch.Generator().manual_seed(len(sample_id) + length)
    sample = {
        "sample_id": sample_id,
        "input_ids": torch.arange(1, length + 1, dtype=torch.int32) + 100 * len(sample_id),
        "response_rows": torch.tensor(response_rows, dtype=torch.int32),
        "visual_start": visual_start,
        "visual_len": visual_len,
        "pixel_values": torch.rand(3, S, S, generator=g) if visual_len else None,
    }
    if targets:
        n_r = len(response_rows)
        sample["response_topk_ids"] = torch.randint(0, 50, (n_r, k_r), generator=g, dtype=torch.int32)
        sample["response_topk_logprobs"] = -torch.rand(n_r, k_r, generator=g).half()
        sample["visual_topk_ids"] = torch.randint(0, 50, (visual_len, k_v), generator=g, dtype=torch.int32)
        sample["visual_topk_logprobs"] = -torch.rand(visual_len, k_v, generator=g).half()
        P = visual_len * (visual_len + 1) // 2
        sample["relation"] = torch.rand(P, generator=g).half() if (relation and visual_len) else None
    return sample


def test_collate_pads_right_and_indexes_response_and_visual_rows_as_batch_time_pairs():
    a = hand_sample("a", 8, [4, 5, 6], visual_start=1, visual_len=3)
    b = hand_sample("bb", 5, [2, 3])                                           # text only
    c = hand_sample("ccc", 7, [5], visual_start=0, visual_len=2, relation=False)
    batch = collate([a, b, c], pad_id=PAD)

    assert batch["sample_id"] == ["a", "bb", "ccc"]
    assert batch["input_ids"].shape == (3, 8) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 5 + [0] * 3, [1] * 7 + [0]]
    assert batch["input_ids"][1, 5:].tolist() == [PAD] * 3
    assert batch["input_ids"][1, :5].tolist() == b["input_ids"].tolist()

    assert batch["response_index"].tolist() == [[0, 4], [0, 5], [0, 6], [1, 2], [1, 3], [2, 5]]
    assert batch["response_index"].dtype == torch.long
    expected_labels = [int(s["input_ids"][t + 1]) for s, t in [(a, 4), (a, 5), (a, 6), (b, 2), (b, 3), (c, 5)]]
    assert batch["response_labels"].tolist() == expected_labels
    assert batch["visual_index"].tolist() == [[0, 1], [0, 2], [0, 3], [2, 0], [2, 1]]

    assert batch["image_index"].tolist() == [0, 2]
    assert batch["pixel_values"].shape == (2, 3, S, S) and batch["pixel_values"].dtype == torch.float32
    assert torch.equal(batch["pixel_values"][1], c["pixel_values"])


def test_collate_concatenates_topk_targets_in_row_order_as_long_and_float32():
    a = hand_sample("a", 8, [4, 5, 6], visual_start=1, visual_len=3)
    b = hand_sample("bb", 5, [2, 3])
    batch = collate([a, b], pad_id=PAD)
    assert batch["response_topk_ids"].dtype == torch.long and batch["response_topk_logprobs"].dtype == torch.float32
    assert batch["response_topk_ids"].shape == (5, 3) and batch["visual_topk_ids"].shape == (3, 2)
    assert torch.equal(batch["response_topk_ids"][3:], b["response_topk_ids"].long())
    assert torch.equal(batch["response_topk_logprobs"][:3], a["response_topk_logprobs"].float())
    assert torch.equal(batch["visual_topk_logprobs"], a["visual_topk_logprobs"].float())


def test_collate_stacks_relations_only_for_samples_that_have_one():
    a = hand_sample("a", 8, [6], visual_start=1, visual_len=3)
    b = hand_sample("bb", 6, [4], visual_start=0, visual_len=3, relation=False)
    c = hand_sample("ccc", 9, [7], visual_start=2, visual_len=3)
    batch = collate([a, b, c], pad_id=PAD)
    assert batch["relation_index"].tolist() == [0, 2]
    assert batch["relation_visual_start"].tolist() == [1, 2]
    assert batch["relation_upper"].shape == (2, 6) and batch["relation_upper"].dtype == torch.float32
    assert torch.equal(batch["relation_upper"][1], c["relation"].float())


def test_collate_of_text_only_samples_gives_empty_visual_sets_and_no_pixels():
    batch = collate([hand_sample("a", 4, [1, 2]), hand_sample("bb", 3, [])], pad_id=7)
    assert batch["pixel_values"] is None
    assert batch["image_index"].shape == (0,) and batch["image_index"].dtype == torch.long
    assert batch["visual_index"].shape == (0, 2) and batch["visual_index"].dtype == torch.long
    assert batch["visual_topk_ids"].shape == (0, 2) and batch["visual_topk_logprobs"].dtype == torch.float32
    assert batch["relation_index"].shape == (0,) and batch["relation_upper"].shape[0] == 0
    assert batch["response_index"].shape == (2, 2)
    assert batch["input_ids"][1, 3].item() == 7


def test_collate_with_no_response_rows_gives_empty_response_sets():
    batch = collate([hand_sample("a", 4, [], visual_start=0, visual_len=2)], pad_id=PAD)
    assert batch["response_index"].shape == (0, 2) and batch["response_labels"].shape == (0,)
    assert batch["response_topk_ids"].shape == (0, 3)
    assert batch["visual_index"].shape == (2, 2)


def test_collate_without_targets_leaves_out_the_cache_only_keys():
    batch = collate([hand_sample("a", 5, [2, 3], targets=False)], pad_id=PAD)
    assert set(batch) == {"input_ids", "attention_mask", "sample_id", "pixel_values", "image_index",
                          "response_index", "response_labels"}


def test_collate_is_picklable_as_a_partial_for_spawned_workers():
    fn = pickle.loads(pickle.dumps(partial(collate, pad_id=3)))
    assert fn([hand_sample("a", 3, [1], targets=False)])["input_ids"].tolist() == [[101, 102, 103]]


# --- over a real cache (kdcache.writer) and a real LLaVA JSON (kdcache.samples / templates)

K_R, K_V, IMAGE_SIZE = 5, 3, 32


def cache_sample(sample_id, image_bytes, *, seed, T=24, L=4, R=5, relation=True, embed=True):
    """A shard record with an image (or text-only when image_bytes is None) and random targets."""
    rng = np.random.default_rng(seed)
    L = L if image_bytes is not None else 0

    def topk(rows, k):
        return (rng.integers(0, 500, size=(rows, k)),
                -rng.uniform(0.01, 5, size=(rows, k)).astype(np.float32))

    (r_ids, r_lp), (v_ids, v_lp) = topk(R, K_R), topk(L, K_V)
    with_relation = relation and L > 0
    return {
        "sample_id": sample_id,
        "input_ids": rng.integers(0, 500, size=T),
        "response_rows": np.sort(rng.choice(np.arange(L + 1, T - 1), size=R, replace=False)),
        "visual_start": 1 if L else 0, "visual_len": L,
        "image": image_bytes if embed else None,
        "image_sha256": hashlib.sha256(image_bytes).digest() if image_bytes is not None else None,
        "response_topk_ids": r_ids, "response_topk_logprobs": r_lp,
        "visual_topk_ids": v_ids, "visual_topk_logprobs": v_lp,
        "relation": rng.normal(size=L * (L + 1) // 2).astype(np.float32) if with_relation else None,
        "relation_norm": 3.0 if with_relation else None,
    }


@pytest.fixture
def small_cache(tmp_path, toy_images):
    """A finalized cache of 7 samples in 4 shards: images embedded, one text-only, one without relation."""
    names = toy_images(tmp_path / "images", count=7, size=IMAGE_SIZE)
    image_bytes = [(tmp_path / "images" / n).read_bytes() for n in names]
    written = [cache_sample(f"s{i}", image_bytes[i] if i != 3 else None, seed=i, relation=i != 5)
               for i in range(7)]
    cache = tmp_path / "cache"
    with ShardWriter(cache, k_response=K_R, k_visual=K_V, shard_size_bytes=1, samples_per_batch=2) as writer:
        for sample in written:
            writer.write(sample)
    write_rank_report(cache, 0, skipped=[])
    finalize_cache(cache, {"template": "plain", "temperature": {"response": 1.0, "visual": 1.0}})
    return cache, written


@pytest.fixture(scope="module")
def processor():
    return models.siglip_image_processor(IMAGE_SIZE)


def test_cache_dataset_yields_tensors_equal_to_the_stored_arrays(small_cache, processor):
    cache, written = small_cache
    dataset = CacheDataset(CacheReader(cache), processor)
    assert len(dataset) == 7 and sum(dataset.shard_sizes) == 7 and len(dataset.shard_sizes) == 4
    for index in range(len(dataset)):
        got = dataset[index]
        want = next(w for w in written if w["sample_id"] == got["sample_id"])
        for key in ("input_ids", "response_rows", "response_topk_ids", "visual_topk_ids"):
            assert np.array_equal(got[key].numpy(), want[key]), key
        for key in ("response_topk_logprobs", "visual_topk_logprobs"):
            assert got[key].dtype == torch.float16
            assert np.array_equal(got[key].numpy(), want[key].astype(np.float16)), key
        assert got["visual_topk_ids"].shape == (want["visual_len"], K_V)
        assert (got["visual_start"], got["visual_len"]) == (want["visual_start"], want["visual_len"])
        if want["relation"] is None:
            assert got["relation"] is None
        else:
            assert np.array_equal(got["relation"].numpy(), want["relation"].astype(np.float16))
        if want["image"] is None:
            assert got["pixel_values"] is None
        else:
            image = samples.decode_image(want["image"], want["sample_id"])
            assert torch.equal(got["pixel_values"], samples.pixel_values([image], processor)[0])
            assert got["pixel_values"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)


def test_cache_dataset_without_targets_gives_ce_only_batches(small_cache, processor):
    cache, _ = small_cache
    dataset = CacheDataset(str(cache), processor, with_targets=False)
    assert "response_topk_ids" not in dataset[0]
    batch = collate([dataset[i] for i in range(3)], pad_id=PAD)
    assert "visual_index" not in batch and batch["response_index"].shape == (15, 2)


def test_cache_dataset_pickles_without_its_open_reader(small_cache, processor):
    cache, _ = small_cache
    dataset = CacheDataset(CacheReader(cache), processor)
    dataset[0]
    clone = pickle.loads(pickle.dumps(dataset))
    assert len(clone.reader._open) == 0              # the reader travels without its open shards
    assert torch.equal(clone[4]["input_ids"], dataset[4]["input_ids"])


def batches_of(loader) -> list[dict]:
    return [batch for batch in loader]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


def test_a_loader_with_two_workers_yields_the_same_batches_as_no_workers(small_cache, processor):
    cache, _ = small_cache
    dataset = CacheDataset(CacheReader(cache), processor)
    runs = []
    for workers in (0, 2):
        sampler = ResumableSampler(dataset.shard_sizes, seed=1, batch_size=6, window=2)
        runs.append(batches_of(make_loader(dataset, sampler, batch_size=3, num_workers=workers, pad_id=PAD)))
    assert len(runs[0]) == 2                                    # 7 samples, global batch 6: one step of 2 x 3
    assert_same_batches(runs[0], runs[1])
    assert runs[0][0]["response_topk_logprobs"].dtype == torch.float32


def epoch_batches(dataset, *, seed: int, epoch: int = 0, samples_seen: int = 0) -> list[dict]:
    """The batches of 2 of one epoch (from `samples_seen` on) through a plain one-epoch loader."""
    sampler = ResumableSampler(dataset.shard_sizes, seed=seed, batch_size=2)
    sampler.load_state_dict({"epoch": epoch, "samples_seen": samples_seen})
    return batches_of(make_loader(dataset, sampler, batch_size=2, num_workers=0, pad_id=PAD))


def test_a_loader_resumes_mid_epoch_at_the_next_unseen_batch(small_cache, processor):
    cache, _ = small_cache
    dataset = CacheDataset(CacheReader(cache), processor)
    assert_same_batches(epoch_batches(dataset, seed=2)[2:], epoch_batches(dataset, seed=2, samples_seen=4))


def test_a_stateful_loader_counts_what_it_yielded_and_rolls_into_the_next_epoch(small_cache, processor):
    cache, _ = small_cache
    dataset = CacheDataset(CacheReader(cache), processor)
    epoch0, epoch1 = epoch_batches(dataset, seed=3), epoch_batches(dataset, seed=3, epoch=1)
    loader = StatefulLoader(dataset, ResumableSampler(dataset.shard_sizes, seed=3, batch_size=2), batch_size=2,
                            num_workers=0, pad_id=PAD)
    got = [next(loader) for _ in range(len(epoch0) + 1)]
    assert_same_batches(got, epoch0 + epoch1[:1])               # 7 samples, batch 2: 3 batches an epoch
    assert loader.state_dict() == {"epoch": 1, "samples_seen": 2}


def test_a_stateful_loader_resumed_from_its_state_continues_the_same_sequence(small_cache, processor):
    cache, _ = small_cache
    dataset = CacheDataset(CacheReader(cache), processor)

    def loader():
        return StatefulLoader(dataset, ResumableSampler(dataset.shard_sizes, seed=4, batch_size=2), batch_size=2,
                              num_workers=0, pad_id=PAD)

    whole = loader()
    expected = [next(whole) for _ in range(5)]
    first = loader()
    got = [next(first) for _ in range(2)]
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(3)]
    assert_same_batches(got, expected)


def test_pad_sequences_pads_right_for_training_and_left_for_generation():
    ids, mask = pad_sequences([[5, 6, 7], torch.tensor([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
    assert pad_sequences([], pad_id=0)[0].shape == (0, 0)


def test_a_cache_without_embedded_images_reads_them_from_the_dataset_folder(tmp_path, toy_images, processor):
    names = toy_images(tmp_path / "images", count=2, size=IMAGE_SIZE)
    raw = [(tmp_path / "images" / n).read_bytes() for n in names]
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": f"s{i}", "image": n, "conversations": []} for i, n in enumerate(names)]))
    cache = tmp_path / "cache"
    with ShardWriter(cache, k_response=K_R, k_visual=K_V) as writer:
        for i in range(2):
            writer.write(cache_sample(f"s{i}", raw[i], seed=i, embed=False))
    write_rank_report(cache, 0, skipped=[])
    finalize_cache(cache, {"images_embedded": False,
                           "dataset": {"source": str(data), "images": str(tmp_path / "images")}})
    dataset = CacheDataset(CacheReader(cache), processor)
    image = samples.decode_image(raw[1], "s1")
    assert torch.equal(dataset[1]["pixel_values"], samples.pixel_values([image], processor)[0])

    (tmp_path / "images" / names[1]).write_bytes(raw[0])                 # a different image under that name
    with pytest.raises(SampleError, match="sha256"):
        dataset[1]


def test_a_moved_dataset_file_of_a_cache_without_embedded_images_is_given_with_its_fingerprint_checked(
        tmp_path, toy_images, processor):
    names = toy_images(tmp_path / "images", count=2, size=IMAGE_SIZE)
    raw = [(tmp_path / "images" / n).read_bytes() for n in names]
    records = [{"id": f"s{i}", "image": n, "conversations": []} for i, n in enumerate(names)]
    data = tmp_path / "elsewhere" / "data.json"                           # the dump's file, copied elsewhere
    data.parent.mkdir()
    data.write_text(json.dumps(records))
    cache = tmp_path / "cache"
    with ShardWriter(cache, k_response=K_R, k_visual=K_V) as writer:
        for i in range(2):
            writer.write(cache_sample(f"s{i}", raw[i], seed=i, embed=False))
    write_rank_report(cache, 0, skipped=[])
    finalize_cache(cache, {"images_embedded": False, "dataset": {
        "source": "/data/of/another/lab/data.json", "images": str(tmp_path / "images"),
        "fingerprint": samples.dataset_fingerprint(data)}})
    with pytest.raises(KdcacheError, match="not readable here.*--cache-dataset"):
        CacheDataset(CacheReader(cache), processor)
    dataset = CacheDataset(CacheReader(cache), processor, dataset=data)
    assert torch.equal(dataset[1]["pixel_values"], samples.pixel_values([samples.decode_image(raw[1], "s1")],
                                                                        processor)[0])
    other = tmp_path / "other.json"
    other.write_text(json.dumps(records[::-1]))                          # the same samples, another file
    with pytest.raises(KdcacheError, match="not the dataset cache .* was dumped from"):
        CacheDataset(CacheReader(cache), processor, dataset=other)


def test_json_dataset_supervises_only_the_answers(toy_dataset, toy_tokenizer, processor):
    data, images = toy_dataset(count=3, template="qwen2_base", text_only=1)
    image_token_id = toy_tokenizer.convert_tokens_to_ids("<image>")
    dataset = JsonDataset(data, images, toy_tokenizer, processor, template="qwen2_base",
                          image_token_id=image_token_id, visual_len=15, max_length=512)
    assert len(dataset) == 3 and dataset.shard_sizes == [3]
    batch = collate([dataset[i] for i in range(3)], pad_id=toy_tokenizer.pad_token_id)
    assert "response_topk_ids" not in batch
    assert batch["image_index"].tolist() == [0, 1]
    assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    records = json.loads(data.read_text())
    eos = toy_tokenizer.eos_token
    for b, record in enumerate(records):
        answers = [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"]
        labels = batch["response_labels"][batch["response_index"][:, 0] == b]
        assert toy_tokenizer.decode(labels.tolist()) == "".join(" " + a + eos for a in answers)   # after ": "
        ids = batch["input_ids"][b]
        assert int((ids == image_token_id).sum()) == (15 if "image" in record else 0)


def test_json_dataset_plain_template_supervises_the_caption_and_its_newline(toy_dataset, toy_tokenizer, processor):
    data, images = toy_dataset(count=2, template="plain")
    image_token_id = toy_tokenizer.convert_tokens_to_ids("<image>")
    dataset = JsonDataset(data, images, toy_tokenizer, processor, template="plain",
                          image_token_id=image_token_id, visual_len=15)
    sample = dataset[0]
    caption = json.loads(data.read_text())[0]["conversations"][1]["value"]
    labels = sample["input_ids"][sample["response_rows"] + 1]
    assert toy_tokenizer.decode(labels.tolist()) == caption + "\n"
    assert (sample["visual_start"], sample["visual_len"]) == (0, 15)


def test_json_dataset_names_an_image_sample_given_no_image_folder(toy_dataset, toy_tokenizer, processor):
    data, _ = toy_dataset(count=1)
    dataset = JsonDataset(data, None, toy_tokenizer, processor, template="qwen2_base",
                          image_token_id=toy_tokenizer.convert_tokens_to_ids("<image>"), visual_len=15)
    with pytest.raises(SampleError, match="sample-0"):
        dataset[0]
