"""Convert a PyTorch checkpoint into a scaledet_jax checkpoint.

    python -m scaledet_jax.convert --from=effdet --config=configs/efficientdet_d0.py \\
        --input=tf_efficientdet_d0.pth --output=converted/d0 [--reference=tf_efficientdet_d0]

Prints a report: tensors mapped, tensors ignored with the reason, shared copies checked, and —
with ``--reference`` (the original PyTorch model's name, built with random init and loaded with
the same checkpoint) — the parity measured on a random image. Any missing, unexpected or
mis-shaped tensor stops the conversion with the full list and nothing written. Then:

    python main.py --config=configs/efficientdet_d0.py --workdir=runs/eval_d0 --mode=eval \\
        --config.init_from=converted/d0
    python main.py --config=configs/efficientdet_d0.py --workdir=runs/finetune_d0 --config.init_from=converted/d0
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import flags  # noqa: E402

from scaledet_jax.cli import UserError, config_from_flags, define_config_flag, run_app  # noqa: E402

FLAGS = flags.FLAGS


def _progress(done: int, total: int, state={"last": -1}) -> None:  # noqa: B006 (intentional per-process state)
    tenth = done * 10 // total
    if tenth != state["last"]:
        state["last"] = tenth
        print(f"  mapping tensors: {done}/{total} ({done * 100 // total}%)", file=sys.stderr, flush=True)


def main(argv: list[str]) -> None:
    import jax
    import numpy as np

    from scaledet_jax.convert import checkpoint, torch_layout
    from scaledet_jax.convert.layouts import LAYOUTS

    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}")
    if FLAGS["from"].value not in LAYOUTS:
        raise UserError(f"unknown layout --from={FLAGS['from'].value!r}; available: {', '.join(LAYOUTS)}")
    for name in ("input", "output"):
        if not FLAGS[name].value:
            raise UserError(f"--{name} is required")
    layout = LAYOUTS[FLAGS["from"].value]
    config = config_from_flags()
    checkpoint.check_output(FLAGS.output, FLAGS.overwrite)  # fail before the work, not after

    start = time.perf_counter()
    if os.path.isfile(FLAGS.input):
        size_mb = os.path.getsize(FLAGS.input) / 2**20
        print(f"reading {FLAGS.input} ({size_mb:.1f} MiB) ...", file=sys.stderr, flush=True)
    state, ignored_entries = checkpoint.load_state_dict(FLAGS.input)
    print(f"read {len(state)} tensors from {FLAGS.input} ({time.perf_counter() - start:.1f}s)", file=sys.stderr)
    size = FLAGS.image_size or config.model.image_size
    try:
        model, shapes, variables, report, model_options = layout.convert(state, config, size, progress=_progress)
    except torch_layout.ConversionError as e:
        raise UserError(
            f"{FLAGS.input} does not fit {FLAGS['config'].config_filename} as --from={layout.name}: {e}"
        ) from None

    parity = None
    if FLAGS.reference:
        if layout.reference is None:
            raise UserError(f"layout {layout.name} has no reference model for parity")
        import torch

        reference = layout.reference(FLAGS.reference, config, size)
        try:
            reference.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=False)
        except RuntimeError as e:
            raise UserError(
                f"--reference={FLAGS.reference} does not fit the checkpoint: {' '.join(str(e).split())[:300]}"
            ) from None
        zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))
        merged, _, _ = checkpoint.merge_into(zeros, variables)
        images = np.random.RandomState(0).normal(size=(1, size, size, 3)).astype(np.float32)
        parity = layout.compare(reference, model, merged, images)

    info = {
        "layout": layout.name,
        "source": os.path.abspath(FLAGS.input),
        "config": FLAGS["config"].config_filename,
        "scope": list(layout.scope),
        "model_options": model_options,
        "mapped": len(report.mapped),
        "ignored": [list(item) for item in ignored_entries + report.ignored],
        "shared_checked": [list(item) for item in report.shared_checked],
        "parity": {"reference": FLAGS.reference, "image_size": size, "max_abs_diff": parity} if parity else None,
    }
    checkpoint.save_converted(FLAGS.output, variables, info, overwrite=FLAGS.overwrite)

    print(f"converted {FLAGS.input} ({layout.name}) -> {FLAGS.output}")
    print(f"  {report.summary()}")
    reasons: dict[str, int] = {}
    for _, reason in ignored_entries + report.ignored:
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in sorted(reasons.items()):
        print(f"  ignored {count:>5}  {reason}")
    if model_options:
        shown = {
            k: f"<{len(v)} ids>" if isinstance(v, (list, tuple)) and len(v) > 8 else repr(v)
            for k, v in model_options.items()
        }
        print("  model options set: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    if parity:
        worst = ", ".join(f"{k} {v:.2e}" for k, v in parity.items())
        print(f"  parity vs {FLAGS.reference} @ {size}: max abs diff {worst}")
    else:
        print("  parity: not measured (pass --reference=<original model name>)")


def run() -> None:
    define_config_flag()
    flags.DEFINE_string(
        "from",
        None,
        "Source layout: mmdet-spinenet, mmdet-efficientdet, effdet, timm-efficientnet, torchvision "
        "(Faster R-CNN / RetinaNet ResNet-FPN state_dicts), torchvision-coco-v1 (torchvision's published "
        "COCO_V1 weights: FrozenBatchNorm eps 0).",
    )
    flags.DEFINE_string(
        "input", None, "PyTorch checkpoint (.pth/.pt via torch.load(weights_only=True), or .safetensors)."
    )
    flags.DEFINE_string("output", None, "Directory for the converted checkpoint (must not exist or be empty).")
    flags.DEFINE_string("reference", None, "Original model name (e.g. tf_efficientdet_d0) to measure parity with.")
    flags.DEFINE_integer("image_size", None, "Input size for shapes and parity; default: the config's.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")
    run_app(main, "scaledet_jax.convert")


if __name__ == "__main__":
    run()
