"""Multilevel RoIAlign: ours (jit) vs torchvision's MultiScaleRoIAlign, forward and forward + backward.

    python benchmarks/roi_align.py [--batch_size=2] [--rois=512] [--image_size=512] [--channels=256]
        [--output_size=7] [--sampling_ratio=2] [--chunk_size=0] [--repeats=10]

The Faster R-CNN box-head load: P2..P5 of a square image, ``rois`` proposals per image whose sizes
(sqrt-area log-uniform in 16..2 * image_size, then clipped to the image) reach every level. Both run in this
process on the same inputs: our ``multilevel_roi_align`` compiled with ``jax.jit`` and torchvision's
``MultiScaleRoIAlign`` (its C++ kernels, default torch threads). Forward+backward is the output plus the
feature gradients of ``sum(out * cotangent)``. Prints median times after warm-up, the ratio ours /
torchvision (< 1 means we are faster) and XLA's memory analysis of our compiled functions.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from absl import app, flags  # noqa: E402
from timing import median_seconds  # noqa: E402

from scaledet_jax.ops.roi_align import assign_levels, multilevel_roi_align  # noqa: E402

flags.DEFINE_integer("batch_size", 2, "Images.")
flags.DEFINE_integer("rois", 512, "RoIs per image.")
flags.DEFINE_integer("image_size", 512, "Square input size; levels P2..P5 have stride 4..32.")
flags.DEFINE_integer("channels", 256, "Feature channels.")
flags.DEFINE_integer("output_size", 7, "Pooled size.")
flags.DEFINE_integer("sampling_ratio", 2, "Samples per bin side.")
flags.DEFINE_integer("chunk_size", 0, "RoIs per chunk for ours (0: the library default).")
flags.DEFINE_integer("repeats", 10, "Timed runs after warm-up; the median is reported.")
FLAGS = flags.FLAGS

LEVELS = (2, 3, 4, 5)


def make_inputs(rng: np.random.RandomState):
    """Features {level: [B, H, W, C]}, boxes [B, R, 4] (ymin, xmin, ymax, xmax) and a cotangent."""
    size, batch, rois, channels = FLAGS.image_size, FLAGS.batch_size, FLAGS.rois, FLAGS.channels
    features = {
        level: rng.normal(size=(batch, size >> level, size >> level, channels)).astype(np.float32) for level in LEVELS
    }
    scale = np.exp(rng.uniform(np.log(16.0), np.log(2.0 * size), (batch, rois, 1)))
    aspect = np.exp(rng.uniform(-0.7, 0.7, (batch, rois, 1)))
    half = np.concatenate([scale * aspect, scale / aspect], axis=-1) / 2
    centre = rng.uniform(0.0, size, (batch, rois, 2))
    boxes = np.clip(np.concatenate([centre - half, centre + half], axis=-1), 0.0, size).astype(np.float32)
    size_out = FLAGS.output_size
    cotangent = rng.normal(size=(batch, rois, size_out, size_out, channels)).astype(np.float32)
    return features, boxes, cotangent


def bench_ours(features, boxes, cotangent):
    """(forward s, forward+backward s, memory lines)."""
    chunk = FLAGS.chunk_size or None

    def pool(f, b):
        return multilevel_roi_align(f, b, FLAGS.output_size, FLAGS.sampling_ratio, chunk_size=chunk)

    def pool_and_grad(f, b, ct):
        out, vjp = jax.vjp(lambda f: pool(f, b), f)
        return out, vjp(ct)[0]

    f = {k: jnp.asarray(v) for k, v in features.items()}
    b, ct = jnp.asarray(boxes), jnp.asarray(cotangent)
    times, memory = [], []
    for name, fn, args in (("forward", pool, (f, b)), ("forward+backward", pool_and_grad, (f, b, ct))):
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(*args))
        times.append(median_seconds(lambda c=compiled, a=args: jax.block_until_ready(c(*a)), FLAGS.repeats))
        m = compiled.memory_analysis()
        mib = [v / 2**20 for v in (m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes)]
        memory.append(
            f"ours {name}: compile {compile_s:.1f} s; XLA buffers: arguments {mib[0]:.0f} MiB, "
            f"outputs {mib[1]:.0f} MiB, temporaries {mib[2]:.0f} MiB"
        )
    return times[0], times[1], memory


def bench_torchvision(features, boxes, cotangent):
    """(forward s, forward+backward s)."""
    names = [f"p{level}" for level in LEVELS]
    feats = OrderedDict(
        (name, torch.from_numpy(np.ascontiguousarray(features[level].transpose(0, 3, 1, 2))).requires_grad_())
        for name, level in zip(names, LEVELS, strict=True)
    )
    torch_boxes = [torch.from_numpy(b[:, [1, 0, 3, 2]]) for b in boxes]
    shapes = [(FLAGS.image_size, FLAGS.image_size)] * FLAGS.batch_size
    pooler = torchvision.ops.MultiScaleRoIAlign(names, FLAGS.output_size, FLAGS.sampling_ratio)
    ct = torch.from_numpy(cotangent.reshape(-1, *cotangent.shape[2:])).permute(0, 3, 1, 2)

    def forward():
        with torch.no_grad():
            return pooler(feats, torch_boxes, shapes)

    def forward_backward():
        out = pooler(feats, torch_boxes, shapes)
        return out, torch.autograd.grad((out * ct).sum(), list(feats.values()))

    forward(), forward_backward()  # warm-up
    return median_seconds(forward, FLAGS.repeats), median_seconds(forward_backward, FLAGS.repeats)


def main(argv):
    del argv
    features, boxes, cotangent = make_inputs(np.random.RandomState(0))
    levels = np.asarray(assign_levels(jnp.asarray(boxes), LEVELS[0], LEVELS[-1]))
    per_level = ", ".join(f"P{level} {(levels == level).sum()}" for level in LEVELS)
    rss_inputs = _peak_rss_mib()
    ours_fwd, ours_fb, memory = bench_ours(features, boxes, cotangent)
    rss_ours = _peak_rss_mib()
    tv_fwd, tv_fb = bench_torchvision(features, boxes, cotangent)

    print(
        f"\nMultilevel RoIAlign, {FLAGS.batch_size} x {FLAGS.rois} RoIs ({per_level}), P2-P5 of "
        f"{FLAGS.image_size}x{FLAGS.image_size}, C={FLAGS.channels}, output {FLAGS.output_size}, sampling "
        f"{FLAGS.sampling_ratio}; {jax.devices()[0].platform} ({os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}), median of {FLAGS.repeats}"
    )
    header = f"{'pass':<18}{'ours s':>10}{'torchvision s':>15}{'ours/tv':>10}"
    print(header)
    print("-" * len(header))
    for name, ours, reference in (("forward", ours_fwd, tv_fwd), ("forward+backward", ours_fb, tv_fb)):
        print(f"{name:<18}{ours:>10.3f}{reference:>15.3f}{ours / reference:>10.2f}")
    print()
    for line in memory:
        print(line)
    print(
        f"process peak RSS: {rss_inputs:.0f} MiB with imports and inputs, {rss_ours:.0f} MiB after ours, "
        f"{_peak_rss_mib():.0f} MiB after torchvision too"
    )


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


if __name__ == "__main__":
    app.run(main)
