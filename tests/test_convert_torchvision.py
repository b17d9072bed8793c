"""torchvision Faster R-CNN / RetinaNet (ResNet-50-FPN) checkpoints through the converter.

The PyTorch models are real torchvision modules built as their COCO weights are (FrozenBatchNorm2d
body, 3 trainable layers), random-init with non-trivial FrozenBN statistics and affine values (a
BatchNorm2d twin randomised and calibrated by ``torch_reference.randomize_``, copied in) and random
biases everywhere, saved as users hold them (references/detection's ``{'model', ...}``, a plain
state_dict) and converted through the CLI (three runs started at once by one fixture).

Parity is measured in float64 on both sides (torch ``.double()``, JAX under ``enable_x64`` with
float64 variables and inputs), where the converted network is the same function: differences are
rounding only (~1e-12), asserted at 1e-8 for FPN features, RPN outputs, RetinaNet head outputs and
the box head on the same fixed proposals (RoIAlign computes its sampling coordinates and weights in
the boxes' dtype, the heads keep float64 outputs).

float32 as deployed: a random-init ResNet-50 is deep enough that PyTorch's own float32 forward is
~1e-3 away from its float64 forward on the FPN outputs (the 1e-4 float32 bound cannot be met by any
float32 implementation here), so ours is asserted no further from the exact outputs than PyTorch's
float32 is (x1.5); the distances are printed (Faster R-CNN FPN+RPN: ours 8.5e-4, torch 9.6e-4 from
exact; RetinaNet outputs: 4.6e-6 / 4.3e-6).

End to end (one 128x128 image, each side's own post-processing: proposals, RoIAlign, box head,
per-class NMS) runs in float64 for the same reason: in float32 both sides give the same 96
detections and classes, but boxes differ by up to 0.06 px and scores by 5e-4 - as far as
torchvision's own float32 is from its float64 (0.08 px, 1.1e-3). In float64 (our proposal and
detection post-processing compute in the inputs' dtype, ``ops/two_stage.py``) boxes agree within
1e-6 px, scores within 1e-8, classes exactly.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
import sys
from types import SimpleNamespace

import flax
import jax
import numpy as np
import pytest
import torch
import torchvision
from configs_util import CONFIG_DIR, load_config, photo_like
from torch_reference import randomize_
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from scaledet_jax.cli import UserError
from scaledet_jax.convert import checkpoint
from scaledet_jax.convert.layouts import LAYOUTS
from scaledet_jax.models import build_model
from scaledet_jax.models.faster_rcnn import FasterRCNN as OurFasterRCNN
from scaledet_jax.tasks.faster_rcnn import FasterRCNNTask
from scaledet_jax.tasks.retinanet import model_anchors
from scaledet_jax.tools import profile

ROOT = str(CONFIG_DIR.parent)
SIZE = 128
FLOAT64_TOLERANCE = 1e-8
NUM_CLASSES = 5  # few classes: softmax scores of a random head pass torchvision's 0.05 threshold


def _params(tree) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(tree))


def _frozen_resnet50(eps: float, seed: int) -> torch.nn.Module:
    """resnet50 with FrozenBatchNorm2d(eps) whose statistics/affine come from a calibrated BN twin."""
    torch.manual_seed(seed)
    twin = torchvision.models.resnet50(weights=None)
    randomize_(twin, np.random.RandomState(seed).normal(size=(4, SIZE, SIZE, 3)).astype(np.float32), seed=seed)
    body = torchvision.models.resnet50(weights=None, norm_layer=functools.partial(FrozenBatchNorm2d, eps=eps))
    body.load_state_dict(twin.state_dict())  # FrozenBatchNorm2d drops num_batches_tracked
    return body


def _randomize_biases_(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and not name.startswith("backbone.body."):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def _load(config, directory):
    checkpoint.apply_model_options(config, str(directory))
    model = build_model(config.model)
    shapes = profile.abstract_variables(model, SIZE)
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))
    variables, _, kept = checkpoint.merge_into(zeros, checkpoint.load_converted(str(directory)))
    assert kept == 0, "every variable comes from the checkpoint"
    return model, variables


def _float64(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _nhwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().permute(0, 2, 3, 1).double().numpy()


def _max_diff(ours: dict, theirs: dict) -> float:
    return max(float(np.max(np.abs(np.asarray(ours[k], np.float64) - theirs[k]))) for k in theirs)


# Our anchor a = scale * 3 + r (w/h ratios 2, 1, 0.5); torchvision's a' = r * sizes + scale (h/w 0.5, 1, 2).
def _torch_anchor_index(num_scales: int) -> np.ndarray:
    return np.asarray([r * num_scales + s for s in range(num_scales) for r in range(3)])


def _torch_head_in_our_order(scores: torch.Tensor, boxes: torch.Tensor, num_scales: int):
    """A torchvision per-level head output pair (NCHW, anchor-major channels, (dx, dy, dw, dh)) in
    our NHWC channel order with (dy, dx, dh, dw) codes."""
    index = _torch_anchor_index(num_scales)
    s, b = _nhwc(scores), _nhwc(boxes)
    s = s.reshape(s.shape[:-1] + (len(index), -1))[..., index, :].reshape(s.shape)
    b = b.reshape(b.shape[:-1] + (len(index), 4))[..., index, :][..., [1, 0, 3, 2]].reshape(b.shape)
    return s, b


def _faster_rcnn() -> torch.nn.Module:
    """A random torchvision Faster R-CNN, 5 classes, FrozenBN eps 1e-5, resize off at 128 px."""
    reference = FasterRCNN(
        _resnet_fpn_extractor(_frozen_resnet50(1e-5, seed=0), 3),
        num_classes=NUM_CLASSES,
        min_size=SIZE,
        max_size=SIZE,
    )
    _randomize_biases_(reference, seed=1)
    with torch.no_grad():  # spread the RPN's logits (its N(0, 0.01) init leaves them near the bias)
        for name, p in reference.rpn.head.named_parameters():
            if name.endswith("weight"):
                p.mul_(5.0)
    return reference.eval()


def _retinanet() -> torch.nn.Module:
    """A random torchvision retinanet_resnet50_fpn (91 classes) with FrozenBN eps 0, as torchvision
    runs its COCO_V1 weights."""
    body = _frozen_resnet50(0.0, seed=2)
    backbone = _resnet_fpn_extractor(body, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    reference = RetinaNet(backbone, num_classes=91, min_size=SIZE, max_size=SIZE)
    _randomize_biases_(reference, seed=3)
    return reference.eval()


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    """Builds both torchvision models, saves them as users hold them, and starts the three CLI runs
    (Faster R-CNN, RetinaNet with --reference, a tampered Faster R-CNN) at once: they are independent."""
    tmp = tmp_path_factory.mktemp("torchvision")
    faster, retina = _faster_rcnn(), _retinanet()
    # references/detection's train.py checkpoint: {'model', 'optimizer', 'lr_scheduler', 'args', 'epoch'}.
    faster_source = tmp / "model_25.pth"
    state = faster.state_dict()
    torch.save({"model": state, "optimizer": {"state": {}}, "lr_scheduler": {}, "args": {}, "epoch": 25}, faster_source)
    retina_source = tmp / "retinanet.pth"
    torch.save(retina.state_dict(), retina_source)  # a plain state_dict
    tampered = dict(state)  # one missing, one unexpected, one mis-shaped tensor
    del tampered["rpn.head.cls_logits.bias"]
    tampered["roi_heads.mask_predictor.mask_fcn_logits.weight"] = torch.zeros(5, 256, 1, 1)
    tampered["backbone.fpn.layer_blocks.2.0.weight"] = torch.zeros(256, 256, 1, 1)
    tampered_source = tmp / "tampered.pth"
    torch.save({"model": tampered}, tampered_source)

    faster_cfg, retina_cfg = "--config=configs/fasterrcnn_resnet50_fpn.py", "--config=configs/retinanet_resnet50_fpn.py"
    runs = {
        "faster": [
            "--from=torchvision",
            faster_cfg,
            f"--input={faster_source}",
            f"--output={tmp / 'faster'}",
            "--reference=fasterrcnn_resnet50_fpn",
            f"--image_size={SIZE}",
        ],
        "retina": [
            "--from=torchvision-coco-v1",
            retina_cfg,
            f"--input={retina_source}",
            f"--output={tmp / 'retina'}",
            "--reference=retinanet_resnet50_fpn",
            f"--image_size={SIZE}",
        ],
        "tampered": ["--from=torchvision", faster_cfg, f"--input={tampered_source}", f"--output={tmp / 'refused'}"],
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "scaledet_jax.convert", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for name, args in runs.items()
    }
    results: dict[str, subprocess.CompletedProcess] = {}

    def result(name: str) -> subprocess.CompletedProcess:
        if name not in results:
            stdout, stderr = processes[name].communicate(timeout=900)
            results[name] = subprocess.CompletedProcess(runs[name], processes[name].returncode, stdout, stderr)
        return results[name]

    yield SimpleNamespace(faster=faster, retina=retina, state=state, tmp=tmp, result=result)
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def faster(conversions):
    result = conversions.result("faster")
    assert result.returncode == 0, result.stderr[-3000:]
    config = load_config("fasterrcnn_resnet50_fpn")
    config.model.image_size = SIZE
    model, variables = _load(config, conversions.tmp / "faster")
    info = json.load(open(conversions.tmp / "faster" / "conversion.json"))
    return SimpleNamespace(
        reference=conversions.faster, config=config, model=model, variables=variables, info=info, stdout=result.stdout
    )


@pytest.fixture(scope="module")
def retina(conversions):
    result = conversions.result("retina")
    assert result.returncode == 0, result.stderr[-3000:]
    config = load_config("retinanet_resnet50_fpn")
    config.model.image_size = SIZE
    model, variables = _load(config, conversions.tmp / "retina")
    info = json.load(open(conversions.tmp / "retina" / "conversion.json"))
    return SimpleNamespace(reference=conversions.retina, config=config, model=model, variables=variables, info=info)


def test_parameter_counts_equal_torchvision_frozen_bn_builds():
    """Parameters (FrozenBN statistics and affine are buffers on both sides: 'batch_stats' here)."""
    faster = FasterRCNN(
        _resnet_fpn_extractor(torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d), 3), num_classes=91
    )
    torch_count = sum(p.numel() for p in faster.parameters())
    ours = profile.abstract_variables(build_model(load_config("fasterrcnn_resnet50_fpn").model), SIZE)
    assert _params(ours["params"]) == torch_count == 41_755_286  # torchvision's documented count

    retina = RetinaNet(
        _resnet_fpn_extractor(
            torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d),
            3,
            returned_layers=[2, 3, 4],
            extra_blocks=LastLevelP6P7(256, 256),
        ),
        num_classes=91,
    )
    torch_count = sum(p.numel() for p in retina.parameters())
    config = load_config("retinanet_resnet50_fpn")
    state = {k: v.numpy() for k, v in retina.state_dict().items()}
    checkpoint.set_model_options(config, LAYOUTS["torchvision"].options(state, config))
    ours = profile.abstract_variables(build_model(config.model), SIZE)
    # 34,068,119 with BatchNorm2d (REFERENCE.md) minus ResNet-50's 53,120 BN affine parameters.
    assert _params(ours["params"]) == torch_count == 34_014_999


def test_faster_rcnn_conversion_report(faster):
    info = faster.info
    options = info["model_options"]
    assert info["layout"] == "torchvision" and info["mapped"] == 295
    assert options["num_classes"] == NUM_CLASSES and options["backbone.depth"] == 50
    assert options["backbone.bn_epsilon"] == 1e-5 and options["backbone.norm"] == "frozen"
    assert options["conv_padding"] == options["pool_padding"] == "symmetric"
    assert options["anchor.center_offset"] == 0.0 and options["anchor.round_base"] is True
    assert {reason for _, reason in info["ignored"]} == {"checkpoint entry beside 'model'"}
    assert "295 tensors mapped" in faster.stdout
    cli = info["parity"]["max_abs_diff"]  # the CLI's float32 check (--reference), deep random net: ~1e-3
    assert set(cli) == {"features", "rpn_objectness", "rpn_deltas"} and max(cli.values()) < 1e-2, cli
    print(f"\nfasterrcnn CLI --reference (float32) @{SIZE}: {cli}")


def test_faster_rcnn_parity_features_rpn_and_box_head(faster):
    """FPN features, RPN objectness/deltas per level and the box head on the same fixed proposals."""
    rng = np.random.RandomState(4)
    images = rng.normal(size=(1, SIZE, SIZE, 3))
    # Fixed proposals [ymin, xmin, ymax, xmax]: first 24 random of 6-128 px (RoIAlign levels 2 and 3 at
    # this size), some crossing the border; then 5 whose RoIAlign sampling grid is exact in float32
    # (56 px on P2 / 112 px on P3 = 14 feature pixels, bins of 2, corners on the stride).
    centres, sides = rng.uniform(0, SIZE, size=(24, 2)), np.exp(rng.uniform(np.log(6), np.log(128), size=(24, 2)))
    random_rois = np.concatenate([centres - sides / 2, centres + sides / 2], axis=1).clip(-8, SIZE + 8)
    grid_rois = np.asarray([[0, 0, 56, 56], [8, 16, 64, 72], [40, 20, 96, 76], [0, 0, 112, 112], [16, 8, 128, 120]])
    proposals = np.concatenate([random_rois, grid_rois]).astype(np.float64)

    def torch_side(dtype):
        reference = copy.deepcopy(faster.reference).to(dtype)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype)
        with torch.no_grad():
            features = reference.backbone(x)
            objectness, deltas = reference.rpn.head(list(features.values()))
            boxes = torch.from_numpy(proposals[:, [1, 0, 3, 2]]).to(dtype)  # x1, y1, x2, y2
            pooled = reference.roi_heads.box_roi_pool(features, [boxes], [(SIZE, SIZE)])
            logits, box_deltas = reference.roi_heads.box_predictor(reference.roi_heads.box_head(pooled))
        out = {}
        for level, feature in enumerate(features.values(), 2):
            out[f"P{level}"] = _nhwc(feature)
            out[f"objectness{level}"], out[f"deltas{level}"] = _torch_head_in_our_order(
                objectness[level - 2], deltas[level - 2], num_scales=1
            )
        deltas = (
            box_deltas.double().numpy().reshape(-1, NUM_CLASSES, 4)[..., [1, 0, 3, 2]].reshape(1, -1, NUM_CLASSES * 4)
        )
        out["class_logits"], out["box_deltas"] = logits.double().numpy()[None], deltas
        return out

    def forward(variables, x, rois):
        model = faster.model
        features = model.apply(variables, x, method=OurFasterRCNN.features)
        objectness, deltas = model.apply(variables, features, method=OurFasterRCNN.rpn)
        logits, box_deltas = model.apply(variables, features, rois, method=OurFasterRCNN.roi_outputs)
        out = {"class_logits": logits, "box_deltas": box_deltas}
        for level in range(2, 7):
            out[f"P{level}"], out[f"objectness{level}"], out[f"deltas{level}"] = (
                features[level], objectness[level], deltas[level],
            )  # fmt: skip
        return out

    def our_side(float64: bool):
        if float64:
            out = jax.jit(forward)(_float64(faster.variables), images, proposals[None])
        else:
            out = jax.jit(forward)(faster.variables, images.astype(np.float32), proposals[None].astype(np.float32))
        return jax.tree_util.tree_map(
            lambda a: np.asarray(a, np.float64) if a.dtype != np.float64 else np.asarray(a), out
        )

    exact = torch_side(torch.float64)
    with jax.enable_x64(True):
        ours64 = our_side(float64=True)
    head = ("class_logits", "box_deltas")
    network = [k for k in exact if k not in head]
    assert all(ours64[k].dtype == np.float64 for k in network)
    float64_network = _max_diff(ours64, {k: exact[k] for k in network})
    assert float64_network <= FLOAT64_TOLERANCE
    float64_head = {}
    for k in head:
        assert ours64[k].dtype == np.float64, k
        diff = np.abs(ours64[k] - exact[k])[0]
        float64_head[k] = (float(np.max(diff[:24])), float(np.max(diff[24:])))
        assert np.max(diff) <= FLOAT64_TOLERANCE, k  # random and grid-exact RoIs alike

    torch32, ours32 = torch_side(torch.float32), our_side(float64=False)
    d = {
        "ours32_exact": _max_diff(ours32, {k: exact[k] for k in network}),
        "torch32_exact": _max_diff(torch32, {k: exact[k] for k in network}),
        "ours32_torch32": _max_diff(ours32, {k: torch32[k] for k in network}),
        "head_ours32_torch32": _max_diff(ours32, {k: torch32[k] for k in head}),
    }
    print(
        f"\nfasterrcnn @{SIZE}: float64 max abs diff FPN+RPN {float64_network:.1e}, box head (random RoIs, "
        f"grid-exact RoIs) {float64_head}; "
        f"float32 FPN+RPN: ours vs exact {d['ours32_exact']:.1e}, torch vs exact {d['torch32_exact']:.1e}, "
        f"ours vs torch {d['ours32_torch32']:.1e}; box head ours vs torch {d['head_ours32_torch32']:.1e}"
    )
    assert d["ours32_exact"] <= 1.5 * d["torch32_exact"]


def test_faster_rcnn_end_to_end_detections(faster):
    """torchvision's eval forward (its resize is the identity at min_size = max_size = 128) against
    FasterRCNNTask.predict on one image, each with its own post-processing."""
    pixels = np.random.RandomState(5).uniform(0, 255, size=(SIZE, SIZE, 3))
    reference = copy.deepcopy(faster.reference).double().eval()
    with torch.no_grad():
        (theirs,) = reference([torch.from_numpy(pixels / 255.0).permute(2, 0, 1)])
    order = torch.argsort(theirs["scores"], descending=True)
    t_boxes = theirs["boxes"][order].numpy()[:, [1, 0, 3, 2]]  # -> ymin, xmin, ymax, xmax
    t_scores, t_classes = theirs["scores"][order].numpy(), theirs["labels"][order].numpy()

    spec = faster.config.model.input
    images = ((pixels - np.asarray(spec.mean)) / np.asarray(spec.std))[None]
    task = FasterRCNNTask(faster.config)
    with jax.enable_x64(True):
        ours = jax.tree_util.tree_map(np.asarray, jax.jit(task.predict)(_float64(faster.variables), images))
    valid = ours["valid"][0]
    o_boxes, o_scores, o_classes = ours["boxes"][0][valid], ours["scores"][0][valid], ours["classes"][0][valid]
    print(
        f"\nfasterrcnn end to end @{SIZE}: {len(t_scores)} detections (torchvision) / {len(o_scores)} (ours); "
        f"max box diff {np.max(np.abs(o_boxes - t_boxes)) if len(o_boxes) == len(t_boxes) else float('nan'):.1e} px, "
        f"max score diff {np.max(np.abs(o_scores - t_scores)) if len(o_scores) == len(t_scores) else float('nan'):.1e}"
    )
    assert len(t_scores) >= 20 and len(set(t_classes.tolist())) > 1  # a non-trivial comparison
    assert len(o_scores) == len(t_scores)
    np.testing.assert_array_equal(o_classes, t_classes)
    np.testing.assert_allclose(o_scores, t_scores, atol=1e-8, rtol=0)
    np.testing.assert_allclose(o_boxes, t_boxes, atol=1e-6, rtol=0)


def test_retinanet_parity_and_anchors(retina):
    info = retina.info
    options = info["model_options"]
    assert info["layout"] == "torchvision-coco-v1" and options["backbone.bn_epsilon"] == 0.0
    assert options["num_classes"] == 91 and options["decoder.extra_levels"] == "p6p7" and options["head.norm"] == ""
    assert options["anchor.truncate_sizes"] is True
    cli = info["parity"]["max_abs_diff"]  # the CLI's own float32 check with --reference
    assert set(cli) == {"features", "class", "box"} and max(cli.values()) < 1e-2, cli

    # Anchors: torchvision's AnchorGenerator for this model, in our order and [ymin, xmin, ymax, xmax].
    features = [torch.zeros(1, 256, SIZE // 2**level, SIZE // 2**level) for level in range(3, 8)]
    image_list = ImageList(torch.zeros(1, 3, SIZE, SIZE), [(SIZE, SIZE)])
    (torch_anchors,) = retina.reference.anchor_generator(image_list, features)
    torch_anchors = torch_anchors.numpy().reshape(-1, 9, 4)[:, _torch_anchor_index(3)][..., [1, 0, 3, 2]]
    np.testing.assert_array_equal(model_anchors(retina.config), torch_anchors.reshape(-1, 4))

    images = np.random.RandomState(6).normal(size=(1, SIZE, SIZE, 3))

    def torch_side(dtype):
        reference = copy.deepcopy(retina.reference).to(dtype)
        head = reference.head
        out = {}
        with torch.no_grad():
            pyramid = reference.backbone(torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype))
            for level, feature in enumerate(pyramid.values(), 3):
                cls = head.classification_head.cls_logits(head.classification_head.conv(feature))
                box = head.regression_head.bbox_reg(head.regression_head.conv(feature))
                out[f"class{level}"], out[f"box{level}"] = _torch_head_in_our_order(cls, box, num_scales=3)
        return out

    def forward(variables, x, model=retina.model):
        outputs = model.apply(variables, x, train=False)
        out = {}
        for level in range(3, 8):
            out[f"class{level}"] = outputs["class_outputs"][level]
            out[f"box{level}"] = outputs["box_outputs"][level]
        return out

    def our_side(float64: bool):
        if float64:  # eager: compiling the whole RetinaNet twice costs more than it saves here
            out = forward(_float64(retina.variables), images)
        else:
            out = forward(retina.variables, images.astype(np.float32))
        return jax.tree_util.tree_map(
            lambda a: np.asarray(a, np.float64) if a.dtype != np.float64 else np.asarray(a), out
        )

    exact = torch_side(torch.float64)
    with jax.enable_x64(True):
        ours64 = our_side(float64=True)
    assert all(v.dtype == np.float64 for v in ours64.values())
    float64_diff = _max_diff(ours64, exact)
    ours32, torch32 = our_side(float64=False), torch_side(torch.float32)
    d = {"ours32_exact": _max_diff(ours32, exact), "torch32_exact": _max_diff(torch32, exact)}
    print(
        f"\nretinanet @{SIZE}: float64 max abs diff {float64_diff:.1e}; float32: ours vs exact "
        f"{d['ours32_exact']:.1e}, torch vs exact {d['torch32_exact']:.1e}, "
        f"ours vs torch {_max_diff(ours32, torch32):.1e}; CLI --reference (float32) {cli}"
    )
    assert float64_diff <= FLOAT64_TOLERANCE
    assert d["ours32_exact"] <= 1.5 * d["torch32_exact"]

    # Negative control: the eps-1e-5 semantics of --from=torchvision on this eps-0 model.
    config = copy.deepcopy(retina.config)
    config.model.backbone.bn_epsilon = 1e-5
    with jax.enable_x64(True):
        wrong = forward(_float64(retina.variables), images, model=build_model(config.model))
    wrong_diff = _max_diff(jax.tree_util.tree_map(np.asarray, wrong), exact)
    print(f"retinanet with FrozenBN eps 1e-5 instead of 0: float64 max abs diff {wrong_diff:.1e}")
    assert wrong_diff > 1e3 * FLOAT64_TOLERANCE


def test_retinanet_end_to_end_detections_equal_torchvisions_postprocessing(retina):
    """Issue 14 item 5: with the post-processing the converter records (per level the top 1000 (anchor, class)
    pairs, torchvision's anchors, decoding and clipping, NMS 0.5, 300 detections), our predict gives torchvision
    ``RetinaNet.postprocess_detections``'s detections on a fixed image: same classes, scores within 1e-4, boxes
    within 0.01 px (float64 networks). torchvision also scores output 0 ('__background__', never a positive in
    training, so its scores stay near 0); we drop it, so here its logits are set as training leaves them."""
    from scaledet_jax.tasks import build_task

    options = retina.info["model_options"]
    assert options["detection.per_level_rank"] == "pair" and options["detection.max_detections"] == 300
    reference = copy.deepcopy(retina.reference).double().eval()
    with torch.no_grad():
        reference.head.classification_head.cls_logits.bias[0::91] = -20.0  # output 0 of each of the 9 anchors
    images = np.random.RandomState(8).normal(size=(1, SIZE, SIZE, 3))
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():  # RetinaNet.forward's eval path after the transform (the image is already its input)
        features = list(reference.backbone(x).values())
        head_outputs = reference.head(features)
        anchors = reference.anchor_generator(ImageList(x, [(SIZE, SIZE)]), features)
        per_level = [f.shape[2] * f.shape[3] * 9 for f in features]
        split_outputs = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        (theirs,) = reference.postprocess_detections(split_outputs, split_anchors, [(SIZE, SIZE)])
    with jax.enable_x64(True):
        found = build_task(retina.config).predict(_float64(retina.variables), images)
        found = jax.tree_util.tree_map(lambda a: np.asarray(a)[0], found)
    valid = found["valid"]
    labels, scores, boxes = (theirs[k].numpy() for k in ("labels", "scores", "boxes"))
    assert 50 <= len(scores) == valid.sum(), (len(scores), valid.sum())
    ours_order = np.lexsort((-found["scores"][valid], found["classes"][valid]))
    theirs_order = np.lexsort((-scores, labels))
    np.testing.assert_array_equal(found["classes"][valid][ours_order], labels[theirs_order])
    np.testing.assert_allclose(found["scores"][valid][ours_order], scores[theirs_order], atol=1e-4, rtol=0)
    ours_xy = found["boxes"][valid][ours_order][:, [1, 0, 3, 2]]
    np.testing.assert_allclose(ours_xy, boxes[theirs_order], atol=0.01, rtol=0)


def _detector_vs_torchvision(converted, reference: torch.nn.Module, image: np.ndarray, resize: tuple[int, int]):
    """Issue 14 item 5, the whole path on a non-square photo: torchvision's eval forward (GeneralizedRCNNTransform
    with ``resize`` = (min_size, max_size): normalise, resize, pad to 32; the detector; postprocess back to the
    image) against ``Detector.predict`` on the uint8 image with the converter's recorded ``model.test_resize``
    (sizes set as the reference's), both float64 networks. Returns (ours, theirs, config)."""
    from scaledet_jax.detector import Detector

    options = converted.info["model_options"]
    assert options["test_resize.style"] == "torchvision" and options["test_resize.size_divisor"] == 32
    assert (options["test_resize.min_size"], options["test_resize.max_size"]) == (800, 1333)  # its defaults
    reference = copy.deepcopy(reference).double().eval()
    reference.transform.min_size, reference.transform.max_size = (resize[0],), resize[1]
    with torch.no_grad():
        (theirs,) = reference([torch.from_numpy(image).permute(2, 0, 1).double() / 255.0])
    config = copy.deepcopy(converted.config)
    config.model.test_resize.min_size, config.model.test_resize.max_size = resize
    with jax.enable_x64(True):
        detector = Detector(config, _float64(converted.variables), dtype=np.float64)
        (ours,) = detector.predict(image)
    return ours, {k: v.numpy() for k, v in theirs.items()}, config


def _assert_same_detections(ours: dict, theirs: dict, name: str) -> None:
    """Same classes, scores within 1e-4, boxes (x1, y1, x2, y2, original pixels) within 0.01 px."""
    o_order = np.lexsort((-ours["scores"], ours["classes"]))
    t_order = np.lexsort((-theirs["scores"], theirs["labels"]))
    box_diff = np.max(np.abs(ours["boxes"][o_order] - theirs["boxes"][t_order])) if len(o_order) == len(t_order) else -1
    print(f"\n{name}: {len(t_order)} detections (torchvision) / {len(o_order)} (ours); max box diff {box_diff:.1e} px")
    assert len(o_order) == len(t_order)
    np.testing.assert_array_equal(ours["classes"][o_order], theirs["labels"][t_order])
    np.testing.assert_allclose(ours["scores"][o_order], theirs["scores"][t_order], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours["boxes"][o_order], theirs["boxes"][t_order], atol=0.01, rtol=0)


def test_faster_rcnn_detector_gives_torchvisions_detections_on_a_photo(faster):
    """97 x 150 -> shorter side 112 would make the longer 173 > 160: resized to 103 x 160, padded to 128 x 160 (a
    non-square input); proposals and detections clipped to 103 x 160, boxes mapped back per axis."""
    image = photo_like(97, 150, seed=11)
    ours, theirs, config = _detector_vs_torchvision(faster, faster.reference, image, (112, 160))
    assert len(theirs["scores"]) >= 10 and len(set(theirs["labels"].tolist())) > 1  # a non-trivial comparison
    _assert_same_detections(ours, theirs, "fasterrcnn, 97 x 150 photo")

    config.model.test_resize.style = "letterbox"  # negative control: our training-time resize
    with jax.enable_x64(True):
        from scaledet_jax.detector import Detector

        (letterboxed,) = Detector(config, _float64(faster.variables), dtype=np.float64).predict(image)
    with pytest.raises(AssertionError):
        _assert_same_detections(letterboxed, theirs, "fasterrcnn, letterbox resize")


def test_retinanet_detector_gives_torchvisions_detections_on_a_photo(retina):
    """A 150 x 97 (portrait) photo: resized to 160 x 103, padded to 160 x 128. Output 0 ('__background__') gets
    the logits training leaves it (see the test above)."""
    reference = copy.deepcopy(retina.reference)
    with torch.no_grad():
        reference.head.classification_head.cls_logits.bias[0::91] = -20.0
    ours, theirs, _ = _detector_vs_torchvision(retina, reference, photo_like(150, 97, seed=12), (112, 160))
    assert len(theirs["scores"]) >= 50
    _assert_same_detections(ours, theirs, "retinanet, 150 x 97 photo")


def test_strict_mapping_refuses_and_writes_nothing(conversions):
    result = conversions.result("tampered")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (
        "1 missing" in result.stderr and "rpn_head/objectness/bias (expects rpn.head.cls_logits.bias)" in result.stderr
    )
    assert "1 unexpected" in result.stderr and "roi_heads.mask_predictor.mask_fcn_logits.weight" in result.stderr
    assert "1 mis-shaped" in result.stderr and "backbone.fpn.layer_blocks.2.0.weight" in result.stderr
    assert not (conversions.tmp / "refused").exists()
    assert not [p for p in conversions.tmp.iterdir() if "partial" in p.name]


def _pre_0_13_names(state: dict) -> dict:
    """Keys as torchvision < 0.13 saved them (before Conv2dNormActivation): ``rpn.head.conv``,
    ``backbone.fpn.{inner,layer}_blocks.{i}``, RetinaNet ``head.*.conv.{2i}`` (conv, relu pairs)."""
    old = {}
    for key, value in state.items():
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        key = re.sub(r"(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.0\.", r"\1.", key)
        key = re.sub(
            r"(head\.(?:classification|regression)_head\.conv\.)(\d+)\.0\.",
            lambda m: f"{m.group(1)}{2 * int(m.group(2))}.",
            key,
        )
        old[key] = value
    return old


def test_wrong_config_and_pre_0_13_key_names(conversions):
    """A Faster R-CNN checkpoint with the RetinaNet config is refused naming the config to use; keys
    saved by torchvision < 0.13 map as torchvision itself loads them."""
    faster = {k: v.numpy() for k, v in conversions.state.items()}
    with pytest.raises(UserError, match="configs/fasterrcnn_resnet50_fpn.py"):
        LAYOUTS["torchvision"].options(faster, load_config("retinanet_resnet50_fpn"))
    retina = {k: v.numpy() for k, v in conversions.retina.state_dict().items()}
    for state, config_name, renamed, new_name in (
        (faster, "fasterrcnn_resnet50_fpn", "rpn.head.conv.weight", "rpn.head.conv.0.0.weight"),
        (
            retina,
            "retinanet_resnet50_fpn",
            "head.regression_head.conv.6.weight",
            "head.regression_head.conv.3.0.weight",
        ),
    ):
        old = _pre_0_13_names(state)
        assert len(old) == len(state) and renamed in old and new_name not in old
        # torchvision's own loader accepts them (version-less state dicts are renamed on load).
        reference = copy.deepcopy(conversions.faster if config_name.startswith("faster") else conversions.retina)
        reference.load_state_dict({k: torch.from_numpy(v) for k, v in old.items()})
        _, _, variables, report, _ = LAYOUTS["torchvision"].convert(old, load_config(config_name), SIZE)
        assert len(report.mapped) == len(state)
        flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(variables).items()}
        used = dict(report.mapped)[renamed]
        np.testing.assert_array_equal(flat[used], np.transpose(state[new_name], (2, 3, 1, 0)))


def test_resnet101_body_maps_strictly():
    """torchvision's resnet_fpn_backbone('resnet101') Faster R-CNN: depth read from the checkpoint."""
    body = torchvision.models.resnet101(norm_layer=FrozenBatchNorm2d)
    reference = FasterRCNN(_resnet_fpn_extractor(body, 3), num_classes=91)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    _, shapes, variables, report, options = LAYOUTS["torchvision"].convert(
        state, load_config("fasterrcnn_resnet50_fpn"), SIZE
    )
    assert options["backbone.depth"] == 101 and len(report.mapped) == len(state)
    assert _params(variables["params"]) == sum(p.numel() for p in reference.parameters())


def test_batchnorm2d_build_maps_with_step_counters_ignored():
    """A checkpoint of torchvision's BatchNorm2d build (``weights_backbone=None``; what training with
    norm_layer=BatchNorm2d saves) has a ``num_batches_tracked`` per norm: ignored with the reason."""
    reference = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert len(counters) == 53  # stem + 16 bottlenecks x 3 + 4 projections
    _, _, _, report, _ = LAYOUTS["torchvision"].convert(state, load_config("fasterrcnn_resnet50_fpn"), SIZE)
    assert len(report.mapped) == 295 and sorted(key for key, _ in report.ignored) == sorted(counters)
    assert {reason for _, reason in report.ignored} == {"batch-norm step counter (FrozenBatchNorm2d drops it too)"}
