"""torchvision Mask R-CNN (ResNet-50-FPN) through the converter: mask-head logits on the same fixed
boxes, and end-to-end detections with their 28x28 mask probabilities and pasted masks.

The PyTorch model is torchvision's ``MaskRCNN`` built as ``maskrcnn_resnet50_fpn``'s COCO weights are
(FrozenBatchNorm2d body with calibrated random statistics, random biases), 5 classes, resize off at
128 px, saved as references/detection does and converted through the CLI with ``--reference``.
As in ``test_convert_torchvision.py``, parity is measured in float64 on both sides (a random-init
ResNet-50 is ~1e-3 from its own float64 outputs in float32): RoIAlign, the heads and the post-processing
compute in float64 there too, so the differences are rounding only.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from configs_util import load_config
from test_convert_torchvision import (
    FLOAT64_TOLERANCE,
    ROOT,
    SIZE,
    _float64,
    _frozen_resnet50,
    _load,
    _randomize_biases_,
)
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.roi_heads import paste_masks_in_image

from scaledet_jax.ops import masks as mask_ops
from scaledet_jax.tasks.mask_rcnn import MaskRCNNTask

NUM_CLASSES = 5


def _mask_rcnn() -> torch.nn.Module:
    reference = MaskRCNN(
        _resnet_fpn_extractor(_frozen_resnet50(1e-5, seed=6), 3), num_classes=NUM_CLASSES, min_size=SIZE, max_size=SIZE
    )
    _randomize_biases_(reference, seed=7)
    with torch.no_grad():  # spread the RPN's logits (its N(0, 0.01) init leaves them near the bias)
        for name, p in reference.rpn.head.named_parameters():
            if name.endswith("weight"):
                p.mul_(5.0)
    return reference.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchvision_mask")
    reference = _mask_rcnn()
    source = tmp / "model_25.pth"
    torch.save({"model": reference.state_dict(), "optimizer": {}, "epoch": 25}, source)
    result = subprocess.run(
        [
            sys.executable, "-m", "scaledet_jax.convert", "--from=torchvision",
            "--config=configs/maskrcnn_resnet50_fpn.py", f"--input={source}", f"--output={tmp / 'out'}",
            "--reference=maskrcnn_resnet50_fpn", f"--image_size={SIZE}",
        ],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    config = load_config("maskrcnn_resnet50_fpn")
    config.model.image_size = SIZE
    model, variables = _load(config, tmp / "out")
    info = json.load(open(tmp / "out" / "conversion.json"))
    return SimpleNamespace(reference=reference, config=config, model=model, variables=variables, info=info)


def test_conversion_maps_the_mask_branch(converted):
    info, options = converted.info, converted.info["model_options"]
    # Faster R-CNN's 295 tensors + 4 mask convs, the transposed conv and the logits conv (weight + bias each).
    assert info["layout"] == "torchvision" and info["mapped"] == 295 + 12
    assert options["num_classes"] == NUM_CLASSES and options["mask_head.roi_output_size"] == 14
    assert options["mask_head.norm"] == "" and options["mask_head.sampling_ratio"] == 2
    assert {reason for _, reason in info["ignored"]} == {"checkpoint entry beside 'model'"}
    cli = info["parity"]["max_abs_diff"]  # the CLI's float32 check (--reference), deep random net: ~1e-3
    assert set(cli) == {"features", "rpn_objectness", "rpn_deltas"} and max(cli.values()) < 1e-2, cli
    assert converted.config.model.name == "mask_rcnn"


def test_mask_head_parity_on_fixed_boxes(converted):
    rng = np.random.RandomState(8)
    images = rng.normal(size=(1, SIZE, SIZE, 3))
    centres, sides = rng.uniform(0, SIZE, size=(16, 2)), np.exp(rng.uniform(np.log(6), np.log(128), size=(16, 2)))
    random_boxes = np.concatenate([centres - sides / 2, centres + sides / 2], axis=1).clip(-8, SIZE + 8)
    # RoIAlign grids exact in float32: 56 px on P2 / 112 px on P3 = 14 feature pixels, bins of 1.
    grid_boxes = np.asarray([[0, 0, 56, 56], [8, 16, 64, 72], [0, 0, 112, 112], [16, 8, 128, 120]])
    boxes = np.concatenate([random_boxes, grid_boxes]).astype(np.float64)

    reference = copy.deepcopy(converted.reference).double()
    with torch.no_grad():
        features = reference.backbone(torch.from_numpy(images).permute(0, 3, 1, 2))
        pooled = reference.roi_heads.mask_roi_pool(features, [torch.from_numpy(boxes[:, [1, 0, 3, 2]])], [(SIZE, SIZE)])
        logits = reference.roi_heads.mask_predictor(reference.roi_heads.mask_head(pooled))
    theirs = logits.permute(0, 2, 3, 1).numpy()[None]  # [1, N, 28, 28, C]

    task = MaskRCNNTask(converted.config)
    with jax.enable_x64(True):
        ours = np.asarray(jax.jit(task.mask_logits_on)(_float64(converted.variables), images, boxes[None]))
    assert ours.shape == theirs.shape == (1, 20, 28, 28, NUM_CLASSES)
    diff = np.abs(ours - theirs)
    print(f"\nmask head @{SIZE} float64: max abs diff {diff.max():.1e} (max |logit| {np.abs(theirs).max():.1f})")
    assert diff.max() <= FLOAT64_TOLERANCE


def test_end_to_end_detections_and_masks(converted):
    """torchvision's eval path (RPN, box head, NMS, mask head on the detections, paste) against
    MaskRCNNTask.predict + paste_masks on one image, both in float64."""
    pixels = np.random.RandomState(9).uniform(0, 255, size=(SIZE, SIZE, 3))
    reference = copy.deepcopy(converted.reference).double().eval()
    x = torch.from_numpy(pixels / 255.0).permute(2, 0, 1)
    with torch.no_grad():
        images, _ = reference.transform([x])
        features = reference.backbone(images.tensors)
        proposals, _ = reference.rpn(images, features)
        (raw,), _ = reference.roi_heads(features, proposals, images.image_sizes)  # masks before pasting
    order = torch.argsort(raw["scores"], descending=True)
    t_boxes = raw["boxes"][order].numpy()[:, [1, 0, 3, 2]]
    t_scores, t_classes = raw["scores"][order].numpy(), raw["labels"][order].numpy()
    t_masks = raw["masks"][order][:, 0].numpy()  # [N, 28, 28] probabilities of the detected class
    with torch.no_grad():  # pasted in float32, as torchvision deploys (our paste_masks is its float32 kernel)
        t_pasted = (
            paste_masks_in_image(raw["masks"][order].float(), raw["boxes"][order].float(), (SIZE, SIZE))[:, 0].numpy()
            > 0.5
        )

    spec = converted.config.model.input
    normalised = ((pixels - np.asarray(spec.mean)) / np.asarray(spec.std))[None]
    task = MaskRCNNTask(converted.config)
    with jax.enable_x64(True):
        ours = jax.tree_util.tree_map(np.asarray, jax.jit(task.predict)(_float64(converted.variables), normalised))
    valid = ours["valid"][0]
    o_boxes, o_scores, o_classes = ours["boxes"][0][valid], ours["scores"][0][valid], ours["classes"][0][valid]
    o_masks = ours["masks"][0][valid]
    assert len(t_scores) >= 20 and len(set(t_classes.tolist())) > 1  # a non-trivial comparison
    assert len(o_scores) == len(t_scores)
    np.testing.assert_array_equal(o_classes, t_classes)
    np.testing.assert_allclose(o_scores, t_scores, atol=1e-4, rtol=0)
    np.testing.assert_allclose(o_boxes, t_boxes, atol=0.01, rtol=0)
    mask_diff = float(np.max(np.abs(o_masks - t_masks)))
    o_pasted = mask_ops.paste_masks(o_masks, o_boxes, SIZE, SIZE)
    disagree = float(np.mean(o_pasted != t_pasted))
    print(
        f"\nmaskrcnn end to end @{SIZE}: {len(t_scores)} detections; max box diff "
        f"{np.max(np.abs(o_boxes - t_boxes)):.1e} px, mask probability diff {mask_diff:.1e}, pasted pixels "
        f"differing {disagree:.2e} ({int(np.sum(o_pasted != t_pasted))} of {o_pasted.size})"
    )
    assert mask_diff <= 1e-4
    # Pasting reproduces torchvision's float32 kernel (tests/test_mask_ops.py): the same masks and boxes
    # rounded to float32 paste to the same pixels, unless a value lies within the float64 difference of 0.5.
    assert disagree <= 1e-5
