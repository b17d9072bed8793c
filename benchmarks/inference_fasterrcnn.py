"""Inference latency of Faster R-CNN ResNet-50-FPN, image to final detections: ours vs torchvision.

    python benchmarks/inference_fasterrcnn.py [--size=640] [--batch_size=1] [--repeats=5] [--threads=0]

Both run in this process on the same machine, same input and random weights: our jit-compiled
``FasterRCNNTask.predict`` (backbone, FPN, RPN, proposals with NMS, RoIAlign, box head, per-class
NMS: fixed shapes, so the same work whatever the scores) and torchvision's
``fasterrcnn_resnet50_fpn`` in eval mode under ``torch.no_grad`` (its transform set so the resize
is the identity at ``--size``). Both keep 1000 proposals per image. torchvision's last stage only
sees boxes over its 0.05 score threshold, which random weights rarely give, so its time is a lower
bound of a trained model's. Prints our compile time, median latencies and ours / torchvision.
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402,I001  (torch before anything that may import TensorFlow)
import torchvision  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from scaledet_jax.tasks import build_task  # noqa: E402
from timing import median_seconds  # noqa: E402

flags.DEFINE_integer("size", 640, "Square input size (multiple of 64).")
flags.DEFINE_integer("batch_size", 1, "Images per call.")
flags.DEFINE_integer("repeats", 5, "Timed runs after warm-up; the median is reported.")
flags.DEFINE_integer("threads", 0, "torch intra-op threads (0 = torch's default).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from configs_util import load_config

    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    size, batch = FLAGS.size, FLAGS.batch_size
    images = np.random.RandomState(0).uniform(0, 1, (batch, size, size, 3)).astype(np.float32)

    config = load_config("fasterrcnn_resnet50_fpn")
    config.model.image_size = size
    task = build_task(config)
    variables = jax.jit(lambda: task.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, size))()
    x = jnp.asarray((images * 255 - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375]))
    x = x.astype(jnp.float32)
    start = time.perf_counter()
    compiled = jax.jit(task.predict).lower(variables, x).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(variables, x))
    ours = median_seconds(lambda: jax.block_until_ready(compiled(variables, x)), FLAGS.repeats)

    reference = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=size, max_size=size
    ).eval()
    t = list(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    with torch.no_grad():
        reference(t)
        theirs = median_seconds(lambda: reference(t), FLAGS.repeats)

    print(
        f"\nFaster R-CNN R50-FPN inference (image -> detections), batch {batch}, {jax.devices()[0].platform} "
        f"({os.cpu_count()} cores, torch threads {torch.get_num_threads()}), median of {FLAGS.repeats}"
    )
    header = f"{'size':>6}{'ours compile s':>16}{'ours s':>10}{'torchvision s':>15}{'ours/torchvision':>18}"
    print(header)
    print("-" * len(header))
    print(f"{size:>6}{compile_s:>16.1f}{ours:>10.3f}{theirs:>15.3f}{ours / theirs:>18.2f}")


if __name__ == "__main__":
    app.run(main)
