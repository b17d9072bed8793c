"""From a checkpoint to pictures (issue 14 items 1-2): the Detector API and ``python -m scaledet_jax.predict``.

A tiny quickstart run trains 2 steps and evaluates its held-out images (non-square, several sizes); the API's
detections on the same image files, in original pixels, must equal what the evaluation wrote (same
preprocessing and mapping back), for a run's workdir and for a converted checkpoint directory alike.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from configs_util import CONFIG_DIR, load_config
from PIL import Image

from scaledet_jax import train
from scaledet_jax.cli import UserError
from scaledet_jax.data.coco_folder import read_rgb
from scaledet_jax.detector import Detector, as_rgb

ROOT = str(CONFIG_DIR.parent)
STEPS = 2


def _config():
    config = load_config("quickstart")
    config.data.synthetic_train_images = 8
    config.data.synthetic_val_images = 4
    config.data.train_batch_size = 4
    config.data.eval_batch_size = 2
    config.total_steps = STEPS
    config.log_every_steps = 1
    config.model.detection.score_threshold = 0.0  # 2 steps from scratch: keep every image's top detections
    config.model.detection.max_detections = 20
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("predict") / "run")
    train.train_and_evaluate(_config(), workdir)
    with open(os.path.join(workdir, "synthetic_data", "annotations", "instances_val.json")) as f:
        images = json.load(f)["images"]
    with open(os.path.join(workdir, f"detections_{STEPS}.json")) as f:
        evaluated = json.load(f)
    return workdir, images, evaluated


@pytest.fixture(scope="module")
def detector(run):
    return Detector.from_checkpoint(run[0], batch_size=3)


def _as_results(found: dict) -> list[tuple]:
    return sorted(
        (int(c), round(float(s), 5), *(round(float(v), 2) for v in (x1, y1, x2 - x1, y2 - y1)))
        for (x1, y1, x2, y2), s, c in zip(found["boxes"], found["scores"], found["classes"], strict=True)
    )


def _evaluated(evaluated: list[dict], image_id: int) -> list[tuple]:
    return sorted((d["category_id"], d["score"], *d["bbox"]) for d in evaluated if d["image_id"] == image_id)


def test_detector_gives_the_evaluations_detections_in_original_pixels(run, detector):
    workdir, images, evaluated = run
    pixels = [read_rgb(os.path.join(workdir, "synthetic_data", "val", image["file_name"])) for image in images]
    assert len({p.shape for p in pixels}) > 1 and any(p.shape[0] != p.shape[1] for p in pixels)
    found = detector.predict(pixels)
    assert detector.categories == {1: "circle", 2: "square", 3: "triangle"}  # from the run's detector.json
    for image, result, image_pixels in zip(images, found, pixels, strict=True):
        expected = np.array(_evaluated(evaluated, image["id"]))
        got = np.array(_as_results(result))
        assert got.shape == expected.shape and len(got) > 0
        np.testing.assert_array_equal(got[:, 0], expected[:, 0])  # classes
        np.testing.assert_allclose(got[:, 1], expected[:, 1], atol=1e-4)  # scores
        np.testing.assert_allclose(got[:, 2:], expected[:, 2:], atol=0.011)  # boxes, rounded to 0.01 px
        h, w = image_pixels.shape[:2]
        assert np.all(result["boxes"] >= 0) and np.all(result["boxes"][:, [0, 2]] <= w)
        assert np.all(result["boxes"][:, [1, 3]] <= h)
        assert np.all(np.diff(result["scores"]) <= 0)  # highest first
        assert result["names"] == [detector.categories[int(c)] for c in result["classes"]]


def test_detector_takes_gray_rgba_and_batches_and_compiles_once(run, detector):
    workdir, images, _ = run
    rgb = read_rgb(os.path.join(workdir, "synthetic_data", "val", images[0]["file_name"]))
    gray = rgb[..., 1]
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], -1)
    single = detector.predict([rgb])[0]
    as_gray = detector.predict([as_rgb(gray)])[0]
    results = detector.predict([rgba, gray, rgb, rgb])  # 4 images in batches of 3: padded, same compilation
    np.testing.assert_array_equal(results[0]["boxes"], single["boxes"])  # alpha dropped
    np.testing.assert_array_equal(results[1]["boxes"], as_gray["boxes"])  # gray = gray repeated to RGB
    np.testing.assert_array_equal(results[3]["scores"], single["scores"])
    assert detector._predict._cache_size() == 1
    thresholded = detector.predict([rgb], score_threshold=float(np.median(single["scores"])))[0]
    assert 0 < len(thresholded["scores"]) < len(single["scores"])
    with pytest.raises(UserError, match="uint8"):
        detector.predict([rgb.astype(np.float32)])


def test_converted_checkpoint_directory_gives_the_same_detections(run, detector, tmp_path):
    from scaledet_jax.convert import checkpoint

    workdir, images, _ = run
    converted = str(tmp_path / "converted")
    checkpoint.save_converted(
        converted, detector.variables, {"layout": "test", "source": "run", "mapped": 1, "model_options": {}}
    )
    with pytest.raises(UserError, match="give the model's config"):
        Detector.from_checkpoint(converted)
    again = Detector.from_checkpoint(converted, _config())
    rgb = read_rgb(os.path.join(workdir, "synthetic_data", "val", images[1]["file_name"]))
    np.testing.assert_array_equal(again.predict([rgb])[0]["boxes"], detector.predict([rgb])[0]["boxes"])
    wrong = _config()
    wrong.model.head.num_filters = 32
    with pytest.raises(UserError, match="does not fit the config"):
        Detector.from_checkpoint(converted, wrong)


def test_predict_cli_writes_pictures_and_results_and_skips_unreadable_files(run, tmp_path):
    workdir, images, _ = run
    inputs = tmp_path / "photos"
    inputs.mkdir()
    source = read_rgb(os.path.join(workdir, "synthetic_data", "val", images[0]["file_name"]))
    Image.fromarray(source).save(inputs / "a.jpg", quality=95)
    Image.fromarray(source[..., 0]).save(inputs / "b_gray.png")
    Image.fromarray(np.concatenate([source, np.full(source.shape[:2] + (1,), 255, np.uint8)], -1)).save(
        inputs / "c_rgba.png"
    )
    (inputs / "d_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "scaledet_jax.predict", f"--workdir={workdir}", f"--input={inputs}",
         f"--output={output}", "--score_threshold=0.0", "--batch_size=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [line for line in result.stderr.splitlines() if line.startswith("predict: skipped")]
    assert len(skipped) == 1 and "d_broken.jpg" in skipped[0]
    assert sorted(os.listdir(output)) == ["a.png", "b_gray.png", "c_rgba.png", "detections.json", "images.json"]
    for name in ("a.png", "b_gray.png", "c_rgba.png"):
        with Image.open(output / name) as picture:
            assert picture.size == (source.shape[1], source.shape[0])
    listing = json.loads((output / "images.json").read_text())
    assert [os.path.basename(i["file_name"]) for i in listing["images"]] == ["a.jpg", "b_gray.png", "c_rgba.png"]
    assert {c["name"] for c in listing["categories"]} == {"circle", "square", "triangle"}
    found = json.loads((output / "detections.json").read_text())
    assert {d["image_id"] for d in found} == {0, 1, 2}
    assert all(0 <= d["bbox"][0] and d["bbox"][0] + d["bbox"][2] <= source.shape[1] + 0.01 for d in found)


def test_predict_cli_mistakes_are_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "scaledet_jax.predict", f"--workdir={tmp_path}", f"--input={tmp_path}/none/*.jpg",
         f"--output={tmp_path / 'out'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no image files found" in lines[0]
    assert not (tmp_path / "out").exists()


def _flat(tree) -> dict:
    import jax

    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_init_from_a_run_with_other_classes_keeps_all_but_the_class_predictor(run, tmp_path, caplog):
    """Fine-tuning on other classes (issue 14 item 4): init_from a run trained on 3 shapes, on a set of 4 other
    shapes: every tensor loads but the class predictor, which keeps its fresh (prior-probability) init."""
    import logging

    from scaledet_jax import detector as detector_module
    from scaledet_jax.heads.retinanet import prior_probability_bias

    workdir = run[0]
    source = _flat(detector_module.restore_variables(detector_module.newest_checkpoint(workdir))["params"])
    config = _config()
    config.data.synthetic_classes = "pentagon,star,cross,hexagon"
    config.model.num_classes = 5
    config.init_from = workdir
    caplog.set_level(logging.INFO)
    state = train.Run(config, str(tmp_path / "other")).restore_or_init()
    loaded = _flat(state.params)
    different = sorted(k for k in loaded if loaded[k].shape != source[k].shape)
    assert different == ["['head']['class_predict']['bias']", "['head']['class_predict']['kernel']"]
    assert all(np.array_equal(loaded[k], source[k]) for k in loaded if k not in different)
    np.testing.assert_allclose(loaded["['head']['class_predict']['bias']"], prior_probability_bias(0.01), rtol=1e-6)
    warning = [r.getMessage() for r in caplog.records if "re-initialised" in r.getMessage()]
    assert (
        len(warning) == 1 and "has 4 classes, the config 5" in warning[0] and "head/class_predict/kernel" in warning[0]
    )
    # The same classes: everything loads, nothing is re-initialised.
    caplog.clear()
    same = _config()
    same.init_from = workdir
    state = train.Run(same, str(tmp_path / "same")).restore_or_init()
    assert all(np.array_equal(x, source[k]) for k, x in _flat(state.params).items())
    assert not [r for r in caplog.records if "re-initialised" in r.getMessage()]


def test_synthetic_set_with_other_classes(tmp_path):
    config = _config()
    config.data.synthetic_classes = "star,cross"
    config.model.num_classes = 3
    from scaledet_jax.data import pipeline

    builder = pipeline.get_builder(config, str(tmp_path))
    assert pipeline.dataset_categories(config, str(tmp_path), builder) == {1: "star", 2: "cross"}
    config.data.synthetic_classes = "star,blob"
    with pytest.raises(UserError, match="synthetic_classes.*blob"):
        pipeline.get_builder(config, str(tmp_path / "bad"))


# Export (issue 14 item 3): the artifacts run in processes that cannot import scaledet_jax (and, for the
# SavedModel, not JAX either) and give Detector.predict's detections.
_BLOCK_IMPORTS = """
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is not importable in this test")
        return None
sys.meta_path.insert(0, _Blocked())
"""
_RUN_JAX_EXPORT = """
import jax, numpy as np
exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
images = np.load(sys.argv[2])
np.savez(sys.argv[3], **{f"{k}/{n}": np.asarray(v) for k in images.files for n, v in exported.call(images[k]).items()})
"""
_RUN_SAVED_MODEL = """
import numpy as np, tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
images = np.load(sys.argv[2])
found = {k: serve(image=tf.constant(images[k])) for k in images.files}
np.savez(sys.argv[3], **{f"{k}/{n}": v.numpy() for k in images.files for n, v in found[k].items()})
"""


def _export_images(run) -> list[np.ndarray]:
    workdir, images, _ = run
    pixels = [read_rgb(os.path.join(workdir, "synthetic_data", "val", image["file_name"])) for image in images[:3]]
    wide = np.concatenate([pixels[0], pixels[0][:, ::-1], pixels[0]], axis=1)
    return [*pixels, wide, np.ascontiguousarray(pixels[1][:40, :, :])]  # landscape 3:1 and a thin strip


@pytest.mark.parametrize("export_format", ["jax", "saved_model"])
def test_exported_detector_runs_without_scaledet_jax_and_gives_the_python_detections(
    run, detector, tmp_path, export_format
):
    output = tmp_path / "exported"
    result = subprocess.run(
        [sys.executable, "-m", "scaledet_jax.export", f"--workdir={run[0]}", f"--format={export_format}",
         f"--output={output}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((output / "labels.json").read_text()) == {"1": "circle", "2": "square", "3": "triangle"}
    manifest = json.loads((output / "export.json").read_text())
    assert manifest["format"] == export_format
    assert set(manifest["outputs"]) == {"boxes", "scores", "classes", "num_detections"}
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]

    pixels = _export_images(run)
    np.savez(tmp_path / "images.npz", *pixels)
    if export_format == "jax":
        program, blocked, artifact = _RUN_JAX_EXPORT, {"scaledet_jax"}, output / "model.jax"
    else:
        program, blocked, artifact = _RUN_SAVED_MODEL, {"scaledet_jax", "jax", "jaxlib", "flax"}, output
    script = _BLOCK_IMPORTS.format(blocked=blocked) + program
    result = subprocess.run(
        [sys.executable, "-c", script, str(artifact), str(tmp_path / "images.npz"), str(tmp_path / "found.npz")],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    found = np.load(tmp_path / "found.npz")
    expected = detector.predict(pixels)
    for k, (image, python) in enumerate(zip(pixels, expected, strict=True)):
        n = int(found[f"arr_{k}/num_detections"])
        assert n == len(python["scores"]) > 0, (image.shape, n, len(python["scores"]))
        boxes, scores, classes = (found[f"arr_{k}/{name}"] for name in ("boxes", "scores", "classes"))
        assert boxes.shape == (20, 4) and np.all(boxes[n:] == 0) and np.all(scores[n:] == 0)
        np.testing.assert_array_equal(classes[:n], python["classes"])
        np.testing.assert_allclose(scores[:n], python["scores"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(boxes[:n], python["boxes"], atol=0.01, rtol=0)  # original pixels


def test_export_mistakes_are_one_line_and_a_failed_export_leaves_nothing(run, detector, tmp_path, monkeypatch):
    from scaledet_jax import export

    existing = tmp_path / "existing"
    existing.mkdir()
    for arguments, message in [
        ([f"--workdir={run[0]}", f"--output={existing}"], "already exists"),
        ([f"--workdir={run[0]}", f"--init_from={run[0]}", f"--output={tmp_path / 'a'}"], "give one of"),
        ([f"--workdir={run[0]}", "--platforms=cpu,gpux", f"--output={tmp_path / 'a'}"], "unknown platform 'gpux'"),
        ([f"--workdir={tmp_path}", f"--output={tmp_path / 'a'}"], "no checkpoint"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "scaledet_jax.export", *arguments], cwd=ROOT, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert os.listdir(existing) == [] and not (tmp_path / "a").exists()

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(export, "export_jax", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export.export(detector, "jax", str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["existing"]  # neither the output nor its partial directory
