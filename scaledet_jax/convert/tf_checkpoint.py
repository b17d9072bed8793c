"""Reading TensorFlow checkpoints (Model Garden, automl) for the converter.

A TF checkpoint is a prefix (``ckpt-350000`` beside ``ckpt-350000.index`` and its
``.data-*-of-*`` shards) or a directory whose ``checkpoint`` file names the latest prefix, as
Model Garden's and automl's trainers write them. ``tf.train.load_checkpoint`` reads it; neither
Model Garden nor automl is needed. Object-based keys lose their ``/.ATTRIBUTES/VARIABLE_VALUE``
suffix. Entries the layout ignores (optimizer slots, step counters) are listed, never read, so a
checkpoint with optimizer state costs no more memory than its weights. Every failure is a one-line
``UserError``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable

import numpy as np

from scaledet_jax.cli import UserError

ATTRIBUTE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


def resolve_prefix(path: str) -> str:
    """The checkpoint prefix ``path`` names: itself, or a directory's latest checkpoint."""
    import tensorflow as tf

    if os.path.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest:
            return latest
        indexes = sorted(glob.glob(os.path.join(path, "*.index")))
        if len(indexes) == 1:
            return indexes[0][: -len(".index")]
        if indexes:
            names = ", ".join(os.path.basename(i)[: -len(".index")] for i in indexes[:3])
            raise UserError(
                f"TF checkpoint directory {path!r} holds {len(indexes)} checkpoints and no 'checkpoint' file naming "
                f"the latest; pass one prefix, e.g. {os.path.join(path, names.split(', ')[0])} (found: {names})"
            )
        raise UserError(f"{path!r} is a directory without a TF checkpoint (no 'checkpoint' file, no *.index)")
    if path.endswith(".index") or ".data-" in os.path.basename(path):
        prefix = path[: -len(".index")] if path.endswith(".index") else path.split(".data-")[0]
        return prefix
    if os.path.exists(path + ".index"):
        return path
    if not os.path.exists(path):
        raise UserError(f"TF checkpoint {path!r} not found (give a prefix such as DIR/ckpt-1000, or its directory)")
    raise UserError(f"{path!r} is not a TF checkpoint prefix: no {os.path.basename(path)}.index beside it")


def check_input(path: str) -> None:
    """Fails fast (one line) unless ``path`` names a readable TF checkpoint."""
    prefix = resolve_prefix(path)
    if not os.path.exists(prefix + ".index"):
        raise UserError(f"TF checkpoint {prefix!r} has no .index file")
    if not glob.glob(glob.escape(prefix) + ".data-*"):
        raise UserError(f"TF checkpoint {prefix!r} has an .index but no .data-* shard beside it (incomplete copy?)")


def size_mib(path: str) -> float:
    prefix = resolve_prefix(path)
    return sum(os.path.getsize(f) for f in glob.glob(glob.escape(prefix) + ".*")) / 2**20


def load(
    path: str, ignored: Callable[[str], str | None], shadow_suffix: str | None = None
) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """(``{key: array}`` of every entry the layout does not ignore, ``[(ignored key, reason)]``).

    ``shadow_suffix`` (e.g. ``/ExponentialMovingAverage``): where ``<key><suffix>`` exists, its value is
    read under ``<key>`` and the plain value is listed as ignored (the source evaluates with the shadows)."""
    import tensorflow as tf

    prefix = resolve_prefix(path)
    try:
        reader = tf.train.load_checkpoint(prefix)
        keys = sorted(reader.get_variable_to_shape_map())
    except Exception as e:  # tf raises NotFoundError / DataLossError / InvalidArgumentError
        text = " ".join(str(e).split())[:300]
        raise UserError(f"cannot read {prefix!r} as a TF checkpoint (truncated or not a checkpoint?): {text}") from None
    state: dict[str, np.ndarray] = {}
    skipped: list[tuple[str, str]] = []
    present = set(keys)
    for key in keys:
        name = key[: -len(ATTRIBUTE_SUFFIX)] if key.endswith(ATTRIBUTE_SUFFIX) else key
        if key == OBJECT_GRAPH_KEY:
            skipped.append((key, "the checkpoint's object graph (structure, no weights)"))
            continue
        read_from = key
        if shadow_suffix and name.endswith(shadow_suffix):
            plain = name[: -len(shadow_suffix)]
            if plain in present:
                continue  # read in place of the plain value, below
            name = plain
        elif shadow_suffix and name + shadow_suffix in present:
            skipped.append(
                (name, f"training value; its {shadow_suffix.strip('/')} shadow is used (the source evaluates with it)")
            )
            read_from = name + shadow_suffix
        reason = ignored(name)
        if reason:
            if read_from == key:
                skipped.append((name, reason))
            continue
        try:
            state[name] = np.asarray(reader.get_tensor(read_from))
        except Exception as e:
            text = " ".join(str(e).split())[:200]
            raise UserError(f"cannot read tensor {name!r} from {prefix!r} (damaged shard?): {text}") from None
    return state, skipped
