"""Fine-tuning on other classes against training from scratch, the same steps on the same data.

    python benchmarks/finetune_vs_scratch.py --source=runs/quickstart [--steps=200] [--workdir=/tmp/finetune_bench]

``--source``: a quickstart run trained here (``python main.py --config=configs/quickstart.py --workdir=...``;
without it one is trained first, ~13 minutes). Both rows train ``--steps`` steps of the quickstart recipe on a
synthetic set with other shapes, other images and another seed (``--classes``, default pentagon, star, cross,
hexagon: none of the source's circle / square / triangle), one from ``init_from=SOURCE`` (everything but the
class predictor), one from scratch, and evaluate on its held-out split. Prints AP / AP50 / AP75 and exits 1
when fine-tuning is not ahead.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from absl import app, flags  # noqa: E402

flags.DEFINE_string("source", "", "A quickstart run's workdir (trained here when empty).")
flags.DEFINE_integer("steps", 200, "Training steps of each row.")
flags.DEFINE_string("classes", "pentagon,star,cross,hexagon", "Shapes of the target set (data.synthetic_classes).")
flags.DEFINE_integer("seed", 7, "Seed of the target set's images (the source's is 0).")
flags.DEFINE_string("workdir", "/tmp/finetune_bench", "Runs go here (fresh).")
FLAGS = flags.FLAGS


def _config(init_from: str = ""):
    from configs_util import load_config

    config = load_config("quickstart")
    config.data.synthetic_classes = FLAGS.classes
    config.data.synthetic_seed = FLAGS.seed
    config.data.coco_folder = os.path.join(FLAGS.workdir, "target_data")  # one copy for both rows
    config.model.num_classes = len(FLAGS.classes.split(",")) + 1
    config.total_steps = FLAGS.steps
    config.optim.warmup_steps = min(config.optim.warmup_steps, FLAGS.steps // 4)
    config.init_from = init_from
    return config


def main(argv: list[str]) -> None:
    del argv
    from configs_util import load_config

    from scaledet_jax import train

    shutil.rmtree(FLAGS.workdir, ignore_errors=True)
    source = FLAGS.source
    if not source:
        source = os.path.join(FLAGS.workdir, "source")
        train.train_and_evaluate(load_config("quickstart"), source)
    rows = {}
    for name, init_from in (("fine-tuned", source), ("from scratch", "")):
        start = time.perf_counter()
        result = train.train_and_evaluate(_config(init_from), os.path.join(FLAGS.workdir, name.replace(" ", "_")))
        rows[name] = dict(result["eval"], seconds=time.perf_counter() - start)
    print(f"\nquickstart recipe, {FLAGS.steps} steps on synthetic {FLAGS.classes} (seed {FLAGS.seed}); source {source}")
    print(f"{'start':<14} {'AP':>7} {'AP50':>7} {'AP75':>7} {'wall (s)':>9}")
    for name, row in rows.items():
        print(f"{name:<14} {row['AP']:>7.3f} {row['AP50']:>7.3f} {row['AP75']:>7.3f} {row['seconds']:>9.0f}")
    ahead = rows["fine-tuned"]["AP"] - rows["from scratch"]["AP"]
    print(f"fine-tuned - scratch: {ahead:+.3f} AP")
    if ahead <= 0:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
