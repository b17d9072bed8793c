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
