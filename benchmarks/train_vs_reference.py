"""Training step: ours vs the references, measured in one run.

    python benchmarks/train_vs_reference.py [--rows=d0,spinenet49s] [--steps=3] [--rounds=2] [--image_size=N]

Rows:
* ``d0``: EfficientDet-D0 @512, batch 2 — our full train step (forward, anchor labeling, focal + Huber
  losses, backward, SGD-momentum update, BN statistics; ``configs/efficientdet_d0.py``) vs effdet's
  ``DetBenchTrain`` (``tf_efficientdet_d0``: forward, its anchor labeler, its losses, ``backward``,
  ``torch.optim.SGD`` step), random init, same random images and boxes.
* ``spinenet49s``: SpineNet-49S RetinaNet @640, batch 2 — our train step (``configs/spinenet49s.py``) vs
  TF Model Garden's ``RetinaNetTask.train_step`` (Keras model, GradientTape, its losses, SGD with
  momentum) under ``tf.function``, labels from Model Garden's own RetinaNet parser on the same images and
  boxes (anchor labeling is in its input pipeline, so it is outside its timed step; ours is inside).

Each side is compiled / traced first (reported), then ``--rounds`` rounds alternate ``--steps`` steps of each,
so both see the same machine load; the median per-step time and the ratio ours / reference (< 1: we are
faster) are printed. Images and boxes are random; step times do not depend on the values.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

# The torch stack before TensorFlow (Model Garden): importing triton (pulled in by torchvision / timm / effdet)
# after TensorFlow segfaults.
import effdet  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402, F401
from absl import app, flags  # noqa: E402
from timing import compiled_train_step, random_batch  # noqa: E402

flags.DEFINE_list("rows", ["d0", "spinenet49s"], "Rows: d0 (vs effdet), spinenet49s (vs Model Garden).")
flags.DEFINE_integer("steps", 3, "Steps of each side per round.")
flags.DEFINE_integer("rounds", 2, "Alternating rounds.")
flags.DEFINE_integer("batch_size", 2, "Images per step.")
flags.DEFINE_integer("image_size", 0, "Input size for every row (0: the row's, 512 for D0 and 640 for SpineNet).")
FLAGS = flags.FLAGS


def _ours(config_name: str, size: int, batch: dict):
    """(compile s, run(n) -> seconds for n steps)."""
    from configs_util import load_config

    config = load_config(config_name)
    config.model.image_size = size
    config.data.train_batch_size = FLAGS.batch_size
    compile_s, state, step = compiled_train_step(config, batch)
    holder = {"state": state}

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    run(1)
    return compile_s, run


def _effdet(size: int, batch: dict):
    cfg = effdet.get_efficientdet_config("tf_efficientdet_d0")
    cfg.image_size = (size, size)
    bench = effdet.DetBenchTrain(effdet.EfficientDet(cfg, pretrained_backbone=False)).train()
    optimizer = torch.optim.SGD(bench.parameters(), lr=1e-3, momentum=0.9)
    images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
    valid = torch.from_numpy(batch["valid"])
    target = {  # effdet's labeler: yxyx pixel boxes, classes 1..C, padding -1
        "bbox": torch.where(valid[..., None], torch.from_numpy(batch["boxes"]), torch.full((1,), -1.0)),
        "cls": torch.where(valid, torch.from_numpy(batch["classes"]).float(), torch.full((1,), -1.0)),
    }

    def step() -> None:
        optimizer.zero_grad()
        bench(images, target)["loss"].backward()
        optimizer.step()

    start = time.perf_counter()
    step()
    first_s = time.perf_counter() - start

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            step()
        return time.perf_counter() - start

    return first_s, run


def _model_garden(size: int, batch: dict):
    import tensorflow as tf
    import tf_keras
    from model_garden import build_retinanet_spinenet
    from official.core import exp_factory
    from official.vision.configs import retinanet  # noqa: F401
    from official.vision.dataloaders import retinanet_input
    from official.vision.tasks.retinanet import RetinaNetTask

    exp = exp_factory.get_exp_config("retinanet_spinenet_coco")
    task_config = exp.task
    task_config.model.backbone.spinenet.model_id = "49S"
    task_config.model.head.num_filters = 128
    task_config.model.input_size = [size, size, 3]
    task = RetinaNetTask(task_config)
    model, _ = build_retinanet_spinenet("49S", size, 128)
    a = task_config.model.anchor
    parser = retinanet_input.Parser(
        output_size=[size, size], min_level=3, max_level=7, num_scales=a.num_scales,
        aspect_ratios=list(a.aspect_ratios), anchor_size=a.anchor_size, dtype="float32",
    )  # fmt: skip
    features, labels = [], []
    for i in range(batch["image"].shape[0]):
        valid = batch["valid"][i]
        pixels = np.clip((batch["image"][i] * 40 + 120), 0, 255).astype(np.uint8)
        image, label = parser._parse_train_data(
            {
                "image": tf.constant(pixels),
                "groundtruth_boxes": tf.constant(batch["boxes"][i][valid] / size),
                "groundtruth_classes": tf.constant(batch["classes"][i][valid].astype(np.int64)),
                "groundtruth_is_crowd": tf.zeros([int(valid.sum())], tf.bool),
                "groundtruth_area": tf.ones([int(valid.sum())], tf.float32),
                "source_id": tf.constant("0"),
                "height": tf.constant(size),
                "width": tf.constant(size),
            }
        )
        features.append(image)
        labels.append(label)
    inputs = (tf.stack(features), tf.nest.map_structure(lambda *t: tf.stack(t), *labels))
    optimizer = tf_keras.optimizers.SGD(learning_rate=1e-3, momentum=0.9)

    @tf.function
    def step(inputs):
        return task.train_step(inputs, model, optimizer)["loss"]

    start = time.perf_counter()
    step(inputs).numpy()
    first_s = time.perf_counter() - start

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            loss = step(inputs)
        loss.numpy()
        return time.perf_counter() - start

    return first_s, run


ROWS = {
    "d0": ("EfficientDet-D0", "efficientdet_d0", 512, "effdet DetBenchTrain", _effdet),
    "spinenet49s": ("SpineNet-49S RetinaNet", "spinenet49s", 640, "Model Garden train_step", _model_garden),
}


def main(argv):
    del argv
    results = []
    for row in FLAGS.rows:
        title, config_name, size, reference_name, reference_fn = ROWS[row]
        size = FLAGS.image_size or size
        batch = random_batch(FLAGS.batch_size, size, 100, np.random.RandomState(0))
        print(f"{title} @{size} batch {FLAGS.batch_size}: compiling ours / preparing {reference_name} ...", flush=True)
        compile_s, ours = _ours(config_name, size, batch)
        first_s, reference = reference_fn(size, batch)
        ours_times, reference_times = [], []
        for _ in range(FLAGS.rounds):
            ours_times.append(ours(FLAGS.steps) / FLAGS.steps)
            reference_times.append(reference(FLAGS.steps) / FLAGS.steps)
        o, r = statistics.median(ours_times), statistics.median(reference_times)
        results.append((title, size, reference_name, compile_s, first_s, o, r))
        print(f"  ours {o:.2f} s/step (compile {compile_s:.0f} s), {reference_name} {r:.2f} s/step", flush=True)

    print(f"\nTrain step, batch {FLAGS.batch_size}, {os.cpu_count()} CPU cores, median of {FLAGS.rounds} alternating "
          f"rounds of {FLAGS.steps} steps")  # fmt: skip
    header = (
        f"{'model':<24}{'input':>6}  {'reference':<24}{'ours compile s':>15}{'ref first step s':>17}"
        f"{'ours s/img':>11}{'ref s/img':>10}{'ours/ref':>9}"
    )
    print(header)
    print("-" * len(header))
    for title, size, reference_name, compile_s, first_s, o, r in results:
        per_image = FLAGS.batch_size
        print(
            f"{title:<24}{size:>6}  {reference_name:<24}{compile_s:>15.0f}{first_s:>17.0f}"
            f"{o / per_image:>11.2f}{r / per_image:>10.2f}{o / r:>9.2f}"
        )


if __name__ == "__main__":
    app.run(main)
