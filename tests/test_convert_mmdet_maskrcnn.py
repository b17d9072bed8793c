"""The seed's mmdetection v1.1 Mask R-CNN SpineNet-49S checkpoint through the converter
(``--from=mmdet-spinenet``), with parity against the PyTorch rebuild of its module structure
(tests/mmdet_spinenet_reference.py: random init, backbone BN calibrated, head biases and BN randomised),
and the converted checkpoint evaluating and fine-tuning through main.py.

Parity in float64 on both sides (the converted network is the same function; rounding only, asserted
at 1e-8, as for the seed's RetinaNet): the SpineNet endpoints P3-P7, the RPN's objectness and deltas
per level (anchors permuted into our order), and on the same fixed RoIs (including RoIs narrower than
a feature pixel, where mmdetection's RoIAlign differs from torchvision's) the box head's class logits
and deltas and the mask head's logits.
"""

import copy
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from configs_util import CONFIG_DIR, load_config
from mmdet_spinenet_reference import build_mmdet_maskrcnn_spinenet
from test_convert_mmdet import _load
from test_mmdet_maskrcnn_reference import _randomize_

from scaledet_jax.convert.mmdet import COCO_80_CATEGORY_IDS, anchor_permutation

ROOT = str(CONFIG_DIR.parent)
SIZE = 128
FLOAT64_TOLERANCE = 1e-8


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seed_maskrcnn")
    torch.manual_seed(0)
    reference = build_mmdet_maskrcnn_spinenet("49S", 81)
    _randomize_(reference)
    reference.eval()
    source = tmp / "mask_rcnn_spinenet_49S.pth"
    torch.save({"meta": {"epoch": 350}, "state_dict": reference.state_dict(), "optimizer": {}}, source)
    out = tmp / "converted"
    result = subprocess.run(
        [sys.executable, "-m", "scaledet_jax.convert", "--from=mmdet-spinenet",
         "--config=configs/maskrcnn_spinenet49s.py", f"--input={source}", f"--output={out}"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    config = load_config("maskrcnn_spinenet49s")
    config.model.image_size = SIZE
    model, variables = _load(config, out)
    return dict(reference=reference, config=config, model=model, variables=variables, out=out, stdout=result.stdout)


def test_conversion_options_and_count(converted):
    info = json.load(open(converted["out"] / "conversion.json"))
    options = info["model_options"]
    assert options["name"] == "mask_rcnn" and options["num_classes"] == 81 and options["background_slot"] is True
    assert tuple(options["category_ids"]) == COCO_80_CATEGORY_IDS
    assert options["roi.style"] == "mmdet" and options["box_head.fc_dims"] == 512 and options["rpn.num_filters"] == 128
    ours = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(converted["variables"]["params"]))
    theirs = sum(p.numel() for p in converted["reference"].parameters())
    assert ours == theirs == 13_916_084  # the seed README's 13.92M


def test_parity_features_rpn_box_and_mask_heads(converted):
    rng = np.random.RandomState(4)
    images = rng.normal(size=(1, SIZE, SIZE, 3))
    centres = rng.uniform(0, SIZE, (20, 2))
    sides = np.exp(rng.uniform(np.log(2.0), np.log(128.0), (20, 2)))  # from sub-pixel at P3 (< 8 px) up
    rois = np.concatenate([centres - sides / 2, centres + sides / 2], 1).clip(-4, SIZE + 4)  # ymin, xmin, ...
    reference = copy.deepcopy(converted["reference"]).double()
    with torch.no_grad():
        torch_rois = torch.from_numpy(np.concatenate([np.zeros((20, 1)), rois[:, [1, 0, 3, 2]]], 1))
        out = reference(torch.from_numpy(images).permute(0, 3, 1, 2), torch_rois)
        feats = reference.features(torch.from_numpy(images).permute(0, 3, 1, 2))
    a = converted["config"].model.anchor
    perm = anchor_permutation(a.num_scales, a.aspect_ratios)
    theirs = {}
    for i, level in enumerate(range(3, 8)):
        theirs[f"P{level}"] = feats[i].permute(0, 2, 3, 1).numpy()
        cls = out["rpn_cls"][i].permute(0, 2, 3, 1).numpy()
        reg = out["rpn_reg"][i].permute(0, 2, 3, 1).numpy()
        theirs[f"objectness{level}"] = cls[..., perm]
        theirs[f"deltas{level}"] = reg.reshape(reg.shape[:-1] + (3, 4))[..., perm, :][..., [1, 0, 3, 2]].reshape(
            reg.shape
        )
    theirs["class_logits"] = out["cls_score"].numpy()[None]
    theirs["box_deltas"] = out["bbox_pred"].numpy().reshape(1, 20, 81, 4)[..., [1, 0, 3, 2]].reshape(1, 20, -1)
    theirs["mask_logits"] = out["mask_logits"].permute(0, 2, 3, 1).numpy()[None]

    model = converted["model"]

    def forward(v, x, boxes):
        features = model.apply(v, x, method="features")
        scores, deltas = model.apply(v, features, method="rpn")
        logits, box_deltas = model.apply(v, features, boxes, method="roi_outputs")
        ours = {"class_logits": logits, "box_deltas": box_deltas}
        ours["mask_logits"] = model.apply(v, features, boxes, method="mask_outputs")
        for level in range(3, 8):
            ours[f"P{level}"], ours[f"objectness{level}"], ours[f"deltas{level}"] = (
                features[level], scores[level], deltas[level],
            )  # fmt: skip
        return ours

    with jax.enable_x64(True):
        v64 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), converted["variables"])
        ours = jax.tree_util.tree_map(np.asarray, jax.jit(forward)(v64, images, rois[None]))
    diffs = {k: float(np.max(np.abs(ours[k] - theirs[k]))) for k in theirs}
    print(f"\nseed Mask R-CNN 49S @{SIZE} float64: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert all(ours[k].dtype == np.float64 for k in theirs)
    assert max(diffs.values()) <= FLOAT64_TOLERANCE, diffs
    assert np.max(np.abs(theirs["mask_logits"])) > 0.1  # a non-trivial comparison


def test_converted_checkpoint_evaluates_and_finetunes_through_main(converted, tmp_path):
    """81 mmdetection classes (COCO ids via category_ids) on the synthetic shapes: eval writes bbox and
    segm results with COCO category ids; two fine-tuning steps start from the converted weights."""
    tiny = [
        "--config=configs/maskrcnn_spinenet49s.py",
        f"--config.init_from={converted['out']}",
        f"--config.model.image_size={SIZE}",
        "--config.data.source=synthetic",
        "--config.data.train_split=train",
        "--config.data.eval_split=val",
        "--config.data.synthetic_train_images=8",
        "--config.data.synthetic_val_images=4",
        "--config.data.train_batch_size=4",
        "--config.data.eval_batch_size=4",
        "--config.data.max_instances=8",
        "--config.data.mask_crop_size=28",
        "--config.model.roi.num_samples=64",
        "--config.model.rpn.pre_nms_top_k_train=300",
        "--config.model.rpn.post_nms_top_k_train=100",
        "--config.model.rpn.pre_nms_top_k=300",
        "--config.model.rpn.post_nms_top_k=100",
        "--config.model.detection.score_threshold=0.0",  # random weights: keep every candidate
    ]
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "main.py", *args], capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    result = run(*tiny, f"--workdir={tmp_path / 'eval'}", "--mode=eval")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "COCO mask AP" in result.stdout
    detections = json.load(open(tmp_path / "eval" / "detections_0.json"))
    masks = json.load(open(tmp_path / "eval" / "segmentations_0.json"))
    assert detections and len(masks) == len(detections)
    assert {d["category_id"] for d in detections} <= set(COCO_80_CATEGORY_IDS)
    assert {d["category_id"] for d in detections} - {1, 2, 3}  # COCO ids beyond the first outputs occur

    result = run(*tiny, f"--workdir={tmp_path / 'finetune'}", "--config.total_steps=2", "--mode=train")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initialised" in result.stderr and (tmp_path / "finetune" / "checkpoints" / "2").is_dir()
