"""Trainable parameters and FLOPs of a config's model (the seeds' ``get_flops``).

    python -m scaledet_jax.tools.profile --config=configs/spinenet49.py [--image_size=640]

FLOPs are multiply-adds of the inference forward (images -> raw class/box outputs, NMS excluded),
counted two ways; nothing is executed (parameters come from ``jax.eval_shape``):

* **TF-profiler convention** (the headline, what the papers and automl/Model Garden report):
  ``tf.profiler``'s float-op rules applied to our jaxpr, halved — convolutions and matmuls
  2 * MACs, element-wise add/sub/mul/div/max/min one op per output element, max pooling one per
  window element, reductions one per input element; batch norm counts nothing (TF runs it as a
  fused, unregistered op) and neither do sigmoid, relu, reshapes or resizes.
* **XLA**: the compiled HLO's cost analysis, halved (counts batch norm and transcendentals too).

Two-stage detectors count the RPN, proposal generation and the box head on every proposal; Mask R-CNN
adds its mask head on ``MASK_ROIS`` (100, the detections per image) RoIs, as mmdetection's
``get_flops`` (``forward_dummy``) counts the seeds' Mask R-CNN.
"""

from __future__ import annotations

import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scaledet_jax import nn as snn


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


def abstract_variables(model: nn.Module, image_size: int, batch_size: int = 1) -> Any:
    """The model's variables as ShapeDtypeStructs (nothing is allocated or run)."""
    images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return jax.eval_shape(lambda x: model.init(rngs, x, train=False), images)


def params_by_module(params: Any) -> dict[str, int]:
    """Trainable parameters per top-level module (backbone, decoder, head)."""
    return {name: count_params(sub) for name, sub in params.items()}


MASK_ROIS = 100


def _forward(module: nn.Module, images: jax.Array) -> Any:
    """The counted inference forward: the model's own, plus Mask R-CNN's mask head on ``MASK_ROIS`` RoIs."""
    outputs = module(images, train=False)
    if getattr(module, "mask_head", None) is not None:
        outputs["mask_logits"] = module.mask_outputs(outputs["features"], outputs["rois"][:, :MASK_ROIS])
    return outputs


def inference_flops(model: nn.Module, variables: Any, image_size: int, batch_size: int = 1) -> float:
    """Multiply-adds of one inference forward at ``batch_size``, from XLA's cost analysis."""
    images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
    forward = jax.jit(lambda v, x: model.apply(v, x, method=_forward))
    cost = forward.lower(variables, images).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
        cost = cost[0]
    return float(cost["flops"]) / 2.0


_ELEMENTWISE = {"add", "add_any", "sub", "mul", "div", "max", "min"}


def _sub_jaxprs(eqn) -> list[Any]:
    subs = []
    for value in eqn.params.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            inner = getattr(item, "jaxpr", item)
            if hasattr(inner, "eqns"):
                subs.append(inner)
    return subs


def tf_convention_flops(model: nn.Module, variables: Any, image_size: int, batch_size: int = 1) -> float:
    """Multiply-adds of one inference forward counted with TF profiler's rules (see module doc)."""
    images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, method=_forward))(variables, images)
    # Batch-norm modules are the ones holding batch statistics; their ops are TF's fused BN.
    bn_scopes = {"/".join(path[:-1]) for path in _paths(variables.get("batch_stats", {}))}

    def in_bn(eqn) -> bool:
        stack = str(eqn.source_info.name_stack).split("/", 1)  # drop the top module's class name
        return len(stack) == 2 and any(stack[1] == s or stack[1].startswith(s + "/") for s in bn_scopes)

    def count(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            subs = _sub_jaxprs(eqn)
            if subs:
                total += sum(count(sub) for sub in subs[:1])
                continue
            name = eqn.primitive.name
            out = eqn.outvars[0].aval
            out_size = float(np.prod(out.shape))
            if name == "conv_general_dilated":
                kernel = eqn.invars[1].aval.shape  # HWIO, I = input channels per group
                total += 2.0 * out_size * float(np.prod(kernel[:-1]))
            elif name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2.0 * out_size * float(np.prod([lhs[d] for d in contract]))
            elif in_bn(eqn):
                continue
            elif name in _ELEMENTWISE:
                total += out_size
            elif name == "reduce_window_max":
                total += out_size * float(np.prod(eqn.params["window_dimensions"]))
            elif name in ("reduce_sum", "reduce_max"):
                total += float(np.prod(eqn.invars[0].aval.shape)) - out_size
        return total

    return count(closed.jaxpr) / 2.0


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return [p for k, v in tree.items() for p in _paths(v, prefix + (k,))]
    return [prefix]


def profile(config: ml_collections.ConfigDict, image_size: int | None = None) -> dict[str, Any]:
    """Parameters (total and per module) and multiply-adds of ``build_model(config.model)``."""
    from scaledet_jax.models import build_model

    image_size = image_size or config.model.image_size
    model = build_model(config.model)
    variables = abstract_variables(model, image_size)
    start = time.perf_counter()
    with snn.depthwise_impl("conv"):  # count depthwise convs as convolutions, whatever runs on this backend
        macs = tf_convention_flops(model, variables, image_size)
        xla_macs = inference_flops(model, variables, image_size)
    return {
        "image_size": image_size,
        "params": count_params(variables["params"]),
        "params_by_module": params_by_module(variables["params"]),
        "multiply_adds": macs,
        "xla_multiply_adds": xla_macs,
        "analysis_seconds": time.perf_counter() - start,
    }


def format_table(name: str, result: dict[str, Any]) -> str:
    rows = [("module", "trainable params")]
    rows += [(k, f"{v:,}") for k, v in result["params_by_module"].items()]
    rows.append(("total", f"{result['params']:,}"))
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{name} @ {result['image_size']}x{result['image_size']}"]
    lines += [f"  {a:<{width}}{b:>16}" for a, b in rows]
    macs = result["multiply_adds"]
    xla = result["xla_multiply_adds"]
    lines.append("  FLOPs (multiply-adds)")
    lines.append(f"    {'TF profiler rules':<20}{macs / 1e9:>10.2f}B   ({macs:,.0f})")
    lines.append(f"    {'XLA cost analysis':<20}{xla / 1e9:>10.2f}B   ({xla:,.0f})")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from absl import flags

    from scaledet_jax.cli import UserError, config_from_flags

    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}")
    config = config_from_flags()
    result = profile(config, flags.FLAGS.image_size)
    print(format_table(flags.FLAGS["config"].config_filename, result))


def run() -> None:
    from absl import flags

    from scaledet_jax.cli import define_config_flag, run_app

    define_config_flag()
    flags.DEFINE_integer("image_size", None, "Square input size; default: the config's model.image_size.")
    run_app(main, "profile")


if __name__ == "__main__":
    run()
