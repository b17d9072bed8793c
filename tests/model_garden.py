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
