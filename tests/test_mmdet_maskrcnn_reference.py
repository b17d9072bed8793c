"""Checks of the PyTorch rebuild of the seed's mmdetection-v1.1 Mask R-CNN SpineNet (tests/mmdet_spinenet_reference.py).

* parameter counts against the seed README (yan-roo/SpineNet-Pytorch: 49S 13.92M, 49 40.69M, 96 55.12M);
* head state_dict keys / shapes / order as listed in the research report (mmdet v1.1 registration order);
* the legacy mmdet RoIAlign against torchvision's ``roi_align`` (the oracle, run here): equal to
  ``aligned=False, sampling_ratio=2`` on ``[x1, y1, x2 + 1, y2 + 1]`` whenever the RoI spans >= 1 feature pixel on
  both axes, different exactly where it does not; there (and for malformed RoIs) equal to ``aligned=True`` on the
  RoI shifted by half a feature pixel, which has mmdet's clamp-at-0 size rule;
* SingleRoIExtractor level mapping (P3 < 112 <= P4 < 224 <= P5 < 448 <= P6, P7 never) against torchvision;
* head forwards against a functional composition (F.conv2d / batch_norm / relu / NCHW flatten / linear).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmdet_spinenet_reference import (
    ROI_FEATMAP_STRIDES,
    build_mmdet_maskrcnn_spinenet,
    map_roi_levels,
    mmdet_roi_align,
)
from torch_reference import randomize_
from torchvision.ops import roi_align as tv_roi_align

TOL = 1e-5

# mmdet v1.1 MaskRCNN state_dict below ``backbone.*`` for 49S / 81 classes (report section 3), in order.
_CONV_BN = [("conv.weight", (128, 128, 3, 3))] + [
    (f"bn.{n}", (128,)) for n in ("weight", "bias", "running_mean", "running_var")
]
_CONV_BN += [("bn.num_batches_tracked", ())]
EXPECTED_HEAD_KEYS = (
    [
        ("rpn_head.rpn_conv.weight", (128, 128, 3, 3)),
        ("rpn_head.rpn_conv.bias", (128,)),
        ("rpn_head.rpn_cls.weight", (3, 128, 1, 1)),
        ("rpn_head.rpn_cls.bias", (3,)),
        ("rpn_head.rpn_reg.weight", (12, 128, 1, 1)),
        ("rpn_head.rpn_reg.bias", (12,)),
        ("bbox_head.fc_cls.weight", (81, 512)),
        ("bbox_head.fc_cls.bias", (81,)),
        ("bbox_head.fc_reg.weight", (324, 512)),
        ("bbox_head.fc_reg.bias", (324,)),
    ]
    + [(f"bbox_head.shared_convs.{i}.{k}", s) for i in range(4) for k, s in _CONV_BN]
    + [("bbox_head.shared_fcs.0.weight", (512, 6272)), ("bbox_head.shared_fcs.0.bias", (512,))]
    + [(f"mask_head.convs.{i}.{k}", s) for i in range(4) for k, s in _CONV_BN]
    + [
        ("mask_head.upsample.weight", (128, 128, 2, 2)),
        ("mask_head.upsample.bias", (128,)),
        ("mask_head.conv_logits.weight", (81, 128, 1, 1)),
        ("mask_head.conv_logits.bias", (81,)),
    ]
)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_seed_readme():
    with torch.device("meta"):  # shapes only: no init cost
        small = build_mmdet_maskrcnn_spinenet("49S", 81)
        parts = {k: _count(getattr(small, k)) for k in ("backbone", "rpn_head", "bbox_head", "mask_head")}
        assert parts == dict(backbone=9_089_215, rpn_head=149_519, bbox_head=4_010_389, mask_head=666_961)
        assert _count(small) == 13_916_084  # README 13.92M
        counts = {v: _count(build_mmdet_maskrcnn_spinenet(v, 81)) for v in ("49", "96")}
    assert counts == {"49": 40_692_533, "96": 55_124_021}  # README 40.69M, 55.12M
    assert round(counts["49"] / 1e6, 2) == 40.69 and round(counts["96"] / 1e6, 2) == 55.12


def test_head_state_dict_matches_report():
    with torch.device("meta"):
        sd = build_mmdet_maskrcnn_spinenet("49S", 81).state_dict()
    keys = list(sd)
    n_backbone = sum(k.startswith("backbone.") for k in keys)
    assert all(k.startswith("backbone.") for k in keys[:n_backbone])  # backbone first, then the heads
    heads = [(k, tuple(v.shape)) for k, v in sd.items() if not k.startswith("backbone.")]
    assert heads == EXPECTED_HEAD_KEYS


def _random_rois(gen: torch.Generator, n: int, batch: int, lo: float, hi: float, span: float) -> torch.Tensor:
    """(b, x1, y1, x2, y2) with corners in [lo, hi] and inclusive sizes (x2 - x1 + 1) in [1, span]; 1/64 grid."""
    b = torch.randint(0, batch, (n,), generator=gen).float()
    xy = torch.rand(n, 2, generator=gen) * (hi - lo) + lo
    wh = torch.rand(n, 2, generator=gen) * (span - 1) + 1
    rois = torch.stack([b, xy[:, 0], xy[:, 1], xy[:, 0] + wh[:, 0] - 1, xy[:, 1] + wh[:, 1] - 1], 1)
    return torch.round(rois * 64) / 64


def _tv_plus_one(feat: torch.Tensor, rois: torch.Tensor, out: int, scale: float) -> torch.Tensor:
    boxes = rois.clone()
    boxes[:, 3:] += 1
    return tv_roi_align(feat, boxes, (out, out), spatial_scale=scale, sampling_ratio=2, aligned=False)


def _tv_aligned_shift(feat: torch.Tensor, rois: torch.Tensor, out: int, scale: float) -> torch.Tensor:
    """torchvision aligned=True subtracts 0.5 after scaling and never clamps the size: shift back by 0.5 px."""
    boxes = rois.clone()
    boxes[:, 3:] += 1
    boxes[:, 1:] += 0.5 / scale
    return tv_roi_align(feat, boxes, (out, out), spatial_scale=scale, sampling_ratio=2, aligned=True)


@pytest.mark.parametrize("stride", [1, 8, 32])
@pytest.mark.parametrize("out", [7, 14])
def test_roi_align_equals_torchvision_plus_one_for_rois_of_at_least_one_pixel(stride, out):
    gen = torch.Generator().manual_seed(stride * 100 + out)
    feat = torch.randn(2, 5, 11, 17, generator=gen)
    scale = 1.0 / stride
    # Corners partly outside the map (the zero / clamp rules), sizes >= 1 feature pixel on both axes.
    rois = _random_rois(gen, 300, 2, -4.0 * stride, 18.0 * stride, 14.0 * stride)
    rois[:, 3:] = torch.maximum(rois[:, 3:], rois[:, 1:3] + stride - 1)
    ours = mmdet_roi_align(feat, rois, out, scale, 2)
    ref = _tv_plus_one(feat, rois, out, scale)
    diff = (ours - ref).abs().max().item()
    print(f"stride {stride} out {out}: max |mmdet - torchvision(+1)| = {diff:.2e}")
    assert ours.shape == (300, 5, out, out)
    assert diff <= TOL
    # The +1 matters: torchvision on the raw (x1, y1, x2, y2) is a different function.
    raw = tv_roi_align(feat, rois, (out, out), spatial_scale=scale, sampling_ratio=2, aligned=False)
    assert (ours - raw).abs().max().item() > 1e-2


def test_roi_align_min_size_rule_is_the_only_difference():
    gen = torch.Generator().manual_seed(0)
    stride, out = 8, 7
    scale = 1.0 / stride
    feat = torch.randn(2, 4, 16, 16, generator=gen)
    big = _random_rois(gen, 100, 2, 0.0, 100.0, 40.0)
    big[:, 3:] = torch.maximum(big[:, 3:], big[:, 1:3] + stride - 1)
    tiny = _random_rois(gen, 100, 2, 0.0, 100.0, 40.0)
    axis = torch.randint(0, 3, (100,), generator=gen)  # 0: x sub-pixel, 1: y sub-pixel, 2: both
    sub = torch.rand(100, generator=gen) * (stride - 1.5) + 0.5  # inclusive size in (0.5, stride - 1): < 1 px
    sub = torch.round(sub * 64) / 64
    tiny[:, 3] = torch.where(axis != 1, tiny[:, 1] + sub - 1, tiny[:, 3])
    tiny[:, 4] = torch.where(axis != 0, tiny[:, 2] + sub - 1, tiny[:, 4])
    rois = torch.cat([big, tiny])
    perm = torch.randperm(200, generator=gen)
    rois = rois[perm]
    size_px = torch.minimum(rois[:, 3] - rois[:, 1] + 1, rois[:, 4] - rois[:, 2] + 1) * scale
    subpixel = size_px < 1
    assert subpixel.sum() == 100

    ours = mmdet_roi_align(feat, rois, out, scale, 2)
    per_roi = (ours - _tv_plus_one(feat, rois, out, scale)).flatten(1).abs().amax(1)
    print(f"min-size rule: equal max {per_roi[~subpixel].max():.2e}, differing min {per_roi[subpixel].min():.2e}")
    assert per_roi[~subpixel].max() <= TOL
    assert per_roi[subpixel].min() > 1e-3
    # The sub-pixel RoIs are the unclamped (>= 0) size rule: torchvision aligned=True, shifted back by 0.5 px.
    shifted = _tv_aligned_shift(feat, rois, out, scale)
    assert (ours - shifted).abs().max().item() <= TOL

    # Malformed RoIs (x2 + 1 < x1): mmdet clamps the size to 0, i.e. every sample sits at x1 * scale.
    bad = rois[:20].clone()
    bad[:, 3] = bad[:, 1] - 5
    zero_w = bad.clone()
    zero_w[:, 3] = zero_w[:, 1] - 1  # size exactly 0
    ours_bad = mmdet_roi_align(feat, bad, out, scale, 2)
    assert (ours_bad - _tv_aligned_shift(feat, zero_w, out, scale)).abs().max().item() <= TOL


def test_level_mapping_and_roi_features_match_torchvision_per_level():
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = build_mmdet_maskrcnn_spinenet("49S", 81).eval()
    size = 256
    feats = [torch.randn(2, 6, size // 2**k, size // 2**k, generator=gen) for k in range(3, 8)]  # P3..P7
    sides = [4.0, 60.0, 111.5, 112.0, 150.0, 223.0, 224.0, 300.0, 447.0, 448.0, 700.0, 1500.0]
    rois = []
    for i, s in enumerate(sides):
        for j, aspect in enumerate((0.5, 1.0, 2.0)):
            w, h = s * aspect**0.5, s / aspect**0.5
            x1, y1 = 10.0 * i, 7.0 * j
            rois.append([float((i + j) % 2), x1, y1, x1 + w - 1, y1 + h - 1])
    rois = torch.round(torch.tensor(rois) * 64) / 64  # exact in float32 after the half-pixel shift below
    side = torch.sqrt((rois[:, 3] - rois[:, 1] + 1) * (rois[:, 4] - rois[:, 2] + 1))
    expected = np.searchsorted(np.array([112.0, 224.0, 448.0]), side.numpy() * (1 + 1e-6), side="right")
    levels = map_roi_levels(rois, 4)
    assert levels.tolist() == expected.tolist()
    assert set(expected.tolist()) == {0, 1, 2, 3}
    for out in (7, 14):
        got = model.roi_features(feats, rois, out)
        ref = torch.stack(
            [
                _tv_aligned_shift(feats[lvl], rois[k : k + 1], out, 1.0 / ROI_FEATMAP_STRIDES[lvl])[0]
                for k, lvl in enumerate(expected.tolist())
            ]
        )
        assert (got - ref).abs().max().item() <= TOL


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _conv_bn_relu(x: torch.Tensor, m: torch.nn.Module) -> torch.Tensor:
    y = F.conv2d(x, m.conv.weight, None, padding=1)
    bn = m.bn
    y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, 1e-3)
    return F.relu(y)


def _randomize_(model: torch.nn.Module) -> torch.Tensor:
    """Backbone BN calibrated on eight random images (torch_reference.randomize_), returned NCHW; head biases / BN
    made non-trivial."""
    images = np.random.default_rng(0).standard_normal((8, 128, 128, 3), dtype=np.float32)
    randomize_(model.backbone, images)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for head in (model.rpn_head, model.bbox_head, model.mask_head):
            for name, p in head.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            for bn in (m for m in head.modules() if isinstance(m, torch.nn.BatchNorm2d)):
                bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) + 0.5)
                bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen) * 0.1)
                bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def test_fixed_roi_forward_shapes_and_head_semantics():
    torch.manual_seed(0)
    model = build_mmdet_maskrcnn_spinenet("49S", 81)
    images = _randomize_(model)[:1]  # one of the calibration images
    model.eval()
    rois = torch.tensor([[0, 4.0, 6.0, 50.0, 40.0], [0, 0.0, 0.0, 127.0, 127.0], [0, 30.0, 20.0, 33.0, 90.0]])
    with torch.no_grad():
        out = model(images, rois)
        feats = model.features(images)
        assert [tuple(f.shape) for f in feats] == [(1, 128, 128 // s, 128 // s) for s in (8, 16, 32, 64, 128)]
        assert [tuple(c.shape) for c in out["rpn_cls"]] == [(1, 3, 128 // s, 128 // s) for s in (8, 16, 32, 64, 128)]
        assert [tuple(r.shape) for r in out["rpn_reg"]] == [(1, 12, 128 // s, 128 // s) for s in (8, 16, 32, 64, 128)]
        assert out["cls_score"].shape == (3, 81) and out["bbox_pred"].shape == (3, 324)
        assert out["mask_logits"].shape == (3, 81, 28, 28)

        # RPN: relu after the 3x3 conv, none after the 1x1 predictors.
        diffs: dict[str, float] = {}
        h = model.rpn_head
        for f, c, r in zip(feats, out["rpn_cls"], out["rpn_reg"], strict=True):
            t = F.relu(F.conv2d(f, h.rpn_conv.weight, h.rpn_conv.bias, padding=1))
            diffs["rpn_cls"] = max(diffs.get("rpn_cls", 0.0), _diff(F.conv2d(t, h.rpn_cls.weight, h.rpn_cls.bias), c))
            diffs["rpn_reg"] = max(diffs.get("rpn_reg", 0.0), _diff(F.conv2d(t, h.rpn_reg.weight, h.rpn_reg.bias), r))

        # Box head: conv-bn-relu x4 -> NCHW flatten -> relu(fc) -> fc_cls / fc_reg (no relu on the outputs).
        x = model.roi_features(feats, rois, 7)
        bh = model.bbox_head
        for m in bh.shared_convs:
            x = _conv_bn_relu(x, m)
        x = F.relu(F.linear(x.reshape(3, -1), bh.shared_fcs[0].weight, bh.shared_fcs[0].bias))
        diffs["cls_score"] = _diff(F.linear(x, bh.fc_cls.weight, bh.fc_cls.bias), out["cls_score"])
        diffs["bbox_pred"] = _diff(F.linear(x, bh.fc_reg.weight, bh.fc_reg.bias), out["bbox_pred"])
        assert (out["cls_score"] < 0).any() and (out["bbox_pred"] < 0).any()

        # Mask head: conv-bn-relu x4 -> relu(deconv 2x2/2) -> 1x1 logits.
        x = model.roi_features(feats, rois, 14)
        mh = model.mask_head
        for m in mh.convs:
            x = _conv_bn_relu(x, m)
        x = F.relu(F.conv_transpose2d(x, mh.upsample.weight, mh.upsample.bias, stride=2))
        diffs["mask_logits"] = _diff(F.conv2d(x, mh.conv_logits.weight, mh.conv_logits.bias), out["mask_logits"])
    print("head semantics max abs diffs:", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= TOL
