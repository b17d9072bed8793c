"""PyTorch state_dict -> Flax variables, driven by our variable tree and checked both ways.

A source layout (effdet, timm, mmdetection, ...) is a function ``source_key(path) -> str | None``
naming the PyTorch tensor that fills our variable ``path`` (a tuple such as
``('params', 'backbone', 'stem_conv', 'kernel')``), plus a list of source keys it ignores on purpose
(with the reason). ``convert`` then walks every variable of the target model, takes its tensor,
transposes it to Flax's layout, checks the shape, and refuses (``ConversionError`` listing every
missing / unexpected / mis-shaped key) unless every target is filled and every source tensor was
used or explicitly ignored. A mapped tensor holding NaN or Inf is refused too (``NonFiniteError``,
one line naming the source keys): a converted model would otherwise score nothing, silently.
Nothing is returned half-filled.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flax import traverse_util

Path = tuple[str, ...]


class ConversionError(ValueError):
    """The checkpoint does not fit the model; the message lists every offending key."""


class NonFiniteError(ConversionError):
    """Mapped source tensors hold NaN/Inf; the one-line message names them (first few and the count)."""


SHOWN_NONFINITE = 5


def nonfinite_counts(array: np.ndarray) -> tuple[int, int]:
    """(number of NaN, number of +-Inf) in ``array``; (0, 0) for integer and boolean arrays."""
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating)):
        return 0, 0
    if np.isfinite(array).all():
        return 0, 0
    return int(np.isnan(array).sum()), int(np.isinf(array).sum())


def describe_nonfinite(found: list[tuple[str, int, int]], what: str = "source tensors") -> str:
    """One line: ``N <what> hold NaN/Inf: key (2 NaN), key (1 Inf), ... and M more``."""
    shown = []
    for name, nans, infs in found[:SHOWN_NONFINITE]:
        counts = [f"{n} {kind}" for n, kind in ((nans, "NaN"), (infs, "Inf")) if n]
        shown.append(f"{name} ({', '.join(counts)})")
    more = f" and {len(found) - SHOWN_NONFINITE} more" if len(found) > SHOWN_NONFINITE else ""
    return f"{len(found)} {what} hold NaN/Inf: {', '.join(shown)}{more}"


def to_numpy(tensor: Any) -> np.ndarray:
    if isinstance(tensor, np.ndarray):
        return tensor
    return tensor.detach().cpu().float().numpy() if tensor.is_floating_point() else tensor.detach().cpu().numpy()


def flax_array(path: Path, tensor: np.ndarray) -> np.ndarray:
    """PyTorch layout -> Flax layout for the variable at ``path``."""
    leaf = path[-1]
    if leaf == "kernel":
        if tensor.ndim == 4:  # conv OIHW -> HWIO (depthwise [C, 1, k, k] -> [k, k, 1, C])
            return np.transpose(tensor, (2, 3, 1, 0))
        if tensor.ndim == 2:  # linear [out, in] -> [in, out]
            return tensor.T
    return tensor


# Our leaf names -> the PyTorch leaf names of the same module.
CONV_LEAVES = {"kernel": "weight", "bias": "bias"}
BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
BN_IGNORED_SUFFIX = "num_batches_tracked"


@dataclass
class ConversionReport:
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (source key, target path)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (source key, reason)
    shared_checked: list[tuple[str, str]] = field(default_factory=list)  # (duplicate key, key used)

    def summary(self) -> str:
        return (
            f"{len(self.mapped)} tensors mapped, {len(self.ignored)} ignored, "
            f"{len(self.shared_checked)} shared copies checked equal"
        )


def leaf_name(path: Path) -> str:
    """The PyTorch leaf for our leaf, given the module kind implied by the collection and name."""
    collection, leaf = path[0], path[-1]
    if collection == "batch_stats":
        return BN_LEAVES[leaf]
    parent = path[-2]
    if leaf == "scale" or (leaf == "bias" and ("bn" in parent or parent.endswith("_norm"))):
        return BN_LEAVES[leaf]
    return CONV_LEAVES.get(leaf, leaf)


def convert(
    state_dict: Mapping[str, Any],
    target_shapes: Mapping[str, Any],
    source_key: Callable[[Path], str | None],
    ignore: Callable[[str], str | None] = lambda key: None,
    duplicates: Callable[[str], str | None] = lambda key: None,
    progress: Callable[[int, int], None] | None = None,
    transform: Callable[[Path, np.ndarray], np.ndarray] | None = None,
    to_flax: Callable[[Path, np.ndarray], np.ndarray] = flax_array,
) -> tuple[dict[str, Any], ConversionReport]:
    """Fills every variable of ``target_shapes`` (``{'params': ..., 'batch_stats': ...}`` of shapes).

    ``source_key(path)`` names the tensor for a target; ``ignore(key)`` returns a reason for source
    keys that are deliberately unused; ``duplicates(key)`` returns, for a tensor the source stores
    more than once (shared head convs saved per level), the key of the copy that is used — the
    copies must be equal. ``transform(path, array)`` re-orders a tensor already in Flax layout
    (e.g. predictor channels of a source whose anchor order differs); it must keep the shape.
    ``to_flax(path, array)`` brings a source tensor into Flax's layout (PyTorch's by default; TF
    checkpoints are already HWIO / [in, out]).
    """
    report = ConversionReport()
    flat_targets = traverse_util.flatten_dict(dict(target_shapes))
    used: set[str] = set()
    missing, misshaped = [], []
    nonfinite: list[tuple[str, int, int]] = []  # (source key, NaN count, Inf count)
    out: dict[Path, np.ndarray] = {}
    for i, (path, target) in enumerate(sorted(flat_targets.items())):
        key = source_key(path)
        if key is None or key not in state_dict:
            missing.append(f"{'/'.join(path)} (expects {key or 'no source'})")
            continue
        array = to_flax(path, to_numpy(state_dict[key]))
        shape = tuple(target.shape)
        if array.shape != shape:
            used.add(key)  # reported as mis-shaped, not also as unexpected
            misshaped.append(f"{key}: {tuple(array.shape)} -> {'/'.join(path)} {shape}")
            continue
        nans, infs = nonfinite_counts(array)
        if nans or infs:
            nonfinite.append((key, nans, infs))
        if transform is not None:
            array = transform(path, array)
        out[path] = array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array
        used.add(key)
        report.mapped.append((key, "/".join(path)))
        if progress is not None:
            progress(i + 1, len(flat_targets))

    unexpected, unequal = [], []
    for key, tensor in state_dict.items():
        if key in used:
            continue
        reason = ignore(key)
        if reason:
            report.ignored.append((key, reason))
            continue
        original = duplicates(key)
        if original is not None and original in used:
            if not np.array_equal(to_numpy(tensor), to_numpy(state_dict[original])):
                unequal.append(f"{key} differs from {original}")
            else:
                report.shared_checked.append((key, original))
            continue
        unexpected.append(key)

    problems = []
    for title, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
        ("shared weights that differ between copies", unequal),
    ):
        if items:
            shown = "\n    ".join(items[:40]) + (f"\n    ... and {len(items) - 40} more" if len(items) > 40 else "")
            problems.append(f"  {len(items)} {title}:\n    {shown}")
    if problems:
        raise ConversionError("checkpoint does not match the model:\n" + "\n".join(problems))
    if nonfinite:
        raise NonFiniteError(
            describe_nonfinite(sorted(set(nonfinite)))
            + "; refusing to convert them (the checkpoint is damaged or its training diverged: "
            "use an earlier or freshly downloaded one)"
        )
    return traverse_util.unflatten_dict(out), report


def numbered(keys, pattern: str) -> list[tuple[int, ...]]:
    """Sorted distinct integer groups of ``pattern`` (a regex with int groups) over ``keys``."""
    regex = re.compile(pattern)
    found = {tuple(int(g) for g in m.groups()) for k in keys if (m := regex.match(k))}
    return sorted(found)
