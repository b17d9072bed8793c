"""Reading PyTorch checkpoints safely, and writing / reading converted checkpoints.

Reading: ``.safetensors`` files through safetensors, everything else through
``torch.load(..., weights_only=True)``, so a pickle that would run code is refused rather than
executed. Accepted containers: a plain state dict, mmcv's ``{'meta', 'state_dict', 'optimizer'}``,
``{'model': ...}`` (maskrcnn-benchmark, detectron-style) and effdet/timm training checkpoints
(``state_dict``); ``module.`` prefixes (DataParallel) are stripped. Every failure is a one-line
``UserError``.

A converted checkpoint is a directory: ``variables/`` (an orbax checkpoint of
``{'params', 'batch_stats'}``, possibly only a sub-tree such as the backbone) and
``conversion.json`` (source, layout, the model options the source's semantics need, the mapping
report and the measured parity). It is written to a temporary sibling and renamed into place, so
an interrupted or failed conversion leaves nothing behind. ``overwrite`` replaces only a previous
converted checkpoint (never a directory holding anything else), by swapping the new one in after
it is complete: a failure before the swap leaves the previous one untouched. Non-finite tensors
are never written. ``config.init_from = DIR`` starts training (or evaluation) from it.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import uuid
from typing import Any

import numpy as np

from scaledet_jax.cli import UserError

CONTAINER_KEYS = ("state_dict", "model")  # tried in this order when the file holds a wrapper dict


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
SHOWN_FILES = 3


def checkpoint_files(directory: str, max_depth: int = 2, max_entries: int = 10_000) -> list[str]:
    """PyTorch / safetensors checkpoint files in ``directory`` (and ``max_depth - 1`` levels below),
    shallowest first, as paths joined onto ``directory``; the scan stops after ``max_entries`` entries."""
    found: list[tuple[int, str]] = []
    seen = 0
    for root, dirs, files in os.walk(directory):
        depth = os.path.relpath(root, directory).count(os.sep) + (root != directory)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth + 1 < max_depth else []
        found += [(depth, os.path.join(root, f)) for f in sorted(files) if f.endswith(CHECKPOINT_SUFFIXES)]
        seen += len(dirs) + len(files)
        if seen > max_entries:
            break
    return [path for _, path in sorted(found)]


def check_input(path: str) -> None:
    """One-line ``UserError`` unless ``path`` is a readable file (a directory says what is inside it)."""
    if os.path.isdir(path):
        found = checkpoint_files(path)
        if not found:
            raise UserError(
                f"checkpoint {path!r} is a directory with no {'/'.join(CHECKPOINT_SUFFIXES)} file in it; "
                "pass the checkpoint file itself"
            )
        more = f" ({len(found)} found)" if len(found) > SHOWN_FILES else ""
        raise UserError(
            f"checkpoint {path!r} is a directory; pass the checkpoint file inside it, e.g. "
            f"{', '.join(found[:SHOWN_FILES])}{more}"
        )
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path!r} not found")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} is not a regular file")
    if not os.access(path, os.R_OK):
        raise UserError(f"checkpoint {path!r} is not readable (permission denied)")


def load_state_dict(path: str) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """(state dict as float32/int NumPy arrays, [(ignored top-level entry, reason)])."""
    check_input(path)
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file

            return dict(load_file(path)), []
        except Exception as e:  # safetensors raises its own SafetensorError for bad headers
            raise UserError(f"cannot read {path!r} as a safetensors file: {_one_line(e)}") from None
    try:
        import torch
    except ImportError:
        raise UserError(
            "reading .pth/.pt checkpoints needs PyTorch: pip install torch (or convert to .safetensors)"
        ) from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            raise UserError(
                f"refusing to load {path!r}: it pickles Python objects that would run code when loaded; "
                "only tensors and plain containers are accepted (re-save it with torch.save(model.state_dict()))"
            ) from None
        raise UserError(f"cannot read {path!r} as a PyTorch checkpoint: {_one_line(e)}") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, IndexError, BadZipFile... for non-checkpoints
        raise UserError(
            f"cannot read {path!r} as a PyTorch checkpoint (truncated or not a checkpoint?): {_one_line(e)}"
        ) from None
    return unwrap(loaded, path)


def unwrap(loaded: Any, path: str = "checkpoint") -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """The state dict inside ``loaded``, NumPy-converted, ``module.`` prefixes removed."""
    ignored: list[tuple[str, str]] = []
    if not isinstance(loaded, dict):
        raise UserError(f"{path!r} holds a {type(loaded).__name__}, not a state dict")
    state = loaded
    for key in CONTAINER_KEYS:
        if isinstance(loaded.get(key), dict) and loaded[key] and all(_is_tensor(v) for v in loaded[key].values()):
            state = loaded[key]
            ignored = [(k, f"checkpoint entry beside '{key}'") for k in loaded if k != key]
            break
    tensors = {k: v for k, v in state.items() if _is_tensor(v)}
    if not tensors:
        raise UserError(f"{path!r} contains no tensors (expected a state dict, or one under 'state_dict' / 'model')")
    ignored += [(k, "not a tensor") for k in state if k not in tensors]
    out = {}
    for key, value in tensors.items():
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        out[key.removeprefix("module.")] = array
    return out, ignored


# ---------------------------------------------------------------------------------------------
# Converted checkpoints
# ---------------------------------------------------------------------------------------------

VARIABLES_DIR, INFO_FILE = "variables", "conversion.json"


CONVERTED_INFO_KEYS = ("layout", "source", "mapped")  # every conversion.json this converter wrote has these


def is_converted(directory: str) -> bool:
    """Whether ``directory`` holds a checkpoint written by this converter (its ``conversion.json``)."""
    try:
        with open(os.path.join(directory, INFO_FILE)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and all(key in info for key in CONVERTED_INFO_KEYS)


def _listing(names: list[str], shown: int = SHOWN_FILES) -> str:
    names = sorted(names)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_output(output: str, overwrite: bool = False) -> None:
    """One-line ``UserError`` unless ``output`` can take a converted checkpoint: it does not exist and
    can be created, or is an empty directory, or (with ``overwrite``) holds a previous converted
    checkpoint and nothing else. Cheap: call it before the slow load and mapping."""
    path = os.path.abspath(output)
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise UserError(f"output {output!r} exists and is not a directory; choose another path")
        entries = os.listdir(path)
        if entries:
            if not is_converted(path):
                raise UserError(
                    f"output {output!r} is a directory holding other things ({_listing(entries)}), not a converted "
                    f"checkpoint{' (--overwrite only replaces those)' if overwrite else ''}; choose another path"
                )
            if not overwrite:
                raise UserError(
                    f"output {output!r} already holds a converted checkpoint; pass --overwrite to replace it "
                    "or choose another path"
                )
            extra = sorted(set(entries) - {VARIABLES_DIR, INFO_FILE})
            if extra:
                raise UserError(
                    f"output {output!r} holds a converted checkpoint but also {_listing(extra)}, which --overwrite "
                    "would delete; move them out or choose another path"
                )
    existing = os.path.dirname(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"cannot create output {output!r}: {existing!r} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot create output {output!r}: directory {existing!r} is not writable; choose another path")


def nonfinite_leaves(tree: Any, where: str = "") -> list[tuple[str, int, int]]:
    """[(path, NaN count, Inf count)] for the leaves of a nested dict holding NaN/Inf."""
    from scaledet_jax.convert.torch_layout import nonfinite_counts

    if isinstance(tree, dict):
        return [found for key, value in tree.items() for found in nonfinite_leaves(value, f"{where}/{key}")]
    nans, infs = nonfinite_counts(np.asarray(tree))
    return [(where.lstrip("/"), nans, infs)] if nans or infs else []


def save_converted(output: str, variables: dict[str, Any], info: dict[str, Any], overwrite: bool = False) -> None:
    """Writes ``output/variables`` (orbax) and ``output/conversion.json`` into a temporary sibling,
    then moves it into place (swapping out a previous converted checkpoint with ``overwrite``)."""
    import orbax.checkpoint as ocp

    from scaledet_jax.convert.torch_layout import describe_nonfinite

    bad = nonfinite_leaves(variables)
    if bad:
        raise UserError(f"refusing to write {output!r}: {describe_nonfinite(bad, 'converted variables')}")
    check_output(output, overwrite)
    output = os.path.abspath(output)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(output) + ".partial-", dir=parent)
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(staging, VARIABLES_DIR), variables)
        checkpointer.wait_until_finished()
        with open(os.path.join(staging, INFO_FILE), "w") as f:
            json.dump(info, f, indent=1)
        _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: str, output: str) -> None:
    """Renames the complete ``staging`` directory to ``output``. A previous ``output`` (checked by
    ``check_output``) is first renamed aside, restored if the second rename fails, deleted after it."""
    if not os.path.lexists(output):
        os.rename(staging, output)
        return
    aside = os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.replaced-{uuid.uuid4().hex[:8]}")
    os.rename(output, aside)
    try:
        os.rename(staging, output)
    except BaseException:
        os.rename(aside, output)
        raise
    if os.path.islink(aside):  # output was a link to the previous checkpoint: the link goes, its target stays
        os.unlink(aside)
    else:
        shutil.rmtree(aside, ignore_errors=True)


def read_info(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, INFO_FILE)
    if not os.path.isfile(path):
        raise UserError(
            f"{directory!r} is not a converted checkpoint (no {INFO_FILE}); "
            "create one with python -m scaledet_jax.convert"
        )
    with open(path) as f:
        return json.load(f)


def load_converted(directory: str) -> dict[str, Any]:
    """The variables sub-tree stored in ``directory`` (NumPy arrays)."""
    import orbax.checkpoint as ocp

    read_info(directory)
    return ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(directory), VARIABLES_DIR))


def apply_model_options(config, directory: str) -> list[str]:
    """Sets the model options the converted weights need (stored by the converter); returns changes."""
    return set_model_options(config, read_info(directory).get("model_options", {}))


def set_model_options(config, options: dict[str, Any]) -> list[str]:
    """``config.model.<dotted key> = value`` for each option; returns the changes made. A leaf the
    config does not have (an option its source never needed, e.g. ``anchor.truncate_sizes``) is
    added, even to a locked config."""
    changes = []
    for dotted, value in options.items():
        if isinstance(value, list):  # conversion.json stores tuples as lists; config fields are tuples
            value = tuple(value)
        node = config.model
        *path, leaf = dotted.split(".")
        for part in path:
            node = node[part]
        if leaf not in node:
            changes.append(f"model.{dotted}: (unset) -> {value!r}")
            with node.unlocked():
                node[leaf] = value
        elif node[leaf] != value:
            changes.append(f"model.{dotted}: {node[leaf]!r} -> {value!r}")
            node[leaf] = value
    return changes


def merge_into(
    target: Any, loaded: Any, where: str = "", reinitialised: list[str] | None = None
) -> tuple[Any, int, int]:
    """Replaces the leaves of ``target`` present in ``loaded`` (same shapes); (tree, loaded, kept).

    ``reinitialised``: a list when the source's class count differs from the model's (fine-tuning on other
    classes): a tensor that differs only in its last axis (a class predictor's outputs) keeps ``target``'s
    fresh initialisation and its path is appended; without it any shape difference is an error."""
    if isinstance(loaded, dict):
        if not isinstance(target, dict):
            raise UserError(f"converted checkpoint has a sub-tree at {where or '/'} where the model has a tensor")
        unknown = sorted(set(loaded) - set(target))
        if unknown:
            raise UserError(
                f"converted checkpoint has {where}/{unknown[0]} which the model does not (config mismatch?)"
            )
        out, n_loaded, n_kept = dict(target), 0, 0
        for key, value in target.items():
            if key in loaded:
                out[key], a, b = merge_into(value, loaded[key], f"{where}/{key}", reinitialised)
            else:
                a, b = 0, len(_leaves(value))
            n_loaded, n_kept = n_loaded + a, n_kept + b
        return out, n_loaded, n_kept
    have, want = tuple(np.shape(loaded)), tuple(target.shape)
    if have != want:
        if reinitialised is not None and len(have) == len(want) and have[:-1] == want[:-1]:
            reinitialised.append(where)
            return target, 0, 1
        raise UserError(f"converted {where} has shape {have}, the model {want} (config mismatch?)")
    return np.asarray(loaded).astype(target.dtype), 1, 0


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    return [tree]
