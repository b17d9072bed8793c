"""Detector families as the trainer sees them (Model Garden's task split, kept to what we need).

``train.py`` owns the loop, the mesh, the optimizer, checkpoints, metrics and evaluation; it asks
the family of ``config.model.name`` for the few things that differ between detectors:

* ``init(rngs, image_size)`` -> the model's variables;
* ``losses(variables, batch, rng, train)`` -> ({name: scalar} with 'model_loss', new batch_stats);
* ``predict(variables, images)`` -> fixed-shape detections {boxes, scores, classes, valid};
* ``batch_fields``: the preprocessed batch fields ``losses`` reads;
* ``log_losses``: the loss parts the log line shows, in order.

A family registers itself with ``@register_task('name', ...)`` for the ``model.name`` values it serves.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections

Array = jax.Array


class Task(Protocol):
    batch_fields: tuple[str, ...]
    log_losses: tuple[str, ...]

    def init(self, rngs: dict[str, Array], image_size: int) -> dict[str, Any]: ...

    def losses(
        self, variables: dict[str, Any], batch: dict[str, Array], rng: Array, train: bool = True
    ) -> tuple[dict[str, Array], Any]: ...

    def predict(self, variables: dict[str, Any], images: Array) -> dict[str, Array]: ...


_TASKS: dict[str, Callable[[ml_collections.ConfigDict], Task]] = {}
# model.name -> the module that registers its task (imported on first use).
_MODULES = {
    "retinanet": "scaledet_jax.tasks.retinanet",
    "efficientdet": "scaledet_jax.tasks.retinanet",
    "faster_rcnn": "scaledet_jax.tasks.faster_rcnn",
    "mask_rcnn": "scaledet_jax.tasks.mask_rcnn",
}


def register_task(*model_names: str):
    def wrap(factory):
        for name in model_names:
            _TASKS[name] = factory
        return factory

    return wrap


def build_task(config: ml_collections.ConfigDict) -> Task:
    """The task serving ``config.model.name`` (the model is built from ``config.model``)."""
    name = config.model.name
    if name not in _MODULES:
        raise ValueError(f"unknown model.name {name!r}; available: {', '.join(sorted(_MODULES))}")
    importlib.import_module(_MODULES[name])
    return _TASKS[name](config)


def init_with_images(model, rngs: dict[str, Array], image_size: int) -> dict[str, Any]:
    """Variables of a model called as ``model(images, train=False)``."""
    return model.init(rngs, jnp.zeros((1, image_size, image_size, 3), jnp.float32))
