"""Parity with the TF original: TF Model Garden SpineNet RetinaNet vs ours, same weights.

Model Garden builds the model (random init, then every variable randomised); its weights are copied
into our Flax model by creation order with every shape checked; endpoints and class/box outputs
at every level must agree to 1e-4 max abs in fp32, inference mode. A negative control (our model
with PyTorch-style symmetric max pooling) must disagree, which shows the comparison is not blind.
The same builds are the oracle for the trainable-parameter counts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from configs_util import load_config
from model_garden import build_retinanet_spinenet, randomize, raw_outputs

from scaledet_jax.convert import model_garden as mg
from scaledet_jax.models import build_model
from scaledet_jax.tools import profile

TOLERANCE = 1e-4

# (config, Model Garden model_id, parity input size); sizes keep CI fast, both are multiples of 128.
CASES = [("spinenet49s", "49S", 384), ("spinenet49", "49", 256)]


def _flax_variables(model, units, size):
    order = mg.flax_layer_order(model, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32), train=False)
    return mg.keras_to_flax(units, order, profile.abstract_variables(model, size))


def _forward(model, variables, images):
    @jax.jit
    def forward(v, x):
        features = model.apply(v, x, train=False, method=lambda m, x, train: m.backbone(x, train))
        outputs = model.apply(v, x, train=False)
        return features, outputs["class_outputs"], outputs["box_outputs"]

    return forward(variables, jnp.asarray(images))


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def pair(request):
    config_name, model_id, size = request.param
    config = load_config(config_name)
    config.model.image_size = size
    keras_model, units = build_retinanet_spinenet(model_id, size, config.model.head.num_filters)
    randomize(units)
    images = np.random.RandomState(7).normal(0, 1, (2, size, size, 3)).astype(np.float32)
    model = build_model(config.model)
    return dict(
        config=config,
        keras=keras_model,
        units=units,
        model=model,
        size=size,
        images=images,
        variables=_flax_variables(model, units, size),
        reference=raw_outputs(keras_model, images),
    )


def test_trainable_parameter_counts_equal(pair):
    keras_count = sum(int(np.prod(w.shape)) for w in pair["keras"].trainable_weights)
    assert profile.count_params(pair["variables"]["params"]) == keras_count
    keras_backbone = sum(int(np.prod(w.shape)) for w in pair["keras"].backbone.trainable_weights)
    assert profile.count_params(pair["variables"]["params"]["backbone"]) == keras_backbone


def test_outputs_match_model_garden(pair):
    ours = _forward(pair["model"], pair["variables"], pair["images"])
    worst = {}
    for name, got, ref in zip(("endpoint", "class", "box"), ours, pair["reference"], strict=True):
        assert sorted(got) == sorted(ref) == [3, 4, 5, 6, 7]
        for level in ref:
            assert got[level].shape == ref[level].shape, (name, level)
            scale = float(np.abs(ref[level]).max())
            assert scale > 0.05, f"{name} level {level} is near zero: the comparison would be blind"
            diff = float(np.abs(np.asarray(got[level]) - ref[level]).max())
            assert diff <= TOLERANCE, f"{name} level {level}: max abs diff {diff:.2e} (max |ref| {scale:.2f})"
            worst[name] = max(worst.get(name, 0.0), diff)
    # Shown with `pytest -s`; the README quotes these numbers.
    print(
        f"\nparity {pair['config'].model.backbone.model_id}@{pair['size']}: max abs diff "
        + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
    )


def test_negative_control_symmetric_pooling_disagrees(pair):
    config = pair["config"].copy_and_resolve_references()
    config.model.pool_padding = "symmetric"
    model = build_model(config.model)
    _, scores, boxes = _forward(model, _flax_variables(model, pair["units"], pair["size"]), pair["images"])
    _, ref_scores, ref_boxes = pair["reference"]
    diff = max(float(np.abs(np.asarray(scores[lv]) - ref_scores[lv]).max()) for lv in ref_scores)
    assert diff > 100 * TOLERANCE


def test_mismatched_structure_is_refused(pair):
    # The mapping checks kinds and shapes: shifting the order by one layer must fail loudly.
    model, size = pair["model"], pair["size"]
    order = mg.flax_layer_order(model, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32), train=False)
    abstract = profile.abstract_variables(model, size)
    with pytest.raises(ValueError, match="is a|shape"):
        mg.keras_to_flax(pair["units"], order[1:] + order[:1], abstract)
