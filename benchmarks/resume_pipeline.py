"""Time to the first training batch: starting fresh vs resuming late in a run (issue 13 item 3).

    python benchmarks/resume_pipeline.py [--resume_step=100000] [--old_skip_step=10] [--repeats=3]

The COCO recipe's pipeline shape (``defaults.get_config()``: global batch 256, 640x640, its augmentation) on
the synthetic data (a COCO folder prepared as TFRecord, as ``tfds build`` writes COCO), as one process sees it
(per-host batch = global batch). Rows: the index-based pipeline (``pipeline.train_batches``) at step 0 and at
``--resume_step``; the old streaming pipeline (shuffle buffer, ``.skip(start_step)``, still the fallback for
data without random access) at step 0 and at ``--old_skip_step``, and its time at ``--resume_step``
extrapolated linearly from those two (labelled as projected). Each time is the median of ``--repeats`` runs,
building the pipeline (the TFRecord header scan included) and taking its first batch.
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from absl import app, flags  # noqa: E402
from timing import median_seconds  # noqa: E402

from scaledet_jax import defaults  # noqa: E402
from scaledet_jax.data import pipeline  # noqa: E402

flags.DEFINE_integer("resume_step", 100_000, "The late step a run resumes at.")
flags.DEFINE_integer("old_skip_step", 10, "The step at which the old .skip pipeline is measured (then extrapolated).")
flags.DEFINE_integer("images", 1000, "Synthetic training images.")
flags.DEFINE_integer("repeats", 3, "Runs per row (median).")
flags.DEFINE_integer("steady_batches", 4, "Batches timed once running (median seconds per batch).")
FLAGS = flags.FLAGS


def first_batch_seconds(config, builder, start_step: int, repeats: int) -> float:
    def first():
        next(pipeline.train_batches(config, builder, start_step=start_step))

    return median_seconds(first, repeats)


def steady_seconds(config, builder, batches: int) -> float:
    """Seconds per batch once running (throughput: the index-based reads must not slow training down)."""
    stream = pipeline.train_batches(config, builder)
    next(stream)
    return median_seconds(lambda: next(stream), batches)


def main(argv):
    del argv
    config = defaults.get_config()
    config.data.source = "synthetic"
    config.data.synthetic_train_images = FLAGS.images
    config.data.synthetic_val_images = 4
    config.model.num_classes = 4  # the synthetic categories 1..3 (the pipeline does not depend on it)
    batch, size = config.data.train_batch_size, config.model.image_size
    with tempfile.TemporaryDirectory() as workdir:
        builder = pipeline.get_builder(config, workdir)
        first_batch_seconds(config, builder, 0, 1)  # warm-up: TensorFlow's start-up, file cache
        new_fresh = first_batch_seconds(config, builder, 0, FLAGS.repeats)
        new_resume = first_batch_seconds(config, builder, FLAGS.resume_step, FLAGS.repeats)
        new_steady = steady_seconds(config, builder, FLAGS.steady_batches)
        index_source = pipeline.random_access_source
        pipeline.random_access_source = lambda builder, split: (None, "benchmark: the old pipeline")
        try:
            old_fresh = first_batch_seconds(config, builder, 0, FLAGS.repeats)
            old_skip = first_batch_seconds(config, builder, FLAGS.old_skip_step, FLAGS.repeats)
            old_steady = steady_seconds(config, builder, FLAGS.steady_batches)
        finally:
            pipeline.random_access_source = index_source
    projected = old_fresh + (old_skip - old_fresh) * FLAGS.resume_step / FLAGS.old_skip_step
    examples = FLAGS.resume_step * batch
    print(f"\nTime to the first batch: batch {batch} (one process), {size}x{size}, {FLAGS.images} synthetic images")
    print(f"(resume at step {FLAGS.resume_step:,} = {examples:,} examples = epoch {examples // FLAGS.images:,})\n")
    print(f"| {'pipeline':<38} | {'start step':>10} | {'first batch (s)':>15} | {'vs fresh':>8} |")
    print(f"|{'-' * 40}|{'-' * 11}:|{'-' * 16}:|{'-' * 9}:|")
    rows = [
        ("index-based (new)", 0, new_fresh, new_fresh),
        ("index-based (new)", FLAGS.resume_step, new_resume, new_fresh),
        ("streaming + .skip (old), measured", 0, old_fresh, old_fresh),
        ("streaming + .skip (old), measured", FLAGS.old_skip_step, old_skip, old_fresh),
        ("streaming + .skip (old), PROJECTED", FLAGS.resume_step, projected, old_fresh),
    ]
    for name, step, seconds, reference in rows:
        print(f"| {name:<38} | {step:>10,} | {seconds:>15.2f} | {seconds / reference:>7.1f}x |")
    print(f"\nOnce running (median of {FLAGS.steady_batches} batches): index-based {new_steady:.2f} s/batch, "
          f"streaming {old_steady:.2f} s/batch")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
