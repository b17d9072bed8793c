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

import cv2
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from configs_util import CONFIG_DIR, load_config, photo_like
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
        # Our "+1" boxes have exclusive corners (roi.plus_one): mmdetection's inclusive x2, y2 plus 1.
        exclusive = rois + np.array([0.0, 0.0, 1.0, 1.0])
        ours = jax.tree_util.tree_map(np.asarray, jax.jit(forward)(v64, images, exclusive[None]))
    diffs = {k: float(np.max(np.abs(ours[k] - theirs[k]))) for k in theirs}
    print(f"\nseed Mask R-CNN 49S @{SIZE} float64: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert all(ours[k].dtype == np.float64 for k in theirs)
    assert max(diffs.values()) <= FLOAT64_TOLERANCE, diffs
    assert np.max(np.abs(theirs["mask_logits"])) > 0.1  # a non-trivial comparison


# mmdetection v1.1's Mask R-CNN test path (MaskRCNN.simple_test with rescale=True and the seed's test_cfg), rebuilt
# from its source on the PyTorch rebuild's pieces: RPNHead.get_bboxes_single, bbox2roi + SingleRoIExtractor,
# BBoxHead.get_det_bboxes + multiclass_nms, FCNMaskHead.get_seg_masks.
MMDET_BOX_STDS = torch.tensor([0.1, 0.1, 0.2, 0.2], dtype=torch.float64)


def _mmdet_v1_mask_rcnn_test(reference, x: torch.Tensor, img_shape, scale_factor: float, ori_shape):
    """(det_bboxes [K, 4] inclusive x1, y1, x2, y2 in original pixels, scores [K], labels [K] 0..79, masks
    [K, H, W] bool) of one image."""
    from mmdet_efficientdet_reference import mmdet_anchors, mmdet_v1_delta2bbox, mmdet_v1_nms
    from mmdet_spinenet_reference import ANCHOR_STRIDES, BBOX_ROI_SIZE, MASK_ROI_SIZE

    feats = reference.features(x)
    rpn_cls, rpn_reg = reference.rpn(feats)
    proposals, proposal_scores = [], []
    for cls, reg, stride in zip(rpn_cls, rpn_reg, ANCHOR_STRIDES, strict=True):  # test_cfg.rpn
        anchors = mmdet_anchors(tuple(cls.shape[-2:]), stride, octave_base_scale=3, scales_per_octave=1).double()
        scores = cls[0].permute(1, 2, 0).reshape(-1).sigmoid()
        deltas = reg[0].permute(1, 2, 0).reshape(-1, 4)
        if scores.shape[0] > 1000:  # nms_pre
            scores, top = scores.topk(1000)
            anchors, deltas = anchors[top], deltas[top]
        boxes = mmdet_v1_delta2bbox(anchors, deltas, img_shape)  # min_bbox_size 0: no filter
        keep = mmdet_v1_nms(boxes, scores, 0.7)[:1000]  # nms_thr, nms_post
        proposals.append(boxes[keep])
        proposal_scores.append(scores[keep])
    proposals, proposal_scores = torch.cat(proposals), torch.cat(proposal_scores)
    proposals = proposals[proposal_scores.topk(min(1000, len(proposal_scores)))[1]]  # max_num

    rois = torch.cat([proposals.new_zeros(len(proposals), 1), proposals], 1)
    cls_score, bbox_pred = reference.bbox_head(reference.roi_features(feats, rois, BBOX_ROI_SIZE))
    scores = F.softmax(cls_score, dim=1)
    deltas = bbox_pred.reshape(len(rois), -1, 4) * MMDET_BOX_STDS
    boxes = torch.stack([mmdet_v1_delta2bbox(proposals, deltas[:, c], img_shape) for c in range(scores.shape[1])], 1)
    boxes = boxes / scale_factor  # rescale
    kept_boxes, kept_scores, labels = [], [], []
    for c in range(1, scores.shape[1]):  # multiclass_nms: score_thr 0.05, nms 0.5
        chosen = scores[:, c] > 0.05
        if chosen.any():
            keep = mmdet_v1_nms(boxes[chosen, c], scores[chosen, c], 0.5)
            kept_boxes.append(boxes[chosen, c][keep])
            kept_scores.append(scores[chosen, c][keep])
            labels.append(torch.full((len(keep),), c - 1, dtype=torch.long))
    det_boxes, det_scores, det_labels = torch.cat(kept_boxes), torch.cat(kept_scores), torch.cat(labels)
    if len(det_scores) > 100:  # max_per_img
        top = det_scores.argsort(descending=True)[:100]
        det_boxes, det_scores, det_labels = det_boxes[top], det_scores[top], det_labels[top]

    scaled = det_boxes * scale_factor  # simple_test_mask: the mask RoIs in input pixels
    mask_rois = torch.cat([scaled.new_zeros(len(scaled), 1), scaled], 1)
    mask_pred = reference.mask_head(reference.roi_features(feats, mask_rois, MASK_ROI_SIZE)).sigmoid().numpy()
    height, width = ori_shape
    masks = np.zeros((len(det_boxes), height, width), bool)
    for i, box in enumerate(scaled.numpy()):  # get_seg_masks (rescale=True)
        x1, y1, x2, y2 = (box / scale_factor).astype(np.int32)
        w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        probability = mask_pred[i, det_labels[i] + 1]
        masks[i, y1 : y1 + h, x1 : x1 + w] = cv2.resize(probability, (int(w), int(h))) > 0.5
    return det_boxes.numpy(), det_scores.numpy(), det_labels.numpy(), masks


def test_detector_gives_the_seeds_mmdetection_detections_and_masks_on_a_photo(converted):
    """Issue 14 item 5 for the seed's Mask R-CNN: mmdetection v1's whole test path (keep-ratio OpenCV resize to
    (S, S), Normalize, Pad to 128; "+1" anchors, proposals and boxes; NMS on rescaled boxes; get_seg_masks) on a
    110 x 300 photo at S = 256 (input 128 x 256, not square), against ``Detector.predict`` on the uint8 photo
    with the converter's recorded options; float64 networks. Same classes, scores within 1e-4, boxes within
    0.01 px, and the pasted masks."""
    from mmdet_efficientdet_reference import mmcv_imrescale

    from scaledet_jax.detector import Detector

    config = copy.deepcopy(converted["config"])
    config.model.image_size = 256
    assert config.model.test_resize.style == "mmdet" and config.model.detection.mask_paste == "mmdet"
    image = photo_like(110, 300, seed=15)
    resized, factor = mmcv_imrescale(image, (256, 256))
    spec = config.model.input
    padded = np.zeros((128, 256, 3))
    padded[: resized.shape[0], : resized.shape[1]] = (resized - np.asarray(spec.mean)) / np.asarray(spec.std)
    reference = copy.deepcopy(converted["reference"]).double().eval()
    with torch.no_grad():
        boxes, scores, labels, masks = _mmdet_v1_mask_rcnn_test(
            reference, torch.from_numpy(padded[None]).permute(0, 3, 1, 2), resized.shape[:2], factor, image.shape[:2]
        )
    assert len(scores) >= 10 and len(set(labels.tolist())) > 1  # a non-trivial comparison
    # Paired by class, score, then corner: random-init scores tie to ~1e-12 within a class.
    exclusive = boxes + np.array([0.0, 0.0, 1.0, 1.0])  # mmdetection's inclusive corners + 1
    theirs_order = np.lexsort((exclusive[:, 1].round(3), exclusive[:, 0].round(3), -scores.round(8), labels))
    v64 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), converted["variables"])

    def compare(config) -> None:
        with jax.enable_x64(True):
            (ours,) = Detector(config, v64, dtype=np.float64).predict(image)
        print(f"\nseed Mask R-CNN, mmdet v1 test path on a 110 x 300 photo: {len(scores)} detections (mmdet), "
              f"{len(ours['scores'])} (ours)")  # fmt: skip
        assert len(ours["scores"]) == len(scores)
        ours_order = np.lexsort(
            (ours["boxes"][:, 1].round(3), ours["boxes"][:, 0].round(3), -ours["scores"].round(8), ours["classes"])
        )
        categories = np.asarray(COCO_80_CATEGORY_IDS)[labels][theirs_order]
        np.testing.assert_array_equal(ours["classes"][ours_order], categories)
        np.testing.assert_allclose(ours["scores"][ours_order], scores[theirs_order], atol=1e-4, rtol=0)
        np.testing.assert_allclose(ours["boxes"][ours_order], exclusive[theirs_order], atol=0.01, rtol=0)
        differing = int(np.sum(ours["masks"][ours_order] != masks[theirs_order]))
        print(f"pasted masks: {differing} of {masks.size} pixels differ; {int(masks.sum())} set")
        assert masks.sum() > 100 and differing == 0

    compare(config)
    config.model.anchor.plus_one_rounding = False  # negative control: Model Garden's anchors for the RPN
    with pytest.raises(AssertionError):
        compare(config)


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
