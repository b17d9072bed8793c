"""Train-step throughput and compile time, and input-pipeline throughput.

    python benchmarks/train_throughput.py [--steps=10] [--configs=quickstart,efficientdet_quickstart,spinenet49@640:2]

Rows (``--configs``): the quickstart models (their own batch and size) and SpineNet-49 RetinaNet at 640, batch 2, on
random images with random boxes (the full step: forward, anchor labeling, losses, backward, SGD,
BN statistics); then the synthetic-data tf.data pipeline with the quickstart's training
augmentation. Runs on whatever JAX's default backend is (CPU here).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from timing import compiled_train_step, random_batch  # noqa: E402

flags.DEFINE_integer("steps", 10, "Timed train steps per model after the compile.")
flags.DEFINE_list(
    "configs",
    ["quickstart", "efficientdet_quickstart", "spinenet49@640:2"],
    "Rows: config names, optionally @size:batch (default: the config's own).",
)
flags.DEFINE_integer("pipeline_batches", 30, "Timed input batches.")
FLAGS = flags.FLAGS


def bench_train_step(config) -> tuple[float, float]:
    """(compile seconds, images per second)."""
    batch = random_batch(
        config.data.train_batch_size, config.model.image_size, config.data.max_instances, np.random.RandomState(0)
    )
    compile_s, state, compiled = compiled_train_step(config, batch)
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    return compile_s, FLAGS.steps * config.data.train_batch_size / (time.perf_counter() - start)


def bench_pipeline(config) -> float:
    from scaledet_jax.data import pipeline

    with tempfile.TemporaryDirectory() as workdir:
        builder = pipeline.get_builder(config, workdir)
        batches = pipeline.train_batches(config, builder)
        next(batches)
        start = time.perf_counter()
        for _ in range(FLAGS.pipeline_batches):
            next(batches)
        return FLAGS.pipeline_batches * config.data.train_batch_size / (time.perf_counter() - start)


def main(argv):
    del argv
    from configs_util import load_config

    quick = load_config("quickstart")
    rows = []
    for spec in FLAGS.configs:
        name, _, override = spec.partition("@")
        config = load_config(name)
        if override:
            size, _, batch = override.partition(":")
            config.model.image_size = int(size)
            if batch:
                config.data.train_batch_size = int(batch)
        compile_s, ips = bench_train_step(config)
        rows.append((name, config.model.image_size, config.data.train_batch_size, compile_s, ips))
    pipeline_ips = bench_pipeline(quick)
    print(f"\nTrain step on {jax.devices()[0].platform} ({os.cpu_count()} cores), {FLAGS.steps} steps after compile")
    header = f"{'model':<26}{'input':>7}{'batch':>7}{'compile s':>11}{'images/s':>10}"
    print(header)
    print("-" * len(header))
    for name, size, batch, compile_s, ips in rows:
        print(f"{name:<26}{size:>7}{batch:>7}{compile_s:>11.1f}{ips:>10.2f}")
    print(
        f"\nInput pipeline (synthetic data, quickstart augmentation, batch {quick.data.train_batch_size}): "
        f"{pipeline_ips:.0f} images/s"
    )


if __name__ == "__main__":
    app.run(main)
