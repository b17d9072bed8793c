"""Parity with the TF original: TF Model Garden's Mask R-CNN SpineNet-49 (``maskrcnn_spinenet_coco``)
vs ours (configs/maskrcnn_spinenet49.py), same weights, inference mode.

Model Garden builds the model with tf-models-official (random init, then every kernel, bias, gamma,
beta and moving statistic randomised); its weights are copied into our Flax model by creation order
with every shape checked (Conv2D, BN, the heads' Dense and Conv2DTranspose layers). On the same images
and the same fixed RoIs, the SpineNet endpoints P3-P7, the RPN's scores and box deltas per level, the
box head's class logits and deltas and the mask head's logits (the channel of a given class, as Model
Garden's mask head returns it) must agree to 1e-4 max abs in fp32. A negative control (torchvision's
RoIAlign instead of Model Garden's crop_and_resize) must disagree.

The same model saved as Model Garden's trainer saves it converts through ``python -m scaledet_jax.convert
--from=model-garden`` to the same variables, and gives the same outputs.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from configs_util import load_config, run_convert
from flax import traverse_util
from model_garden import build_maskrcnn_spinenet, maskrcnn_roi_outputs, randomize_maskrcnn, write_trainer_checkpoint

from scaledet_jax.convert import checkpoint
from scaledet_jax.convert import model_garden as mg
from scaledet_jax.models import build_model
from scaledet_jax.tools import profile

TOLERANCE = 1e-4
SIZE = 128
NUM_ROIS = 24


def _rois(rng: np.random.RandomState) -> np.ndarray:
    """[1, R, 4] RoIs of 6-128 px, some crossing the image border (levels 3-5 at this size)."""
    centres = rng.uniform(0, SIZE, (NUM_ROIS, 2))
    sides = np.exp(rng.uniform(np.log(6.0), np.log(128.0), (NUM_ROIS, 2)))
    return np.concatenate([centres - sides / 2, centres + sides / 2], 1).clip(-8, SIZE + 8)[None].astype(np.float32)


@pytest.fixture(scope="module")
def pair():
    config = load_config("maskrcnn_spinenet49")
    config.model.image_size = SIZE
    keras_model, units = build_maskrcnn_spinenet("49", SIZE)
    randomize_maskrcnn(units)
    model = build_model(config.model)
    order = mg.flax_layer_order(model, jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32), train=False)
    variables = mg.keras_to_flax(units, order, profile.abstract_variables(model, SIZE))
    rng = np.random.RandomState(3)
    images = rng.normal(0, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    rois = _rois(rng)
    classes = rng.randint(1, config.model.num_classes, (1, NUM_ROIS)).astype(np.int32)
    return dict(
        keras=keras_model,
        config=config,
        model=model,
        variables=variables,
        images=images,
        rois=rois,
        classes=classes,
        reference=maskrcnn_roi_outputs(keras_model, images, rois, classes),
    )


def _ours(model, variables, images, rois, classes):
    @jax.jit
    def forward(v, x, boxes):
        features = model.apply(v, x, method="features")
        scores, deltas = model.apply(v, features, method="rpn")
        logits, box_deltas = model.apply(v, features, boxes, method="roi_outputs")
        masks = model.apply(v, features, boxes, method="mask_outputs")
        return features, scores, deltas, logits, box_deltas, masks

    features, scores, deltas, logits, box_deltas, masks = jax.device_get(forward(variables, images, rois))
    chosen = np.take_along_axis(masks, classes[:, :, None, None, None], axis=-1)[..., 0]
    return features, scores, deltas, logits, box_deltas, chosen


def _max_diffs(pair, variables) -> dict[str, float]:
    reference = pair["reference"]
    features, scores, deltas, logits, box_deltas, masks = _ours(
        pair["model"], variables, pair["images"], pair["rois"], pair["classes"]
    )
    diffs = {}
    for level in range(3, 8):
        diffs[f"P{level}"] = np.max(np.abs(features[level] - reference["features"][level]))
        diffs[f"rpn_scores{level}"] = np.max(np.abs(scores[level] - reference["rpn_scores"][level]))
        diffs[f"rpn_boxes{level}"] = np.max(np.abs(deltas[level] - reference["rpn_boxes"][level]))
    diffs["class_logits"] = np.max(np.abs(logits - reference["class_outputs"]))
    diffs["box_deltas"] = np.max(np.abs(box_deltas - reference["box_outputs"]))
    diffs["mask_logits"] = np.max(np.abs(masks - reference["mask_logits"]))
    return diffs


def test_backbone_rpn_box_and_mask_heads_match_model_garden(pair):
    reference = pair["reference"]
    diffs = _max_diffs(pair, pair["variables"])
    scale = {k: float(np.max(np.abs(v))) for k, v in (("mask", reference["mask_logits"]),
                                                      ("class", reference["class_outputs"]))}  # fmt: skip
    print(f"\nmaskrcnn spinenet49 @{SIZE} vs Model Garden (fp32 max abs): "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + f"; output scales {scale}")  # fmt: skip
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_torchvision_roi_align_is_a_negative_control(pair):
    config = copy.deepcopy(pair["config"])  # the fixture is shared by the module's tests
    config.model.roi.style = "torchvision"
    model = build_model(config.model)
    *_, masks = _ours(model, pair["variables"], pair["images"], pair["rois"], pair["classes"])
    assert np.max(np.abs(masks - pair["reference"]["mask_logits"])) > 1e-2


def test_model_garden_checkpoint_converts_through_the_cli(pair, tmp_path):
    write_trainer_checkpoint(pair["keras"], str(tmp_path / "train"), step=1000)
    out = tmp_path / "converted"
    result = run_convert(
        "--from=model-garden", "--config=configs/maskrcnn_spinenet49.py", f"--input={tmp_path / 'train'}",
        f"--output={out}", f"--image_size={SIZE}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.load(open(out / "conversion.json"))["model_options"]["num_classes"] == 91
    config = copy.deepcopy(pair["config"])
    checkpoint.apply_model_options(config, str(out))
    assert config.model.to_dict() == pair["config"].model.to_dict()
    converted = traverse_util.flatten_dict(checkpoint.load_converted(str(out)))
    expected = traverse_util.flatten_dict(jax.device_get(pair["variables"]))
    assert sorted(converted) == sorted(expected)
    for path, value in expected.items():
        assert np.array_equal(np.asarray(converted[path]), np.asarray(value)), path
    diffs = _max_diffs(pair, traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in converted.items()}))
    print(f"\nconverted Model Garden Mask R-CNN checkpoint: max abs diff {max(diffs.values()):.1e}")
    assert max(diffs.values()) <= TOLERANCE, diffs
