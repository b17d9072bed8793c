"""Convert a PyTorch or TF (Model Garden, automl) checkpoint into a scaledet_jax checkpoint.

    python -m scaledet_jax.convert --from=effdet --config=configs/efficientdet_d0.py \\
        --input=tf_efficientdet_d0.pth --output=converted/d0 [--reference=tf_efficientdet_d0]

Prints a report: tensors mapped, tensors ignored with the reason, shared copies checked, and —
with ``--reference`` (the original PyTorch model's name, built with random init and loaded with
the same checkpoint) — the parity measured on a random image. Any missing, unexpected or
mis-shaped tensor, or one holding NaN/Inf, stops the conversion with the list and nothing written.
``--overwrite`` replaces only a previous converted checkpoint (swapped in once the new one is
complete); input and output are checked before the slow work. Then:

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
    from scaledet_jax.convert.layouts import LAYOUTS

    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}")
    if FLAGS["from"].value not in LAYOUTS:
        raise UserError(f"unknown layout --from={FLAGS['from'].value!r}; available: {', '.join(LAYOUTS)}")
    for name in ("input", "output"):
        if not FLAGS[name].value:
            raise UserError(f"--{name} is required")
    convert_checkpoint(
        FLAGS["from"].value,
        config_from_flags(),
        FLAGS["config"].config_filename,
        FLAGS.input,
        FLAGS.output,
        reference=FLAGS.reference,
        image_size=FLAGS.image_size,
        overwrite=FLAGS.overwrite,
    )


def convert_checkpoint(
    layout_name: str,
    config,
    config_path: str,
    input_path: str,
    output: str,
    *,
    reference: str | None = None,
    image_size: int | None = None,
    overwrite: bool = False,
) -> dict:
    """The converter's work behind the flags: checks input and output (cheaply, before the slow load
    and mapping), converts ``input_path`` with layout ``layout_name`` onto the model of ``config``,
    writes ``output`` and prints the report. Returns the ``conversion.json`` contents. Every user
    mistake is a one-line ``UserError``, and nothing is written then."""
    import jax
    import numpy as np

    from scaledet_jax.convert import checkpoint, torch_layout
    from scaledet_jax.convert.layouts import LAYOUTS

    if layout_name not in LAYOUTS:
        raise UserError(f"unknown layout --from={layout_name!r}; available: {', '.join(LAYOUTS)}")
    layout = LAYOUTS[layout_name]
    if reference and layout.reference is None:
        raise UserError(f"layout {layout.name} has no reference model for parity")
    layout.check_input(input_path)  # fail before the work, not after
    checkpoint.check_output(output, overwrite)

    start = time.perf_counter()
    size_mb = layout.size_mib(input_path)
    print(f"reading {input_path} ({size_mb:.1f} MiB) ...", file=sys.stderr, flush=True)
    state, ignored_entries = layout.read(input_path)
    print(f"read {len(state)} tensors from {input_path} ({time.perf_counter() - start:.1f}s)", file=sys.stderr)
    size = image_size or config.model.image_size
    try:
        model, shapes, variables, report, model_options = layout.convert(state, config, size, progress=_progress)
    except torch_layout.NonFiniteError as e:
        raise UserError(f"{input_path}: {e}; nothing written to {output}") from None
    except torch_layout.ConversionError as e:
        raise UserError(f"{input_path} does not fit {config_path} as --from={layout.name}: {e}") from None

    parity = None
    if reference:
        import torch

        reference_model = layout.reference(reference, config, size)
        try:
            reference_model.load_state_dict(
                {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=False
            )
        except RuntimeError as e:
            raise UserError(
                f"--reference={reference} does not fit the checkpoint: {' '.join(str(e).split())[:300]}"
            ) from None
        zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))
        merged, _, _ = checkpoint.merge_into(zeros, variables)
        images = np.random.RandomState(0).normal(size=(1, size, size, 3)).astype(np.float32)
        parity = layout.compare(reference_model, model, merged, images)

    info = {
        "layout": layout.name,
        "source": os.path.abspath(input_path),
        "config": config_path,
        "scope": list(layout.scope),
        "model_options": model_options,
        "mapped": len(report.mapped),
        "ignored": [list(item) for item in ignored_entries + report.ignored],
        "shared_checked": [list(item) for item in report.shared_checked],
        "parity": {"reference": reference, "image_size": size, "max_abs_diff": parity} if parity else None,
    }
    checkpoint.save_converted(output, variables, info, overwrite=overwrite)

    print(f"converted {input_path} ({layout.name}) -> {output}")
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
        print(f"  parity vs {reference} @ {size}: max abs diff {worst}")
    else:
        print("  parity: not measured (pass --reference=<original model name>)")
    return info


def run() -> None:
    define_config_flag()
    flags.DEFINE_string(
        "from",
        None,
        "Source layout: model-garden (TF Model Garden SpineNet RetinaNet / Mask R-CNN TF checkpoint: prefix or "
        "directory), automl (google/automl EfficientDet TF checkpoint directory, EMA shadows used), "
        "mmdet-spinenet, mmdet-efficientdet, effdet, timm-efficientnet, torchvision "
        "(Faster R-CNN / RetinaNet ResNet-FPN state_dicts), torchvision-coco-v1 (torchvision's published "
        "COCO_V1 weights: FrozenBatchNorm eps 0), maskrcnn-benchmark (Faster / Mask R-CNN ResNet-FPN or VoVNet-FPN, "
        "incl. stigma0617/maskrcnn-benchmark-vovnet), timm-vovnet (timm vovnet39a / vovnet57a ImageNet weights), "
        "detnet-pytorch (DetNet_pytorch's DetNet-59 FPN Faster R-CNN), detnet-pytorch-imagenet (its detnet59.pth).",
    )
    flags.DEFINE_string(
        "input",
        None,
        "PyTorch checkpoint (.pth/.pt via torch.load(weights_only=True), or .safetensors); for TF layouts a "
        "checkpoint prefix (DIR/ckpt-N) or its directory.",
    )
    flags.DEFINE_string(
        "output", None, "Directory for the converted checkpoint (must not exist, be empty, or --overwrite)."
    )
    flags.DEFINE_string("reference", None, "Original model name (e.g. tf_efficientdet_d0) to measure parity with.")
    flags.DEFINE_integer("image_size", None, "Input size for shapes and parity; default: the config's.")
    flags.DEFINE_bool(
        "overwrite", False, "Replace a previous converted checkpoint at --output (never any other directory)."
    )
    run_app(main, "scaledet_jax.convert")


if __name__ == "__main__":
    run()
