"""RoIAlign ``style='jwyang_avg'`` (DetNet_pytorch's RoIAlignAvg and ``_PyramidRoI_Feat``) against a loop-for-loop
port of the seed's CUDA kernels (tests/detnet_reference.py: ``pyramid_roi_feat``, ``roi_align_forward`` /
``roi_align_backward``), run here on CPU.

* Levels: ``jwyang_levels`` equals the seed's float32 rule (+1 widths, floor, no epsilon, clamp to 2..5) on random
  boxes and on boxes whose ``sqrt((w + 1)(h + 1))`` is exactly 112, 224 or 448 px (the level boundaries).
* Values and gradients w.r.t. the features (a random cotangent through the seed's backward kernel and
  ``avg_pool2d``'s backward) on P2..P5 maps of a 600 x 600 input (150, 75, 38, 38: the stride-16 maps' scale
  is 38 / 600, not 1 / 16), two images, 14 x 14 output: RoIs of every level, RoIs crossing every border,
  RoIs whose grid ends in the last row/column's extrapolation band [H - 1, H) or beyond the map (0), and
  degenerate RoIs (x2 < x1 - 1: extent clamped to 0). Max abs diffs asserted <= 1e-5 (measured ~1e-7).
* Negative controls: the same RoIs with ``1 / stride`` scales, and torchvision-style sampling, disagree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from detnet_reference import pyramid_roi_feat, roi_levels

from scaledet_jax.ops.roi_align import jwyang_levels, multilevel_roi_align

TOLERANCE = 1e-5
SIZE = 600  # not a multiple of 16: the seed's spatial scale H_l / S differs from 1 / stride
MAP_SIZES = {2: 150, 3: 75, 4: 38, 5: 38}  # DetNet's P2..P5 of a 600 x 600 input (strides 4, 8, 16, 16)
STRIDES = {2: 4, 3: 8, 4: 16, 5: 16}
CHANNELS = 3
POOLING = 14


def _seed_rois(boxes: np.ndarray) -> torch.Tensor:
    """Our [B, R, 4] (ymin, xmin, ymax, xmax) -> the seed's [B * R, 5] (batch index, x1, y1, x2, y2)."""
    batch, count = boxes.shape[:2]
    index = np.repeat(np.arange(batch, dtype=np.float32), count)[:, None]
    return torch.from_numpy(np.concatenate([index, boxes.reshape(-1, 4)[:, [1, 0, 3, 2]]], 1).astype(np.float32))


def _boxes(rng: np.random.RandomState, count: int) -> np.ndarray:
    """[count, 4] boxes (ymin, xmin, ymax, xmax): a quarter per level 2..5 (sqrt(wh) in [16, 112), [112, 224),
    [224, 448), [448, 900)), every border crossed, some ending in the last pixel's band, three degenerate."""
    bounds = np.asarray([16.0, 112.0, 224.0, 448.0, 900.0])
    which = np.arange(count) % 4
    root = np.exp(rng.uniform(np.log(bounds[which]), np.log(bounds[which + 1])))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), count))
    sides = np.stack([root / np.sqrt(aspect), root * np.sqrt(aspect)], 1)
    centres = rng.uniform(-40, SIZE + 40, (count, 2))
    boxes = np.concatenate([centres - sides / 2, centres + sides / 2], 1)
    edge = slice(0, count // 4 * 4, 4 // 2)  # every other box ends in the last pixels (or just beyond)
    ends = rng.uniform(SIZE - 12, SIZE + 2, (len(range(*edge.indices(count))), 2))
    boxes[edge] = np.concatenate([ends - sides[edge], ends], 1)
    boxes[-3:] = [[100.0, 100.0, 97.0, 98.5], [5.0, 590.0, 3.0, 560.0], [-20.0, -30.0, -25.0, -40.0]]  # degenerate
    return boxes.astype(np.float32)


@pytest.fixture(scope="module")
def case():
    rng = np.random.RandomState(0)
    maps = {level: rng.normal(size=(2, s, s, CHANNELS)).astype(np.float32) for level, s in MAP_SIZES.items()}
    boxes = np.stack([_boxes(rng, 40), _boxes(rng, 40)])
    cotangent = rng.normal(size=(2, 40, POOLING, POOLING, CHANNELS)).astype(np.float32)
    return dict(maps=maps, boxes=boxes, cotangent=cotangent)


def _seed(case) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The seed's pooled features [B, R, P, P, C] and d<pooled, cotangent>/d maps (NHWC)."""
    maps = {k: torch.from_numpy(m).permute(0, 3, 1, 2).contiguous().requires_grad_() for k, m in case["maps"].items()}
    im_info = torch.tensor([[SIZE, SIZE, 1.0]])
    pooled = pyramid_roi_feat([maps[level] for level in range(2, 6)], _seed_rois(case["boxes"]), im_info, POOLING)
    cotangent = torch.from_numpy(case["cotangent"].reshape(-1, POOLING, POOLING, CHANNELS)).permute(0, 3, 1, 2)
    (pooled * cotangent).sum().backward()
    out = pooled.detach().permute(0, 2, 3, 1).numpy().reshape(case["cotangent"].shape)
    return out, {level: m.grad.permute(0, 2, 3, 1).numpy() for level, m in maps.items()}


def _ours(case, **kw) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    scales = {level: s / SIZE for level, s in MAP_SIZES.items()}
    kw = {"style": "jwyang_avg", "strides": STRIDES, "spatial_scales": scales, **kw}

    def pool(maps):
        return multilevel_roi_align(maps, jnp.asarray(case["boxes"]), POOLING, **kw)

    out, vjp = jax.vjp(jax.jit(pool), case["maps"])
    return np.asarray(out), {k: np.asarray(v) for k, v in vjp(jnp.asarray(case["cotangent"]))[0].items()}


def test_levels_match_the_seed():
    rng = np.random.RandomState(1)
    boxes = _boxes(rng, 400)
    sides = np.asarray([112.0, 224.0, 448.0])[:, None] - 1.0  # sqrt((w + 1)(h + 1)) exactly 112, 224, 448
    exact = np.concatenate([np.full((3, 2), 7.0), 7.0 + np.repeat(sides, 2, 1)], 1).astype(np.float32)
    boxes = np.concatenate([boxes, exact])
    theirs = roi_levels(_seed_rois(boxes[None])).numpy().astype(np.int32)
    ours = np.asarray(jwyang_levels(jnp.asarray(boxes), 2, 5))
    np.testing.assert_array_equal(ours, theirs)
    assert list(ours[-3:]) == [3, 4, 5]
    assert set(np.unique(ours)) == {2, 3, 4, 5}


def test_values_and_gradients_match_the_seed_kernel(case):
    theirs, theirs_grad = _seed(case)
    ours, ours_grad = _ours(case)
    boxes = case["boxes"].reshape(-1, 4)
    levels = roi_levels(_seed_rois(case["boxes"])).numpy().astype(int)
    assert all((levels == level).sum() >= 5 for level in range(2, 6)), np.bincount(levels)
    # The borders are exercised: grids ending in the extrapolation band [H - 1, H) and beyond the map.
    scale = np.asarray([MAP_SIZES[level] / SIZE for level in levels], np.float32)
    ends = boxes[:, 2:] * scale[:, None] + 1.0
    height = np.asarray([MAP_SIZES[level] for level in levels])[:, None]
    assert ((ends > height - 1) & (ends < height)).sum() >= 3 and (ends >= height + 0.5).sum() >= 10
    assert (boxes[:, :2] < 0).sum() >= 10
    diff = float(np.abs(ours - theirs).max())
    grad_diff = max(float(np.abs(ours_grad[k] - theirs_grad[k]).max()) for k in theirs_grad)
    grad_scale = max(np.abs(g).max() for g in theirs_grad.values())
    print(f"\njwyang_avg vs the seed's kernel: values {diff:.1e} (max |ref| {np.abs(theirs).max():.2f}), "
          f"d/dfeatures {grad_diff:.1e} (max |ref| {grad_scale:.2f})")  # fmt: skip
    assert diff <= TOLERANCE and grad_diff <= TOLERANCE
    assert np.abs(theirs).max() > 0.5 and all(np.abs(g).max() > 0.5 for g in theirs_grad.values())
    # Degenerate RoIs: x extent clamped to 0 -> every column samples x1 (equal columns); starting above/left of
    # the map -> all 0. Both images' last two boxes are those.
    assert np.abs(theirs[:, -2] - theirs[:, -2, :, :1]).max() == 0 and np.abs(theirs[:, -2]).max() > 0
    assert np.all(theirs[:, -1] == 0) and np.all(ours[:, -1] == 0)


def test_other_scales_or_sampling_disagree(case):
    theirs, _ = _seed(case)
    one_over_stride, _ = _ours(case, spatial_scales=None)
    torchvision, _ = _ours(case, style="torchvision", spatial_scales=None)
    levels = roi_levels(_seed_rois(case["boxes"])).numpy().astype(int).reshape(2, -1)
    stride16 = levels >= 4
    # Only the stride-16 maps' scale differs (38 / 600 vs 1 / 16); P2 and P3 are exact multiples.
    assert np.abs(one_over_stride - theirs)[~stride16].max() <= TOLERANCE
    assert np.abs(one_over_stride - theirs)[stride16].max() > 100 * TOLERANCE
    assert np.abs(torchvision - theirs).max() > 100 * TOLERANCE
