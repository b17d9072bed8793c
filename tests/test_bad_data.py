"""Bad data in a COCO folder (issue 16, items 1-4, 9, 10): each case is refused in one line naming the
json / id / file before anything is written, or handled correctly (16-bit images, edited jsons,
read-only folders, skipped unreadable images)."""

import contextlib
import json
import logging
import os
import shutil
import struct
import tempfile
import zlib

import numpy as np
import pytest
from PIL import Image

from scaledet_jax import defaults
from scaledet_jax.cli import UserError
from scaledet_jax.data import coco_folder, pipeline

CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]


def _write_split(folder, split, num_images, seed=0):
    rng = np.random.RandomState(seed)
    os.makedirs(os.path.join(folder, split), exist_ok=True)
    os.makedirs(os.path.join(folder, "annotations"), exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        name = f"{i:03d}.png"
        Image.fromarray(rng.randint(0, 256, (24, 32, 3)).astype(np.uint8)).save(os.path.join(folder, split, name))
        images.append({"id": i + 1, "file_name": name, "height": 24, "width": 32})
        annotations.append(
            {"id": 100 + i, "image_id": i + 1, "category_id": i % 3 + 1, "bbox": [2, 3, 10 + i, 8], "iscrowd": 0}
        )
    _dump(folder, split, {"images": images, "annotations": annotations, "categories": CATEGORIES})


def _dump(folder, split, data):
    with open(os.path.join(folder, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(data, f)


def _load(folder, split="train"):
    with open(os.path.join(folder, "annotations", f"instances_{split}.json")) as f:
        return json.load(f)


def _make_folder(tmp_path, num_train=4, num_val=2):
    folder = str(tmp_path / "coco")
    _write_split(folder, "train", num_train, seed=0)
    _write_split(folder, "val", num_val, seed=1)
    return folder


def _config(folder, num_classes=4, **data):
    config = defaults.get_config()
    config.data.source = "coco_folder"
    config.data.coco_folder = folder
    config.data.train_split, config.data.eval_split = "train", "val"
    config.model.num_classes = num_classes
    config.data.update(data)
    return config


def _tree(path):
    """Every file and folder under ``path`` (relative), with file sizes and mtimes."""
    out = []
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            st = os.stat(full)
            out.append((os.path.relpath(full, path), st.st_size if name in files else None, st.st_mtime_ns))
    return sorted(out)


def _refused(config, workdir, *expected):
    """get_builder raises one UserError line holding every ``expected`` piece; nothing gets written."""
    folder = config.data.coco_folder
    before = _tree(folder)
    with pytest.raises(UserError) as info:
        pipeline.get_builder(config, str(workdir))
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    for piece in expected:
        assert piece in message, (piece, message)
    assert _tree(folder) == before  # no tfds/ folder, no half-prepared copy
    assert not os.path.exists(os.path.join(workdir, "prepared_data"))
    return message


def _examples(builder, split="train"):
    return {int(ex["image/id"]): ex for ex in builder.as_dataset(split=split).as_numpy_iterator()}


# ---------------------------------------------------------------------------------------------
# 1. 16-bit images
# ---------------------------------------------------------------------------------------------


def _png16(path, pixels, color_type):
    """A real 16-bit PNG (PIL cannot write 16-bit RGB): IHDR bit depth 16, big-endian samples."""
    height, width = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
        )


def test_16bit_png_becomes_8bit_by_its_bit_depth(tmp_path):
    folder = _make_folder(tmp_path, num_train=3)
    rng = np.random.RandomState(5)
    gray = rng.randint(0, 65536, (24, 32)).astype(np.uint16)
    gray[0, :4] = [0, 255, 256, 65535]
    Image.fromarray(gray).save(os.path.join(folder, "train", "000.png"))  # PIL writes 16-bit grayscale
    rgb = rng.randint(0, 65536, (24, 32, 3)).astype(np.uint16)
    _png16(os.path.join(folder, "train", "001.png"), rgb, color_type=2)
    with Image.open(os.path.join(folder, "train", "000.png")) as image:
        assert image.mode == "I;16"  # the case convert('RGB') clipped to white
    builder = pipeline.get_builder(_config(folder), str(tmp_path / "work"))
    examples = _examples(builder)
    expected_gray = np.repeat((gray >> 8).astype(np.uint8)[..., None], 3, axis=2)
    np.testing.assert_array_equal(examples[1]["image"], expected_gray)
    np.testing.assert_array_equal(examples[1]["image"][0, :4, 0], [0, 0, 1, 255])
    np.testing.assert_array_equal(examples[2]["image"], (rgb >> 8).astype(np.uint8))
    eight_bit = np.asarray(Image.open(os.path.join(folder, "train", "002.png")))
    np.testing.assert_array_equal(examples[3]["image"], eight_bit)  # 8-bit images unchanged


def test_other_deep_images_scaled_by_their_bit_depth_or_refused(tmp_path):
    deep = np.random.RandomState(0).randint(0, 2**31 - 1, (6, 5)).astype(np.int32)
    Image.fromarray(deep).save(tmp_path / "deep.tif")  # mode I, BitsPerSample 32
    np.testing.assert_array_equal(coco_folder.read_rgb(str(tmp_path / "deep.tif"))[..., 1], deep >> 24)
    folder = _make_folder(tmp_path, num_train=3)
    Image.fromarray(np.ones((24, 32), np.float32)).save(os.path.join(folder, "train", "001.tif"))
    data = _load(folder)
    data["images"][1]["file_name"] = "001.tif"
    _dump(folder, "train", data)
    path = os.path.join(folder, "train", "001.tif")
    _refused(_config(folder), tmp_path / "work", "instances_train.json", "image id 2", path, "floating-point")


# ---------------------------------------------------------------------------------------------
# 2. Category ids against the json's categories and the model's outputs
# ---------------------------------------------------------------------------------------------


def test_category_id_missing_from_categories(tmp_path):
    folder = _make_folder(tmp_path)
    data = _load(folder)
    data["annotations"][2]["category_id"] = 7
    _dump(folder, "train", data)
    _refused(
        _config(folder),
        tmp_path / "work",
        "instances_train.json",
        "category ids 7",
        "annotation ids 102",
        "not in its 'categories' (1, 2, 3)",
    )


def test_category_ids_without_model_output_refused_before_preparing(tmp_path):
    folder = _make_folder(tmp_path)
    work = tmp_path / "work"
    # The usual off-by-one: ids 1..3 with num_classes=3 (output 0 is the background slot).
    _refused(
        _config(folder, num_classes=3),
        work,
        "category ids 3",
        "instances_train.json and instances_val.json",
        "ids 1..2",
        "--config.model.num_classes=4",
    )
    config = _config(folder, num_classes=2)
    config.model.background_slot = False  # automl layout: output c is category c + 1
    _refused(config, work, "category ids 3", "ids 1..2", "--config.model.num_classes=3")
    config.model.category_ids = (1, 2)  # mmdetection layout: outputs for the listed ids only
    _refused(config, work, "category ids 3", "model.category_ids has 2 ids", "--config.model.category_ids")
    # The eval split counts too: the model must have an output for every scored category.
    data = _load(folder, "train")
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 3]
    _dump(folder, "train", data)
    val = _load(folder, "val")
    val["annotations"][0]["category_id"] = 3
    _dump(folder, "val", val)
    message = _refused(_config(folder, num_classes=3), work, "category ids 3", "--config.model.num_classes=4")
    assert "1 annotation in instances_train.json and instances_val.json" in message
    # Category id 0 is the background: no num_classes can fix it.
    data["annotations"][0]["category_id"] = 0
    data["categories"].append({"id": 0, "name": "zero"})
    _dump(folder, "train", data)
    _refused(_config(folder, num_classes=4), work, "category ids 0", "number the categories from 1")
    # Once the numbers fit, the same data prepares; the prepared copy is checked again on reuse.
    data["annotations"][0]["category_id"] = 1
    _dump(folder, "train", data)
    builder = pipeline.get_builder(_config(folder, num_classes=4), str(work))
    assert builder.info.splits["train"].num_examples == 4
    with pytest.raises(UserError, match=r"category ids 3 .*--config.model.num_classes=4"):
        pipeline.get_builder(_config(folder, num_classes=3), str(work))


def test_check_categories_layouts():
    model = defaults.get_config().model
    model.num_classes = 91
    pipeline.check_categories(model, {1: 5, 90: 1}, "x.json")  # COCO ids 1..90, background slot
    model.num_classes = 90
    with pytest.raises(UserError, match="category ids 90 .1 annotation in x.json.*num_classes=91"):
        pipeline.check_categories(model, {1: 5, 90: 1}, "x.json")
    model.background_slot = False
    pipeline.check_categories(model, {1: 5, 90: 1}, "x.json")  # automl: 90 outputs for ids 1..90
    model.category_ids = tuple(range(1, 91, 2))
    with pytest.raises(UserError, match=r"category ids 90 \(tfds coco\)"):
        pipeline.check_categories(model, {1: None, 90: None}, "tfds coco")


# ---------------------------------------------------------------------------------------------
# 3. Training on nothing
# ---------------------------------------------------------------------------------------------


def test_training_json_without_annotations_or_objects(tmp_path):
    folder = _make_folder(tmp_path)
    data = _load(folder)
    annotations = data.pop("annotations")
    _dump(folder, "train", data)
    _refused(_config(folder), tmp_path / "work", "instances_train.json", "has no 'annotations'", "train_split")
    for ann in annotations:  # only crowd regions and zero-size boxes: nothing to learn from
        ann["iscrowd"] = int(ann["id"] % 2 == 0)
        ann["bbox"][2] = 0 if not ann["iscrowd"] else ann["bbox"][2]
    _dump(folder, "train", dict(data, annotations=annotations))
    _refused(_config(folder), tmp_path / "work", "instances_train.json", "no object to train on", "4 images")


# ---------------------------------------------------------------------------------------------
# 4. Edited annotations are prepared again; unchanged ones are reused
# ---------------------------------------------------------------------------------------------


def test_edited_json_is_prepared_again_unchanged_is_reused(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    folder = _make_folder(tmp_path)
    config, work = _config(folder), str(tmp_path / "work")
    first = pipeline.get_builder(config, work)
    assert first.data_dir.startswith(os.path.join(folder, "tfds"))
    records = _tree(first.data_dir)

    def no_decoding(path):
        raise AssertionError(f"{path} decoded again although nothing changed")

    with monkeypatch.context() as m:
        m.setattr(coco_folder, "read_rgb", no_decoding)
        caplog.clear()
        again = pipeline.get_builder(config, work)
    assert again.data_dir == first.data_dir and _tree(first.data_dir) == records
    assert "contents unchanged" in caplog.text

    data = _load(folder)
    data["annotations"][0]["bbox"] = [4, 6, 12, 10]
    _dump(folder, "train", data)
    caplog.clear()
    edited = pipeline.get_builder(config, work)
    assert edited.data_dir != first.data_dir
    changed = [r.getMessage() for r in caplog.records if "changed since" in r.getMessage()]
    assert len(changed) == 1 and folder in changed[0], caplog.text
    box = _examples(edited)[1]["objects"]["bbox"][0]
    np.testing.assert_allclose(box, [6 / 24, 4 / 32, 16 / 24, 16 / 32], atol=1e-6)
    assert _examples(first)[1]["objects"]["bbox"][0][0] == pytest.approx(3 / 24)  # the old copy is intact

    # A replaced image (another size on disk) changes the fingerprint too.
    before = coco_folder.fingerprint(folder)
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(os.path.join(folder, "train", "001.png"))
    assert coco_folder.fingerprint(folder) != before


def test_identical_folders_share_a_copy_in_a_cache_dir(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    folder, cache, work = _make_folder(tmp_path), str(tmp_path / "cache"), str(tmp_path / "work")
    first = pipeline.get_builder(_config(folder, cache_dir=cache), work)
    other = str(tmp_path / "other")
    shutil.copytree(folder, other)
    with monkeypatch.context() as m:
        m.setattr(coco_folder, "read_rgb", lambda path: pytest.fail(f"{path} decoded again"))
        second = pipeline.get_builder(_config(other, cache_dir=cache), work)
    assert second.data_dir == first.data_dir
    assert second.summary["train"]["json"] == os.path.join(other, "annotations", "instances_train.json")
    data = _load(other)
    data["annotations"][0]["bbox"] = [1, 1, 5, 5]
    _dump(other, "train", data)
    caplog.clear()
    assert pipeline.get_builder(_config(other, cache_dir=cache), work).data_dir != first.data_dir
    assert "changed since" not in caplog.text  # the copy of the first folder is not the second's old copy


# ---------------------------------------------------------------------------------------------
# 9. Data errors, each one line naming the json, the id and the file
# ---------------------------------------------------------------------------------------------


def _corrupt(folder):
    with open(os.path.join(folder, "train", "001.png"), "wb") as f:
        f.write(np.random.RandomState(0).bytes(300))


def _truncate_png(folder):
    path = os.path.join(folder, "train", "001.png")
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])


def _truncate_jpeg(folder):
    path = os.path.join(folder, "train", "001.jpg")
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3)).astype(np.uint8)).save(path, quality=95)
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    data = _load(folder)
    data["images"][1]["file_name"] = "001.jpg"
    _dump(folder, "train", data)


def _edit(fn):
    def mutate(folder):
        data = _load(folder)
        fn(data)
        _dump(folder, "train", data)

    return mutate


def _malformed(folder):
    path = os.path.join(folder, "annotations", "instances_train.json")
    text = open(path).read()
    open(path, "w").write(text[:-30])


TRAIN = os.path.join("annotations", "instances_train.json")
BAD_DATA = {
    "corrupt_image": (_corrupt, [TRAIN, "image id 2", "train/001.png", "skip_bad_images=True"]),
    "truncated_png": (_truncate_png, [TRAIN, "image id 2", "train/001.png", "skip_bad_images=True"]),
    "truncated_jpeg": (_truncate_jpeg, [TRAIN, "image id 2", "train/001.jpg", "truncated", "skip_bad_images"]),
    "json_without_images": (_edit(lambda d: d.pop("images")), [TRAIN, "has no 'images' list"]),
    "image_missing": (
        _edit(lambda d: d["images"][2].update(file_name="gone.png")),
        [TRAIN, "image id 3", "train/gone.png", "file not found", "skip_bad_images"],
    ),
    "duplicate_image_ids": (
        _edit(lambda d: d["images"][3].update(id=1)),
        [TRAIN, "image id 1 is used twice", "'000.png' and '003.png'"],
    ),
    "empty_images": (_edit(lambda d: d.update(images=[])), [TRAIN, "lists no images"]),
    "bbox_with_3_numbers": (
        _edit(lambda d: d["annotations"][1].update(bbox=[1, 2, 3])),
        [TRAIN, "annotation id 101", "image id 2", "file 001.png", "bbox [1, 2, 3]", "[x, y, width, height]"],
    ),
    "string_image_id": (
        _edit(lambda d: d["images"][0].update(id="1")),
        [TRAIN, "images[0]", "'000.png'", "has id '1'", "must be integers"],
    ),
    "string_annotation_image_id": (
        _edit(lambda d: d["annotations"][0].update(image_id="1")),
        [TRAIN, "annotation id 100", "image id '1'", "not in 'images'"],
    ),
    "malformed_json": (_malformed, [TRAIN, "is not valid JSON", "line 1 column"]),
    "json_is_a_list": (lambda folder: _dump(folder, "train", [_load(folder)]), [TRAIN, "holds a JSON list"]),
    "no_image_folder": (
        lambda folder: os.rename(os.path.join(folder, "train"), os.path.join(folder, "pics")),
        ["no image folder for split 'train'", "train/"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_one_line_before_anything_is_written(case, tmp_path):
    folder = _make_folder(tmp_path)
    mutate, expected = BAD_DATA[case]
    mutate(folder)
    _refused(_config(folder), tmp_path / "work", *expected)


def test_skip_bad_images_leaves_them_out_and_counts_them(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    folder = _make_folder(tmp_path, num_train=5)
    _corrupt(folder)
    os.remove(os.path.join(folder, "train", "003.png"))
    work = str(tmp_path / "work")
    builder = pipeline.get_builder(_config(folder, skip_bad_images=True), work)
    assert sorted(_examples(builder)) == [1, 3, 5]
    assert "Leaving out 2 unreadable of 5 images" in caplog.text
    assert builder.summary["train"]["images"] == 3 and len(builder.summary["train"]["skipped"]) == 2
    # The prepared copy remembers what it left out: without the option it is refused again.
    path = os.path.join(folder, "train", "001.png")
    with pytest.raises(UserError, match=f"image id 2: cannot read {path} .*2 of 5 images are unreadable"):
        pipeline.get_builder(_config(folder), work)


def test_skipping_every_image_still_refuses_an_empty_training_split(tmp_path):
    folder = _make_folder(tmp_path, num_train=2)
    for name in ("000.png", "001.png"):
        os.remove(os.path.join(folder, "train", name))
    _refused(_config(folder, skip_bad_images=True), tmp_path / "work", "instances_train.json", "no object to train on")


# ---------------------------------------------------------------------------------------------
# 10. Read-only folders and unwritable places
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _unprivileged():
    """Root ignores file modes: drop to an unprivileged effective uid so permissions really apply."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_write_problem_sees_real_permissions():
    base = tempfile.mkdtemp(prefix="scaledet_perm_", dir="/tmp")  # reachable for an unprivileged uid
    try:
        os.chmod(base, 0o755)
        locked, shared = os.path.join(base, "locked"), os.path.join(base, "shared")
        os.mkdir(locked)
        os.mkdir(shared)
        os.chmod(locked, 0o555)
        os.chmod(shared, 0o777)
        with _unprivileged():
            assert "Permission denied" in coco_folder.write_problem(os.path.join(locked, "tfds", "x"))
            assert coco_folder.write_problem(os.path.join(shared, "cache")) is None
        assert os.listdir(locked) == [] and os.listdir(shared) == []  # the probe leaves nothing behind
        open(os.path.join(base, "file"), "w").close()
        assert "is not a directory" in coco_folder.write_problem(os.path.join(base, "file", "cache"))
    finally:
        os.chmod(os.path.join(base, "locked"), 0o755)
        shutil.rmtree(base)


def _lock(folder):
    """Makes ``folder`` unwritable: mode 0o555, plus (for root, whom modes do not stop) a regular file
    where the prepared copy's folder would be created."""
    if os.geteuid() == 0:
        open(os.path.join(folder, "tfds"), "w").close()
    os.chmod(folder, 0o555)


def test_read_only_folder_prepares_into_the_workdir(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    folder = _make_folder(tmp_path)
    _lock(folder)
    try:
        before = _tree(folder)
        work = str(tmp_path / "work")
        builder = pipeline.get_builder(_config(folder), work)
        assert builder.data_dir.startswith(os.path.join(work, "prepared_data"))
        assert builder.info.splits["train"].num_examples == 4
        assert _tree(folder) == before
        assert "is not writable" in caplog.text
        # An explicit cache_dir is used as given.
        cache = str(tmp_path / "cache")
        assert pipeline.get_builder(_config(folder, cache_dir=cache), work).data_dir.startswith(cache)
        assert _tree(folder) == before
        # Nowhere to write: one line naming both places and the option.
        blocked = tmp_path / "blocked"
        blocked.write_text("")
        _refused(_config(folder), blocked / "work", "neither", os.path.join(folder, "tfds"), "data.cache_dir")
    finally:
        os.chmod(folder, 0o755)


def test_unwritable_cache_dir_and_workdir(tmp_path):
    folder = _make_folder(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cache = str(blocker / "cache")
    _refused(
        _config(folder, cache_dir=cache),
        tmp_path / "work",
        f"data.cache_dir {cache} is not writable",
        "not a directory",
    )
    config = _config(folder)
    config.data.source, config.data.coco_folder = "synthetic", ""
    with pytest.raises(UserError, match="cannot write the synthetic dataset to .*a_file/work/synthetic_data"):
        pipeline.get_builder(config, str(blocker / "work"))
