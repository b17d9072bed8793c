"""TF Model Garden (Keras) -> Flax weights, matched by creation order and checked by shape.

Keras layer names are auto-generated (``conv2d_137``) and change with whatever was built before,
so names are useless for matching. Both frameworks, however, create variables in the order the
network's construction code calls its layers, and our modules call their convs and batch norms in
the same order as Model Garden. So:

1. ``record_keras_variables()`` wraps ``Layer.add_weight`` while the Keras model is built and keeps
   (layer, variable) in creation order, dropping variables the final model does not own (layers
   built but disconnected from the outputs, e.g. SpineNet's unused level-2 block).
2. ``flax_layer_order()`` traces ``model.init`` and lists the paths of our ``nn.Conv`` and
   ``nn.BatchNorm`` modules in first-call order.
3. ``keras_to_flax()`` pairs the two lists position by position, refusing on any difference in
   layer kind, variable count or shape, and returns Flax variables.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze


class KerasUnit:
    """One Keras layer (Conv2D, BatchNormalization, Dense or Conv2DTranspose) and its variables in creation order."""

    def __init__(self, layer: Any):
        self.layer = layer
        self.variables: list[Any] = []

    @property
    def kind(self) -> str:
        cls = type(self.layer).__name__
        if "BatchNormalization" in cls:
            return "bn"
        if cls in ("Conv2D",):
            return "conv"
        if cls == "Dense":
            return "dense"
        if cls == "Conv2DTranspose":
            return "deconv"
        raise ValueError(f"no Flax counterpart for Keras layer type {cls}")


@contextlib.contextmanager
def record_keras_variables() -> Iterator[list[KerasUnit]]:
    """Records every Keras variable created inside the block, grouped by layer, in order."""
    import tf_keras

    units: list[KerasUnit] = []
    by_layer: dict[int, KerasUnit] = {}
    original = tf_keras.layers.Layer.add_weight

    def add_weight(self, *args, **kwargs):
        variable = original(self, *args, **kwargs)
        if id(self) not in by_layer:
            by_layer[id(self)] = KerasUnit(self)
            units.append(by_layer[id(self)])
        by_layer[id(self)].variables.append(variable)
        return variable

    tf_keras.layers.Layer.add_weight = add_weight
    try:
        yield units
    finally:
        tf_keras.layers.Layer.add_weight = original


def owned_units(units: list[KerasUnit], keras_model: Any) -> list[KerasUnit]:
    """The recorded units whose variables belong to ``keras_model``."""
    owned = {v.ref() for v in keras_model.weights}
    kept = []
    for unit in units:
        inside = [v.ref() in owned for v in unit.variables]
        if all(inside):
            kept.append(unit)
        elif any(inside):
            raise ValueError(f"layer {unit.layer.name} is only partly owned by the model")
    return kept


def _flax_kind(module: nn.Module) -> str | None:
    from scaledet_jax.heads.roi_heads import _Upsample2x2

    if isinstance(module, nn.Conv):
        return "conv"
    if isinstance(module, nn.BatchNorm):
        return "bn"
    if isinstance(module, nn.Dense):
        return "dense"
    if isinstance(module, _Upsample2x2):
        return "deconv"
    return None


def flax_layer_order(model: nn.Module, *init_args: Any, **init_kwargs: Any) -> list[tuple[str, tuple[str, ...]]]:
    """[(kind, module path)] of the model's convs, batch norms, dense and transposed-conv layers in first-call order."""
    order: list[tuple[str, tuple[str, ...]]] = []
    seen = set()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        kind = _flax_kind(module) if context.method_name == "__call__" else None
        if kind is not None:
            path = tuple(module.scope.path)
            if path not in seen:
                seen.add(path)
                order.append((kind, path))
        return next_fun(*args, **kwargs)

    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda *a: model.init(rngs, *a, **init_kwargs), *init_args)
    return order


def _set(tree: dict, path: tuple[str, ...], name: str, value: np.ndarray) -> None:
    node = tree
    for key in path:
        node = node[key]
    if node[name].shape != value.shape:
        raise ValueError(f"{'/'.join(path)}/{name}: Flax shape {node[name].shape} != Keras {value.shape}")
    node[name] = jnp.asarray(value, dtype=node[name].dtype)


def keras_to_flax(units: list[KerasUnit], flax_order: list[tuple[str, tuple[str, ...]]], abstract: Any) -> dict:
    """Flax variables {'params', 'batch_stats'} holding the Keras units' values."""
    if len(units) != len(flax_order):
        raise ValueError(f"Keras model has {len(units)} weight layers, the Flax model {len(flax_order)}")
    variables = unfreeze(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract))
    params, stats = variables["params"], variables.get("batch_stats", {})
    for i, (unit, (kind, path)) in enumerate(zip(units, flax_order, strict=True)):
        if unit.kind != kind:
            raise ValueError(f"layer {i}: Keras {unit.layer.name} is a {unit.kind}, Flax {'/'.join(path)} a {kind}")
        values = [v.numpy() for v in unit.variables]
        if kind == "deconv":  # Keras Conv2DTranspose kernel [kh, kw, out, in] -> ours [kh, kw, in, out]
            values[0] = values[0].transpose(0, 1, 3, 2)
        if kind in ("conv", "dense", "deconv"):
            _set(params, path, "kernel", values[0])
            if len(values) == 2:
                _set(params, path, "bias", values[1])
            elif "bias" in _node(params, path):
                raise ValueError(f"{'/'.join(path)} has a bias, Keras {unit.layer.name} none")
        else:
            gamma, beta, mean, var = values
            _set(params, path, "scale", gamma)
            _set(params, path, "bias", beta)
            _set(stats, path, "mean", mean)
            _set(stats, path, "var", var)
    return variables


def _node(tree: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        tree = tree[key]
    return tree


# ---- Model Garden checkpoints (``tf.train.Checkpoint(model=...)``), read without Model Garden ----------------------
#
# Keys are object paths: ``model/_backbone/layer_with_weights-17/kernel``, ``model/_head/_cls_norms/2/1/gamma``,
# ``model/mask_head/_deconv/kernel``. The heads are subclassed layers with named attributes, so their creation
# order follows from the names. SpineNet is a functional Keras model: its layers are numbered in the functional
# graph's depth order, which differs from the order they create their variables (the order our modules are
# called in). That order was measured once per variant on Model Garden's own checkpoint
# (``tests/model_garden.py``'s ``spinenet_checkpoint_order``; a test re-measures it) and is stored beside this file.

SPINENET_ORDER_FILE = os.path.join(os.path.dirname(__file__), "model_garden_spinenet_order.json")
# Sub-layers of Model Garden's BottleneckBlock / ResidualBlock in the order its call() creates them.
BLOCK_SUBLAYERS = ("_shortcut", "_norm0", "_conv1", "_norm1", "_conv2", "_norm2", "_conv3", "_norm3")
FLAX_LEAVES = {  # (our collection, our leaf) per Keras variable name, by layer kind
    "conv": {"kernel": ("params", "kernel"), "bias": ("params", "bias")},
    "bn": {
        "gamma": ("params", "scale"),
        "beta": ("params", "bias"),
        "moving_mean": ("batch_stats", "mean"),
        "moving_variance": ("batch_stats", "var"),
    },
}
FLAX_LEAVES["dense"] = FLAX_LEAVES["deconv"] = FLAX_LEAVES["conv"]

# Model Garden's semantics (our defaults, set explicitly so a config written for another source cannot leak in).
MODEL_GARDEN_OPTIONS = {
    "conv_padding": "same",
    "pool_padding": "same",
    "backbone.endpoint_activation": True,
    "backbone.resample_pooling": "repeated",
    "background_slot": True,
    "category_ids": (),
    "input.mean": (123.675, 116.28, 103.53),
    "input.std": (58.395, 57.12, 57.375),
    "input.channels": "rgb",
}


def model_garden_ignored(key: str) -> str | None:
    if not key.startswith("model/"):
        return "training state (optimizer, global step, save counter), not part of the model"
    if "/.OPTIMIZER_SLOT/" in key:
        return "optimizer slot variable"
    return None


def _root(keys, pattern: str, what: str) -> str | None:
    """The one object path matching ``pattern`` (a regex over key prefixes) among ``keys``."""
    regex = re.compile(rf"^({pattern})/")
    found = sorted({m.group(1) for k in keys if (m := regex.match(k))})
    if len(found) > 1:
        from scaledet_jax.convert.torch_layout import ConversionError

        raise ConversionError(f"the checkpoint holds several {what}s: {', '.join(found)}")
    return found[0] if found else None


def _kind(shapes: dict[str, tuple[int, ...]], prefix: str) -> str | None:
    if f"{prefix}/gamma" in shapes:
        return "bn"
    kernel = shapes.get(f"{prefix}/kernel")
    if kernel is None:
        return None
    if prefix.endswith("_deconv"):
        return "deconv"
    return "conv" if len(kernel) == 4 else "dense"


def _count(keys, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def checkpoint_units(shapes: dict[str, tuple[int, ...]], model_id: str) -> list[tuple[str, str]]:
    """[(kind, Keras object path)] of a Model Garden SpineNet RetinaNet / Mask R-CNN checkpoint's layers in
    the order Model Garden creates them."""
    from scaledet_jax.convert.torch_layout import ConversionError

    keys = list(shapes)
    units: list[tuple[str, str]] = []

    def add(prefix: str) -> bool:
        kind = _kind(shapes, prefix)
        if kind:
            units.append((kind, prefix))
        return kind is not None

    backbone = _root(keys, r"model/_?backbone", "backbone")
    if backbone is None:
        raise ConversionError("no model/backbone (or model/_backbone) in the checkpoint: not a Model Garden model")
    with open(SPINENET_ORDER_FILE) as f:
        orders = json.load(f)
    if model_id not in orders:
        raise ConversionError(f"Model Garden SpineNet-{model_id} is not known; known: {', '.join(orders)}")
    for index in orders[model_id]:
        layer = f"{backbone}/layer_with_weights-{index}"
        if not add(layer):
            for sub in BLOCK_SUBLAYERS:
                add(f"{layer}/{sub}")

    head = _root(keys, r"model/_?head", "RetinaNet head")
    if head is not None:
        convs = _count(keys, rf"{head}/_cls_convs/(\d+)/")
        levels = _count(keys, rf"{head}/_cls_norms/(\d+)/")
        for level in range(max(levels, 1)):
            for branch, predictor in (("cls", "_classifier"), ("box", "_box_regressor")):
                for j in range(convs):
                    if level == 0:
                        add(f"{head}/_{branch}_convs/{j}")
                    add(f"{head}/_{branch}_norms/{level}/{j}")
                if level == 0:
                    add(f"{head}/{predictor}")
        return units

    rpn = _root(keys, r"model/_?rpn_head", "RPN head")
    if rpn is None:
        raise ConversionError(
            "the checkpoint has neither a RetinaNet head (model/_head) nor an RPN head (model/rpn_head)"
        )
    convs = _count(keys, rf"{rpn}/_convs/(\d+)/")
    levels = _count(keys, rf"{rpn}/_norms/(\d+)/")
    for level in range(max(levels, 1)):
        for j in range(convs):
            if level == 0:
                add(f"{rpn}/_convs/{j}")
            add(f"{rpn}/_norms/{level}/{j}")
        if level == 0:
            add(f"{rpn}/_classifier")
            add(f"{rpn}/_box_regressor")
    # The detection heads live in a list (one per cascade stage); the checkpoint names the first path it finds.
    detection = _root(keys, r"model/(?:_config_dict/)?_?detection_head(?:/0)?", "detection head")
    if detection is None:
        raise ConversionError("the checkpoint has an RPN head but no detection head")
    for part in ("conv", "fc"):
        for j in range(_count(keys, rf"{detection}/_{part}s/(\d+)/")):
            add(f"{detection}/_{part}s/{j}")
            add(f"{detection}/_{part}_norms/{j}")
    add(f"{detection}/_classifier")
    add(f"{detection}/_box_regressor")
    mask = _root(keys, r"model/_?mask_head", "mask head")
    if mask is not None:
        for j in range(_count(keys, rf"{mask}/_convs/(\d+)/")):
            add(f"{mask}/_convs/{j}")
            add(f"{mask}/_conv_norms/{j}")
        for name in ("_deconv", "_deconv_bn", "_mask_regressor"):
            add(f"{mask}/{name}")
    return units


def model_garden_source(state, target, model: nn.Module, config, image_size: int):
    """source_key(path) for ``torch_layout.convert``: pairs the checkpoint's layers (creation order) with our
    modules (call order) one by one, refusing on any difference in count or kind (shapes are checked after)."""
    from scaledet_jax.convert.torch_layout import ConversionError

    shapes = {k: tuple(np.shape(v)) for k, v in state.items()}
    backbone = config.model.backbone
    if backbone.name != "spinenet":
        raise ConversionError(
            "the model-garden layout reads SpineNet RetinaNet / Mask R-CNN checkpoints; use a SpineNet config"
        )
    units = checkpoint_units(shapes, backbone.model_id)
    order = flax_layer_order(model, jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32), train=False)
    if len(units) != len(order):
        raise ConversionError(
            f"the checkpoint has {len(units)} weight layers, the model of the config {len(order)}: a different "
            "variant, head depth or width (check the config's SpineNet variant, head and class count)"
        )
    sources: dict[tuple[str, ...], str] = {}
    for i, ((kind, prefix), (our_kind, path)) in enumerate(zip(units, order, strict=True)):
        if kind != our_kind:
            raise ConversionError(f"layer {i}: {prefix} is a {kind}, our {'/'.join(path)} a {our_kind}")
        for name, (collection, leaf) in FLAX_LEAVES[kind].items():
            sources[(collection, *path, leaf)] = f"{prefix}/{name}"
    return sources.get


def model_garden_prepare(state):
    """Keras Conv2DTranspose kernels are [kh, kw, out, in]; ours [kh, kw, in, out]."""
    return {k: (np.transpose(v, (0, 1, 3, 2)) if k.endswith("/_deconv/kernel") else v) for k, v in state.items()}


def model_garden_options(state, config) -> dict[str, Any]:
    """Model Garden's semantics and the class count read from the class predictor."""
    from scaledet_jax.cli import UserError

    options = dict(MODEL_GARDEN_OPTIONS)
    retinanet = [k for k in state if re.fullmatch(r"model/_?head/_classifier/kernel", k)]
    two_stage = [k for k in state if re.search(r"detection_head(/0)?/_classifier/kernel$", k)]
    if retinanet:
        if config.model.name != "retinanet":
            raise UserError(
                "the checkpoint is a Model Garden RetinaNet; convert it with a RetinaNet config, "
                "e.g. --config=configs/spinenet49.py"
            )
        a = config.model.anchor
        anchors = a.num_scales * len(a.aspect_ratios)
        outputs = int(np.shape(state[retinanet[0]])[-1])
        if outputs % anchors:
            raise UserError(
                f"{retinanet[0]} has {outputs} outputs, not a multiple of the config's {anchors} anchors per location"
            )
        options["num_classes"] = outputs // anchors
    elif two_stage:
        if config.model.name != "mask_rcnn":
            raise UserError(
                "the checkpoint is a Model Garden Mask R-CNN; convert it with a Mask R-CNN config, "
                "e.g. --config=configs/maskrcnn_spinenet49.py"
            )
        options["num_classes"] = int(np.shape(state[two_stage[0]])[-1])
    else:
        raise UserError(
            "no class predictor (model/_head/_classifier or detection_head/_classifier) in the checkpoint: "
            "not a Model Garden RetinaNet / Mask R-CNN"
        )
    return options
