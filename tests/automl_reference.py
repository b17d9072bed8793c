"""google/automl EfficientDet checkpoints written from an effdet model's weights, for the ``automl`` layout's tests.

automl's variable names and layouts, as its source builds them (google/automl ``efficientdet/``, read at
commit 6a54c87): ``backbone/efficientnet_model.py`` (``get_conv_name`` / ``get_bn_name``: a block's convs
``conv2d``, ``conv2d_1`` and norms ``tpu_batch_normalization``, ``_1``, ``_2`` in creation order, the
expansion conv only where expand_ratio != 1; ``se/conv2d``, ``se/conv2d_1`` with biases; ``stem/``),
``efficientdet_arch.py`` (``resample_p{level}/{conv2d, bn}``; ``fpn_cells/cell_{c}/fnode{j}/``: ``WSM``,
``WSM_1``, ... per input, ``resample_{position}_{offset}_{len(feats)}/{conv2d, bn}``,
``op_after_combine{len(feats)}/conv/{depthwise_kernel, pointwise_kernel, bias}`` and ``/bn``;
``class_net/class-{i}``, ``class-{i}-bn-{level}``, ``class-predict``, same for ``box_net/box-``), Keras
layouts (conv kernels HWIO, depthwise ``[k, k, C, 1]``). ``det_model_fn.py`` keeps an
ExponentialMovingAverage shadow ``<name>/ExponentialMovingAverage`` of every variable; the file is what
a TF1 ``Saver`` writes (name-based keys, ``model.index`` / ``model.data-*`` and a ``checkpoint`` file).

This mapping (effdet -> automl) is written here independently of the converter's (automl -> ours); the
test compares the converted model with effdet itself.
"""

from __future__ import annotations

import os
import re

import numpy as np

BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def _conv(weight: np.ndarray) -> np.ndarray:  # OIHW -> HWIO
    return weight.transpose(2, 3, 1, 0)


def _depthwise(weight: np.ndarray) -> np.ndarray:  # [C, 1, k, k] -> [k, k, C, 1]
    return weight.transpose(2, 3, 0, 1)


def automl_variables(model, backbone: str) -> dict[str, np.ndarray]:
    """automl's {variable name: value} for effdet ``model`` (a ``tf_efficientdet_*``); every tensor placed."""
    state = {
        k: v.detach().numpy().astype(np.float32)
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def put(name: str, key: str, convert=lambda a: a) -> None:
        out[name] = convert(state[key])
        used.add(key)

    def bn(name: str, key: str) -> None:
        for theirs, ours in BN.items():
            put(f"{name}/{ours}", f"{key}.{theirs}")

    put(f"{backbone}/stem/conv2d/kernel", "backbone.conv_stem.weight", _conv)
    bn(f"{backbone}/stem/tpu_batch_normalization", "backbone.bn1")
    blocks = sorted(
        {(int(m.group(1)), int(m.group(2))) for k in state if (m := re.match(r"backbone\.blocks\.(\d+)\.(\d+)\.", k))}
    )
    for index, (stage, j) in enumerate(blocks):
        src, dst = f"backbone.blocks.{stage}.{j}", f"{backbone}/blocks_{index}"
        put(f"{dst}/se/conv2d/kernel", f"{src}.se.conv_reduce.weight", _conv)
        put(f"{dst}/se/conv2d/bias", f"{src}.se.conv_reduce.bias")
        put(f"{dst}/se/conv2d_1/kernel", f"{src}.se.conv_expand.weight", _conv)
        put(f"{dst}/se/conv2d_1/bias", f"{src}.se.conv_expand.bias")
        put(f"{dst}/depthwise_conv2d/depthwise_kernel", f"{src}.conv_dw.weight", _depthwise)
        if f"{src}.conv_pwl.weight" in state:  # inverted residual: expand, depthwise, project
            put(f"{dst}/conv2d/kernel", f"{src}.conv_pw.weight", _conv)
            put(f"{dst}/conv2d_1/kernel", f"{src}.conv_pwl.weight", _conv)
            for n, norm in enumerate(("bn1", "bn2", "bn3")):
                bn(f"{dst}/tpu_batch_normalization" + (f"_{n}" if n else ""), f"{src}.{norm}")
        else:  # depthwise-separable (expand ratio 1): depthwise, project
            put(f"{dst}/conv2d/kernel", f"{src}.conv_pw.weight", _conv)
            bn(f"{dst}/tpu_batch_normalization", f"{src}.bn1")
            bn(f"{dst}/tpu_batch_normalization_1", f"{src}.bn2")

    min_level = 3
    for i in sorted({int(m.group(1)) for k in state if (m := re.match(r"fpn\.resample\.(\d+)\.", k))}):
        put(f"resample_p{min_level + i}/conv2d/kernel", f"fpn.resample.{i}.conv.conv.weight", _conv)
        put(f"resample_p{min_level + i}/conv2d/bias", f"fpn.resample.{i}.conv.conv.bias")
        bn(f"resample_p{min_level + i}/bn", f"fpn.resample.{i}.conv.bn")
    num_levels = model.config.num_levels
    for c, cell in enumerate(model.fpn.cell):
        for j, fnode in enumerate(cell.fnode):
            src, dst = f"fpn.cell.{c}.fnode.{j}", f"fpn_cells/cell_{c}/fnode{j}"
            features = num_levels + j
            weights = state[f"{src}.combine.edge_weights"]
            used.add(f"{src}.combine.edge_weights")
            for k, value in enumerate(weights):
                out[f"{dst}/WSM" + (f"_{k}" if k else "")] = np.asarray(value, np.float32)
            for position, offset in enumerate(fnode.combine.inputs_offsets):
                key = f"{src}.combine.resample.{offset}.conv"
                if f"{key}.conv.weight" in state:
                    scope = f"{dst}/resample_{position}_{offset}_{features}"
                    put(f"{scope}/conv2d/kernel", f"{key}.conv.weight", _conv)
                    put(f"{scope}/conv2d/bias", f"{key}.conv.bias")
                    bn(f"{scope}/bn", f"{key}.bn")
            op = f"{dst}/op_after_combine{features}"
            put(f"{op}/conv/depthwise_kernel", f"{src}.after_combine.conv.conv_dw.weight", _depthwise)
            put(f"{op}/conv/pointwise_kernel", f"{src}.after_combine.conv.conv_pw.weight", _conv)
            put(f"{op}/conv/bias", f"{src}.after_combine.conv.conv_pw.bias")
            bn(f"{op}/bn", f"{src}.after_combine.conv.bn")

    for net, short in (("class_net", "class"), ("box_net", "box")):
        repeats = sorted({int(m.group(1)) for k in state if (m := re.match(rf"{net}\.conv_rep\.(\d+)\.", k))})
        for name, src in [(f"{short}-{i}", f"{net}.conv_rep.{i}") for i in repeats] + [
            (f"{short}-predict", f"{net}.predict")
        ]:
            put(f"{net}/{name}/depthwise_kernel", f"{src}.conv_dw.weight", _depthwise)
            put(f"{net}/{name}/pointwise_kernel", f"{src}.conv_pw.weight", _conv)
            put(f"{net}/{name}/bias", f"{src}.conv_pw.bias")
        for i in repeats:
            for lv in sorted({int(m.group(1)) for k in state if (m := re.match(rf"{net}\.bn_rep\.{i}\.(\d+)\.", k))}):
                bn(f"{net}/{short}-{i}-bn-{min_level + lv}", f"{net}.bn_rep.{i}.{lv}.bn")

    left = sorted(set(state) - used - {k for k in state if k.startswith("anchors.")})
    assert not left, f"effdet tensors not placed in the automl checkpoint: {left[:10]}"
    return out


def write_automl_checkpoint(variables: dict[str, np.ndarray], directory: str, ema_seed: int | None = 0) -> str:
    """Writes ``variables`` as automl's training checkpoint ``directory/model``: with ``ema_seed``, the values go
    to the ``/ExponentialMovingAverage`` shadows and the plain variables get random training values (so only a
    reader that prefers the shadows reproduces the model); plus ``global_step``. Returns the prefix."""
    import tensorflow as tf

    arrays: dict[str, np.ndarray] = {"global_step": np.asarray(350000, np.int64)}
    rng = np.random.RandomState(ema_seed or 0)
    for name, value in variables.items():
        if ema_seed is None:
            arrays[name] = value
        else:
            arrays[name + "/ExponentialMovingAverage"] = value
            arrays[name] = rng.normal(0.0, 1.0, value.shape).astype(np.float32)
    names = sorted(arrays)
    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "model")
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[tf.constant(arrays[n]) for n in names],
    )
    with open(os.path.join(directory, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "model"\nall_model_checkpoint_paths: "model"\n')
    return prefix
