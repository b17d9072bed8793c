"""VoVNet-39/57 backbone (+ FPN) vs timm and the maskrcnn-benchmark-vovnet seed (random init, same weights).

* Counts: our VoVNet with FrozenBatchNorm equals the seed rebuild's trainable parameters (21.555M / 35.584M as
  REFERENCE.md quotes the seed) and its buffers; with trainable BatchNorm it equals timm ``vovnet39a`` / ``vovnet57a``
  (num_classes=0); our FPN (P2-P6) equals the seed's FPN (3.017M).
* Parity: timm vovnet39a (BatchNorm eps 1e-5, random statistics, no residual) at 72 px — the stage-entry
  pools then see even (ceil != floor) and odd (ceil != TF 'SAME') sizes; the seed rebuild (FrozenBatchNorm
  without eps, identity OSA modules) + its FPN at 64 px (C2..C5, P2..P6), V-57 body on one image, both through
  ``vovnet.timm_to_flax`` / ``seed_to_flax`` (strict mappings the converter reuses).
* ``snn.max_pool(ceil_mode=True)`` vs ``torch.nn.functional.max_pool2d(ceil_mode=True)``.
* frozen_stages: zero gradients / untouched statistics exactly in the frozen part; the registry builder.
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import vovnet_reference as ref
from torch_reference import nhwc, randomize_

from scaledet_jax import nn as snn
from scaledet_jax.backbones import vovnet
from scaledet_jax.backbones.vovnet import VoVNet
from scaledet_jax.convert.torch_layout import convert
from scaledet_jax.models import build_backbone
from scaledet_jax.necks.fpn import FPN
from scaledet_jax.tools import profile

TOLERANCE = 1e-4
TIMM = dict(norm="batch", bn_epsilon=1e-5, residual=False)  # timm vovnet39a / 57a
SEED_FPN = dict(min_level=2, max_level=6, extra_levels="maxpool", conv_padding="symmetric", norm=None)
DOCUMENTED_MILLIONS = {39: 21.555, 57: 35.584}  # the seed's counts as /work/shared/REFERENCE.md quotes them
TINY = dict(
    stem_channels=(8, 8, 16), stage_channels=(8, 8, 8, 8), concat_channels=(16, 16, 24, 32), stage_blocks=(1, 1, 1, 1),
    layers_per_block=2,
)  # fmt: skip


def _images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).normal(0, 1, (batch, size, size, 3)).astype(np.float32)


def _abstract(module, *shape):
    return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape, jnp.float32)))


def _max_diff(got: dict, expected: dict, what: str, tolerance: float | None = None) -> float:
    """Max abs diff over levels (shapes equal, references non-trivial); asserted <= ``tolerance`` if given."""
    assert sorted(got) == sorted(expected), (what, sorted(got), sorted(expected))
    worst = 0.0
    for level, want in expected.items():
        assert got[level].shape == want.shape, (what, level, got[level].shape, want.shape)
        scale = float(np.abs(want).max())
        assert scale > 0.05, f"{what} level {level} is near zero: the comparison would be blind"
        diff = float(np.abs(np.asarray(got[level], np.float64) - np.asarray(want, np.float64)).max())
        assert tolerance is None or diff <= tolerance, (
            f"{what} level {level}: max abs diff {diff:.2e} (max |ref| {scale:.2f})"
        )
        worst = max(worst, diff)
    return worst


def _check_parity(ours: dict, theirs: dict, what: str) -> dict[str, float]:
    """``ours`` / ``theirs``: {'float32' | 'float64': {name: {level: array}}}.

    float64 on both sides: the same function up to rounding, asserted at 1e-8. float32: a random VoVNet with
    calibrated norms amplifies rounding through ~40 layers so much that the reference's own float32 forward is
    ~1e-4 from its float64 forward at C4/C5; so ours must be within max(1e-4, 2x the reference's float32 error)
    of the exact outputs. The direct float32 difference is reported.
    """
    exact = theirs["float64"]
    found = {}
    for name in exact:
        d64 = _max_diff(ours["float64"][name], exact[name], f"{what} {name} float64", 1e-8)
        ours_err = _max_diff(ours["float32"][name], exact[name], f"{what} {name}")
        ref_err = _max_diff(theirs["float32"][name], exact[name], f"{what} {name}")
        direct = _max_diff(ours["float32"][name], theirs["float32"][name], f"{what} {name}")
        print(
            f"\n{what} {name}: max abs diff float64 {d64:.1e}; float32 vs exact: ours {ours_err:.1e}, "
            f"reference {ref_err:.1e}; float32 ours vs reference {direct:.1e}"
        )
        assert ours_err <= max(TOLERANCE, 2 * ref_err), (name, ours_err, ref_err)
        found[name] = direct
    return found


def _ours(run, variables, images: np.ndarray) -> dict:
    """``run(variables, images)`` jitted in float32 and, under ``jax.enable_x64``, in float64."""
    as_numpy = functools.partial(jax.tree_util.tree_map, np.asarray)
    out = {"float32": as_numpy(jax.jit(run)(variables, jnp.asarray(images)))}
    with jax.enable_x64(True):
        v64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables)
        out["float64"] = as_numpy(jax.jit(run)(v64, images.astype(np.float64)))
    return out


def _theirs(module: torch.nn.Module, run, images: np.ndarray) -> dict:
    """``run(module, x)`` (-> {name: {level: tensor}}) in float32 and on a float64 copy of ``module``."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    out = {}
    with torch.no_grad():
        for key, m, xx in (("float32", module, x), ("float64", copy.deepcopy(module).double(), x.double())):
            out[key] = {name: {lvl: nhwc(t) for lvl, t in levels.items()} for name, levels in run(m, xx).items()}
    return out


# --- ceil-mode max pool ------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["valid", "symmetric"])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool_matches_torch(padding, ceil_mode):
    rng = np.random.RandomState(0)
    for height, width in ((5, 8), (7, 7), (9, 12), (16, 13), (18, 9)):
        for window, stride in ((3, 2), (2, 2), (3, 1), (5, 3)):
            x = rng.normal(size=(2, height, width, 3)).astype(np.float32)
            pad = window // 2 if padding == "symmetric" else 0
            expected = F.max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), window, stride, pad, ceil_mode=ceil_mode)
            got = np.asarray(snn.max_pool(jnp.asarray(x), window, stride, padding, ceil_mode=ceil_mode))
            np.testing.assert_array_equal(got, nhwc(expected), err_msg=f"{height}x{width} k{window} s{stride}")


def test_max_pool_ceil_mode_needs_a_torch_padding():
    with pytest.raises(ValueError, match="ceil_mode"):
        snn.max_pool(jnp.zeros((1, 8, 8, 1)), 3, 2, "same", ceil_mode=True)
    with pytest.raises(ValueError, match="padding"):
        snn.max_pool(jnp.zeros((1, 8, 8, 1)), 3, 2, "reflect")


# --- parameter counts --------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [39, 57])
def test_parameter_counts_equal_seed_and_timm(depth):
    seed_body = ref.VoVNetBody(depth)
    expected = ref.trainable_parameter_count(seed_body)
    assert round(expected / 1e6, 3) == DOCUMENTED_MILLIONS[depth]
    frozen = _abstract(VoVNet(depth=depth), 1, 64, 64, 3)
    assert profile.count_params(frozen["params"]) == expected
    # FrozenBatchNorm's four arrays per channel are buffers on both sides.
    assert profile.count_params(frozen["batch_stats"]) == sum(b.numel() for b in seed_body.buffers())

    timm_model = timm.create_model(f"vovnet{depth}a", pretrained=False, num_classes=0)
    batch = _abstract(VoVNet(depth=depth, **TIMM), 1, 64, 64, 3)
    assert profile.count_params(batch["params"]) == sum(p.numel() for p in timm_model.parameters())


def test_fpn_parameter_count_equals_seed():
    expected = ref.trainable_parameter_count(ref.FPN())
    assert round(expected / 1e6, 3) == 3.017
    features = {
        level: jnp.zeros((1, 64 >> level, 64 >> level, c))
        for level, c in zip(range(2, 6), vovnet.CONCAT_CHANNELS, strict=True)
    }
    variables = jax.eval_shape(lambda: FPN(**SEED_FPN).init(jax.random.key(0), features))
    assert profile.count_params(variables["params"]) == expected


# --- parity --------------------------------------------------------------------------------------------


def _levels(tensors, first: int = 2) -> dict:
    return dict(enumerate(tensors, first))


def test_parity_with_timm_vovnet39a():
    # Statistics calibrated on other, larger images: at 72 px C5 is 2x2, too few values for well-conditioned ones.
    images = _images(2, 72)
    torch_model = randomize_(timm.create_model("vovnet39a", pretrained=False, num_classes=0), _images(4, 128, 7), 1)
    indices = [1, 2, 3, 4]
    theirs = _theirs(
        torch_model, lambda m, x: {"C": _levels(m.forward_intermediates(x, indices, intermediates_only=True))}, images
    )
    assert [theirs["float32"]["C"][level].shape[1] for level in range(2, 6)] == [18, 9, 4, 2]  # ceil: 18->9; 9->4 not 5

    model = VoVNet(depth=39, **TIMM)
    variables = vovnet.timm_to_flax(torch_model.state_dict(), _abstract(model, *images.shape))
    _check_parity(_ours(lambda v, x: {"C": model.apply(v, x)}, variables, images), theirs, "VoVNet-39 vs timm @72")


def _seed_body_fpn(backbone: torch.nn.Module, x: torch.Tensor) -> dict:
    c = backbone.body(x)
    return {"C": _levels(c), "P": _levels(backbone.fpn(c))}


@pytest.fixture(scope="module")
def seed_v39():
    """The seed's V-39 body + FPN with calibrated FrozenBatchNorm statistics, its state_dict and outputs at 64 px."""
    backbone = ref.calibrate_frozen_bn_(ref.build_backbone(39), _images(4, 128, seed=3), seed=3)
    images = _images(2, 64, seed=2)
    return images, backbone.state_dict(), _theirs(backbone, _seed_body_fpn, images)


def _seed_variables(state_dict, model: VoVNet, fpn: FPN, images: np.ndarray) -> dict:
    body_vars = vovnet.seed_to_flax(state_dict, _abstract(model, *images.shape), prefix="body.")
    features = {level: jnp.zeros(a.shape) for level, a in jax.eval_shape(model.apply, body_vars, images).items()}
    fpn_vars, _ = convert(
        state_dict,
        jax.eval_shape(lambda: fpn.init(jax.random.key(0), features)),
        lambda path: vovnet.seed_fpn_key(path, "fpn."),
        ignore=lambda key: "body" if key.startswith("body.") else None,
    )
    return {"body": body_vars, "fpn": fpn_vars}


def test_parity_with_seed_v39_body_and_fpn(seed_v39):
    images, state_dict, theirs = seed_v39
    model, fpn = VoVNet(depth=39), FPN(**SEED_FPN)

    def run(variables, x):
        c = model.apply(variables["body"], x)
        return {"C": c, "P": fpn.apply(variables["fpn"], c)}

    _check_parity(_ours(run, _seed_variables(state_dict, model, fpn, images), images), theirs, "VoVNet-39 vs seed @64")


def test_seed_semantics_matter(seed_v39):
    """Negative controls: without the identity adds, or with an epsilon, the seed's C5 is not reproduced."""
    images, state_dict, theirs = seed_v39
    for changed in (dict(residual=False), dict(bn_epsilon=1e-3)):
        model = VoVNet(depth=39, **changed)
        variables = vovnet.seed_to_flax(state_dict, _abstract(model, *images.shape), prefix="body.")
        got = jax.jit(model.apply)(variables, jnp.asarray(images))
        assert float(np.abs(np.asarray(got[5]) - theirs["float64"]["C"][5]).max()) > 1e-2, changed


def test_parity_with_seed_v57_body():
    body = ref.calibrate_frozen_bn_(ref.VoVNetBody(57), _images(4, 128, seed=5), seed=5)
    images = _images(1, 64, seed=4)
    theirs = _theirs(body, lambda m, x: {"C": _levels(m(x))}, images)
    model = VoVNet(depth=57)
    variables = vovnet.seed_to_flax(body.state_dict(), _abstract(model, *images.shape))
    _check_parity(_ours(lambda v, x: {"C": model.apply(v, x)}, variables, images), theirs, "VoVNet-57 vs seed @64")


# --- reference keys and anchors ------------------------------------------------------------------------


def test_seed_rebuild_has_the_checkpoint_keys():
    """The rebuild's keys are the ones REFERENCE.md lists for maskrcnn-benchmark VoVNet checkpoints."""
    state = ref.GeneralizedRCNN(39).state_dict()
    for key in (
        "backbone.body.stem.stem_1/conv.weight",
        "backbone.body.stem.stem_3/norm.running_var",
        "backbone.body.stage3.OSA3_1.layers.0.OSA3_1_0/conv.weight",
        "backbone.body.stage5.OSA5_2.concat.OSA5_2_concat/conv.weight",
        "backbone.fpn.fpn_inner1.weight",
        "backbone.fpn.fpn_layer4.bias",
        "rpn.head.conv.weight",
        "roi_heads.mask.predictor.mask_fcn_logits.bias",
    ):
        assert key in state, key
    assert tuple(state["roi_heads.box.predictor.cls_score.weight"].shape) == (81, 1024)
    assert tuple(state["roi_heads.box.predictor.bbox_pred.weight"].shape) == (324, 1024)
    assert tuple(state["roi_heads.box.feature_extractor.fc6.weight"].shape) == (1024, 256 * 7 * 7)
    assert tuple(state["roi_heads.mask.predictor.conv5_mask.weight"].shape) == (256, 256, 2, 2)
    assert not any("num_batches_tracked" in key for key in state)


def test_reference_cell_anchors_match_detectron_table():
    """The matlab anchors quoted in the seed's anchor_generator.py (stride 16, sizes 128-512), which are 1-based:
    the seed's reference window is ``[1, 1, 16, 16] - 1``, so its anchors are the table minus 1."""
    table = [
        [-83, -39, 100, 56], [-175, -87, 192, 104], [-359, -183, 376, 200],
        [-55, -55, 72, 72], [-119, -119, 136, 136], [-247, -247, 264, 264],
        [-35, -79, 52, 96], [-79, -167, 96, 184], [-167, -343, 184, 360],
    ]  # fmt: skip
    anchors = ref.generate_cell_anchors(16, (128, 256, 512), (0.5, 1, 2)).numpy()
    np.testing.assert_array_equal(anchors, np.asarray(table) - 1)


# --- frozen stages and the builder ----------------------------------------------------------------------


def _numpy_variables(abstract) -> dict:
    """He-normal kernels, unit scales / variances, zero biases / means, drawn with NumPy: ``Module.init``
    compiles the initialisers, which costs seconds for nothing here."""
    rng = np.random.RandomState(0)

    def value(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape).astype(leaf.dtype)
        return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype)

    return jax.tree_util.tree_map_with_path(value, abstract)


def test_frozen_stages_stop_gradients_and_statistics():
    model = VoVNet(norm="batch", frozen_stages=2, **TINY)
    images = jnp.asarray(_images(2, 32, seed=6))
    variables = _numpy_variables(_abstract(model, *images.shape))

    def loss(params):
        features, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, images, train=True, mutable=["batch_stats"]
        )
        return sum(jnp.sum(f**2) for f in features.values()), updates

    grads, updates = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    for name, grad in grads.items():
        norm = float(sum(jnp.abs(g).sum() for g in jax.tree_util.tree_leaves(grad)))
        frozen = name.startswith(("stem_", "stage2_"))
        assert (norm == 0) == frozen, (name, norm)
        moved = jax.tree_util.tree_map(
            lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"][name], updates["batch_stats"][name]
        )
        assert any(jax.tree_util.tree_leaves(moved)) != frozen, name


def test_registry_builds_the_configured_vovnet():
    config = ml_collections.ConfigDict(
        dict(
            backbone=dict(name="vovnet", depth=57, norm="batch", bn_epsilon=1e-5, frozen_stages=2, residual=False),
            norm=dict(momentum=0.9, epsilon=1e-3),
        )
    )
    model = build_backbone(config)
    assert isinstance(model, VoVNet)
    assert (model.depth, model.norm, model.bn_epsilon, model.frozen_stages, model.residual) == (
        57,
        "batch",
        1e-5,
        2,
        False,
    )
    assert (model.conv_padding, model.pool_padding, model.pool_ceil_mode) == ("symmetric", "valid", True)
    config.backbone = dict(name="vovnet")
    config.dtype = "bfloat16"
    model = build_backbone(config)  # the seed's defaults; bn_epsilon from model.norm when unset
    assert (model.depth, model.norm, model.bn_epsilon, model.residual) == (39, "frozen", 1e-3, True)
    features = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))[0])
    assert {level: (f.shape, f.dtype) for level, f in features.items()} == {
        level: ((1, 64 >> level, 64 >> level, c), jnp.bfloat16)
        for level, c in zip(range(2, 6), vovnet.CONCAT_CHANNELS, strict=True)
    }
