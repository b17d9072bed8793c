"""Inference latency of SpineNet RetinaNet (raw class/box outputs, no NMS): ours vs TF Model Garden.

    python benchmarks/inference_spinenet.py [--configs=spinenet49s,spinenet49] [--image_size=640]
        [--batch_size=1] [--repeats=5]

Both run in this process on the same machine, same input and random weights: our jit-compiled
Flax forward and Model Garden's Keras backbone + head under ``tf.function``, and under
``tf.function(jit_compile=True)`` (XLA through TF). Prints compile time, median latency and the ratios
ours / Model Garden (< 1 means we are faster).
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TF stays on the host; JAX uses its default device

sys.path[:0] = [
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"),
]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from timing import median_seconds  # noqa: E402

from scaledet_jax.models import build_model  # noqa: E402

flags.DEFINE_list("configs", ["spinenet49s", "spinenet49"], "Config names under configs/.")
flags.DEFINE_integer("image_size", 640, "Square input size.")
flags.DEFINE_integer("batch_size", 1, "Images per forward.")
flags.DEFINE_integer("repeats", 5, "Timed runs after warm-up; the median is reported.")
FLAGS = flags.FLAGS

MODEL_IDS = {
    "spinenet49s": "49S",
    "spinenet49": "49",
    "spinenet96": "96",
    "spinenet143": "143",
    "spinenet143l": "143L",
    "spinenet190": "190",
}


def bench_one(name: str, images: np.ndarray) -> tuple[float, float, float, float]:
    """(our compile s, our median s, TF trace s, TF median s) for one config."""
    import tensorflow as tf
    from configs_util import load_config
    from model_garden import build_retinanet_spinenet

    size = images.shape[1]
    config = load_config(name)
    config.model.image_size = size
    model = build_model(config.model)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(jnp.asarray(images[:1]))
    x = jnp.asarray(images)
    start = time.perf_counter()
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(variables, x))
    ours = median_seconds(lambda: jax.block_until_ready(compiled(variables, x)), FLAGS.repeats)

    keras_model, _ = build_retinanet_spinenet(
        MODEL_IDS[name], size, config.model.head.num_filters, head_convs=config.model.head.num_convs
    )

    @tf.function
    def tf_forward(t):
        features = keras_model.backbone(t, training=False)
        return keras_model.head(features, training=False)[:2]

    t = tf.constant(images)
    start = time.perf_counter()
    tf_forward(t)
    tf_trace_s = time.perf_counter() - start
    reference = median_seconds(lambda: [v.numpy() for d in tf_forward(t) for v in d.values()], FLAGS.repeats)

    @tf.function(jit_compile=True)  # the same forward compiled by XLA through TF
    def tf_xla_forward(t):
        features = keras_model.backbone(t, training=False)
        return keras_model.head(features, training=False)[:2]

    tf_start = time.perf_counter()
    tf_xla_forward(t)
    tf_xla_compile_s = time.perf_counter() - tf_start
    reference_xla = median_seconds(lambda: [v.numpy() for d in tf_xla_forward(t) for v in d.values()], FLAGS.repeats)
    return compile_s, ours, tf_trace_s, reference, tf_xla_compile_s, reference_xla


def main(argv):
    del argv
    size, batch = FLAGS.image_size, FLAGS.batch_size
    images = np.random.RandomState(0).normal(size=(batch, size, size, 3)).astype(np.float32)
    rows = [(name, *bench_one(name, images)) for name in FLAGS.configs]

    print(
        f"\nSpineNet RetinaNet inference, {size}x{size}, batch {batch}, {jax.devices()[0].platform} "
        f"({os.cpu_count()} cores), median of {FLAGS.repeats}"
    )
    header = (
        f"{'model':<14}{'ours compile s':>15}{'ours s':>10}{'TF trace s':>12}{'TF s':>10}{'ours/TF':>10}"
        f"{'TF XLA compile s':>18}{'TF XLA s':>10}{'ours/TF XLA':>13}"
    )
    print(header)
    print("-" * len(header))
    for name, compile_s, ours, tf_trace_s, reference, xla_compile_s, reference_xla in rows:
        print(
            f"{name:<14}{compile_s:>15.1f}{ours:>10.3f}{tf_trace_s:>12.1f}{reference:>10.3f}{ours / reference:>10.2f}"
            f"{xla_compile_s:>18.1f}{reference_xla:>10.3f}{ours / reference_xla:>13.2f}"
        )


if __name__ == "__main__":
    app.run(main)
