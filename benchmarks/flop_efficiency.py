"""Achieved FLOP rate of inference and training steps beside the machine's matmul peak.

    python benchmarks/flop_efficiency.py [--rows=efficientdet_d0@512,spinenet49s@640,spinenet49@640] [--repeats=3]

* Peak: a jit-compiled 4096 x 4096 float32 matmul (2 * 4096^3 FLOPs), median of 5 runs: the rate XLA's CPU
  backend reaches on the most favourable op.
* Inference: the raw forward (class / box outputs, no NMS), batch 1. Training: the full train step
  (forward, anchor labeling, losses, backward, optimizer update), batch 2.
* FLOPs are XLA's own count of each compiled computation (``cost_analysis()['flops']``: 2 per multiply-add
  plus element-wise work), so the rate is FLOPs / median wall time.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from timing import batch2_train_step, config_for_row, median_seconds  # noqa: E402

flags.DEFINE_list(
    "rows", ["efficientdet_d0@512", "spinenet49s@640", "spinenet49@640"], "config@size rows (configs/ names)."
)
flags.DEFINE_integer("repeats", 3, "Timed runs (median) per measurement after a warm-up run.")
FLAGS = flags.FLAGS


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def matmul_peak() -> float:
    """GFLOP/s of a 4096^2 float32 matmul."""
    a = jnp.asarray(np.random.RandomState(0).normal(size=(4096, 4096)), jnp.float32)
    f = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
    jax.block_until_ready(f(a, a))
    return 2 * 4096**3 / median_seconds(lambda: jax.block_until_ready(f(a, a)), 5) / 1e9


def inference(config) -> tuple[float, float]:
    """(GFLOPs, median seconds) of the batch-1 forward."""
    from scaledet_jax.models import build_model

    model = build_model(config.model)
    size = config.model.image_size
    x = jnp.asarray(np.random.RandomState(0).normal(size=(1, size, size, 3)), jnp.float32)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(x)
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    jax.block_until_ready(compiled(variables, x))
    return _flops(compiled) / 1e9, median_seconds(lambda: jax.block_until_ready(compiled(variables, x)), FLAGS.repeats)


def training(config) -> tuple[float, float]:
    """(GFLOPs, median seconds) of one batch-2 train step."""
    step, run = batch2_train_step(config)
    return _flops(step) / 1e9, median_seconds(run, FLAGS.repeats)


def main(argv):
    del argv
    peak = matmul_peak()
    print(f"matmul peak (4096^2 float32, jit): {peak:.0f} GFLOP/s", flush=True)
    rows = []
    for spec in FLAGS.rows:
        name = spec.partition("@")[0]
        config = config_for_row(spec)
        start = time.perf_counter()
        inf = inference(config)
        tr = training(config)
        rows.append((name, config.model.image_size, inf, tr))
        print(f"  {name} @{config.model.image_size}: measured in {time.perf_counter() - start:.0f} s", flush=True)

    print(f"\nXLA FLOPs / median time on {jax.devices()[0].platform} ({os.cpu_count()} cores); peak {peak:.0f} GFLOP/s")
    header = (
        f"{'model':<20}{'input':>6}{'infer GFLOP':>12}{'s':>8}{'GFLOP/s':>9}{'% peak':>8}"
        f"{'train GFLOP':>13}{'s/step':>8}{'GFLOP/s':>9}{'% peak':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, size, (inf_gf, inf_s), (tr_gf, tr_s) in rows:
        print(
            f"{name:<20}{size:>6}{inf_gf:>12.1f}{inf_s:>8.3f}{inf_gf / inf_s:>9.1f}{100 * inf_gf / inf_s / peak:>7.0f}%"
            f"{tr_gf:>13.1f}{tr_s:>8.2f}{tr_gf / tr_s:>9.1f}{100 * tr_gf / tr_s / peak:>7.0f}%"
        )


if __name__ == "__main__":
    app.run(main)
