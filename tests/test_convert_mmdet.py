"""mmdetection v1.1 checkpoints through the converter, with parity against PyTorch rebuilds of the
seeds' models (tests/mmdet_spinenet_reference.py, tests/mmdet_efficientdet_reference.py) that run
for real, random-init with randomised biases/BN/fusion weights (torch_reference.randomize_), saved
as the mmcv dicts those repositories release.

Parity is measured twice, at every output level, class and box outputs:

* float64 on both sides (torch ``.double()``, JAX under ``enable_x64``): the converted network is
  the same function — differences are rounding only (~1e-12), asserted at 1e-8;
* float32, as deployed. EfficientDet D0: max abs diff <= 1e-4 against PyTorch's float32 forward.
  SpineNet: a random-init SpineNet is deep enough (~100 convs on the longest path) that PyTorch's
  own float32 forward is 1e-3 - 4e-3 away from its float64 forward on these outputs, so the 1e-4
  float32 bound cannot be met by any float32 implementation here (ours vs PyTorch float32 measures
  1.5e-3 - 2.3e-3). The test asserts ours is no further from the exact (float64) outputs than
  PyTorch's float32 forward is (x1.5), and prints all three distances. The ratio is a property of
  the random network: over SpineNet-49S networks from torch seeds 0-5 it measured 0.66 - 1.30 (RMS
  ratio 0.77 - 1.18), and 1.74 once in CI when the network still depended on which tests had run
  before in the worker; conftest now seeds torch per test, so this is the seed-0 network everywhere
  (0.96 for 49S, 1.04 for 49).
"""

import copy
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from configs_util import CONFIG_DIR, load_config, photo_like
from mmdet_efficientdet_reference import build_mmdet_efficientdet, mmcv_imrescale, mmdet_v1_detections
from mmdet_spinenet_reference import build_mmdet_spinenet_retinanet
from mmdet_spinenet_reference import trainable_parameter_count as torch_parameter_count
from torch_reference import randomize_

from scaledet_jax.convert import checkpoint
from scaledet_jax.convert.mmdet import COCO_80_CATEGORY_IDS, anchor_permutation
from scaledet_jax.models import build_model
from scaledet_jax.tasks import build_task
from scaledet_jax.tools import profile

ROOT = str(CONFIG_DIR.parent)
FLOAT64_TOLERANCE = 1e-8
TOLERANCE = 1e-4
SIZE = 128  # the mmdetection SpineNet needs multiples of 128


def _convert(*args):
    return subprocess.run(
        [sys.executable, "-m", "scaledet_jax.convert", *args], capture_output=True, text=True, timeout=900, cwd=ROOT
    )


def _in_our_order(class_outputs, box_outputs, config) -> list[tuple[np.ndarray, np.ndarray]]:
    """mmdetection's per-level NCHW outputs -> NHWC in our anchor order and box coding (float64)."""
    a = config.model.anchor
    perm = anchor_permutation(a.num_scales, a.aspect_ratios)
    out = []
    for cls, box in zip(class_outputs, box_outputs, strict=True):
        cls = cls.permute(0, 2, 3, 1).double().numpy()
        box = box.permute(0, 2, 3, 1).double().numpy()
        cls = cls.reshape(cls.shape[:-1] + (len(perm), -1))[..., perm, :].reshape(cls.shape)
        box = box.reshape(box.shape[:-1] + (len(perm), 4))[..., perm, :][..., [1, 0, 3, 2]].reshape(box.shape)
        out.append((cls, box))
    return out


def _torch_outputs(reference, images: np.ndarray, dtype, config):
    model = copy.deepcopy(reference).to(dtype).eval()
    with torch.no_grad():
        cls, box = model(torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype))
    return _in_our_order(cls, box, config)


def _our_outputs(model, variables, images: np.ndarray, float64: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    if float64:
        with jax.enable_x64(True):
            v64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables)
            out = model.apply(v64, images.astype(np.float64), train=False)
            out = jax.tree_util.tree_map(np.asarray, out)
    else:
        out = model.apply(variables, images.astype(np.float32), train=False)
    levels = sorted(out["class_outputs"])
    return [
        (np.asarray(out["class_outputs"][lv], np.float64), np.asarray(out["box_outputs"][lv], np.float64))
        for lv in levels
    ]


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for pa, pb in zip(a, b, strict=True) for x, y in zip(pa, pb, strict=True))


def _load(config, directory):
    checkpoint.apply_model_options(config, directory)
    model = build_model(config.model)
    shapes = profile.abstract_variables(model, SIZE)
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))
    variables, loaded, kept = checkpoint.merge_into(zeros, checkpoint.load_converted(str(directory)))
    assert kept == 0, "every variable comes from the checkpoint"
    return model, variables


def _assert_mmdet_detections(reference, config, variables, images, octave_base_scale: float) -> dict:
    """Our end-to-end detections (the converter's recorded post-processing: mmdet v1 anchors, decoding, per-level
    candidates, clipping, NMS) on ``images`` equal mmdet v1's own post-processing
    (``mmdet_v1_detections``) of the PyTorch rebuild's outputs, both in float64: same classes, scores within
    1e-4, boxes within 0.01 px. Returns our detections."""
    config = copy.deepcopy(config)
    config.model.image_size = SIZE
    task = build_task(config)
    with torch.no_grad():
        cls, box = copy.deepcopy(reference).double().eval()(torch.from_numpy(images).permute(0, 3, 1, 2).double())
    boxes, scores, labels = (x.numpy() for x in mmdet_v1_detections(cls, box, octave_base_scale, (SIZE, SIZE)))
    with jax.enable_x64(True):
        v64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables)
        found = jax.tree_util.tree_map(lambda x: np.asarray(x)[0], task.predict(v64, images.astype(np.float64)))
    valid = found["valid"]
    return _assert_same_as_mmdet({k: v[valid] for k, v in found.items()}, boxes, scores, labels)


def _assert_same_as_mmdet(ours: dict, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> dict:
    """Our detections (boxes y1, x1, y2, x2) equal mmdet v1's ("+1" x1, y1, x2, y2; labels 0..79): same classes,
    scores within 1e-4, boxes within 0.01 px."""
    assert 20 <= len(scores) == len(ours["scores"]) <= 100, (len(scores), len(ours["scores"]))
    if len(scores) == 100:  # the max_per_img cut: detections scored within 1e-4 of it may differ by near-ties
        cut = max(scores.min(), ours["scores"].min()) + 1e-4
        boxes, scores, labels = boxes[scores > cut], scores[scores > cut], labels[scores > cut]
        ours = {k: v[ours["scores"] > cut] for k, v in ours.items()}
        assert len(scores) >= 30  # random-init scores crowd near 1, where float32 resolves ~6e-8
    categories = np.asarray(COCO_80_CATEGORY_IDS)[labels]
    # Pair them by class, then score (scores a few 1e-8 apart across classes may swap in a plain score order).
    theirs_order, ours_order = np.lexsort((-scores, categories)), np.lexsort((-ours["scores"], ours["classes"]))
    np.testing.assert_array_equal(ours["classes"][ours_order], categories[theirs_order])
    np.testing.assert_allclose(ours["scores"][ours_order], scores[theirs_order], atol=1e-4, rtol=0)
    # mmdet's inclusive "+1" corners: its x2, y2 are our exclusive x2 - 1, y2 - 1.
    y1, x1, y2, x2 = (ours["boxes"][ours_order][:, i] for i in range(4))
    np.testing.assert_allclose(np.stack([x1, y1, x2 - 1, y2 - 1], -1), boxes[theirs_order], atol=0.01, rtol=0)
    return ours


def _tempered(reference, variables, factor: float):
    """Copies of both with the class predictor's last linear map scaled by ``factor`` (logits x factor). The
    random-init logits reach 1e3 on a 128 x 256 input, which saturates all top scores at exactly 1.0 in float64,
    where no order or score can be compared; both sides stay the same function, the comparison meaningful."""
    reference = copy.deepcopy(reference)
    theirs = [
        n for n, _ in reference.named_parameters() if n.startswith("bbox_head.retina_cls.") and "depthwise" not in n
    ]
    with torch.no_grad():
        for name in theirs:
            reference.get_parameter(name).mul_(factor)
    ours = []

    def scale(path, leaf):
        name = jax.tree_util.keystr(path)
        if "['class_predict']" in name and "depthwise" not in name:
            ours.append(name)
            return leaf * factor
        return leaf

    params = jax.tree_util.tree_map_with_path(scale, variables["params"])
    assert len(theirs) == len(ours) == 2, (theirs, ours)  # weight and bias on each side
    return reference, {**variables, "params": params}


def _assert_mmdet_photo_detections(reference, config, variables, octave_base_scale: float, image_size: int) -> None:
    """The whole path on a 110 x 300 photo (issue 14 item 5): mmdet v1's test pipeline (Resize keep_ratio to
    (S, S) with OpenCV, Normalize, Pad) and its get_bboxes(rescale=True) on the PyTorch rebuild, against
    ``Detector.predict`` on the uint8 image with the converter's recorded ``model.test_resize``; float64 networks.
    SpineNet at S = 256: 94 x 256, padded to 128 x 256 (size divisor 128, a non-square input); EfficientDet at
    S = 128: 47 x 128, padded to the square."""
    from scaledet_jax.detector import Detector

    config = copy.deepcopy(config)
    config.model.image_size = image_size
    image = photo_like(110, 300, seed=14)
    resized, factor = mmcv_imrescale(image, (image_size, image_size))
    spec = config.model.input
    normalised = (resized.astype(np.float64) - np.asarray(spec.mean)) / np.asarray(spec.std)
    if config.model.test_resize.pad_square:
        padded_hw = (image_size, image_size)
    else:
        padded_hw = tuple(-(-side // 128) * 128 for side in resized.shape[:2])
        assert padded_hw == (128, 256)
    padded = np.zeros((*padded_hw, 3))
    padded[: resized.shape[0], : resized.shape[1]] = normalised
    x = torch.from_numpy(padded[None]).permute(0, 3, 1, 2)
    with torch.no_grad():
        cls, _ = copy.deepcopy(reference).double().eval()(x)
        # Logits of at most +-8 (see _tempered).
        reference, variables = _tempered(reference, variables, 8.0 / max(float(c.abs().max()) for c in cls))
        cls, box = reference.double().eval()(x)
    boxes, scores, labels = (
        x.numpy() for x in mmdet_v1_detections(cls, box, octave_base_scale, resized.shape[:2], scale_factor=factor)
    )
    with jax.enable_x64(True):
        v64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables)
        (found,) = Detector(config, v64, dtype=np.float64).predict(image)
    ours = {"boxes": found["boxes"][:, [1, 0, 3, 2]], "scores": found["scores"], "classes": found["classes"]}
    compared = _assert_same_as_mmdet(ours, boxes, scores, labels)
    print(f"\nmmdet v1 test pipeline on a 110 x 300 photo @{image_size}: {len(compared['scores'])} detections equal")

    config.model.test_resize.style = "letterbox"  # negative control: our training-time resize (TF bilinear)
    with jax.enable_x64(True):
        (found,) = Detector(config, v64, dtype=np.float64).predict(image)
    wrong = {"boxes": found["boxes"][:, [1, 0, 3, 2]], "scores": found["scores"], "classes": found["classes"]}
    with pytest.raises(AssertionError):
        _assert_same_as_mmdet(wrong, boxes, scores, labels)


def _convert_and_compare(layout: str, reference, config_name: str, tmp_path, expected_shared: int):
    """Saves ``reference`` as an mmcv checkpoint, converts it through the CLI, and returns
    (config, model, variables, images, distances) with the float64 / float32 distances measured."""
    source = tmp_path / "source.pth"
    torch.save({"meta": {"epoch": 350}, "state_dict": reference.state_dict(), "optimizer": {}}, source)
    out = tmp_path / "converted"
    result = _convert(f"--from={layout}", f"--config=configs/{config_name}.py", f"--input={source}", f"--output={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.load(open(out / "conversion.json"))
    options = info["model_options"]
    assert options["num_classes"] == 80 and tuple(options["category_ids"]) == COCO_80_CATEGORY_IDS
    # Head tower convs are stored once per level; every copy after level 0's is checked equal.
    assert len(info["shared_checked"]) == expected_shared and "shared copies checked equal" in result.stdout

    config = load_config(config_name)
    model, variables = _load(config, out)
    ours_count = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables["params"]))
    assert ours_count == torch_parameter_count(reference)  # same network, shared convs counted once
    images = np.random.RandomState(1).normal(size=(1, SIZE, SIZE, 3))
    exact = _torch_outputs(reference, images, torch.float64, config)
    ours64 = _our_outputs(model, variables, images, float64=True)
    torch32 = _torch_outputs(reference, images, torch.float32, config)
    ours32 = _our_outputs(model, variables, images, float64=False)
    distances = {
        "float64": _max_diff(ours64, exact),
        "ours32_torch32": _max_diff(ours32, torch32),
        "ours32_exact": _max_diff(ours32, exact),
        "torch32_exact": _max_diff(torch32, exact),
    }
    print(
        f"\n{layout} {config_name} @{SIZE}: float64 max abs diff {distances['float64']:.1e}; float32: ours vs "
        f"torch {distances['ours32_torch32']:.1e}, ours vs exact {distances['ours32_exact']:.1e}, "
        f"torch vs exact {distances['torch32_exact']:.1e}"
    )
    assert distances["float64"] <= FLOAT64_TOLERANCE
    return config, variables, images, exact, distances


@pytest.mark.parametrize("variant,config_name", [("49S", "spinenet49s"), ("49", "spinenet49")])
def test_mmdet_spinenet_converts_with_parity(variant, config_name, tmp_path):
    reference = build_mmdet_spinenet_retinanet(variant)
    randomize_(reference, np.random.RandomState(0).normal(size=(8, SIZE, SIZE, 3)).astype(np.float32))
    config, variables, images, exact, distances = _convert_and_compare(
        "mmdet-spinenet", reference, config_name, tmp_path, expected_shared=4 * 2 * 4
    )
    assert config.model.backbone.resample_pooling == "single" and config.model.activation == "relu"
    assert distances["ours32_exact"] <= 1.5 * distances["torch32_exact"]  # see the module docstring
    ours = _assert_mmdet_detections(reference, config, variables, images, octave_base_scale=3)
    assert config.model.test_resize.style == "mmdet" and config.model.test_resize.size_divisor == 128
    if variant == "49S":
        _assert_mmdet_photo_detections(reference, config, variables, octave_base_scale=3, image_size=256)

    if variant == "49S":  # negative control: Model Garden's anchors and decoding move the boxes
        for option in ("plus_one_rounding",):
            config.model.anchor[option] = False
        with pytest.raises(AssertionError):
            _assert_mmdet_detections(reference, config, variables, images, octave_base_scale=3)
        assert len(ours["scores"]) > 0

    if variant == "49S":  # negative control: Model Garden's repeated pools from level 4 to 7
        config.model.backbone.resample_pooling = "repeated"
        wrong = _our_outputs(build_model(config.model), variables, images, float64=True)
        assert _max_diff(wrong, exact) > 1e-2


def test_mmdet_efficientdet_d0_converts_with_parity(tmp_path):
    reference = build_mmdet_efficientdet("d0", image_size=SIZE)
    randomize_(reference, np.random.RandomState(0).normal(size=(8, SIZE, SIZE, 3)).astype(np.float32))
    # 3 tower convs x (depthwise weight, pointwise weight, pointwise bias) x 2 towers x 4 levels.
    config, variables, images, exact, distances = _convert_and_compare(
        "mmdet-efficientdet", reference, "efficientdet_d0", tmp_path, expected_shared=3 * 3 * 2 * 4
    )
    assert config.model.pool_padding == "symmetric"
    assert distances["ours32_torch32"] <= TOLERANCE
    _assert_mmdet_detections(reference, config, variables, images, octave_base_scale=4)
    assert config.model.test_resize.style == "mmdet" and config.model.test_resize.pad_square
    _assert_mmdet_photo_detections(reference, config, variables, octave_base_scale=4, image_size=SIZE)

    config.model.pool_padding = "same"  # negative control: automl's 'SAME' pools
    wrong = _our_outputs(build_model(config.model), variables, images, float64=True)
    assert _max_diff(wrong, exact) > 1e-3


def test_mmdet_spinenet_refuses_unequal_shared_head_convs(tmp_path):
    reference = build_mmdet_spinenet_retinanet("49S")
    state = reference.state_dict()
    state["bbox_head.cls_convs.3.1.conv.weight"] = state["bbox_head.cls_convs.3.1.conv.weight"] + 1.0
    source = tmp_path / "tampered.pth"
    torch.save({"state_dict": state}, source)
    result = _convert(
        "--from=mmdet-spinenet", "--config=configs/spinenet49s.py", f"--input={source}", f"--output={tmp_path / 'o'}"
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "bbox_head.cls_convs.3.1.conv.weight differs from bbox_head.cls_convs.0.1.conv.weight" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "layout,variant,config_name",
    [("mmdet-spinenet", v, f"spinenet{v.lower()}") for v in ("96", "143", "190")]
    + [("mmdet-efficientdet", v, f"efficientdet_{v}") for v in ("d1", "d2", "d3", "d4", "d5")],
)
def test_mmdet_every_variant_maps_strictly(layout, variant, config_name):
    """The remaining variants (parity above covers SpineNet-49S/49 and D0): every tensor of the
    PyTorch model is placed, every variable of ours filled, and the parameter counts are equal."""
    from scaledet_jax.convert.layouts import LAYOUTS

    reference = (
        build_mmdet_spinenet_retinanet(variant) if layout == "mmdet-spinenet" else build_mmdet_efficientdet(variant)
    )
    state = {k: t.numpy() for k, t in reference.state_dict().items()}
    size = SIZE if layout == "mmdet-spinenet" else 256
    _, shapes, variables, report, _ = LAYOUTS[layout].convert(state, load_config(config_name), size)
    assert len(report.mapped) == len(jax.tree_util.tree_leaves(shapes))
    ours = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables["params"]))
    assert ours == torch_parameter_count(reference)


def test_mmdet_efficientdet_checkpoint_evaluates_and_finetunes_through_main(tmp_path):
    """80 mmdetection classes (COCO ids via category_ids) through main.py on the synthetic data."""
    reference = build_mmdet_efficientdet("d0", image_size=SIZE)
    randomize_(reference, np.random.RandomState(0).normal(size=(4, SIZE, SIZE, 3)).astype(np.float32))
    source = tmp_path / "d0.pth"
    torch.save({"state_dict": reference.state_dict()}, source)
    d0_on_synthetic = ["--config=configs/efficientdet_quickstart.py", "--config.model.max_level=7"]
    converted = tmp_path / "converted"
    result = _convert("--from=mmdet-efficientdet", *d0_on_synthetic, f"--input={source}", f"--output={converted}")
    assert result.returncode == 0, result.stderr[-3000:]
    tiny = [
        *d0_on_synthetic,
        f"--config.init_from={converted}",
        "--config.data.synthetic_train_images=8",
        "--config.data.synthetic_val_images=4",
        "--config.data.train_batch_size=4",
        "--config.data.eval_batch_size=4",
        "--config.model.detection.score_threshold=0.0",  # random weights: keep every candidate
    ]
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "main.py", *args], capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    result = run(*tiny, f"--workdir={tmp_path / 'eval'}", "--mode=eval")
    assert result.returncode == 0, result.stderr[-3000:]
    detections = json.load(open(tmp_path / "eval" / "detections_0.json"))
    assert detections and {d["category_id"] for d in detections} <= set(COCO_80_CATEGORY_IDS)
    assert {d["category_id"] for d in detections} - {1, 2, 3}  # COCO ids beyond the first outputs occur

    # Fine-tuning on the 3 synthetic classes (issue 14 item 4): the dataset's classes win over the checkpoint's 80;
    # everything but the class predictor loads.
    result = run(*tiny, f"--workdir={tmp_path / 'finetune'}", "--config.total_steps=2", "--mode=train")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initialised" in result.stderr and (tmp_path / "finetune" / "checkpoints" / "2").is_dir()
    assert "has 80 classes, the config 3: the dataset's classes are kept" in result.stderr
    assert "class_predict" in result.stderr.split("re-initialised")[-1].splitlines()[0]
    card = json.load(open(tmp_path / "finetune" / "detector.json"))
    assert card["config"]["model"]["num_classes"] == 3 and card["config"]["model"]["category_ids"] == []
    assert card["categories"] == {"1": "circle", "2": "square", "3": "triangle"}


@pytest.mark.parametrize("config_name,octave_base_scale", [("spinenet49", 3), ("efficientdet_d0", 4)])
def test_plus_one_anchors_equal_mmdet_v1_anchor_generator(config_name, octave_base_scale):
    """``anchor.plus_one_rounding`` (recorded by both mmdet layouts) gives mmdet v1's rounded "+1" anchors
    exactly, in our order and frame (x2, y2 exclusive); Model Garden's are up to ~1 px away."""
    from mmdet_efficientdet_reference import ANCHOR_STRIDES, mmdet_anchors

    from scaledet_jax.tasks.retinanet import model_anchors

    config = load_config(config_name)
    config.model.image_size = 640
    a = config.model.anchor
    perm = anchor_permutation(a.num_scales, a.aspect_ratios)
    expected = []
    for stride in ANCHOR_STRIDES:
        theirs = mmdet_anchors((640 // stride, 640 // stride), stride, octave_base_scale).numpy()
        theirs = theirs.reshape(-1, len(perm), 4)[:, perm] + np.array([0.0, 0.0, 1.0, 1.0], np.float32)
        expected.append(theirs[..., [1, 0, 3, 2]].reshape(-1, 4))
    expected = np.concatenate(expected)
    a.anchor_size = float(octave_base_scale)
    plain = model_anchors(config)
    a.plus_one_rounding = True
    np.testing.assert_array_equal(model_anchors(config), expected)
    assert 0.4 < np.abs(plain - expected).max() <= 1.5
