"""TF Model Garden reference models for the parity tests (random init, nothing downloaded)."""

from __future__ import annotations

import numpy as np

from scaledet_jax.convert import model_garden as mg


def build_retinanet_spinenet(
    model_id: str,
    image_size: int,
    head_filters: int,
    num_classes: int = 91,
    head_convs: int = 4,
    activation: str = "swish",
):
    """Model Garden's ``retinanet_spinenet_coco`` model; returns (keras model, owned units in order)."""
    import tf_keras
    from official.core import exp_factory
    from official.vision.configs import retinanet  # noqa: F401  (registers the experiments)
    from official.vision.modeling import factory

    model_config = exp_factory.get_exp_config("retinanet_spinenet_coco").task.model
    model_config.backbone.spinenet.model_id = model_id
    model_config.head.num_filters = head_filters
    model_config.head.num_convs = head_convs
    model_config.num_classes = num_classes
    model_config.input_size = [image_size, image_size, 3]
    model_config.norm_activation.activation = activation
    specs = tf_keras.layers.InputSpec(shape=[None, image_size, image_size, 3])
    with mg.record_keras_variables() as units:
        model = factory.build_retinanet(specs, model_config)
        # With the identity decoder Model Garden builds the head lazily, at its first call.
        raw_outputs(model, np.zeros([1, image_size, image_size, 3], np.float32))
    return model, mg.owned_units(units, model)


def randomize(units, seed: int = 0) -> None:
    """Gives every variable a random, non-trivial value.

    Random-init BN (mean 0, var 1, gamma 1, beta 0) and the head's 1e-5 predictor init would make
    a parity test blind to BN and predictor mistakes, so every kernel, bias, gamma, beta and moving
    statistic gets a random value. The scales (He-normal kernels, gamma in [0.6, 1], variance in
    [0.8, 1.2]) keep activations O(0.1-1) through the whole depth without the perturbation growth of
    a chaotic random net, so fp32 rounding stays ~1e-6 while a semantic change (e.g. symmetric
    instead of 'SAME' max pooling) moves the outputs by ~1e-1; the parity test checks both.
    """
    rng = np.random.RandomState(seed)
    for unit in units:
        if unit.kind == "conv":
            kernel = unit.variables[0]
            fan_in = int(np.prod(kernel.shape[:-1]))
            values = [rng.normal(0.0, np.sqrt(2.0 / fan_in), kernel.shape)]
            if len(unit.variables) == 2:
                values.append(rng.normal(0.0, 0.1, unit.variables[1].shape))
        else:
            shape = unit.variables[0].shape
            values = [
                rng.uniform(0.6, 1.0, shape),
                rng.normal(0.0, 0.1, shape),
                rng.normal(0.0, 0.1, shape),
                rng.uniform(0.8, 1.2, shape),
            ]
        for variable, value in zip(unit.variables, values, strict=True):
            variable.assign(value.astype(np.float32))


def raw_outputs(model, images: np.ndarray):
    """Endpoints and head outputs of the Keras model in inference mode, as {int level: ndarray}."""
    features = model.backbone(images, training=False)
    scores, boxes, _ = model.head(features, training=False)
    to_np = lambda d: {int(k): v.numpy() for k, v in d.items()}  # noqa: E731
    return to_np(features), to_np(scores), to_np(boxes)


def tf_profiler_multiply_adds(model, image_size: int) -> float:
    """Multiply-adds of the Keras model's inference forward (backbone + head), by TF's profiler."""
    import tensorflow as tf
    from tensorflow.python.profiler import model_analyzer, option_builder

    @tf.function
    def forward(images):
        features = model.backbone(images, training=False)
        scores, boxes, _ = model.head(features, training=False)
        return scores, boxes

    graph = forward.get_concrete_function(tf.TensorSpec([1, image_size, image_size, 3], tf.float32)).graph
    options = option_builder.ProfileOptionBuilder(option_builder.ProfileOptionBuilder.float_operation())
    result = model_analyzer.profile(graph, options=options.with_empty_output().build())
    return result.total_float_ops / 2.0


def build_maskrcnn_spinenet(
    model_id: str,
    image_size: int,
    num_classes: int = 91,
    activation: str = "relu",
    num_scales: int = 1,
    anchor_size: float = 3.0,
    include_mask: bool = True,
):
    """Model Garden's ``maskrcnn_spinenet_coco`` model; returns (keras model, owned units in creation order).

    Defaults are the registered experiment's (relu, 3 anchors of size 3); the SpineNet-143 yaml recipe
    uses ``num_scales=3, anchor_size=4.0``. With the identity decoder the RPN head, and always the box and
    mask heads, are built lazily, so the model is called once (on a few fixed RoIs) inside the recording.
    Parameter counts do not depend on ``image_size`` (a multiple of 128); keep it small for speed.
    """
    import tf_keras
    from official.core import exp_factory
    from official.vision.configs import maskrcnn  # noqa: F401  (registers the experiments)
    from official.vision.modeling import factory

    model_config = exp_factory.get_exp_config("maskrcnn_spinenet_coco").task.model
    model_config.backbone.spinenet.model_id = model_id
    model_config.num_classes = num_classes
    model_config.input_size = [image_size, image_size, 3]
    model_config.norm_activation.activation = activation
    model_config.anchor.num_scales = num_scales
    model_config.anchor.anchor_size = anchor_size
    model_config.include_mask = include_mask
    specs = tf_keras.layers.InputSpec(shape=[None, image_size, image_size, 3])
    with mg.record_keras_variables() as units:
        model = factory.build_maskrcnn(specs, model_config)
        half = image_size / 2.0
        rois = np.array([[[0.0, 0.0, half, half], [half / 2, half / 4, image_size, half]]], np.float32)
        # Same creation order as the model's own first call: backbone, RPN head, box head, mask head.
        images = np.zeros([1, image_size, image_size, 3], np.float32)
        maskrcnn_roi_outputs(model, images, rois, np.ones([1, 2], np.int32))
    return model, mg.owned_units(units, model)


def maskrcnn_part_counts(model) -> dict[str, int]:
    """Trainable parameters of the Mask R-CNN Keras model, per part and in total."""

    def count(layer) -> int:
        return int(sum(np.prod(v.shape) for v in layer.trainable_weights)) if layer is not None else 0

    counts = {
        "backbone": count(model.backbone),
        "decoder": count(model.decoder),
        "rpn_head": count(model.rpn_head),
        "detection_head": sum(count(head) for head in model.detection_head),
        "mask_head": count(model.mask_head),
    }
    counts["total"] = count(model)
    return counts


def maskrcnn_roi_outputs(model, images: np.ndarray, rois: np.ndarray, roi_classes: np.ndarray) -> dict:
    """Inference-mode outputs of Model Garden's Mask R-CNN on FIXED RoIs, as NumPy (the parity oracle).

    Runs the model's own layers in the order its ``call`` does (``_call_box_outputs`` /
    ``_features_to_mask_outputs``) but skips proposal generation, sampling and NMS, so both
    implementations can be fed identical RoIs. ``rois``: [B, R, 4] ymin, xmin, ymax, xmax in input
    pixels; ``roi_classes``: [B, R] class ids whose mask channel Model Garden's mask head returns.

    Returns {'features', 'rpn_scores', 'rpn_boxes'} as {int level: array} and 'roi_features'
    [B,R,7,7,F], 'class_outputs' [B,R,C], 'box_outputs' [B,R,4C], 'mask_roi_features' [B,R,14,14,F],
    'mask_logits' [B,R,28,28] (the channel of ``roi_classes``) as arrays.
    """
    import tensorflow as tf

    images = tf.convert_to_tensor(images, tf.float32)
    rois = tf.convert_to_tensor(rois, tf.float32)
    features = model.backbone(images, training=False)
    if model.decoder is not None:
        features = model.decoder(features, training=False)
    rpn_scores, rpn_boxes = model.rpn_head(features, training=False)
    roi_features = model.roi_aligner(features, rois, training=False)
    class_outputs, box_outputs = model.detection_head[0](roi_features, training=False)
    to_np = lambda d: {int(k): v.numpy() for k, v in d.items()}  # noqa: E731
    outputs = {
        "features": to_np(features),
        "rpn_scores": to_np(rpn_scores),
        "rpn_boxes": to_np(rpn_boxes),
        "roi_features": roi_features.numpy(),
        "class_outputs": class_outputs.numpy(),
        "box_outputs": box_outputs.numpy(),
    }
    if model.mask_head is not None:
        mask_roi_features = model.mask_roi_aligner(features, rois, training=False)
        classes = tf.convert_to_tensor(np.asarray(roi_classes).astype(np.int32))
        mask_logits = model.mask_head([mask_roi_features, classes], training=False)
        outputs["mask_roi_features"] = mask_roi_features.numpy()
        outputs["mask_logits"] = mask_logits.numpy()
    return outputs


def randomize_maskrcnn(units, seed: int = 0) -> None:
    """``randomize`` for models that also hold Dense and Conv2DTranspose layers (the R-CNN heads).

    Same scales as ``randomize``: He-normal kernels (fan-in: all but the last axis for Conv2D and
    Dense, the input channels for a stride-equals-kernel Conv2DTranspose, whose kernel is
    [kh, kw, out, in]), N(0, 0.1) biases, gamma in [0.6, 1], beta/mean N(0, 0.1), variance in [0.8, 1.2].
    """
    rng = np.random.RandomState(seed)
    for unit in units:
        cls = type(unit.layer).__name__
        if "BatchNormalization" in cls:
            shape = unit.variables[0].shape
            values = [
                rng.uniform(0.6, 1.0, shape),
                rng.normal(0.0, 0.1, shape),
                rng.normal(0.0, 0.1, shape),
                rng.uniform(0.8, 1.2, shape),
            ]
        elif cls in ("Conv2D", "Dense", "Conv2DTranspose"):
            kernel = unit.variables[0]
            fan_in = int(kernel.shape[-1]) if cls == "Conv2DTranspose" else int(np.prod(kernel.shape[:-1]))
            values = [rng.normal(0.0, np.sqrt(2.0 / fan_in), kernel.shape)]
            if len(unit.variables) == 2:
                values.append(rng.normal(0.0, 0.1, unit.variables[1].shape))
        else:
            raise ValueError(f"no randomisation rule for Keras layer type {cls}")
        for variable, value in zip(unit.variables, values, strict=True):
            variable.assign(value.astype(np.float32))


def write_trainer_checkpoint(model, directory: str, step: int = 1) -> str:
    """Saves ``model`` as Model Garden's trainer does (``official/core/base_trainer.py``: a
    ``tf.train.Checkpoint`` of global_step, model and optimizer, written by a ``CheckpointManager`` as
    ``ckpt-<step>``), with SGD-momentum slots for every trainable variable. Returns the prefix."""
    import tensorflow as tf
    import tf_keras

    optimizer = tf_keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)
    optimizer.build(model.trainable_variables)  # creates the momentum slots, changes no weight
    global_step = tf.Variable(step, dtype=tf.int64, trainable=False, name="global_step")
    checkpoint = tf.train.Checkpoint(global_step=global_step, model=model, optimizer=optimizer)
    manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=1)
    return manager.save(checkpoint_number=step)


def spinenet_checkpoint_order(model_id: str, built=None) -> list[int]:
    """The ``layer_with_weights-N`` indices of Model Garden's SpineNet-``model_id`` checkpoint, in the
    order the layers create their variables (the order ``record_keras_variables`` sees, and the order
    our modules are called in). Measured on the checkpoint itself: every variable is filled with its
    creation index, the model saved with ``tf.train.Checkpoint``, and the values read back by key.
    ``built``: a (model, units) of ``build_retinanet_spinenet`` to measure (its values are overwritten)."""
    import re
    import tempfile

    import tensorflow as tf

    model, units = built or build_retinanet_spinenet(model_id, 128, 8, num_classes=2, head_convs=1)
    created = [v for unit in units for v in unit.variables]
    for index, variable in enumerate(created):
        variable.assign(np.full(variable.shape, float(index), np.float32))
    with tempfile.TemporaryDirectory() as directory:
        reader = tf.train.load_checkpoint(tf.train.Checkpoint(model=model).write(f"{directory}/ckpt"))
        by_index = {}
        for key in reader.get_variable_to_shape_map():
            found = re.match(r"model/_backbone/layer_with_weights-(\d+)/", key)
            if found:
                by_index[int(reader.get_tensor(key).flat[0])] = int(found.group(1))
    order: list[int] = []
    for index in sorted(by_index):
        if by_index[index] not in order:
            order.append(by_index[index])
    return order


if (
    __name__ == "__main__"
):  # (re)measures scaledet_jax/convert/model_garden_spinenet_order.json [for the variants given]
    import json
    import sys

    import conftest  # noqa: F401  (import order: torch before TensorFlow)
    from official.vision.modeling.backbones.spinenet import SCALING_MAP

    from scaledet_jax.convert.model_garden import SPINENET_ORDER_FILE

    with open(SPINENET_ORDER_FILE) as f:
        table = json.load(f)
    table.update({model_id: spinenet_checkpoint_order(model_id) for model_id in sys.argv[1:] or SCALING_MAP})
    with open(SPINENET_ORDER_FILE, "w") as f:
        f.write("{\n" + ",\n".join(f'  "{k}": {json.dumps(v)}' for k, v in table.items()) + "\n}\n")
    print(f"wrote {SPINENET_ORDER_FILE}: " + ", ".join(f"{k}: {len(v)} layers" for k, v in table.items()))
