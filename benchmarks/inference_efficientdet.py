"""Inference latency of EfficientDet (raw class/box outputs, no NMS): ours vs effdet (PyTorch).

    python benchmarks/inference_efficientdet.py [--variants=d0] [--batch_size=1] [--repeats=10]
        [--threads=0]

Both run in this process on the same machine, same input and random weights, each at the
variant's native size: our jit-compiled Flax forward, and effdet's ``tf_efficientdet_dN`` (eval
mode, ``torch.no_grad``). Prints our compile time, median latencies and the ratio ours / effdet
(< 1 means we are faster).
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402,I001  (torch before anything that may import TensorFlow)
import effdet  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from scaledet_jax.models import build_model  # noqa: E402
from timing import median_seconds  # noqa: E402

flags.DEFINE_list("variants", ["d0"], "EfficientDet variants (d0..d7x).")
flags.DEFINE_integer("batch_size", 1, "Images per forward.")
flags.DEFINE_integer("repeats", 10, "Timed runs after warm-up; the median is reported.")
flags.DEFINE_integer("threads", 0, "torch intra-op threads (0 = torch's default).")
FLAGS = flags.FLAGS


def bench_one(variant: str, batch: int) -> tuple[int, float, float, float]:
    """(size, our compile s, our median s, effdet median s)."""
    from configs_util import load_config

    config = load_config(f"efficientdet_{variant}")
    size = config.model.image_size
    images = np.random.RandomState(0).normal(size=(batch, size, size, 3)).astype(np.float32)
    model = build_model(config.model)
    x = jnp.asarray(images)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(x[:1])
    start = time.perf_counter()
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(variables, x))
    ours = median_seconds(lambda: jax.block_until_ready(compiled(variables, x)), FLAGS.repeats)

    reference = effdet.create_model(f"tf_efficientdet_{variant}", pretrained=False, pretrained_backbone=False).eval()
    t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        reference(t)
        theirs = median_seconds(lambda: reference(t), FLAGS.repeats)
    return size, compile_s, ours, theirs


def main(argv):
    del argv
    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    rows = [(v, *bench_one(v, FLAGS.batch_size)) for v in FLAGS.variants]
    print(
        f"\nEfficientDet inference, batch {FLAGS.batch_size}, {jax.devices()[0].platform} ({os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}), median of {FLAGS.repeats}"
    )
    header = f"{'model':<8}{'size':>6}{'ours compile s':>16}{'ours s':>10}{'effdet s':>10}{'ours/effdet':>13}"
    print(header)
    print("-" * len(header))
    for variant, size, compile_s, ours, theirs in rows:
        print(f"{variant:<8}{size:>6}{compile_s:>16.1f}{ours:>10.3f}{theirs:>10.3f}{ours / theirs:>13.2f}")


if __name__ == "__main__":
    app.run(main)
