import hashlib
import io
import json

import pytest
import torch
from PIL import Image

from kdcache import samples
from kdcache.errors import KdcacheError, SampleError
from kdcache.models import siglip_image_processor
from kdcache.samples import Record

TURNS = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_json_list_and_jsonl_give_the_same_records_with_string_ids(tmp_path):
    items = [{"id": 7, "image": "a.png", "conversations": TURNS},
             {"id": "b", "conversations": TURNS[:1] + [{"from": "gpt", "value": "no image"}]}]
    (tmp_path / "d.json").write_text(json.dumps(items, indent=2))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n\n")
    from_json = samples.load_records(tmp_path / "d.json")
    assert from_json == samples.load_records(tmp_path / "d.jsonl")
    assert from_json[0] == Record("7", "a.png", TURNS)
    assert (from_json[1].sample_id, from_json[1].image) == ("b", None)


def test_samples_without_id_are_named_by_their_position(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"conversations": TURNS}, {"id": "x", "conversations": TURNS},
                                                 {"conversations": TURNS}]))
    assert [r.sample_id for r in samples.load_records(tmp_path / "d.json")] == ["0", "x", "2"]


def test_duplicate_ids_are_refused_naming_both_places(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(i) for i in [
        {"id": "a", "conversations": TURNS}, {"conversations": TURNS}, {"id": 1, "conversations": TURNS}]))
    with pytest.raises(KdcacheError, match=r"d.jsonl line 3: sample id '1' is already used at .*d.jsonl line 2"):
        samples.load_records(tmp_path / "d.jsonl")


def test_bad_json_error_names_the_file_and_line(tmp_path):
    (tmp_path / "d.json").write_text('[\n {"id": "a", "conversations": []},\n {"id": "b",,}\n]')
    with pytest.raises(KdcacheError, match=r"d.json line 3 column \d+: bad JSON"):
        samples.load_records(tmp_path / "d.json")
    (tmp_path / "d.jsonl").write_text('{"id": "a", "conversations": []}\n{"id": "b", "conv\n')
    with pytest.raises(KdcacheError, match=r"d.jsonl line 2 column \d+: bad JSON"):
        samples.load_records(tmp_path / "d.jsonl")


def test_json_that_is_not_a_list_of_objects_is_refused(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"id": "a", "conversations": TURNS}))
    with pytest.raises(KdcacheError, match="expected a JSON list of samples, got dict"):
        samples.load_records(tmp_path / "d.json")
    (tmp_path / "e.json").write_text(json.dumps([{"id": "a", "conversations": TURNS}, "oops"]))
    with pytest.raises(KdcacheError, match="e.json item 1: a sample must be a JSON object"):
        samples.load_records(tmp_path / "e.json")


def test_several_images_in_one_sample_are_refused_naming_it(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"id": "two", "image": ["a.png", "b.png"], "conversations": TURNS}]))
    record, = samples.load_records(tmp_path / "d.json")   # loads: --skip-bad must be able to skip it later
    with pytest.raises(SampleError, match="'two'.*one image per sample"):
        samples.load_image(tmp_path, record)


def test_missing_image_error_names_the_sample(tmp_path):
    with pytest.raises(SampleError, match="'s9'.*image not found") as caught:
        samples.read_image_bytes(tmp_path, Record("s9", "nowhere.png", TURNS))
    assert caught.value.sample_id == "s9"


def test_corrupt_image_error_names_the_sample(tmp_path, toy_images):
    name = toy_images(tmp_path)[0]
    data = samples.read_image_bytes(tmp_path, Record("ok", name, TURNS))
    assert samples.decode_image(data, "ok").size == (32, 32)
    for bad in (b"not an image at all", data[: len(data) // 2]):
        with pytest.raises(SampleError, match="'broken'.*corrupt") as caught:
            samples.decode_image(bad, "broken")
        assert caught.value.sample_id == "broken"


@pytest.mark.parametrize("path", ["../secret.png", "sub/../../secret.png", "/etc/passwd"])
def test_image_paths_escaping_the_images_folder_are_refused(tmp_path, path):
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    with pytest.raises(SampleError, match="'evil'.*escapes the images folder"):
        samples.read_image_bytes(images, Record("evil", path, TURNS))


def test_image_paths_in_subfolders_are_read(tmp_path):
    (tmp_path / "coco" / "train").mkdir(parents=True)
    (tmp_path / "coco" / "train" / "a.png").write_bytes(b"bytes")
    assert samples.read_image_bytes(tmp_path, Record("a", "coco/./train/a.png", TURNS)) == b"bytes"


def test_decoded_images_are_rgb(tmp_path):
    for mode, color in (("RGBA", (10, 20, 30, 128)), ("L", 200), ("P", 3)):
        image = samples.decode_image(png_bytes(Image.new(mode, (5, 3), color)), "m")
        assert image.mode == "RGB" and image.size == (5, 3)


def test_pixel_values_are_stretched_to_the_tower_size_and_normalised():
    image = Image.new("RGB", (64, 16), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 32, 16))                      # left half red, right half blue
    pixels = samples.pixel_values([image, Image.new("RGB", (8, 40), (255, 255, 255))], siglip_image_processor(32))
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    # Stretched, not cropped: the left half stays red and the right half blue over the full height.
    assert torch.allclose(pixels[0, :, :, :12].mean(dim=(1, 2)), torch.tensor([1.0, -1.0, -1.0]), atol=1e-3)
    assert torch.allclose(pixels[0, :, :, 20:].mean(dim=(1, 2)), torch.tensor([-1.0, -1.0, 1.0]), atol=1e-3)
    assert torch.allclose(pixels[1], torch.ones(3, 32, 32), atol=1e-3)


def test_dataset_fingerprint_is_the_sha256_of_the_file_bytes(tmp_path):
    (tmp_path / "d.json").write_bytes(b"[]")
    assert samples.dataset_fingerprint(tmp_path / "d.json") == "sha256:" + hashlib.sha256(b"[]").hexdigest()
