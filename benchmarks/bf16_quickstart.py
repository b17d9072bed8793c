"""bfloat16 against float32: the quickstart trained both ways in one run, AP and time side by side.

    python benchmarks/bf16_quickstart.py [--config=quickstart] [--total_steps=0] [--workdir=/tmp/bf16_quickstart]

Trains ``configs/<config>.py`` twice from the same seed and data, with ``model.dtype`` float32 and then bfloat16
(float32 parameters, BN statistics and losses either way), evaluates each on the held-out split, and prints
wall time, training images/s, AP / AP50 / AP75 and the difference. Exit status 1 when bf16's AP is more than
``--max_ap_drop`` (0.03, issue 13) below float32's. ``--total_steps`` shortens both runs (0: the config's).
bf16 brings no speed-up on a CPU; it is meant for GPUs and TPUs (README: bfloat16).
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from absl import app, flags  # noqa: E402

flags.DEFINE_string("config", "quickstart", "Config name under configs/.")
flags.DEFINE_integer("total_steps", 0, "Train this many steps instead of the config's schedule (0: the config's).")
flags.DEFINE_string("workdir", "/tmp/bf16_quickstart", "Runs go to WORKDIR/float32 and WORKDIR/bfloat16 (fresh).")
flags.DEFINE_float("max_ap_drop", 0.03, "Largest AP drop of bfloat16 below float32 that passes.")
FLAGS = flags.FLAGS


def train_once(dtype: str) -> dict:
    import shutil

    from configs_util import load_config

    from scaledet_jax import train

    config = load_config(FLAGS.config)
    config.model.dtype = dtype
    if config.data.source == "synthetic":  # one copy of the data for both runs
        config.data.coco_folder = os.path.join(FLAGS.workdir, "synthetic_data")
    if FLAGS.total_steps:
        config.total_steps = FLAGS.total_steps
    workdir = os.path.join(FLAGS.workdir, dtype)
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    result = train.train_and_evaluate(config, workdir)
    return {"seconds": time.perf_counter() - start, "steps": int(result["state"].step), **result["eval"]}


def main(argv: list[str]) -> None:
    del argv
    rows = {dtype: train_once(dtype) for dtype in ("float32", "bfloat16")}
    steps = rows["float32"]["steps"]
    print(f"\n{FLAGS.config}: the same seed and data, model.dtype float32 vs bfloat16 ({steps} steps)")
    print(f"{'dtype':<10} {'wall (s)':>9} {'AP':>7} {'AP50':>7} {'AP75':>7}")
    for dtype, row in rows.items():
        print(f"{dtype:<10} {row['seconds']:>9.0f} {row['AP']:>7.3f} {row['AP50']:>7.3f} {row['AP75']:>7.3f}")
    drop = rows["float32"]["AP"] - rows["bfloat16"]["AP"]
    verdict = "within" if drop <= FLAGS.max_ap_drop else "NOT within"
    print(f"AP bfloat16 - float32: {-drop:+.3f} ({verdict} the {FLAGS.max_ap_drop} allowed)")
    if drop > FLAGS.max_ap_drop:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
