"""Where a train step's and an inference forward's time goes on this machine, by kind of XLA op.

    python benchmarks/step_profile.py [--rows=spinenet49@640,efficientdet_d0@512] [--repeats=3]

For each row: the full train step (batch 2, as ``flop_efficiency.py``) and the raw inference forward (batch 1)
are compiled, timed, then run twice under ``jax.profiler`` with a Perfetto trace. Every traced XLA op is
classified from the compiled HLO (the trace names ops by their HLO instruction names):

* ``conv, filter gradient``: a convolution whose output is a filter ([in, k, k, out]): the weight gradient of a
  kxk conv, computed by XLA as a convolution over the batch and spatial axes;
* ``conv, forward / input gradient``: every other convolution (forwards, and input gradients, which XLA
  computes as convolutions with the flipped kernel);
* ``dot``: matrix products (our CPU form of 1x1 convolutions, forward and both gradients; dense layers);
* ``transpose fused into element-wise``: loop fusions that write a transposed layout (XLA feeding a
  gradient contraction): the element-wise work before it (batch-norm backward, loss gradient) writes strided;
* ``element-wise / reductions``: the other fusions (batch norm, activations, losses, optimizer update);
* ``other``: anything else (copies, pooling, gathers, sorts).

Op times are summed per class; the sum exceeds the wall time because XLA's CPU runtime runs independent ops
concurrently, so shares are of the summed op time. ``BN as bias only`` is an upper bound on what folding batch
norm into the preceding convolution could save at inference: the same forward with every batch norm replaced
by adding its bias (no normalisation at all), timed alternating with the real forward.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from timing import batch2_train_step, config_for_row, median_seconds  # noqa: E402

flags.DEFINE_list("rows", ["spinenet49@640", "efficientdet_d0@512"], "config@size rows (configs/ names).")
flags.DEFINE_integer("repeats", 3, "Timed runs (median) per measurement after a warm-up run.")
FLAGS = flags.FLAGS

CLASSES = (
    "conv, forward / input gradient",
    "conv, filter gradient",
    "dot",
    "transpose fused into element-wise",
    "element-wise / reductions",
    "other",
)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_FILTER_SHAPE = re.compile(r"^f32\[\d+,(\d+),(\d+),\d+\]")


def _computations(hlo: str) -> dict[str, list[str]]:
    """HLO computation name -> its instruction lines."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and " = " not in line.split("(")[0]:
            current = bodies.setdefault(header.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    return bodies


def classify_ops(hlo: str) -> dict[str, str]:
    """HLO instruction name -> one of ``CLASSES``, for every instruction of the compiled module."""
    bodies = _computations(hlo)

    def ops_inside(name: str, seen: set[str]) -> list[tuple[str, str, str]]:
        found = []
        for line in bodies.get(name, []):
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            found.append((match.group(3), match.group(2), match.group(4)))
            called = _CALLS.search(line)
            if called and called.group(1) not in seen:
                seen.add(called.group(1))
                found += ops_inside(called.group(1), seen)
        return found

    classes = {}
    for lines in bodies.values():
        for line in lines:
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            name, shape, opcode, rest = match.groups()
            called = _CALLS.search(rest)
            inner = ops_inside(called.group(1), set()) if called else []
            inner = inner + [(opcode, shape, rest)]
            inner_ops = {op for op, _, _ in inner}
            if "convolution" in inner_ops:
                filter_gradient = any(_is_filter_gradient(s, r) for op, s, r in inner if op == "convolution")
                classes[name] = CLASSES[1] if filter_gradient else CLASSES[0]
            elif "dot" in inner_ops:
                classes[name] = CLASSES[2]
            elif opcode == "fusion" and inner_ops & {"transpose", "copy"}:
                classes[name] = CLASSES[3]
            elif opcode == "fusion":
                classes[name] = CLASSES[4]
            else:
                classes[name] = CLASSES[5]
    return classes


def _is_filter_gradient(shape: str, rest: str) -> bool:
    """A convolution that outputs a [in, k, k, out] filter from a window larger than k x k (the image): XLA's form
    of a kxk conv's weight gradient. A forward's window is its kernel, smaller than or equal to its output image."""
    output = _FILTER_SHAPE.match(shape)
    window = re.search(r"window=\{size=(\d+)x(\d+)", rest)
    if not output or not window:
        return False
    return int(window.group(1)) > int(output.group(1)) and int(window.group(2)) > int(output.group(2))


def profile(fn, runs: int = 2) -> collections.Counter:
    """Summed duration (ms per run) of each traced event name over ``runs`` calls of ``fn``."""
    with tempfile.TemporaryDirectory(prefix="step_profile_") as directory:  # traces are large: not kept
        jax.profiler.start_trace(directory, create_perfetto_trace=True)
        for _ in range(runs):
            fn()
        jax.profiler.stop_trace()
        path = sorted(glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True))[-1]
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") == "X":
            totals[event["name"]] += event.get("dur", 0) / 1e3 / runs
    return totals


def breakdown(compiled, fn) -> tuple[dict[str, float], float]:
    """({class: ms per call}, wall ms per call) of a compiled computation run by ``fn``."""
    classes = classify_ops(compiled.as_text())
    wall_ms = median_seconds(fn, FLAGS.repeats) * 1e3  # before tracing, which may leave hooks behind
    totals = profile(fn)
    per_class = dict.fromkeys(CLASSES, 0.0)
    for name, ms in totals.items():
        if name in classes:
            per_class[classes[name]] += ms
    return per_class, wall_ms


def _bias_only(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
        return args[0] + context.module.get_variable("params", "bias")
    return next_fun(*args, **kwargs)


def inference(config):
    """(breakdown of the batch-1 forward, (ms with batch norm, ms with batch norm as a bias only))."""
    from scaledet_jax.models import build_model

    model = build_model(config.model)
    size = config.model.image_size
    x = jnp.asarray(np.random.RandomState(0).normal(size=(1, size, size, 3)), jnp.float32)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(x)

    def forward(v, x):
        return model.apply(v, x, train=False)

    def forward_bias_only(v, x):
        with nn.intercept_methods(_bias_only):
            return model.apply(v, x, train=False)

    compiled = jax.jit(forward).lower(variables, x).compile()
    bias_only = jax.jit(forward_bias_only).lower(variables, x).compile()
    real_call = lambda: jax.block_until_ready(compiled(variables, x))  # noqa: E731
    bias_call = lambda: jax.block_until_ready(bias_only(variables, x))  # noqa: E731
    real_call(), bias_call()
    real, bias = [], []
    for _ in range(2 * FLAGS.repeats + 1):  # alternating, so both see the same machine
        real.append(median_seconds(real_call, 1))
        bias.append(median_seconds(bias_call, 1))
    return breakdown(compiled, real_call), (statistics.median(real) * 1e3, statistics.median(bias) * 1e3)


def training(config):
    """Breakdown of the batch-2 train step."""
    return breakdown(*batch2_train_step(config))


def _table(title: str, per_class: dict[str, float], wall_ms: float) -> None:
    total = sum(per_class.values())
    print(f"  {title}: wall {wall_ms:.0f} ms, summed op time {total:.0f} ms")
    for name in CLASSES:
        print(f"    {name:<36}{per_class[name]:>9.0f} ms{100 * per_class[name] / max(total, 1e-9):>6.0f}%")


def main(argv):
    del argv
    print(f"{jax.devices()[0].platform} ({os.cpu_count()} cores)", flush=True)
    for spec in FLAGS.rows:
        name = spec.partition("@")[0]
        config = config_for_row(spec)
        start = time.perf_counter()
        (inf_classes, inf_wall), (with_bn, bias_only) = inference(config)
        train_classes, train_wall = training(config)
        print(f"\n{name} @{config.model.image_size} (measured in {time.perf_counter() - start:.0f} s)")
        _table("inference forward, batch 1", inf_classes, inf_wall)
        _table("train step, batch 2", train_classes, train_wall)
        print(f"  train step / (2 x inference forward): {train_wall / (2 * inf_wall):.2f}")
        print(
            f"  BN as bias only (folding's upper bound): {bias_only:.0f} ms vs {with_bn:.0f} ms with BN "
            f"(ratio {bias_only / with_bn:.3f})"
        )


if __name__ == "__main__":
    app.run(main)
