"""VoVNet-39/57 (Lee et al., 2019, "An Energy and GPU-Computation Efficient Backbone Network"):
images -> {2..5: C2..C5}.

One module for the two PyTorch sources we track; their differences are fields:

* maskrcnn-benchmark-vovnet (stigma0617, branch ``vovnet``, ``modeling/backbone/vovnet.py``; the detection
  seed): ``FrozenBatchNorm2d`` *without* epsilon (``weight * running_var.rsqrt()``: ``norm='frozen'``,
  ``bn_epsilon=0``), and every OSA module after a stage's first adds its input to its output
  (``identity=True``: ``residual=True``). These are the defaults.
* timm ``vovnet39a`` / ``vovnet57a`` (ImageNet classifiers): trainable ``BatchNorm2d`` eps 1e-5
  (``norm='batch'``, ``bn_epsilon=1e-5``, ``bn_momentum=0.9`` = PyTorch's 0.1) and no residual
  (``residual=False``).

Both: symmetric 3x3 padding (``conv_padding='symmetric'``), convs without bias, relu after every norm,
and stages 3-5 enter through ``MaxPool2d(3, 2, padding=0, ceil_mode=True)`` (``pool_padding='valid'``,
``pool_ceil_mode=True``; on even sizes this equals TF 'SAME', on odd sizes it keeps one row/column less).

Architecture: stem 3x3/2 64, 3x3/1 64, 3x3/2 128 (conv-norm-relu each, stride 4). Stage s = 2..5 (stage 2
has no pool) is a chain of OSA modules: 5 chained 3x3 conv-norm-relu with ``stage_channels[s-2]`` filters,
the module input and all 5 outputs concatenated, then a 1x1 conv-norm-relu to ``concat_channels[s-2]``
(256, 512, 768, 1024). Modules per stage: V-39 (1, 1, 2, 2), V-57 (1, 1, 4, 3). Stage s's output is level s:
C2 stride 4 (256 ch), C3 stride 8 (512), C4 stride 16 (768), C5 stride 32 (1024).

Variables (module path -> seed key / timm key; ``{leaf}`` conv ``kernel`` -> ``weight``; norm ``scale``,
``bias``, ``mean``, ``var`` -> ``weight``, ``bias``, ``running_mean``, ``running_var``):

* ``stem_{n}/{conv,norm}`` (n = 1..3) -> ``stem.stem_{n}/{conv,norm}.{leaf}`` / ``stem.{n-1}.{conv,bn}.{leaf}``
* ``stage{s}_osa{b}/layer{i}/{conv,norm}`` (b = 1.., i = 0..4)
  -> ``stage{s}.OSA{s}_{b}.layers.{i}.OSA{s}_{b}_{i}/{conv,norm}.{leaf}``
  / ``stages.{s-2}.blocks.{b-1}.conv_mid.{i}.{conv,bn}.{leaf}``
* ``stage{s}_osa{b}/concat/{conv,norm}`` -> ``stage{s}.OSA{s}_{b}.concat.OSA{s}_{b}_concat/{conv,norm}.{leaf}``
  / ``stages.{s-2}.blocks.{b-1}.conv_concat.{conv,bn}.{leaf}``

``norm='frozen'`` keeps all four norm arrays in 'batch_stats' (nothing trainable: the seed's parameter
count); ``norm='batch'`` has scale/bias in 'params' and mean/var in 'batch_stats' (timm's count).
``timm_key`` / ``seed_key`` / ``seed_fpn_key`` name the PyTorch tensor of each of our variables;
``timm_to_flax`` / ``seed_to_flax`` convert a state_dict strictly (every variable filled, every tensor used).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from scaledet_jax import nn as snn
from scaledet_jax.backbones.resnet import make_norm

Array = jax.Array
Path = tuple[str, ...]

# depth -> OSA modules per stage (stages 2..5).
VOVNET_BLOCKS: dict[int, tuple[int, int, int, int]] = {39: (1, 1, 2, 2), 57: (1, 1, 4, 3)}
STEM_CHANNELS = (64, 64, 128)
STAGE_CHANNELS = (128, 160, 192, 224)
CONCAT_CHANNELS = (256, 512, 768, 1024)
LAYERS_PER_BLOCK = 5
# The seed initialises convs with torch's kaiming_normal_ (fan_in, gain sqrt(2), untruncated).
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class ConvNormReLU(nn.Module):
    """Conv (no bias) -> norm -> relu; submodules ``conv`` and ``norm`` (the seed's ``{name}/conv``, ``/norm``)."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    norm: str = "frozen"
    bn_momentum: float = 0.9
    bn_epsilon: float = 0.0
    padding: str = "symmetric"
    kernel_init: Callable = kaiming_normal
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = snn.conv(
            self.features, self.kernel_size, self.strides, padding=self.padding, kernel_init=self.kernel_init,
            dtype=self.dtype, name="conv",
        )(x)  # fmt: skip
        x = make_norm(self.norm, self.bn_momentum, self.bn_epsilon, self.dtype, "norm")(
            x, use_running_average=not train
        )
        return nn.relu(x)


class OSAModule(nn.Module):
    """One-shot aggregation: ``layers`` chained 3x3 conv-norm-relu, concat [input, every output], 1x1 conv-norm-relu.

    ``residual`` adds the module input to the output (after the 1x1's relu), as the seed's ``identity=True``.
    """

    stage_channels: int
    concat_channels: int
    layers: int = LAYERS_PER_BLOCK
    residual: bool = False
    norm: str = "frozen"
    bn_momentum: float = 0.9
    bn_epsilon: float = 0.0
    padding: str = "symmetric"
    kernel_init: Callable = kaiming_normal
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        kw = dict(
            norm=self.norm, bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, padding=self.padding,
            kernel_init=self.kernel_init, dtype=self.dtype,
        )  # fmt: skip
        outputs = [x]
        y = x
        for i in range(self.layers):
            y = ConvNormReLU(self.stage_channels, 3, name=f"layer{i}", **kw)(y, train)
            outputs.append(y)
        dtype = self.dtype or x.dtype
        y = jnp.concatenate([o.astype(dtype) for o in outputs], axis=-1)
        y = ConvNormReLU(self.concat_channels, 1, name="concat", **kw)(y, train)
        if self.residual:
            if x.shape[-1] != self.concat_channels:
                raise ValueError(
                    f"a residual OSA module needs {self.concat_channels} input channels, got {x.shape[-1]}"
                )
            y = y + x.astype(y.dtype)
        return y


class VoVNet(nn.Module):
    """VoVNet-39/57: images [B, H, W, 3] -> {level: [B, H_l, W_l, concat_channels[level - 2]]}, levels 2..5.

    ``stage_blocks`` / ``stem_channels`` / ``stage_channels`` / ``concat_channels`` / ``layers_per_block``
    override ``depth``'s configuration (small test nets). ``frozen_stages=k`` is the seed's
    ``FREEZE_CONV_BODY_AT=k``: the stem (k >= 1) and stages 2..k are frozen — their outputs go through
    ``jax.lax.stop_gradient`` and their norms run in inference mode (a no-op for ``norm='frozen'``); masking
    their weight decay is the trainer's job. The seed's VoVNet recipes use 0 (everything trains).
    """

    depth: int = 39
    stage_blocks: tuple[int, int, int, int] | None = None
    stem_channels: tuple[int, int, int] = STEM_CHANNELS
    stage_channels: tuple[int, int, int, int] = STAGE_CHANNELS
    concat_channels: tuple[int, int, int, int] = CONCAT_CHANNELS
    layers_per_block: int = LAYERS_PER_BLOCK
    residual: bool = True  # seed: identity on every OSA module after a stage's first; timm vovnet39a/57a: False
    norm: str = "frozen"  # 'frozen' (seed FrozenBatchNorm2d) or 'batch' (timm)
    frozen_stages: int = 0
    bn_momentum: float = 0.9  # Keras semantics: PyTorch's momentum 0.1
    bn_epsilon: float = 0.0  # seed FrozenBatchNorm2d has none; timm BatchNorm2d: 1e-5
    conv_padding: str = "symmetric"
    pool_padding: str = "valid"  # stage-entry 3x3/2 max pool: PyTorch padding=0
    pool_ceil_mode: bool = True  # ... with ceil_mode=True
    kernel_init: Callable = kaiming_normal
    dtype: Any = None

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> dict[int, Array]:
        if self.stage_blocks is None and self.depth not in VOVNET_BLOCKS:
            raise ValueError(f"VoVNet depth must be one of {sorted(VOVNET_BLOCKS)}, got {self.depth}")
        stage_blocks = VOVNET_BLOCKS[self.depth] if self.stage_blocks is None else tuple(self.stage_blocks)
        for name, values in (
            ("stage_blocks", stage_blocks),
            ("stage_channels", self.stage_channels),
            ("concat_channels", self.concat_channels),
        ):
            if len(values) != 4 or min(values) < 1:
                raise ValueError(f"{name} must be 4 positive numbers, got {tuple(values)}")
        if len(self.stem_channels) != 3:
            raise ValueError(f"stem_channels must be 3 numbers, got {tuple(self.stem_channels)}")
        if not 0 <= self.frozen_stages <= 5:
            raise ValueError(f"frozen_stages must be in 0..5, got {self.frozen_stages}")
        kw = dict(
            norm=self.norm, bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, padding=self.conv_padding,
            kernel_init=self.kernel_init, dtype=self.dtype,
        )  # fmt: skip

        def freeze(x: Array, part: int) -> Array:
            # Every frozen part's output, not only the last one's: C2..C_k are also returned features.
            return jax.lax.stop_gradient(x) if part <= self.frozen_stages else x

        stem_train = train and self.frozen_stages < 1
        x = images
        for n, (features, strides) in enumerate(zip(self.stem_channels, (2, 1, 2), strict=True), 1):
            x = ConvNormReLU(features, 3, strides, name=f"stem_{n}", **kw)(x, stem_train)
        x = freeze(x, 1)

        outputs = {}
        for level, (blocks, stage_ch, concat_ch) in enumerate(
            zip(stage_blocks, self.stage_channels, self.concat_channels, strict=True), 2
        ):
            stage_train = train and self.frozen_stages < level
            if level > 2:
                x = snn.max_pool(x, 3, 2, self.pool_padding, ceil_mode=self.pool_ceil_mode)
            for b in range(1, blocks + 1):
                x = OSAModule(
                    stage_ch, concat_ch, self.layers_per_block, residual=self.residual and b > 1,
                    name=f"stage{level}_osa{b}", **kw,
                )(x, stage_train)  # fmt: skip
            x = freeze(x, level)
            outputs[level] = x
        return outputs


def build_vovnet(model_config: ml_collections.ConfigDict) -> VoVNet:
    """The VoVNet of ``config.model``: ``backbone.{depth, norm, bn_epsilon, frozen_stages, residual,
    pool_ceil_mode}`` (``bn_epsilon`` None: ``norm.epsilon``), ``norm.momentum``, paddings and dtype;
    optional ``backbone.{stage_blocks, stem_channels, stage_channels, concat_channels, layers_per_block}``
    give a narrower or shallower net of the same structure (the quickstarts).

    Unset keys take the seed's values, except the paddings, which follow the model-wide ``conv_padding``
    (default 'symmetric' here) and ``backbone.pool_padding`` (default 'valid').
    """
    b = model_config.backbone
    bn_epsilon = b.get("bn_epsilon")
    sizes = {
        key: tuple(b[key]) if key != "layers_per_block" else b[key]
        for key in ("stage_blocks", "stem_channels", "stage_channels", "concat_channels", "layers_per_block")
        if b.get(key)
    }
    return VoVNet(
        depth=b.get("depth", 39),
        **sizes,
        norm=b.get("norm", "frozen"),
        frozen_stages=b.get("frozen_stages", 0),
        residual=b.get("residual", True),
        bn_momentum=model_config.norm.momentum,
        bn_epsilon=model_config.norm.epsilon if bn_epsilon is None else bn_epsilon,
        conv_padding=model_config.get("conv_padding", "symmetric"),
        pool_padding=b.get("pool_padding", "valid"),
        pool_ceil_mode=b.get("pool_ceil_mode", True),
        dtype={"float32": None, "bfloat16": "bfloat16"}[model_config.get("dtype", "float32")],
    )


# --- PyTorch keys of our variables -----------------------------------------------------------------------

_NORM_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_MODULE = re.compile(r"stem_(\d)|stage(\d)_osa(\d+)")
_LAYER = re.compile(r"layer(\d+)|concat")


def _split(path: Path) -> tuple[Path, str, str]:
    """('params'|'batch_stats', *modules, leaf) -> (modules ending in conv/norm, 'conv'|'norm', torch leaf)."""
    modules, leaf = tuple(path[1:-1]), path[-1]
    if not modules or modules[-1] not in ("conv", "norm"):
        raise KeyError(f"not a VoVNet variable: {'/'.join(path)}")
    kind = modules[-1]
    torch_leaf = "weight" if kind == "conv" else _NORM_LEAVES[leaf]
    return modules[:-1], kind, torch_leaf


def timm_key(path: Path, prefix: str = "") -> str:
    """timm ``vovnet39a`` / ``vovnet57a`` state_dict key of our variable ``path``
    (e.g. ``('params', 'stage4_osa2', 'layer0', 'conv', 'kernel')`` -> ``stages.2.blocks.1.conv_mid.0.conv.weight``)."""
    modules, kind, leaf = _split(path)
    kind = "conv" if kind == "conv" else "bn"
    top = _MODULE.fullmatch(modules[0])
    if top is None:
        raise KeyError(f"not a VoVNet variable: {'/'.join(path)}")
    if top.group(1):
        return f"{prefix}stem.{int(top.group(1)) - 1}.{kind}.{leaf}"
    stage, block = int(top.group(2)), int(top.group(3))
    layer = _LAYER.fullmatch(modules[1])
    part = f"conv_mid.{layer.group(1)}" if layer.group(1) is not None else "conv_concat"
    return f"{prefix}stages.{stage - 2}.blocks.{block - 1}.{part}.{kind}.{leaf}"


def seed_key(path: Path, prefix: str = "") -> str:
    """maskrcnn-benchmark-vovnet body key of our variable ``path`` (keys contain '/'; a detector checkpoint
    has ``prefix='backbone.body.'``), e.g. ``('batch_stats', 'stage3_osa1', 'concat', 'norm', 'var')`` ->
    ``stage3.OSA3_1.concat.OSA3_1_concat/norm.running_var``."""
    modules, kind, leaf = _split(path)
    top = _MODULE.fullmatch(modules[0])
    if top is None:
        raise KeyError(f"not a VoVNet variable: {'/'.join(path)}")
    if top.group(1):
        return f"{prefix}stem.stem_{top.group(1)}/{kind}.{leaf}"
    stage, block = int(top.group(2)), int(top.group(3))
    name = f"OSA{stage}_{block}"
    layer = _LAYER.fullmatch(modules[1])
    if layer.group(1) is not None:
        return f"{prefix}stage{stage}.{name}.layers.{layer.group(1)}.{name}_{layer.group(1)}/{kind}.{leaf}"
    return f"{prefix}stage{stage}.{name}.concat.{name}_concat/{kind}.{leaf}"


def seed_fpn_key(path: Path, prefix: str = "") -> str:
    """maskrcnn-benchmark FPN key of our ``necks.fpn.FPN`` variable (levels 2..5 on C2..C5; a detector
    checkpoint has ``prefix='backbone.fpn.'``): ``lateral_{l}`` -> ``fpn_inner{l-1}``, ``output_{l}`` ->
    ``fpn_layer{l-1}`` (``kernel`` -> ``weight``, ``bias``)."""
    match = re.fullmatch(r"(lateral|output)_(\d)", path[-2])
    if match is None or path[0] != "params":
        raise KeyError(f"not an FPN variable: {'/'.join(path)}")
    block = {"lateral": "fpn_inner", "output": "fpn_layer"}[match.group(1)]
    return f"{prefix}{block}{int(match.group(2)) - 1}.{'weight' if path[-1] == 'kernel' else path[-1]}"


def _convert(
    state_dict: Mapping[str, Any], target_shapes: Mapping[str, Any], key: Callable[[Path], str], ignore: Callable
) -> dict[str, Any]:
    from scaledet_jax.convert.torch_layout import convert  # the strict torch -> flax walker

    def source(path: Path) -> str | None:
        try:
            return key(path)
        except (KeyError, AttributeError):
            return None

    variables, _ = convert(state_dict, target_shapes, source, ignore=ignore)
    return variables


def timm_to_flax(state_dict: Mapping[str, Any], target_shapes: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """timm VoVNet state_dict -> our variables shaped like ``target_shapes`` (``{'params', 'batch_stats'}``).

    Strict: raises ``ConversionError`` unless every variable is filled and every tensor is used, except
    ``num_batches_tracked`` and the classifier (``head.*``), which have no counterpart.
    """

    def ignore(key: str) -> str | None:
        if key.endswith("num_batches_tracked"):
            return "batch counter"
        if key.startswith(f"{prefix}head."):
            return "classifier"
        return None

    return _convert(state_dict, target_shapes, lambda path: timm_key(path, prefix), ignore)


def seed_to_flax(state_dict: Mapping[str, Any], target_shapes: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """maskrcnn-benchmark-vovnet body state_dict (keys after ``prefix``) -> our variables; strict as
    ``timm_to_flax``. Keys outside ``prefix`` and ``num_batches_tracked`` are ignored."""

    def ignore(key: str) -> str | None:
        if not key.startswith(prefix):
            return "outside the VoVNet body"
        return "batch counter" if key.endswith("num_batches_tracked") else None

    return _convert(state_dict, target_shapes, lambda path: seed_key(path, prefix), ignore)
