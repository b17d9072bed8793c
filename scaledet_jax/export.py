"""Exports a detector as an artifact that runs without this package: uint8 image in, detections out.

    python -m scaledet_jax.export --workdir=runs/quickstart --format=jax --output=exported/quickstart
    python -m scaledet_jax.export --init_from=converted/spinenet49 --config=configs/spinenet49.py \\
        --format=saved_model --output=exported/spinenet49_savedmodel

The exported function takes one RGB image, uint8 ``[height, width, 3]`` of any size, and does what
``Detector.predict`` does: resize keeping the aspect ratio and pad (``ops.image.letterbox``), normalise, run the
network, decode the boxes, NMS, and map the boxes back to the image's pixels. It returns fixed-size arrays,
highest score first (``D = model.detection.max_detections``):

* ``boxes`` float32 ``[D, 4]``: x1, y1, x2, y2 in the image's pixels;
* ``scores`` float32 ``[D]``; ``classes`` int32 ``[D]`` (category ids, names in ``labels.json``);
* ``num_detections`` int32 ``[]``: rows past it are padding (zeros);
* Mask R-CNN also ``mask_probabilities`` float32 ``[D, M, M]``: each box's mask, to be resized into its box.

``--format=jax`` writes ``OUTPUT/model.jax``, a ``jax.export`` serialization (weights included) that any JAX
>= the exporting version loads without scaledet_jax::

    exported = jax.export.deserialize(open("OUTPUT/model.jax", "rb").read())
    found = exported.call(image)  # numpy uint8 [H, W, 3]

``--format=saved_model`` writes a TF SavedModel directory (weights as variables; the computation as StableHLO
through ``jax2tf``) that TensorFlow alone serves::

    model = tf.saved_model.load("OUTPUT")
    found = model.signatures["serving_default"](image=tf.constant(image))

Both write ``OUTPUT/labels.json`` ({category id: name}) and ``OUTPUT/export.json`` (what was exported, the
input and outputs). Nothing is left at OUTPUT when the export fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags, logging  # noqa: E402

from scaledet_jax.cli import UserError, config_from_flags, define_config_flag, run_app  # noqa: E402

FORMATS = ("jax", "saved_model")
JAX_FILE = "model.jax"
LABELS_FILE = "labels.json"
MANIFEST_FILE = "export.json"
INPUT_SHAPE = "(height, width, 3)"  # jax.export / jax2tf symbolic shape of the image


def serving_function(detector) -> Callable[[Any, Any], dict[str, Any]]:
    """``serve(variables, image)``: one uint8 ``[H, W, 3]`` image -> the exported outputs (module docstring)."""
    import jax
    import jax.numpy as jnp

    from scaledet_jax.data import pipeline, preprocess
    from scaledet_jax.ops.image import letterbox

    config, task = detector.config, detector.task
    normalization = {"mean": preprocess.MEAN_RGB, "std": preprocess.STDDEV_RGB, **pipeline.normalization(config)}
    size = config.model.image_size

    def serve(variables, image):
        pixels, factor = letterbox(image, size, **normalization)
        found = jax.tree_util.tree_map(lambda x: x[0], task.predict(variables, pixels[None]))
        height, width = (jnp.asarray(d, jnp.float32) for d in image.shape[:2])
        valid = found["valid"]
        order = jnp.argsort(jnp.where(valid, -found["scores"], jnp.inf), stable=True)  # as Detector.predict
        valid = valid[order]
        boxes_yx = jnp.clip(found["boxes"][order] / factor, 0.0, jnp.stack([height, width, height, width]))
        outputs = {
            "boxes": jnp.where(valid[:, None], boxes_yx[:, jnp.array([1, 0, 3, 2])], 0.0).astype(jnp.float32),
            "scores": jnp.where(valid, found["scores"][order], 0.0).astype(jnp.float32),
            "classes": jnp.where(valid, found["classes"][order], 0).astype(jnp.int32),
            "num_detections": jnp.sum(valid).astype(jnp.int32),
        }
        if "masks" in found:
            masks = found["masks"][order]
            outputs["mask_probabilities"] = jnp.where(valid[:, None, None], masks, 0.0).astype(jnp.float32)
        return outputs

    return serve


def export_jax(detector, platforms: Sequence[str] | None = None) -> bytes:
    """The ``jax.export`` serialization of the detector with its weights, for images of any size."""
    import jax
    import jax.numpy as jnp

    serve = serving_function(detector)
    variables = detector.variables
    image = jax.ShapeDtypeStruct(jax.export.symbolic_shape(INPUT_SHAPE), jnp.uint8)
    exported = jax.export.export(jax.jit(lambda pixels: serve(variables, pixels)), platforms=platforms)(image)
    return exported.serialize()


@contextlib.contextmanager
def _stablehlo_readable_by_tensorflow():
    """Serializes StableHLO at the newest version the installed TensorFlow reads.

    ``jax.export`` writes the portable artifact at a version ~4 weeks older than JAX's StableHLO, which is newer
    than what a TensorFlow of the same season reads (JAX 0.10 writes 1.15, TF 2.20 reads up to 1.12.1: its
    ``XlaCallModule`` fails with "failed to deserialize portable artifact"). StableHLO's serializer downgrades
    to any version in its compatibility window, but JAX exposes no option for the target, so its private
    serialization hook is wrapped for the duration of the export."""
    from jax._src import xla_bridge
    from jax._src.export import _export
    from jax._src.lib import _jax
    from jax._src.lib.mlir.dialects import hlo
    from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo

    def as_tuple(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in version.split("."))

    jax_target = hlo.get_version_from_compatibility_requirement(hlo.StablehloCompatibilityRequirement.WEEK_4)
    target = min(jax_target, tf_stablehlo.get_current_version(), key=as_tuple)
    original = _export._module_to_bytecode

    def to_bytecode(module):
        return _jax.mlir.serialize_portable_artifact(module, target, xla_bridge.get_backend().serialize_with_sdy)

    _export._module_to_bytecode = to_bytecode
    try:
        yield target
    finally:
        _export._module_to_bytecode = original


def export_saved_model(detector, directory: str) -> None:
    """A TF SavedModel at ``directory``: signature ``serving_default(image: uint8 [H, W, 3])``."""
    import jax
    import numpy as np
    import tensorflow as tf
    from jax.experimental import jax2tf

    from scaledet_jax.data import pipeline

    pipeline._hide_accelerators_from_tf()
    serve = serving_function(detector)
    leaves, treedef = jax.tree_util.tree_flatten(jax.device_get(detector.variables))
    converted = jax2tf.convert(
        lambda flat, image: serve(jax.tree_util.tree_unflatten(treedef, flat), image),
        polymorphic_shapes=[None, INPUT_SHAPE],
        with_gradient=False,
    )
    module = tf.Module()
    module.weights = [tf.Variable(np.asarray(leaf), trainable=False) for leaf in leaves]

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name="image")], autograph=False)
    def serving_default(image):
        return converted(list(module.weights), image)

    module.serving_default = serving_default
    with _stablehlo_readable_by_tensorflow():
        tf.saved_model.save(module, directory, signatures={"serving_default": serving_default})


def manifest(detector, export_format: str, platforms: Sequence[str] | None) -> dict[str, Any]:
    import jax

    m = detector.config.model
    outputs = {
        "boxes": f"float32 [{m.detection.max_detections}, 4] x1, y1, x2, y2 in the image's pixels",
        "scores": f"float32 [{m.detection.max_detections}] highest first",
        "classes": f"int32 [{m.detection.max_detections}] category ids (names in {LABELS_FILE})",
        "num_detections": "int32 []: rows past it are padding",
    }
    if "masks" in _output_names(detector):
        outputs["mask_probabilities"] = "float32 [D, M, M]: each box's mask, to be resized into its box"
    return {
        "format": export_format,
        "file": JAX_FILE if export_format == "jax" else "saved_model.pb",
        "input": "image: uint8 [height, width, 3] RGB, any size",
        "outputs": outputs,
        "image_size": m.image_size,
        # Inside the artifact images are letterboxed as in training (TF bilinear, padded to the square).
        "resize": "letterbox",
        "jax_version": jax.__version__,
        "platforms": list(platforms or [jax.default_backend()]),
    }


def export(detector, export_format: str, output: str, platforms: Sequence[str] | None = None) -> str:
    """Writes the artifact, ``labels.json`` and ``export.json`` into the new directory ``output`` (built
    beside it and renamed into place, so a failure leaves nothing there)."""
    if export_format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {export_format!r}")
    if os.path.exists(output):
        raise UserError(f"{output} already exists: remove it or give another --output")
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    partial = os.path.join(parent, f".{os.path.basename(os.path.abspath(output))}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if export_format == "jax":
            os.makedirs(partial)
            with open(os.path.join(partial, JAX_FILE), "wb") as f:
                f.write(export_jax(detector, platforms))
        else:
            if platforms:
                raise UserError("--platforms applies to --format=jax (a SavedModel runs where TensorFlow runs it)")
            export_saved_model(detector, partial)
        with open(os.path.join(partial, LABELS_FILE), "w") as f:
            json.dump({str(k): v for k, v in sorted(detector.categories.items())}, f, indent=1)
        with open(os.path.join(partial, MANIFEST_FILE), "w") as f:
            json.dump(manifest(detector, export_format, platforms), f, indent=1)
        os.replace(partial, output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return output


def _output_names(detector) -> set[str]:
    import jax
    import jax.numpy as jnp

    size = detector.config.model.image_size
    shapes = jax.eval_shape(detector.task.predict, detector.variables, jnp.zeros((1, size, size, 3), jnp.float32))
    return set(shapes)


define_config_flag()
flags.DEFINE_string("workdir", None, "A training run's workdir: its newest checkpoint is exported.")
flags.DEFINE_string("init_from", None, "A converted checkpoint directory (python -m scaledet_jax.convert).")
flags.DEFINE_enum("format", "jax", FORMATS, "jax: a jax.export artifact; saved_model: a TF SavedModel.")
flags.DEFINE_string("output", None, "Directory to create for the artifact, labels.json and export.json.")
flags.DEFINE_list(
    "platforms", None, "--format=jax: platforms to lower for (cpu, cuda, rocm, tpu); default: this machine's."
)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}")
    if bool(FLAGS.workdir) == bool(FLAGS.init_from):
        raise UserError("give one of --workdir=RUN (a training run) or --init_from=DIR (a converted checkpoint)")
    if not FLAGS.output:
        raise UserError("--output=DIR is required (a new directory for the exported model)")
    if os.path.exists(FLAGS.output):
        raise UserError(f"{FLAGS.output} already exists: remove it or give another --output")
    known = {"cpu", "cuda", "rocm", "tpu"}
    for platform in FLAGS.platforms or ():
        if platform not in known:
            raise UserError(f"--platforms: unknown platform {platform!r}; choose from {', '.join(sorted(known))}")
    config = config_from_flags() if FLAGS["config"].present else None
    from scaledet_jax.detector import Detector

    detector = Detector.from_checkpoint(FLAGS.workdir or FLAGS.init_from, config)
    from scaledet_jax.data.test_resize import style_of

    source_resize = style_of(detector.config)
    if source_resize != "letterbox":
        print(
            f"export: note: the artifact letterboxes images as training does; the source's {source_resize!r} "
            "test-time resize (which Detector.predict and scaledet_jax.predict use) is not in it, so its "
            "detections can differ slightly from theirs",
            file=sys.stderr,
        )
    print(f"export: tracing and lowering the detector for --format={FLAGS.format} ...", file=sys.stderr, flush=True)
    export(detector, FLAGS.format, FLAGS.output, FLAGS.platforms)
    message = f"Wrote the {FLAGS.format} export, {LABELS_FILE} and {MANIFEST_FILE} to {FLAGS.output}"
    logging.info(message)
    print(message)


if __name__ == "__main__":
    run_app(main, "python -m scaledet_jax.export")
