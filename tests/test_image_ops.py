"""``ops.image.letterbox`` (the exported artifacts' preprocessing) against evaluation's TF preprocessing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from scaledet_jax.data import preprocess
from scaledet_jax.ops.image import letterbox

SIZE = 128


def _tf_eval_input(image: np.ndarray, normalization: dict) -> tuple[np.ndarray, float]:
    example = {
        "image": tf.constant(image),
        "image/id": tf.constant(0, tf.int64),
        "objects": {
            "bbox": tf.zeros([0, 4], tf.float32),
            "label": tf.zeros([0], tf.int64),
            "is_crowd": tf.zeros([0], tf.bool),
        },
    }
    out = preprocess.preprocess(example, training=False, output_size=SIZE, max_instances=1, normalization=normalization)
    return out["image"].numpy(), float(out["scale"].numpy())


@pytest.mark.parametrize(
    "normalization",
    [
        {"mean": preprocess.MEAN_RGB, "std": preprocess.STDDEV_RGB},
        {"mean": (102.9801, 115.9465, 122.7717), "std": (1.0, 1.0, 1.0), "bgr": True},  # Detectron's BGR
    ],
)
def test_letterbox_equals_evaluation_preprocessing_for_any_size(normalization):
    rng = np.random.default_rng(0)
    # Down- and upscaled, landscape, portrait, square, extreme aspects, tiny.
    shapes = [(200, 300), (300, 200), (77, 50), (128, 128), (60, 1000), (1000, 37), (3, 5), (640, 480)]
    # One compiled program for every size: the height and width are symbolic, as in the exported artifact.
    exported = jax.export.export(jax.jit(lambda image: letterbox(image, SIZE, **normalization)))(
        jax.ShapeDtypeStruct(jax.export.symbolic_shape("h, w, 3"), jnp.uint8)
    )
    std = min(normalization["std"])
    for shape in shapes:
        image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
        expected, expected_factor = _tf_eval_input(image, normalization)
        pixels, factor = (np.asarray(x) for x in exported.call(image))
        assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.float32
        assert float(factor) == pytest.approx(expected_factor, rel=1e-7)
        # TF's arithmetic step for step, but XLA fuses one multiply-add (module docstring): <= 2e-3 of 255.
        np.testing.assert_allclose(pixels, expected, atol=2.5e-3 / std, rtol=0)
        scaled = np.round(np.array(shape) * np.float32(expected_factor)).astype(int)
        assert np.all(pixels[scaled[0] :] == 0) and np.all(pixels[:, scaled[1] :] == 0)  # padding
        assert np.any(pixels[scaled[0] - 1, : scaled[1]] != 0)
