"""Trainable parameters and FLOPs of a config's model (the seeds' ``get_flops``).

    python -m scaledet_jax.tools.profile --config=configs/spinenet49.py [--image_size=640]

FLOPs are multiply-adds (the papers' convention): XLA's cost analysis of the jit-compiled
inference forward (images -> raw class/box outputs, NMS excluded) divided by two. Nothing is
executed: parameters come from ``jax.eval_shape`` and FLOPs from the compiled HLO.
"""

from __future__ import annotations

import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


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


def inference_flops(model: nn.Module, variables: Any, image_size: int, batch_size: int = 1) -> float:
    """Multiply-adds of one inference forward at ``batch_size``, from XLA's cost analysis."""
    images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    cost = forward.lower(variables, images).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
        cost = cost[0]
    return float(cost["flops"]) / 2.0


def profile(config: ml_collections.ConfigDict, image_size: int | None = None) -> dict[str, Any]:
    """Parameters (total and per module) and multiply-adds of ``build_model(config.model)``."""
    from scaledet_jax.models import build_model

    image_size = image_size or config.model.image_size
    model = build_model(config.model)
    variables = abstract_variables(model, image_size)
    start = time.perf_counter()
    macs = inference_flops(model, variables, image_size)
    return {
        "image_size": image_size,
        "params": count_params(variables["params"]),
        "params_by_module": params_by_module(variables["params"]),
        "multiply_adds": macs,
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
    lines.append(f"  {'FLOPs (multiply-adds)':<{width}}{macs / 1e9:>15.2f}B   ({macs:,.0f})")
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
