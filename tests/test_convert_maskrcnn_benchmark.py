"""maskrcnn-benchmark checkpoints (``--from=maskrcnn-benchmark``) and timm VoVNets (``--from=timm-vovnet``) through
the converter, against PyTorch rebuilds that run in the test.

* VoVNet-39 Mask R-CNN and Faster R-CNN of the seed (stigma0617/maskrcnn-benchmark-vovnet, rebuilt in
  ``vovnet_reference.py``: FrozenBatchNorm without eps calibrated on images, random biases), saved as the trainer
  saves them (``{'model', 'optimizer', 'scheduler', 'iteration'}`` / ``{'model'}``, ``module.`` prefixes) and
  converted by the CLI (a subprocess for the Mask R-CNN; ``convert_checkpoint``, the CLI's work, in-process for the
  others, to keep the test short).
  Through the converted directory at 128 px: FPN P2-P6, RPN objectness / deltas per level (in our anchor and box
  code order), and on fixed proposals (random, plus boxes on Detectron's level boundaries) the box head's class
  logits / deltas and the mask logits.
* maskrcnn-benchmark's ResNet-50-FPN Faster R-CNN (MSRA: stride in the 1x1, ``maskrcnn_benchmark_reference.py``):
  features and RPN at 64 px.
* timm ``vovnet39a`` (random, BatchNorm statistics calibrated) as a backbone initialisation: C2-C5 at 64 px.

Parity rule (as ``test_vovnet.py``): in float64 on both sides the converted network is the same function (asserted
at 1e-8). In float32 a random deep net amplifies rounding: the reference's own float32 outputs are up to ~1e-4 (VoVNet)
/ ~1e-3 (ResNet-50) from its float64 ones, so ours must be within max(1e-4, 2x the reference's float32 error) of the
exact (float64) outputs; the direct float32 differences are printed.

Anchors: Detectron's cell anchors are not expressible with our anchor options (they round widths at the stride, then
scale); the test checks what the layout does reproduce (per-location order, centres, square anchors) and prints the
rest. Refusals: a tampered state_dict (one missing, one mis-shaped, one unknown tensor), a truncated file, a Faster
R-CNN checkpoint with a Mask R-CNN config, non-default cell anchors — one error line each, nothing written.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from types import SimpleNamespace

import jax
import maskrcnn_benchmark_reference as mb_ref
import numpy as np
import pytest
import timm
import torch
import vovnet_reference as ref
from configs_util import CONFIG_DIR, load_config
from torch_reference import randomize_

from scaledet_jax import defaults
from scaledet_jax.cli import UserError
from scaledet_jax.convert import checkpoint
from scaledet_jax.convert import maskrcnn_benchmark as layout
from scaledet_jax.convert.__main__ import convert_checkpoint
from scaledet_jax.convert.layouts import LAYOUTS
from scaledet_jax.convert.mmdet import COCO_80_CATEGORY_IDS, anchor_permutation
from scaledet_jax.convert.torchvision import TORCHVISION_RATIOS, torch_in_our_order
from scaledet_jax.models import build_model
from scaledet_jax.models.faster_rcnn import FasterRCNN, rpn_anchors
from scaledet_jax.models.mask_rcnn import MaskRCNN
from scaledet_jax.ops import roi_align
from scaledet_jax.tools import profile

ROOT = str(CONFIG_DIR.parent)
SIZE = 128
TOLERANCE = 1e-4
FLOAT64_TOLERANCE = 1e-8
MASK_TENSORS = 12  # mask_fcn1..4, conv5_mask, mask_fcn_logits: weight + bias each
CONFIG_FILE = (
    "from scaledet_jax import defaults\n\n\ndef get_config():\n    return defaults.vovnet_rcnn_config(39, masks={})\n"
)
# Proposals [ymin, xmin, ymax, xmax] whose sides are 111, 223, 447 px: Detectron's +1 areas put them one level above
# torchvision's rule (P3 / P4 / P5 instead of P2 / P3 / P4).
BOUNDARY_ROIS = [[0, 0, 111, 111], [10, 20, 121, 131], [-40, -60, 183, 163], [-150, -100, 297, 347]]


def _images(batch: int, size: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "scaledet_jax.convert", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    """The seed's V-39 Mask R-CNN (calibrated) and the Faster R-CNN with the same weights, and a timm vovnet39a,
    saved as users hold them. The Mask R-CNN's conversion runs through the CLI (a subprocess started here, while the
    rest is built); the others call ``convert_checkpoint``, what the CLI's ``main`` calls, in-process."""
    tmp = tmp_path_factory.mktemp("maskrcnn_benchmark")
    torch.manual_seed(0)
    mask_model = ref.calibrate_frozen_bn_(ref.GeneralizedRCNN(39, mask=True), _images(2, SIZE, seed=3), seed=3)
    state = mask_model.state_dict()
    # The trainer's Checkpointer file: {'model', 'optimizer', 'scheduler', 'iteration'}, DistributedDataParallel keys.
    optimizer = torch.optim.SGD(mask_model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [120000, 160000])
    mask_source = tmp / "model_final.pth"
    torch.save(
        {
            "model": {f"module.{k}": v for k, v in state.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "iteration": 180000,
        },
        mask_source,
    )
    config_file = tmp / "maskrcnn_vovnet39_fpn.py"
    config_file.write_text(CONFIG_FILE.format(True))
    process = _cli(
        "--from=maskrcnn-benchmark", f"--config={config_file}", f"--input={mask_source}", f"--output={tmp / 'mask'}"
    )

    faster_model = ref.GeneralizedRCNN(39, mask=False).eval()
    faster_model.load_state_dict({k: v for k, v in state.items() if not k.startswith("roi_heads.mask.")})
    faster_source = tmp / "faster.pth"
    torch.save({"model": {f"module.{k}": v for k, v in faster_model.state_dict().items()}}, faster_source)
    timm_model = randomize_(timm.create_model("vovnet39a", pretrained=False), _images(4, SIZE, seed=7), seed=1)
    timm_source = tmp / "vovnet39a.pth"
    torch.save(timm_model.state_dict(), timm_source)
    results: list[subprocess.CompletedProcess] = []

    def result() -> subprocess.CompletedProcess:
        if not results:
            stdout, stderr = process.communicate(timeout=900)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
        return results[0]

    yield SimpleNamespace(
        mask=mask_model, faster=faster_model, state=state, timm=timm_model, tmp=tmp, mask_result=result,
        sources={"mask": mask_source, "faster": faster_source, "timm": timm_source},
    )  # fmt: skip
    if process.poll() is None:
        process.kill()
        process.wait()


def _load(config, directory, size: int = SIZE):
    """(model, variables) of ``config`` with the converted checkpoint's options and variables (zeros elsewhere)."""
    checkpoint.apply_model_options(config, str(directory))
    model = build_model(config.model)
    shapes = profile.abstract_variables(model, size)
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))
    variables, _, kept = checkpoint.merge_into(zeros, checkpoint.load_converted(str(directory)))
    return model, variables, kept


def _info(directory) -> dict:
    return json.loads((directory / "conversion.json").read_text())


@pytest.fixture(scope="module")
def mask(conversions):
    result = conversions.mask_result()
    assert result.returncode == 0, result.stderr[-3000:]
    config = defaults.vovnet_rcnn_config(39, masks=True)
    model, variables, kept = _load(config, conversions.tmp / "mask")
    info = _info(conversions.tmp / "mask")
    return SimpleNamespace(model=model, variables=variables, kept=kept, info=info, stdout=result.stdout, config=config)


@pytest.fixture(scope="module")
def faster(conversions):
    output = conversions.tmp / "faster"
    config = defaults.vovnet_rcnn_config(39, masks=False)
    convert_checkpoint(
        "maskrcnn-benchmark", copy.deepcopy(config), "fasterrcnn_vovnet39_fpn.py", str(conversions.sources["faster"]),
        str(output),
    )  # fmt: skip
    info = _info(output)
    model, variables, kept = _load(config, output)
    return SimpleNamespace(model=model, variables=variables, kept=kept, info=info, config=config)


def _float64(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _max_diff(ours: dict, theirs: dict, keys) -> float:
    return max(float(np.max(np.abs(np.asarray(ours[k], np.float64) - theirs[k]))) for k in keys)


def _check(ours64: dict, ours32: dict, exact: dict, torch32: dict, groups: dict[str, list[str]], what: str) -> dict:
    """float64 parity at 1e-8 and the float32 rule per output group; returns the direct float32 differences."""
    direct = {}
    for group, keys in groups.items():
        for k in keys:
            assert np.abs(exact[k]).max() > 0.05, f"{what} {k}: reference near zero, the comparison would be blind"
        d64 = _max_diff(ours64, exact, keys)
        ours_err, torch_err = _max_diff(ours32, exact, keys), _max_diff(torch32, exact, keys)
        direct[group] = _max_diff(ours32, torch32, keys)
        print(
            f"\n{what} {group}: float64 max abs diff {d64:.1e}; float32 vs exact: ours {ours_err:.1e}, "
            f"reference {torch_err:.1e}; float32 ours vs reference {direct[group]:.1e}"
        )
        assert d64 <= FLOAT64_TOLERANCE, (group, d64)
        assert ours_err <= max(TOLERANCE, 2 * torch_err), (group, ours_err, torch_err)
    return direct


def _nhwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().permute(0, 2, 3, 1).double().numpy()


def _reference_outputs(reference: torch.nn.Module, images: np.ndarray, rois: np.ndarray | None, dtype) -> dict:
    """The rebuild's features, RPN outputs (our channel order) and, on ``rois`` [R, 4] (ymin, xmin, ymax, xmax),
    box head class logits / deltas (ours: (dy, dx, dh, dw)) and mask logits [R, 28, 28, C]."""
    model = copy.deepcopy(reference).to(dtype)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype)
    order = anchor_permutation(1, layout.COMMON_OPTIONS["anchor.aspect_ratios"], TORCHVISION_RATIOS)
    with torch.no_grad():
        if rois is None:
            features = model.features(x)
            logits, deltas = model.rpn.head(list(features))
            out = {}
        else:
            boxes = torch.from_numpy(rois[:, [1, 0, 3, 2]]).to(dtype)  # x1, y1, x2, y2
            outputs = model(x, torch.cat([torch.zeros(len(rois), 1, dtype=dtype), boxes], 1))
            features, logits, deltas = outputs["features"], outputs["rpn_logits"], outputs["rpn_deltas"]
            classes = outputs["cls_score"].shape[1]
            out = {
                "class_logits": outputs["cls_score"].double().numpy()[None],
                "box_deltas": outputs["bbox_pred"].double().numpy().reshape(-1, classes, 4)[..., [1, 0, 3, 2]]
                .reshape(1, len(rois), -1),
            }  # fmt: skip
            if "mask_logits" in outputs:
                out["mask_logits"] = _nhwc(outputs["mask_logits"])[None]
    for level, (feature, logit, delta) in enumerate(zip(features, logits, deltas, strict=True), 2):
        out[f"P{level}"] = _nhwc(feature)
        out[f"objectness{level}"], out[f"deltas{level}"] = torch_in_our_order(logit, delta, 1, order)
    return out


def _our_outputs(model, variables, images: np.ndarray, rois: np.ndarray | None, float64: bool) -> dict:
    def forward(v, x, r):
        features = model.apply(v, x, method=FasterRCNN.features)
        objectness, deltas = model.apply(v, features, method=FasterRCNN.rpn)
        out = {f"P{level}": f for level, f in features.items()}
        for level in objectness:
            out[f"objectness{level}"], out[f"deltas{level}"] = objectness[level], deltas[level]
        if r is not None:
            out["class_logits"], out["box_deltas"] = model.apply(v, features, r, method=FasterRCNN.roi_outputs)
            if isinstance(model, MaskRCNN):
                out["mask_logits"] = model.apply(v, features, r, method=MaskRCNN.mask_outputs)
        return out

    boxes = None if rois is None else rois[None]
    if float64:
        with jax.enable_x64(True):
            return _float64(jax.jit(forward)(_float64(variables), images.astype(np.float64), boxes))
    boxes = None if boxes is None else boxes.astype(np.float32)
    return _float64(jax.jit(forward)(variables, images.astype(np.float32), boxes))


def _proposals(seed: int, count: int = 12) -> np.ndarray:
    """``count`` random proposals of 8-600 px (all four RoI levels at 128 px, many crossing the border) plus
    ``BOUNDARY_ROIS``, float64 [ymin, xmin, ymax, xmax]."""
    rng = np.random.RandomState(seed)
    centres, sides = rng.uniform(0, SIZE, size=(count, 2)), np.exp(rng.uniform(np.log(8), np.log(600), size=(count, 2)))
    random_rois = np.concatenate([centres - sides / 2, centres + sides / 2], axis=1)
    return np.concatenate([random_rois, np.asarray(BOUNDARY_ROIS, np.float64)])


# --- VoVNet-39 Mask / Faster R-CNN ------------------------------------------------------------------------


def test_mask_rcnn_conversion_report(mask, conversions):
    info, options = mask.info, mask.info["model_options"]
    state = conversions.state
    assert info["layout"] == "maskrcnn-benchmark" and info["mapped"] == len(state) - 5 == 237
    ignored = dict(info["ignored"])
    # Every tensor used or explained: the five cell-anchor buffers, and the trainer's entries beside 'model'.
    assert sorted(ignored) == sorted([f"rpn.anchor_generator.cell_anchors.{i}" for i in range(5)] + [
        "optimizer", "scheduler", "iteration"])  # fmt: skip
    assert ignored["optimizer"] == "checkpoint entry beside 'model'"
    assert "generate_anchors" in ignored["rpn.anchor_generator.cell_anchors.0"]
    assert mask.kept == 0, "every variable of the Mask R-CNN comes from the checkpoint"
    expected = {
        "backbone.name": "vovnet", "backbone.depth": 39, "backbone.norm": "frozen", "backbone.bn_epsilon": 0.0,
        "backbone.residual": True, "backbone.pool_ceil_mode": True, "backbone.pool_padding": "valid",
        "conv_padding": "symmetric", "input.channels": "bgr", "input.mean": list(layout.PIXEL_MEAN_BGR),
        "input.std": [1.0, 1.0, 1.0], "num_classes": 81, "category_ids": list(COCO_80_CATEGORY_IDS),
        "background_slot": True, "roi.style": "maskrcnn_benchmark", "roi.aligned": False, "roi.sampling_ratio": 2,
        "box_coder_weights": [10.0, 10.0, 5.0, 5.0], "box_head.num_fcs": 2, "box_head.fc_dims": 1024,
        "mask_head.num_convs": 4, "mask_head.conv_filters": 256, "anchor.center_offset": 0.5,
    }  # fmt: skip
    assert {k: options[k] for k in expected} == expected
    assert "237 tensors mapped" in mask.stdout and "model options set" in mask.stdout


def test_mask_rcnn_parity_features_rpn_box_and_mask_heads(mask, conversions):
    images = np.random.RandomState(4).normal(size=(1, SIZE, SIZE, 3))
    rois = _proposals(seed=5)
    exact = _reference_outputs(conversions.mask, images, rois, torch.float64)
    torch32 = _reference_outputs(conversions.mask, images, rois, torch.float32)
    ours64 = _our_outputs(mask.model, mask.variables, images, rois, float64=True)
    ours32 = _our_outputs(mask.model, mask.variables, images, rois, float64=False)
    assert sorted(ours64) == sorted(exact)
    groups = {
        "FPN P2-P6": [f"P{level}" for level in range(2, 7)],
        "RPN": [f"{kind}{level}" for kind in ("objectness", "deltas") for level in range(2, 7)],
        "box head": ["class_logits", "box_deltas"],
        "mask head": ["mask_logits"],
    }
    _check(ours64, ours32, exact, torch32, groups, f"V-39 Mask R-CNN @{SIZE}")

    # Negative control: torchvision's level rule (no +1 in the box area) pools the boundary proposals from the
    # level below, so the box head's outputs on them change; the random ones keep theirs.
    config = copy.deepcopy(mask.config)
    config.model.roi.style = "torchvision"
    other = build_model(config.model)
    features = {level: ours64[f"P{level}"] for level in range(2, 7)}
    with jax.enable_x64(True):
        logits, _ = other.apply(_float64(mask.variables), features, rois[None], method=FasterRCNN.roi_outputs)
    diff = np.abs(np.asarray(logits)[0] - exact["class_logits"][0]).max(axis=-1)
    print(f"torchvision level rule instead: class logits differ by {diff[-len(BOUNDARY_ROIS) :]} on the boundary RoIs")
    assert diff[: -len(BOUNDARY_ROIS)].max() <= FLOAT64_TOLERANCE and diff[-len(BOUNDARY_ROIS) :].min() > 1e-3


def test_faster_rcnn_converts_to_the_same_variables(faster, mask, conversions):
    """The Faster R-CNN (same weights, no mask branch, saved as ``{'model'}``) maps every tensor; its variables are
    the Mask R-CNN's without the mask head, and its RPN and box head match the rebuild in float64."""
    info = faster.info
    assert info["mapped"] == 237 - MASK_TENSORS and faster.kept == 0
    assert info["mapped"] + len(info["ignored"]) == len(conversions.faster.state_dict())
    assert {reason for _, reason in info["ignored"]} == {layout.ignored("rpn.anchor_generator.cell_anchors.0")}
    assert "mask_head.num_convs" not in info["model_options"]
    assert {k: v for k, v in mask.info["model_options"].items() if not k.startswith("mask_head.")} == info[
        "model_options"
    ]
    flat_faster = jax.tree_util.tree_leaves_with_path(faster.variables)
    flat_mask = dict(jax.tree_util.tree_leaves_with_path(mask.variables))
    assert len(flat_faster) == len(flat_mask) - MASK_TENSORS
    for path, value in flat_faster:
        np.testing.assert_array_equal(value, flat_mask[path])

    images = np.random.RandomState(6).normal(size=(1, SIZE, SIZE, 3))
    rois = _proposals(seed=7, count=8)
    exact = _reference_outputs(conversions.faster, images, rois, torch.float64)
    ours64 = _our_outputs(faster.model, faster.variables, images, rois, float64=True)
    assert sorted(ours64) == sorted(exact)
    d64 = _max_diff(ours64, exact, exact)
    print(f"\nV-39 Faster R-CNN @{SIZE}: float64 max abs diff (FPN, RPN, box head) {d64:.1e}")
    assert d64 <= FLOAT64_TOLERANCE


def test_anchor_order_and_centres_match_the_seed(mask):
    """Detectron's cell anchors + grid (the rebuild's ``AnchorGenerator``) vs ours with the recorded options, in the
    box coder's view (maskrcnn-benchmark's coder reads a box as x1 .. x2 + 1): the same anchor order per location and
    the same centres; square anchors equal; the others are rounded at the stride by Detectron (sizes printed)."""
    model = mask.model
    ours = rpn_anchors(SIZE, model.min_level, model.max_level, model.anchor)
    theirs = ref.AnchorGenerator().grid_anchors([(SIZE >> level, SIZE >> level) for level in range(2, 7)])
    worst_iou, worst_centre = 1.0, 0.0
    for level, t in zip(range(2, 7), theirs, strict=True):
        t = t.double().numpy()
        t = np.stack([t[:, 1], t[:, 0], t[:, 3] + 1, t[:, 2] + 1], axis=1).reshape(-1, 3, 4)
        o = ours[level].reshape(-1, 3, 4).astype(np.float64)
        centre = np.abs((o[..., :2] + o[..., 2:]) / 2 - (t[..., :2] + t[..., 2:]) / 2).max()
        o_size, t_size = o[..., 2:] - o[..., :2], t[..., 2:] - t[..., :2]
        np.testing.assert_array_equal(
            np.sign(o_size[..., 1] - o_size[..., 0]), np.sign(t_size[..., 1] - t_size[..., 0])
        )
        np.testing.assert_allclose(o_size[:, 1], t_size[:, 1], rtol=0, atol=1e-4)  # square: 32 * 2**(level - 2)
        inter = np.prod(np.minimum(o_size, t_size), -1)
        iou = inter / (np.prod(o_size, -1) + np.prod(t_size, -1) - inter)
        worst_iou, worst_centre = min(worst_iou, float(iou.min())), max(worst_centre, float(centre))
        print(f"P{level}: Detectron (h, w) {t_size[0].tolist()}, ours {np.round(o_size[0], 2).tolist()}")
    print(f"anchors: centres within {worst_centre:.1e} px, min IoU of co-centred anchors {worst_iou:.3f}")
    assert worst_centre <= 1e-4 and worst_iou > 0.88


# --- ResNet-50-FPN (MSRA) ------------------------------------------------------------------------------------


def test_resnet50_fpn_faster_rcnn_parity(tmp_path):
    """maskrcnn-benchmark's R-50-FPN (stride in the 1x1, eps-free FrozenBN) converts with the torchvision Faster R-CNN
    config; features and RPN outputs equal the rebuild's."""
    torch.manual_seed(1)
    reference = mb_ref.ResNetRCNN(50)
    mb_ref.calibrate_frozen_bn_(reference, reference.backbone.body, _images(2, SIZE, seed=8), seed=8)
    assert reference.backbone.body.layer2[0].conv1.stride == (2, 2)  # the MSRA body really is the oracle
    state = reference.state_dict()
    source = tmp_path / "e2e_faster_rcnn_R_50_FPN_1x.pth"
    torch.save({"model": state}, source)
    config = load_config("fasterrcnn_resnet50_fpn")
    convert_checkpoint(
        "maskrcnn-benchmark", config, "configs/fasterrcnn_resnet50_fpn.py", str(source), str(tmp_path / "out"),
        image_size=64,
    )  # fmt: skip
    info = _info(tmp_path / "out")
    options = info["model_options"]
    assert info["mapped"] == len(state) - 5 and len(info["ignored"]) == 5
    body = {k: options[f"backbone.{k}"] for k in ("name", "depth", "stride_in_1x1", "norm", "bn_epsilon")}
    assert body == {"name": "resnet", "depth": 50, "stride_in_1x1": True, "norm": "frozen", "bn_epsilon": 0.0}
    assert options["pool_padding"] == "symmetric" and options["input.channels"] == "bgr"

    model, variables, kept = _load(load_config("fasterrcnn_resnet50_fpn"), tmp_path / "out", 64)
    assert kept == 0
    images = np.random.RandomState(9).normal(size=(1, 64, 64, 3))
    exact = _reference_outputs(reference, images, None, torch.float64)
    torch32 = _reference_outputs(reference, images, None, torch.float32)
    ours64 = _our_outputs(model, variables, images, None, float64=True)
    ours32 = _our_outputs(model, variables, images, None, float64=False)
    groups = {
        "FPN P2-P6": [f"P{level}" for level in range(2, 7)],
        "RPN": [f"{kind}{level}" for kind in ("objectness", "deltas") for level in range(2, 7)],
    }
    _check(ours64, ours32, exact, torch32, groups, "R-50-FPN Faster R-CNN @64")


def test_vovnet57_and_resnet101_bodies_map_strictly():
    """The depth is read from the keys: the seed's V-57 and maskrcnn-benchmark's R-101 bodies map every tensor."""
    for reference, depth in ((ref.GeneralizedRCNN(57, mask=False), 57), (mb_ref.ResNetRCNN(101), 101)):
        state = {k: v.numpy() for k, v in reference.state_dict().items()}
        _, _, variables, report, options = LAYOUTS["maskrcnn-benchmark"].convert(
            state, defaults.vovnet_rcnn_config(39), 64
        )
        assert options["backbone.depth"] == depth and len(report.mapped) + len(report.ignored) == len(state)
        assert profile.count_params(variables["params"]) == ref.trainable_parameter_count(reference)


# --- timm VoVNet ------------------------------------------------------------------------------------------------


def test_timm_vovnet39a_backbone_init(conversions):
    """timm's vovnet39a state_dict (classifier included) converts as the backbone initialisation, with the CLI's own
    parity check (``--reference=vovnet39a``); C2-C5 through the converted directory equal timm's."""
    directory = conversions.tmp / "timm"
    convert_checkpoint(
        "timm-vovnet", defaults.vovnet_rcnn_config(39), "fasterrcnn_vovnet39_fpn.py", str(conversions.sources["timm"]),
        str(directory), reference="vovnet39a", image_size=64,
    )  # fmt: skip
    info = _info(directory)
    state = conversions.timm.state_dict()
    assert info["layout"] == "timm-vovnet" and info["scope"] == ["backbone"]
    assert info["mapped"] + len(info["ignored"]) == len(state)
    assert {reason for _, reason in info["ignored"]} == {
        "ImageNet classifier (no counterpart in the detector)",
        "batch-norm step counter",
    }
    assert sorted(k for k, _ in info["ignored"] if k.startswith("head.")) == ["head.fc.bias", "head.fc.weight"]
    options = info["model_options"]
    body = {k: options[f"backbone.{k}"] for k in ("name", "depth", "norm", "bn_epsilon", "residual", "pool_ceil_mode")}
    assert body == {"name": "vovnet", "depth": 39, "norm": "batch", "bn_epsilon": 1e-5, "residual": False,
                    "pool_ceil_mode": True}  # fmt: skip
    assert options["input.channels"] == "rgb" and options["input.std"] == [58.395, 57.12, 57.375]
    cli = info["parity"]["max_abs_diff"]["features"]  # the CLI's own float32 check (--reference=vovnet39a @64)
    print(f"\ntimm vovnet39a CLI --reference (float32) @64: {cli:.1e}")

    model, variables, kept = _load(defaults.vovnet_rcnn_config(39), directory, 64)
    assert kept > 0  # FPN and heads keep their initialisation
    images = np.random.RandomState(10).normal(size=(2, 64, 64, 3))

    def theirs(dtype):
        reference = copy.deepcopy(conversions.timm).to(dtype)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype)
        with torch.no_grad():
            features = reference.forward_intermediates(x, [1, 2, 3, 4], intermediates_only=True)
        return {f"C{level}": _nhwc(f) for level, f in enumerate(features, 2)}

    def ours(float64):
        def forward(v, x):
            return {f"C{level}": f for level, f in model.apply(v, x, method=lambda m, x: m.backbone(x)).items()}

        if float64:
            with jax.enable_x64(True):
                return _float64(jax.jit(forward)(_float64(variables), images))
        return _float64(jax.jit(forward)(variables, images.astype(np.float32)))

    keys = [f"C{level}" for level in range(2, 6)]
    direct = _check(ours(True), ours(False), theirs(torch.float64), theirs(torch.float32), {"C2-C5": keys}, "timm V-39")
    assert cli <= 10 * max(TOLERANCE, direct["C2-C5"])


# --- refusals -----------------------------------------------------------------------------------------------


def test_tampered_checkpoint_is_refused_in_one_error_line(conversions, tmp_path):
    """One missing, one mis-shaped and one unknown tensor: one error (its first line says what and where; the
    offending keys follow), nothing written."""
    tampered = dict(conversions.faster.state_dict())
    del tampered["rpn.head.cls_logits.bias"]
    tampered["backbone.fpn.fpn_layer2.weight"] = torch.zeros(256, 256, 1, 1)
    tampered["roi_heads.box.feature_extractor.fc8.weight"] = torch.zeros(4, 4)
    source = tmp_path / "tampered.pth"
    torch.save({"model": tampered}, source)
    with pytest.raises(UserError) as error:
        convert_checkpoint(
            "maskrcnn-benchmark", defaults.vovnet_rcnn_config(39), "fasterrcnn_vovnet39_fpn.py", str(source),
            str(tmp_path / "out"),
        )  # fmt: skip
    message = str(error.value)
    first, *listed = message.splitlines()
    assert "does not fit fasterrcnn_vovnet39_fpn.py as --from=maskrcnn-benchmark" in first
    assert not any("error" in line.lower() for line in listed), message
    assert "1 missing" in message and "rpn_head/objectness/bias (expects rpn.head.cls_logits.bias)" in message
    assert "1 unexpected" in message and "roi_heads.box.feature_extractor.fc8.weight" in message
    assert "1 mis-shaped" in message and "backbone.fpn.fpn_layer2.weight" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tampered.pth"]  # no output, no partial directory


def test_truncated_file_wrong_config_and_other_anchors_are_refused(conversions, tmp_path):
    truncated = tmp_path / "truncated.pth"
    data = conversions.sources["faster"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    config = defaults.vovnet_rcnn_config(39)
    with pytest.raises(UserError, match="truncated") as error:
        convert_checkpoint("maskrcnn-benchmark", config, "x.py", str(truncated), str(tmp_path / "out"))
    assert "\n" not in str(error.value)

    state = {k: v.numpy() for k, v in conversions.faster.state_dict().items()}
    with pytest.raises(
        UserError, match="is a maskrcnn-benchmark Faster R-CNN but the config builds model.name='mask_rcnn'"
    ):
        LAYOUTS["maskrcnn-benchmark"].options(state, defaults.vovnet_rcnn_config(39, masks=True))
    other = dict(state)
    other["rpn.anchor_generator.cell_anchors.2"] = state["rpn.anchor_generator.cell_anchors.2"] * 2
    with pytest.raises(UserError, match="cell_anchors.2 is not maskrcnn-benchmark's default anchor"):
        LAYOUTS["maskrcnn-benchmark"].options(other, config)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["truncated.pth"]


def test_layout_cell_anchors_equal_the_rebuild():
    """The converter's own Detectron ``generate_anchors`` (which checks checkpoints' buffers) equals the rebuild's."""
    for stride, size in zip(layout.ANCHOR_STRIDES, layout.ANCHOR_SIZES, strict=True):
        ours = layout.detectron_cell_anchors(stride, (size,), layout.ANCHOR_RATIOS)
        np.testing.assert_array_equal(ours.astype(np.float32), ref.generate_cell_anchors(stride, (size,), (0.5, 1, 2)))
    multi = layout.detectron_cell_anchors(16, (128, 256, 512), (0.5, 1.0, 2.0))
    np.testing.assert_array_equal(multi.astype(np.float32), ref.generate_cell_anchors(16, (128, 256, 512), (0.5, 1, 2)))


def test_level_rule_equals_the_seed_pooler():
    """``roi.style='maskrcnn_benchmark'``'s level rule vs the rebuild's ``LevelMapper`` (+1 areas), float32, on random
    boxes and on boxes at and next to the level boundaries (sides 111 / 223 / 447 px and one pixel less)."""
    rng = np.random.RandomState(11)
    sides = np.concatenate([rng.uniform(0, 900, size=(400, 2)), [[111, 111], [110, 111], [223, 223], [222, 223],
                                                                 [447, 447], [446, 447], [0, 0]]])  # fmt: skip
    corners = rng.uniform(-50, 100, size=(len(sides), 2))
    boxes = np.concatenate([corners, corners + sides], axis=1).astype(np.float32)  # ymin, xmin, ymax, xmax
    ours = np.asarray(roi_align.maskrcnn_benchmark_levels(boxes, 2, 5)) - 2
    theirs = ref.map_levels(torch.from_numpy(boxes[:, [1, 0, 3, 2]])).numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert sorted(set(theirs.tolist())) == [0, 1, 2, 3] and list(theirs[-7:]) == [1, 0, 2, 1, 3, 2, 0]
    torchvision_rule = np.asarray(roi_align.assign_levels(boxes, 2, 5)) - 2
    assert list(torchvision_rule[-7:-1]) == [0, 0, 1, 1, 2, 2]  # one level lower on the boundaries
