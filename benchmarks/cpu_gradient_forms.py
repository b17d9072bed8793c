"""Our CPU gradient forms against XLA's own gradients, in one process, alternating (issue 17 item 1).

    python benchmarks/cpu_gradient_forms.py [--rows=efficientdet_d0@512,spinenet49@640] [--rounds=5]

Per row, the full train step (batch 2, random data) is compiled twice: with the project's CPU gradient forms
(the depthwise conv's own VJP; filter gradients as dots for wide stride-1 and stride-2 3x3 convs) and with
XLA differentiating the same forward itself. Both start from the same state and batch; their first-step loss
and gradient norm are printed (they must agree), then one step of each per round, alternating, median.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from timing import compiled_train_step, config_for_row, random_batch  # noqa: E402

from scaledet_jax import nn as snn  # noqa: E402

flags.DEFINE_list("rows", ["efficientdet_d0@512", "spinenet49@640"], "config@size rows (configs/ names).")
flags.DEFINE_integer("rounds", 5, "Alternating rounds (one step of each per round).")
FLAGS = flags.FLAGS


def _xla_gradients(enabled: bool) -> None:
    """Trace with XLA's own gradients (True) or ours (False). The forms are chosen at trace time, so switching
    these module attributes between compilations is enough; forwards are identical either way."""
    snn._depthwise_shifted = snn._depthwise_shifted_forward if enabled else _OURS["depthwise"]
    snn.FLAT_MIN_OUTPUT_CHANNELS = 10**9 if enabled else _OURS["flat"]
    snn.IM2COL_MIN_INPUT_CHANNELS = 10**9 if enabled else _OURS["im2col"]


_OURS = {
    "depthwise": snn._depthwise_shifted,
    "flat": snn.FLAT_MIN_OUTPUT_CHANNELS,
    "im2col": snn.IM2COL_MIN_INPUT_CHANNELS,
}


def measure(spec: str) -> dict[str, tuple[float, float, float, float]]:
    """{'ours' | 'XLA': (compile s, median step s, first loss, first grad norm)}."""
    size = config_for_row(spec).model.image_size
    batch = random_batch(2, size, 100, np.random.RandomState(0))
    runs = {}
    for name, xla in (("ours", False), ("XLA", True)):
        _xla_gradients(xla)
        config = config_for_row(spec)
        config.data.train_batch_size = 2
        compile_s, state, step = compiled_train_step(config, batch)
        state, metrics = step(state, batch)
        runs[name] = [step, state, compile_s, float(metrics["total_loss"]), float(metrics["grad_norm"]), []]
    _xla_gradients(False)
    for _ in range(FLAGS.rounds):
        for run in runs.values():
            start = time.perf_counter()
            run[1], metrics = run[0](run[1], batch)
            jax.block_until_ready(metrics)
            run[5].append(time.perf_counter() - start)
    return {name: (r[2], statistics.median(r[5]), r[3], r[4]) for name, r in runs.items()}


def main(argv):
    del argv
    print(f"{jax.devices()[0].platform} ({os.cpu_count()} cores), train step batch 2, median of {FLAGS.rounds} rounds")
    header = f"{'row':<22}{'gradients':<11}{'compile s':>10}{'step s':>9}{'first loss':>12}{'grad norm':>11}"
    print(header + f"{'ours/XLA':>10}")
    print("-" * (len(header) + 10))
    for spec in FLAGS.rows:
        result = measure(spec)
        for name, (compile_s, step_s, loss, norm) in result.items():
            ratio = f"{step_s / result['XLA'][1]:>10.2f}" if name == "ours" else ""
            print(f"{spec:<22}{name:<11}{compile_s:>10.1f}{step_s:>9.3f}{loss:>12.5f}{norm:>11.5f}{ratio}", flush=True)


if __name__ == "__main__":
    app.run(main)
