"""ResNet backbone and FPN neck vs torchvision and TF Model Garden (random init, same weights).

* Trainable-parameter counts equal torchvision's (ResNet-50/101 with FrozenBatchNorm2d and with
  BatchNorm2d, fc excluded; FeaturePyramidNetwork) and Model Garden's (ResNet-50, FPN 3..7).
* torchvision ``BackboneWithFPN`` (ResNet-50, FrozenBatchNorm2d, LastLevelMaxPool): weights copied
  by name, C2..C5 and P2..P6 agree (symmetric padding). Small torchvision FPNs cover the other
  extra blocks (P6P7 from P5 and from C5) and the non-2x nearest resize of odd feature sizes.
* Detectron's stride-in-1x1 bottleneck vs a hand-written torch block.
* Model Garden ResNet-50 + FPN: weights copied by creation order, C2..C5 and P3..P7 agree
  ('same' padding); a negative control (symmetric padding) disagrees.
* frozen_stages: exact zero gradients and untouched batch statistics in the frozen part only.
* FrozenBatchNorm: nothing trainable, statistics never updated.
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax.traverse_util import flatten_dict, unflatten_dict
from torch_reference import nhwc, randomize_
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from scaledet_jax import nn as snn
from scaledet_jax.backbones.resnet import BottleneckBlock, ResNet
from scaledet_jax.necks.fpn import FPN
from scaledet_jax.tools import profile

TOLERANCE = 1e-4
SIZE = 64
TORCHVISION = dict(norm="frozen", bn_epsilon=1e-5, conv_padding="symmetric", pool_padding="symmetric")


def _count(variables) -> int:
    return profile.count_params(variables.get("params", {}))


def _abstract(module: nn.Module, *args, **kwargs):
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))


def _torch_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _images(batch: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).normal(0, 1, (batch, size, size, 3)).astype(np.float32)


# --- torch state dict -> our variables ---------------------------------------------------------------


def _resnet_module(key: str) -> tuple[str, ...]:
    """torchvision ResNet module name -> our module path ('layer1.0.downsample.1' -> stage2_block0/shortcut_norm)."""
    if key in ("conv1", "bn1"):
        return ("stem_conv" if key == "conv1" else "stem_norm",)
    match = re.fullmatch(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])", key)
    assert match, key
    stage, block, sub = match.groups()
    sub = {"downsample.0": "shortcut_conv", "downsample.1": "shortcut_norm"}.get(sub, sub.replace("bn", "norm"))
    return (f"stage{int(stage) + 1}_block{block}", sub)


def _fpn_module(key: str, min_level: int) -> tuple[str, ...]:
    """torchvision FPN module name -> ours ('inner_blocks.0.0' -> lateral_{min_level})."""
    match = re.fullmatch(r"(inner_blocks|layer_blocks)\.(\d+)\.0", key)
    if match:
        kind = {"inner_blocks": "lateral", "layer_blocks": "output"}[match.group(1)]
        return (f"{kind}_{min_level + int(match.group(2))}",)
    match = re.fullmatch(r"extra_blocks\.p([67])", key)
    assert match, key
    return (f"extra_{match.group(1)}",)


def torch_to_flax(state_dict: dict, abstract, module_path, prefix: tuple[str, ...] = ()) -> dict:
    """Our variables from a torch state dict; ``module_path`` maps a torch module name to our path.

    Conv kernels OIHW -> HWIO; norm weight/bias/running_mean/running_var -> scale/bias/mean/var in
    whichever collection our module keeps them. Every one of our leaves must be assigned once.
    """
    flat = flatten_dict(abstract)
    values = {}
    for key, tensor in state_dict.items():
        module, leaf = key.rsplit(".", 1)
        if leaf == "num_batches_tracked":
            continue
        value = tensor.detach().numpy()
        if leaf == "weight" and value.ndim == 4:
            leaf, value = "kernel", value.transpose(2, 3, 1, 0)
        else:
            leaf = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}[leaf]
        path = prefix + module_path(module) + (leaf,)
        targets = [(col,) + path for col in ("params", "batch_stats") if (col,) + path in flat]
        assert len(targets) == 1, f"{key} -> {path}: {targets}"
        assert flat[targets[0]].shape == value.shape, (key, flat[targets[0]].shape, value.shape)
        assert targets[0] not in values, key
        values[targets[0]] = value
    assert set(values) == set(flat), f"unassigned: {sorted(set(flat) - set(values))[:5]}"
    return unflatten_dict(values)


def _random_variables(abstract, seed: int = 0) -> dict:
    """He-normal kernels, unit scales/variances, zero biases/means, from NumPy: ``Module.init``
    compiles its truncated-normal initialisers, which alone costs several seconds per network."""
    rng = np.random.RandomState(seed)

    def value(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape).astype(leaf.dtype)
        return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype)

    return jax.tree_util.tree_map_with_path(value, abstract)


class BackboneFPN(nn.Module):
    backbone: nn.Module
    fpn: nn.Module

    def __call__(self, images, train: bool = False):
        features = self.backbone(images, train)
        return features, self.fpn(features, train)


def _max_diff(got: dict, ref: dict, what: str, tolerance: float | None = TOLERANCE) -> float:
    """Max abs diff over levels (shapes and non-trivial references checked); asserted <= tolerance."""
    assert sorted(got) == sorted(ref), (what, sorted(got), sorted(ref))
    worst = 0.0
    for level in ref:
        assert got[level].shape == ref[level].shape, (what, level, got[level].shape, ref[level].shape)
        scale = float(np.abs(ref[level]).max())
        assert scale > 0.05, f"{what} level {level} is near zero: the comparison would be blind"
        diff = float(np.abs(np.asarray(got[level], np.float64) - np.asarray(ref[level], np.float64)).max())
        message = f"{what} level {level}: max abs diff {diff:.2e} (max |ref| {scale:.2f})"
        assert tolerance is None or diff <= tolerance, message
        worst = max(worst, diff)
    return worst


def _apply(model: nn.Module, variables, images: np.ndarray, float64: bool):
    """Inference outputs as NumPy; float64 runs under ``jax.enable_x64`` with the variables cast."""
    forward = lambda v, x: model.apply(v, x)  # noqa: E731
    if not float64:
        return jax.tree_util.tree_map(np.asarray, jax.jit(forward)(variables, jnp.asarray(images, jnp.float32)))
    with jax.enable_x64(True):
        v64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables)
        return jax.tree_util.tree_map(np.asarray, jax.jit(forward)(v64, images.astype(np.float64)))


def _check_parity(ours: dict, reference: dict, name: str) -> None:
    """``ours``/``reference``: {'float32'|'float64': (C dict, P dict)}.

    float64 on both sides: the same function up to rounding, asserted at 1e-8. float32: a random
    ResNet-50 + FPN amplifies rounding so much that the reference's own float32 forward is ~1e-4
    away from its float64 forward (outputs up to ~60), so no float32 implementation can meet 1e-4
    everywhere; ours must be no further from the exact outputs than 2x the reference's float32 error.
    """

    def worst(got, ref, tolerance=None):
        return max(_max_diff(g, r, f"{name} {w}", tolerance) for w, g, r in zip("CP", got, ref, strict=True))

    exact = reference["float64"]
    d64 = worst(ours["float64"], exact, 1e-8)
    d32, ref32 = worst(ours["float32"], exact), worst(reference["float32"], exact)
    direct = worst(ours["float32"], reference["float32"])
    print(
        f"\n{name} @{SIZE}: max abs diff float64 {d64:.1e}; float32 vs exact: ours {d32:.1e}, reference {ref32:.1e}; "
        f"float32 ours vs reference {direct:.1e}"
    )
    assert d32 <= max(TOLERANCE, 2 * ref32), (d32, ref32)


# --- parameter counts --------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [50, 101])
def test_resnet_parameter_counts_equal_torchvision(depth):
    build = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth]
    images = jnp.zeros((1, SIZE, SIZE, 3))
    for norm, norm_layer in (("frozen", FrozenBatchNorm2d), ("batch", torch.nn.BatchNorm2d)):
        reference = build(weights=None, norm_layer=norm_layer)
        expected = _torch_params(reference) - _torch_params(reference.fc)
        variables = _abstract(ResNet(depth=depth, norm=norm), images)
        assert _count(variables) == expected, (depth, norm)
        if norm == "frozen":  # the affine parameters and statistics are all there, as buffers
            buffers = sum(b.numel() for n, b in reference.named_buffers() if "num_batches" not in n)
            assert profile.count_params(variables["batch_stats"]) == buffers


def test_fpn_parameter_count_equals_torchvision():
    features = {level: jnp.zeros((1, 2 ** (7 - level), 2 ** (7 - level), 64 * 2**level)) for level in range(2, 6)}
    reference = FeaturePyramidNetwork([256, 512, 1024, 2048], 256, LastLevelMaxPool())
    ours = FPN(min_level=2, max_level=6, extra_levels="maxpool")
    assert _count(_abstract(ours, features)) == _torch_params(reference) == 3_344_384
    reference = FeaturePyramidNetwork([512, 1024, 2048], 256, LastLevelP6P7(256, 256))
    ours = FPN(min_level=3, max_level=7, extra_levels="p6p7")
    assert _count(_abstract(ours, features)) == _torch_params(reference)


# --- torchvision parity ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchvision_pair():
    return_layers = {f"layer{i}": str(i - 1) for i in range(1, 5)}
    channels = [256, 512, 1024, 2048]
    with_bn = BackboneWithFPN(torchvision.models.resnet50(weights=None), return_layers, channels, 256)
    # Random BN affine, random biases, BN statistics calibrated on other images (so activations
    # stay O(1) through 16 blocks), then loaded into the FrozenBatchNorm2d model Faster R-CNN uses.
    randomize_(with_bn, _images(4, seed=1))
    frozen = BackboneWithFPN(torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d), return_layers,
                             channels, 256).eval()  # fmt: skip
    frozen.load_state_dict(with_bn.state_dict())
    assert isinstance(frozen.body.layer3[0].bn2, FrozenBatchNorm2d)
    images = _images(2)
    reference = {}
    for name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        with torch.no_grad():
            c = copy.deepcopy(frozen).to(dtype).body(torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype))
            p = frozen.to(dtype).fpn(c)
        reference[name] = (
            {int(k) + 2: nhwc(v) for k, v in c.items()},
            {(6 if k == "pool" else int(k) + 2): nhwc(v) for k, v in p.items()},
        )
    frozen.float()

    model = BackboneFPN(ResNet(**TORCHVISION), FPN(min_level=2, max_level=6, extra_levels="maxpool",
                                                   conv_padding="symmetric"))  # fmt: skip
    abstract = _abstract(model, jnp.asarray(images))
    state = frozen.state_dict()
    variables = {"params": {}, "batch_stats": {}}
    for part, names, path in (("body.", _resnet_module, "backbone"), ("fpn.", lambda k: _fpn_module(k, 2), "fpn")):
        sub = {k[len(part) :]: v for k, v in state.items() if k.startswith(part)}
        sub_abstract = {col: {path: abstract[col][path]} for col in abstract if path in abstract[col]}
        converted = torch_to_flax(sub, sub_abstract, names, prefix=(path,))
        for col, tree in converted.items():
            variables[col].update(tree)
    return dict(model=model, variables=variables, images=images, reference=reference)


def test_resnet50_fpn_matches_torchvision(torchvision_pair):
    pair = torchvision_pair
    ours = {name: _apply(pair["model"], pair["variables"], pair["images"], name == "float64")
            for name in ("float32", "float64")}  # fmt: skip
    assert [ours["float32"][0][level].shape[1] for level in range(2, 6)] == [16, 8, 4, 2]
    _check_parity(ours, pair["reference"], "torchvision ResNet-50 + FPN")


@pytest.mark.parametrize(
    "extra, max_level, source",
    [("maxpool", 6, "output"), ("p6p7", 7, "output"), ("p6p7", 7, "backbone")],
)
def test_fpn_extra_levels_and_odd_sizes_match_torchvision(extra, max_level, source):
    # Odd sizes (13x11 -> 7x6 -> 4x3): the top-down resize is torchvision's interpolate(size=...).
    channels, width = [8, 16, 32], 16
    torch.manual_seed(0)
    blocks = {"maxpool": LastLevelMaxPool(), "p6p7": LastLevelP6P7(32 if source == "backbone" else width, width)}
    reference = FeaturePyramidNetwork(channels, width, blocks[extra]).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape) * 0.1)
    rng = np.random.RandomState(3)
    shapes = [(13, 11), (7, 6), (4, 3)]
    features = {level: rng.normal(0, 1, (2, h, w, ch)).astype(np.float32) for level, ((h, w), ch) in
                enumerate(zip(shapes, channels, strict=True), 3)}  # fmt: skip
    with torch.no_grad():
        out = reference(OrderedDict((str(k), torch.from_numpy(v).permute(0, 3, 1, 2)) for k, v in features.items()))
    names = {"pool": 6, "p6": 6, "p7": 7}
    expected = {names.get(k, None) or int(k): nhwc(v) for k, v in out.items()}
    ours = FPN(min_level=3, max_level=max_level, extra_levels=extra, extra_input=source, num_filters=width,
               conv_padding="symmetric")  # fmt: skip
    variables = torch_to_flax(reference.state_dict(), _abstract(ours, features), lambda k: _fpn_module(k, 3))
    _max_diff(ours.apply(variables, features), expected, f"FPN {extra}/{source}")


class DetectronBottleneck(torch.nn.Module):
    """maskrcnn-benchmark's Bottleneck (stride_in_1x1=True), written out: stride on the first 1x1."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        conv = lambda i, o, k, s: torch.nn.Conv2d(i, o, k, s, k // 2, bias=False)  # noqa: E731
        self.conv1, self.bn1 = conv(cin, width, 1, stride), FrozenBatchNorm2d(width)
        self.conv2, self.bn2 = conv(width, width, 3, 1), FrozenBatchNorm2d(width)
        self.conv3, self.bn3 = conv(width, 4 * width, 1, 1), FrozenBatchNorm2d(4 * width)
        self.downsample = torch.nn.Sequential(conv(cin, 4 * width, 1, stride), FrozenBatchNorm2d(4 * width))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + self.downsample(x))


def test_stride_in_1x1_matches_detectron_bottleneck():
    torch.manual_seed(0)
    reference = DetectronBottleneck(32, 16, 2).eval()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    x = np.random.RandomState(0).normal(0, 1, (2, 15, 15, 32)).astype(np.float32)  # odd: stride placement matters
    with torch.no_grad():
        expected = nhwc(reference(torch.from_numpy(x).permute(0, 3, 1, 2)))
    kw = dict(strides=2, use_projection=True, norm="frozen", bn_epsilon=1e-5, padding="symmetric")
    ours = BottleneckBlock(16, stride_in_1x1=True, **kw)
    names = {"downsample.0": "shortcut_conv", "downsample.1": "shortcut_norm"}
    variables = torch_to_flax(
        reference.state_dict(), _abstract(ours, x), lambda k: (names.get(k, k.replace("bn", "norm")),)
    )
    _max_diff({0: ours.apply(variables, x)}, {0: expected}, "Detectron bottleneck")
    # The same weights with the stride on the 3x3 (torchvision) compute something else.
    other = BottleneckBlock(16, stride_in_1x1=False, **kw).apply(variables, x)
    assert float(np.abs(np.asarray(other) - expected).max()) > 100 * TOLERANCE


# --- Model Garden parity -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_garden_pair():
    import tf_keras
    from model_garden import randomize
    from official.vision.modeling.backbones import ResNet as KerasResNet
    from official.vision.modeling.decoders import FPN as KerasFPN

    from scaledet_jax.convert import model_garden as mg

    images = _images(2, seed=5)
    reference, counts, float32_units = {}, None, None
    for floatx in ("float32", "float64"):  # the same random weights (float32 values) built twice
        tf_keras.backend.set_floatx(floatx)
        try:
            with mg.record_keras_variables() as units:
                backbone = KerasResNet(model_id=50, input_specs=tf_keras.layers.InputSpec(shape=[None, SIZE, SIZE, 3]))
                decoder = KerasFPN(input_specs=backbone.output_specs, min_level=3, max_level=7)
            units = mg.owned_units(units, backbone) + mg.owned_units(units, decoder)
            randomize(units)
            features = backbone(images.astype(floatx), training=False)
            pyramid = decoder(features, training=False)
        finally:
            tf_keras.backend.set_floatx("float32")
        assert pyramid["3"].dtype.name == floatx
        reference[floatx] = tuple({int(k): v.numpy() for k, v in d.items()} for d in (features, pyramid))
        if floatx == "float32":
            float32_units = units
            counts = [sum(int(np.prod(w.shape)) for w in m.trainable_weights) for m in (backbone, decoder)]

    def convert(model):
        spec = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
        order = mg.flax_layer_order(model, spec, train=False)
        return mg.keras_to_flax(float32_units, order, profile.abstract_variables(model, SIZE))

    return dict(images=images, reference=reference, counts=counts, convert=convert)


def _model_garden_model(padding: str = "same") -> BackboneFPN:
    return BackboneFPN(
        ResNet(depth=50, conv_padding=padding, pool_padding=padding),
        FPN(min_level=3, max_level=7, extra_levels="conv", norm="batch", conv_padding=padding),
    )


def test_parameter_counts_equal_model_garden(model_garden_pair):
    variables = profile.abstract_variables(_model_garden_model(), SIZE)
    assert _count(variables) == sum(model_garden_pair["counts"])
    assert profile.count_params(variables["params"]["backbone"]) == model_garden_pair["counts"][0] == 23_508_032
    assert profile.count_params(variables["params"]["fpn"]) == model_garden_pair["counts"][1] == 3_871_232


def test_resnet50_fpn_matches_model_garden(model_garden_pair):
    pair = model_garden_pair
    model = _model_garden_model()
    variables = pair["convert"](model)
    ours = {name: _apply(model, variables, pair["images"], name == "float64") for name in ("float32", "float64")}
    # C2..C5 (Model Garden's backbone returns C2 too; the FPN ignores it) and P3..P7.
    _check_parity(ours, pair["reference"], "Model Garden ResNet-50 + FPN")


# --- frozen stages and FrozenBatchNorm -------------------------------------------------------------


@pytest.mark.parametrize("frozen_stages", [0, 2, 3])  # 3: C2 is returned too, and must not leak
def test_frozen_stages_stop_gradients_and_statistics(frozen_stages):
    # A one-block-per-stage net: the same code path as ResNet-50, a fraction of the compile time.
    model = ResNet(stage_blocks=(1, 1, 1, 1), norm="batch", frozen_stages=frozen_stages)
    images = jnp.asarray(_images(2, size=32))
    variables = _random_variables(_abstract(model, images))

    @jax.jit
    def grads(params, stats):
        def loss(p):
            out, updates = model.apply({"params": p, "batch_stats": stats}, images, train=True,
                                       mutable=["batch_stats"])  # fmt: skip
            return sum(jnp.mean(jnp.square(x)) for x in out.values()), updates["batch_stats"]

        return jax.grad(loss, has_aux=True)(params)

    g, new_stats = grads(variables["params"], variables["batch_stats"])

    def part(name: str) -> int:
        return 1 if name.startswith("stem") else int(name[len("stage")])

    for name in g:
        frozen = part(name) <= frozen_stages
        grad_zero = all(not np.any(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(g[name]))
        assert grad_zero == frozen, (name, frozen_stages)
    for name in variables["batch_stats"]:
        old, new = (jax.tree_util.tree_leaves(s[name]) for s in (variables["batch_stats"], new_stats))
        stats_same = all(np.array_equal(a, b) for a, b in zip(old, new, strict=True))
        assert stats_same == (part(name) <= frozen_stages), (name, frozen_stages)


def test_frozen_batch_norm_is_not_trainable_and_never_updates():
    norm = snn.FrozenBatchNorm()
    x = jnp.asarray(np.random.RandomState(0).normal(2.0, 3.0, (2, 5, 5, 6)).astype(np.float32))
    variables = norm.init(jax.random.key(0), x)
    assert "params" not in variables or not variables["params"]
    assert sorted(variables["batch_stats"]) == ["bias", "mean", "scale", "var"]
    stats = {
        "scale": jnp.linspace(0.5, 1.5, 6),
        "bias": jnp.linspace(-1, 1, 6),
        "mean": jnp.linspace(-0.3, 0.3, 6),
        "var": jnp.linspace(0.2, 2.0, 6),
    }
    y, updates = norm.apply({"batch_stats": stats}, x, use_running_average=False, mutable=["batch_stats"])
    for key in stats:
        assert np.array_equal(updates["batch_stats"][key], stats[key])
    reference = FrozenBatchNorm2d(6)
    for key, name in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var")):
        getattr(reference, name).copy_(torch.from_numpy(np.array(stats[key])))
    expected = nhwc(reference(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)))
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5, rtol=0)
    # In the backbone: only conv kernels are trainable, and a train-mode apply changes no statistic.
    model = ResNet(stage_blocks=(1, 1, 1, 1), norm="frozen")
    images = jnp.asarray(_images(2, size=32))
    variables = _random_variables(_abstract(model, images))
    leaves = flatten_dict(variables["params"])
    assert leaves and all(path[-1] == "kernel" for path in leaves)
    stats = flatten_dict(variables["batch_stats"])
    assert len(stats) == 4 * (4 * 3 + 4 + 1)  # 4 arrays in each of 3 norms per block, 4 shortcut norms, the stem
    _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, images)
    assert all(np.array_equal(stats[k], v) for k, v in flatten_dict(updates["batch_stats"]).items())


def test_builders_read_the_model_config():
    import ml_collections

    from scaledet_jax.backbones.resnet import build_resnet
    from scaledet_jax.necks.fpn import build_fpn

    config = ml_collections.ConfigDict(
        dict(
            min_level=2,
            max_level=6,
            conv_padding="symmetric",
            pool_padding="symmetric",
            dtype="bfloat16",
            norm=dict(momentum=0.9, epsilon=1e-3),
            backbone=dict(depth=101, stride_in_1x1=True, norm="frozen", frozen_stages=2, bn_epsilon=1e-5),
            decoder=dict(num_filters=128, extra_levels="maxpool", norm=""),
        )
    )
    backbone, neck = build_resnet(config), build_fpn(config)
    assert (backbone.depth, backbone.stride_in_1x1, backbone.norm, backbone.frozen_stages) == (101, True, "frozen", 2)
    assert (backbone.bn_epsilon, backbone.bn_momentum, backbone.conv_padding, backbone.pool_padding) == (
        1e-5, 0.9, "symmetric", "symmetric",
    )  # fmt: skip
    assert backbone.dtype == "bfloat16" and neck.dtype == "bfloat16"
    assert (neck.min_level, neck.max_level, neck.num_filters, neck.extra_levels) == (2, 6, 128, "maxpool")
    assert neck.norm is None and neck.conv_padding == "symmetric"
    config.backbone.bn_epsilon = None
    assert build_resnet(config).bn_epsilon == 1e-3
    # bfloat16 end to end (shapes only): C2..C5 and P2..P6 at strides 4..64.
    out = jax.eval_shape(
        lambda x: BackboneFPN(backbone, neck).init_with_output(jax.random.key(0), x)[0], jnp.zeros((1, 64, 64, 3))
    )
    assert {k: (v.shape[1], v.dtype) for k, v in out[1].items()} == {lv: (64 >> lv, jnp.bfloat16) for lv in range(2, 7)}
    assert {k: v.shape[-1] for k, v in out[0].items()} == {2: 256, 3: 512, 4: 1024, 5: 2048}
