"""Parity with the TF original: TF Model Garden SpineNet RetinaNet vs ours, same weights.

Model Garden builds the model (random init, then every variable randomised); its weights are copied
into our Flax model by creation order with every shape checked; endpoints and class/box outputs
at every level must agree to 1e-4 max abs in fp32, inference mode. A negative control (our model
with PyTorch-style symmetric max pooling) must disagree, which shows the comparison is not blind.
The same builds are the oracle for the trainable-parameter counts.

Model Garden checkpoints: the same randomised models are saved as Model Garden's trainer saves them
(``tf.train.Checkpoint`` of model, optimizer with momentum slots and global step, via a
CheckpointManager) and converted through ``python -m scaledet_jax.convert --from=model-garden``
(read with ``tf.train.load_checkpoint``, no Model Garden at conversion time): the converted variables
must equal the in-memory mapping's exactly and give Model Garden's outputs within 1e-4. SpineNet's
functional-graph layer numbering is mapped with an order table measured on Model Garden's own
checkpoints; a test re-measures it for every variant.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from configs_util import load_config, run_convert
from flax import traverse_util
from model_garden import (
    build_retinanet_spinenet,
    randomize,
    raw_outputs,
    spinenet_checkpoint_order,
    write_trainer_checkpoint,
)

from scaledet_jax.convert import checkpoint
from scaledet_jax.convert import model_garden as mg
from scaledet_jax.models import build_model
from scaledet_jax.tools import profile

TOLERANCE = 1e-4

# (config, Model Garden model_id, parity input size); sizes keep CI fast, both are multiples of 128.
CASES = [("spinenet49s", "49S", 384), ("spinenet49", "49", 256)]


def _flax_variables(model, units, size):
    order = mg.flax_layer_order(model, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32), train=False)
    return mg.keras_to_flax(units, order, profile.abstract_variables(model, size))


def _forward(model):
    """(variables, images) -> (endpoints, class outputs, box outputs), jit-compiled once per model."""

    @jax.jit
    def forward(v, x):
        features = model.apply(v, x, train=False, method=lambda m, x, train: m.backbone(x, train))
        outputs = model.apply(v, x, train=False)
        return features, outputs["class_outputs"], outputs["box_outputs"]

    return lambda variables, images: forward(variables, jnp.asarray(images))


def _max_diffs(ours, reference) -> dict[str, float]:
    worst = {}
    for name, got, ref in zip(("endpoint", "class", "box"), ours, reference, strict=True):
        assert sorted(got) == sorted(ref) == [3, 4, 5, 6, 7]
        for level in ref:
            assert got[level].shape == ref[level].shape, (name, level)
            diff = float(np.abs(np.asarray(got[level]) - ref[level]).max())
            worst[name] = max(worst.get(name, 0.0), diff)
    return worst


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
        forward=_forward(model),
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
    ours = pair["forward"](pair["variables"], pair["images"])
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
    _, scores, boxes = _forward(model)(_flax_variables(model, pair["units"], pair["size"]), pair["images"])
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


@pytest.fixture(scope="module")
def trainer_checkpoint(pair, tmp_path_factory) -> str:
    """The randomised Model Garden model saved as its trainer saves it; returns the directory."""
    directory = tmp_path_factory.mktemp("model_garden_train")
    write_trainer_checkpoint(pair["keras"], str(directory), step=350)
    return str(directory)


def test_model_garden_checkpoint_converts_through_the_cli(pair, trainer_checkpoint, tmp_path):
    size, name = pair["size"], f"spinenet{pair['config'].model.backbone.model_id.lower()}"
    out = tmp_path / "converted"
    result = run_convert(
        "--from=model-garden", f"--config=configs/{name}.py", f"--input={trainer_checkpoint}",
        f"--output={out}", f"--image_size={size}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.load(open(out / "conversion.json"))
    assert info["model_options"]["num_classes"] == 91 and info["model_options"]["background_slot"] is True
    reasons = [reason for _, reason in info["ignored"]]
    # SGD momentum slots, iteration counters, global step: read from the index, never mapped.
    assert sum("optimizer" in r for r in reasons) >= len(pair["keras"].trainable_variables)

    config = copy.deepcopy(pair["config"])
    checkpoint.apply_model_options(config, str(out))
    assert config.model.to_dict() == pair["config"].model.to_dict()  # Model Garden's semantics are our defaults
    converted = traverse_util.flatten_dict(checkpoint.load_converted(str(out)))
    expected = traverse_util.flatten_dict(jax.device_get(pair["variables"]))
    assert sorted(converted) == sorted(expected)
    for path, value in expected.items():
        assert np.array_equal(np.asarray(converted[path]), np.asarray(value)), path
    variables = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in converted.items()})
    worst = _max_diffs(pair["forward"](variables, pair["images"]), pair["reference"])
    print(
        f"\nconverted Model Garden checkpoint {name}@{size}: max abs diff "
        + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
    )
    assert max(worst.values()) <= TOLERANCE, worst


def test_model_garden_checkpoint_with_another_variants_config_is_refused(pair, trainer_checkpoint, tmp_path):
    # 49S under SpineNet-96's config: another topology (layer count); 49 under 49S's: other widths (shapes).
    other = {"49S": "spinenet96", "49": "spinenet49s"}[pair["config"].model.backbone.model_id]
    out = tmp_path / "converted"
    result = run_convert("--from=model-garden", f"--config=configs/{other}.py", f"--input={trainer_checkpoint}",
                      f"--output={out}", "--image_size=128")  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"does not fit configs/{other}.py as --from=model-garden" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("model_id", ["49S", "49", "96", "143", "143L", "190"])
def test_every_spinenet_variants_checkpoint_maps_strictly(model_id, tmp_path):
    """The order table the converter reads equals the order measured on Model Garden's checkpoint now; and a
    trainer checkpoint of the variant (small head, 2 classes, randomised) converts with every tensor placed,
    to the variables the in-memory creation-order mapping gives."""
    from scaledet_jax.convert.layouts import LAYOUTS

    size = 128
    built = build_retinanet_spinenet(model_id, size, 8, num_classes=2, head_convs=1)
    with open(mg.SPINENET_ORDER_FILE) as f:
        assert json.load(f)[model_id] == spinenet_checkpoint_order(model_id, built)

    keras_model, units = built
    randomize(units)
    state, ignored = LAYOUTS["model-garden"].read(write_trainer_checkpoint(keras_model, str(tmp_path)))
    config = load_config(f"spinenet{model_id.lower()}")
    config.model.head.num_filters, config.model.head.num_convs = 8, 1
    model, shapes, variables, report, options = LAYOUTS["model-garden"].convert(state, config, size)
    assert options["num_classes"] == 2 and len(report.mapped) == len(jax.tree_util.tree_leaves(shapes))
    expected = traverse_util.flatten_dict(
        jax.device_get(mg.keras_to_flax(units, mg.flax_layer_order(
            model, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32), train=False), shapes))
    )  # fmt: skip
    converted = traverse_util.flatten_dict(variables)
    assert sorted(converted) == sorted(expected)
    assert all(np.array_equal(np.asarray(converted[k]), np.asarray(v)) for k, v in expected.items())
