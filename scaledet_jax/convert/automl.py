"""google/automl EfficientDet checkpoints (``efficientdet-d0/`` ... as released: ``model.index``,
``model.data-*``, ``checkpoint``), read by TF variable name.

automl names its variables as TF1 scopes (``efficientdet/efficientdet_arch.py``,
``backbone/efficientnet_model.py``; the Keras ``tf2/`` port keeps the same names):

* backbone ``efficientnet-bN/stem/{conv2d, tpu_batch_normalization}``, ``blocks_{i}/...``: a block
  with an expansion conv names its convs ``conv2d`` (expand), ``depthwise_conv2d``, ``conv2d_1``
  (project) and its norms ``tpu_batch_normalization``, ``_1``, ``_2``; a block without one (expand
  ratio 1) ``depthwise_conv2d``, ``conv2d`` (project) and ``tpu_batch_normalization``, ``_1``;
  squeeze-excitation ``se/conv2d`` (reduce) and ``se/conv2d_1`` (expand), both with biases;
* ``resample_p{6,7}/{conv2d, bn}`` (only where the channel count changes);
* BiFPN ``fpn_cells/cell_{c}/fnode{j}/``: fast-attention scalars ``WSM``, ``WSM_1``, ``WSM_2`` (one per
  input, in input order), input 1x1 convs ``resample_{position}_{offset}_{feature count}/{conv2d, bn}``,
  the separable conv ``op_after_combine{k}/conv/{depthwise_kernel, pointwise_kernel, bias}`` and its
  ``op_after_combine{k}/bn``;
* heads ``class_net/class-{i}`` (separable, shared by the levels), ``class_net/class-{i}-bn-{level}``
  (per level), ``class_net/class-predict``; ``box_net/box-...`` likewise.

automl trains with an exponential moving average of every variable and evaluates with the averages
(``det_model_fn.py``, ``inference.py``): where a ``<name>/ExponentialMovingAverage`` shadow exists
it is used in place of ``<name>`` (the plain value is listed as ignored). Keras depthwise kernels
are ``[k, k, C, 1]``, ours ``[k, k, 1, C]``; the attention scalars become our per-node weight vector.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from scaledet_jax.convert.torch_layout import Path

EMA_SUFFIX = "/ExponentialMovingAverage"
BN_NAMES = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}
_EXPANDED = {
    "expand_conv": "conv2d",
    "expand_bn": "tpu_batch_normalization",
    "depthwise_conv": "depthwise_conv2d",
    "depthwise_bn": "tpu_batch_normalization_1",
    "project_conv": "conv2d_1",
    "project_bn": "tpu_batch_normalization_2",
}
_NOT_EXPANDED = {
    "depthwise_conv": "depthwise_conv2d",
    "depthwise_bn": "tpu_batch_normalization",
    "project_conv": "conv2d",
    "project_bn": "tpu_batch_normalization_1",
}
_SE = {"se_reduce": "se/conv2d", "se_expand": "se/conv2d_1"}
STACKED_WEIGHTS = "/WSM*"  # prepare() stacks fnode{j}/WSM, WSM_1, ... into fnode{j}/WSM*

# automl's semantics, set explicitly (a config written for another source cannot leak in): TF 'SAME'
# convs and pools, BN epsilon 1e-3 everywhere, biases on the BiFPN and head convs, 90 classes without a
# background slot (output c is COCO category c + 1), anchors at aspect ratios 1, 2, 1/2 (sqrt), ImageNet
# mean/std on RGB 0-255.
AUTOML_OPTIONS = {
    "conv_padding": "same",
    "pool_padding": "same",
    "backbone.bn_epsilon": None,
    "norm.epsilon": 1e-3,
    "decoder.conv_bias": True,
    "head.conv_bias": True,
    "background_slot": False,
    "category_ids": (),
    "anchor.aspect_ratios": (1.0, 2.0, 0.5),
    "anchor.aspect_multipliers": (),
    "input.mean": (123.675, 116.28, 103.53),
    "input.std": (58.395, 57.12, 57.375),
    "input.channels": "rgb",
}


def automl_ignored(key: str) -> str | None:
    if key == "global_step":
        return "training step counter"
    if re.search(r"/(Momentum|RMSProp|RMSProp_1|Adam|Adam_1)$", key):
        return "optimizer slot variable"
    if re.match(r"efficientnet-b\d+/head/", key):
        return "EfficientNet ImageNet classifier head (not part of the detector)"
    return None


def backbone_scope(state_keys) -> str:
    from scaledet_jax.convert.torch_layout import ConversionError

    found = sorted({m.group(1) for k in state_keys if (m := re.match(r"(efficientnet-b\d+)/stem/", k))})
    if len(found) != 1:
        raise ConversionError(
            f"expected one efficientnet-bN/stem scope in an automl EfficientDet checkpoint, found {found or 'none'}"
        )
    return found[0]


def automl_prepare(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Depthwise kernels to our layout; each node's attention scalars stacked into one vector."""
    out: dict[str, np.ndarray] = {}
    scalars: dict[str, dict[int, np.ndarray]] = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.*/fnode\d+)/WSM(?:_(\d+))?", key)
        if m:
            scalars.setdefault(m.group(1), {})[int(m.group(2) or 0)] = value
        elif key.endswith("depthwise_kernel"):
            out[key] = np.transpose(value, (0, 1, 3, 2))
        else:
            out[key] = value
    for node, values in scalars.items():
        if sorted(values) != list(range(len(values))):
            from scaledet_jax.convert.torch_layout import ConversionError

            raise ConversionError(f"{node}: attention weights WSM..WSM_{max(values)} are not numbered 0..n-1")
        out[node + STACKED_WEIGHTS] = np.stack([np.asarray(values[i], np.float32).reshape(()) for i in sorted(values)])
    return out


def automl_source(state_keys, target_shapes: Mapping[str, Any]):
    """``source_key`` for our EfficientDet (backbone / decoder / head) from automl's variable names."""
    keys = list(state_keys)
    backbone = backbone_scope(keys)
    flat = traverse_util.flatten_dict(dict(target_shapes))
    expanded = {p[2] for p in flat if p[1] == "backbone" and p[3:4] == ("expand_conv",)}

    def find(pattern: str) -> str | None:
        regex = re.compile(pattern)
        found = sorted({m.group(0) for k in keys if (m := regex.match(k))})
        return found[0] if len(found) == 1 else None

    def leaf_of(path: Path) -> str:
        collection, leaf = path[0], path[-1]
        module = path[-2]
        is_bn = collection == "batch_stats" or leaf == "scale" or module.endswith("bn") or "_bn_" in module
        return BN_NAMES[leaf] if is_bn else leaf

    def separable(scope: str, part: str, leaf: str) -> str:
        if part == "depthwise":
            return f"{scope}/depthwise_kernel"
        return f"{scope}/pointwise_kernel" if leaf == "kernel" else f"{scope}/bias"

    def source(path: Path) -> str | None:
        part, local, leaf = path[1], path[2:], leaf_of(path)
        if part == "backbone":
            if local[0] == "stem_conv":
                return f"{backbone}/stem/conv2d/{leaf}"
            if local[0] == "stem_bn":
                return f"{backbone}/stem/tpu_batch_normalization/{leaf}"
            names = _EXPANDED if local[0] in expanded else _NOT_EXPANDED
            module = _SE.get(local[1]) or names.get(local[1])
            if module == "depthwise_conv2d":
                return f"{backbone}/{local[0]}/depthwise_conv2d/depthwise_kernel"
            return module and f"{backbone}/{local[0]}/{module}/{leaf}"
        if part == "decoder":
            if local[0].startswith("resample_p"):
                return f"{local[0]}/{'conv2d' if local[1] == 'conv' else 'bn'}/{leaf}"
            cell, node = int(local[0].split("_")[1]), int(local[1].split("_")[1])
            stem = f"fpn_cells/cell_{cell}/fnode{node}"
            if local[2] == "weights":
                return stem + STACKED_WEIGHTS
            if local[2].startswith("resample_"):
                offset = int(local[2].split("_")[1])
                scope = find(rf"{re.escape(stem)}/resample_\d+_{offset}_\d+(?=/)")
                return scope and f"{scope}/{'conv2d' if local[3] == 'conv' else 'bn'}/{leaf}"
            op = find(rf"{re.escape(stem)}/op_after_combine\d+(?=/)")
            if op is None:
                return None
            if local[2] == "op_after_combine":
                return separable(f"{op}/conv", local[3], leaf)
            if local[2] == "bn":
                return f"{op}/bn/{leaf}"
            return None
        if part == "head":
            name = local[0]
            net, short = ("class_net", "class") if name.startswith("class_") else ("box_net", "box")
            if name.endswith("_predict"):
                return separable(f"{net}/{short}-predict", local[1], leaf)
            m = re.fullmatch(r"(?:class|box)_conv_(\d+)", name)
            if m:
                return separable(f"{net}/{short}-{m.group(1)}", local[1], leaf)
            m = re.fullmatch(r"(?:class|box)_bn_(\d+)_(\d+)", name)
            if m:
                return f"{net}/{short}-{m.group(2)}-bn-{m.group(1)}/{leaf}"
        return None

    return source


def automl_options(state, config) -> dict[str, Any]:
    """automl's semantics; the class count from the class predictor; the backbone checked against the config."""
    from scaledet_jax.cli import UserError

    backbone = backbone_scope(state.keys())
    expected = f"efficientnet-{config.model.backbone.get('model_id', '?')}"
    if config.model.name != "efficientdet" or backbone != expected:
        variant = {f"efficientnet-b{i}": f"d{i}" for i in range(8)}.get(backbone, "?")
        raise UserError(
            f"the checkpoint is an automl EfficientDet on {backbone}; the config builds "
            f"{config.model.name} on {expected}: use --config=configs/efficientdet_{variant}.py"
        )
    bias = state.get("class_net/class-predict/bias")
    if bias is None:
        raise UserError("no class_net/class-predict/bias in the checkpoint: not an automl EfficientDet detector")
    a = config.model.anchor
    anchors = a.num_scales * len(AUTOML_OPTIONS["anchor.aspect_ratios"])
    if np.shape(bias)[0] % anchors:
        raise UserError(f"class-predict has {np.shape(bias)[0]} outputs, not a multiple of {anchors} anchors")
    return {**AUTOML_OPTIONS, "num_classes": int(np.shape(bias)[0]) // anchors}
