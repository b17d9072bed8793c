"""SpineNet + RetinaNet: exact parameter counts, shapes of every variant, schedule and graph."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from configs_util import load_config

from scaledet_jax.backbones import spinenet
from scaledet_jax.models import build_model
from scaledet_jax.tools import profile

# Trainable parameters of TF Model Garden's build, 91 classes, 9 anchors (REFERENCE.md; 143L measured
# here from tf-models-official 2.20 with the same head as 143).
MODEL_GARDEN_COUNTS = {
    # config: (backbone, RetinaNet total)
    "spinenet49s": (9_089_215, 11_265_942),
    "spinenet49": (21_831_488, 28_543_383),
    "spinenet96": (36_262_976, 42_974_871),
    "spinenet143": (60_247_616, 66_959_511),
    "spinenet143l": (100_796_257, 107_508_152),
    "spinenet190": (126_587_664, 163_637_351),
}


@pytest.mark.parametrize("config_name", sorted(MODEL_GARDEN_COUNTS))
def test_trainable_parameters_equal_model_garden(config_name):
    config = load_config(config_name)
    variables = profile.abstract_variables(build_model(config.model), 256)
    backbone, total = MODEL_GARDEN_COUNTS[config_name]
    assert profile.count_params(variables["params"]["backbone"]) == backbone
    assert profile.count_params(variables["params"]) == total


@pytest.mark.parametrize("config_name,total", [("spinenet49s", 11_151_795), ("spinenet49", 28_315_188)])
def test_trainable_parameters_with_80_classes(config_name, total):
    config = load_config(config_name)
    config.model.num_classes = 80
    assert profile.count_params(profile.abstract_variables(build_model(config.model), 256)["params"]) == total


@pytest.mark.parametrize("config_name", sorted(MODEL_GARDEN_COUNTS))
def test_output_shapes_every_variant(config_name):
    config = load_config(config_name)
    size, batch = 256, 2
    model = build_model(config.model)
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    variables = profile.abstract_variables(model, size)
    outputs = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    anchors, classes = 9, config.model.num_classes
    for level in range(3, 8):
        side = size // 2**level
        assert outputs["class_outputs"][level].shape == (batch, side, side, anchors * classes)
        assert outputs["box_outputs"][level].shape == (batch, side, side, anchors * 4)
    features = jax.eval_shape(
        lambda v, x: model.apply(v, x, method=lambda m, x: m.backbone(x, False)), variables, images
    )
    endpoint_filters = spinenet.SCALING_MAP[config.model.backbone.model_id]["endpoints_num_filters"]
    assert {k: v.shape for k, v in features.items()} == {
        level: (batch, size // 2**level, size // 2**level, endpoint_filters) for level in range(3, 8)
    }


def test_small_variant_runs_forward_and_train_step():
    """SpineNet-49S really runs: finite outputs, BN statistics update in training, dropout RNG used."""
    config = load_config("spinenet49s")
    model = build_model(config.model)
    images = jnp.asarray(np.random.RandomState(0).normal(size=(2, 128, 128, 3)), jnp.float32)
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, images)
    outputs = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    assert all(bool(jnp.isfinite(o).all()) for o in jax.tree_util.tree_leaves(outputs))
    # The class bias starts every anchor at probability 0.01.
    np.testing.assert_allclose(jax.nn.sigmoid(outputs["class_outputs"][3]).mean(), 0.01, atol=2e-3)

    def train_forward(v, x, rng):
        return model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": rng})

    train_forward = jax.jit(train_forward)
    out_a, new_state = train_forward(variables, images, jax.random.key(2))
    out_b, _ = train_forward(variables, images, jax.random.key(3))
    changed = jax.tree_util.tree_map(
        lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], new_state["batch_stats"]
    )
    assert all(jax.tree_util.tree_leaves(changed))
    # Stochastic depth (rate 0.2 in the recipe) makes training outputs depend on the dropout key.
    assert float(jnp.abs(out_a["box_outputs"][3] - out_b["box_outputs"][3]).max()) > 0


def test_stochastic_depth_schedule_follows_model_garden():
    # rate * (i + 1) / 16 over the 16 Model Garden specs, the unused level-2 block included.
    config = load_config("spinenet49")
    model = build_model(config.model)
    rates = {}

    import flax.linen as nn

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, spinenet.BlockGroup) and context.method_name == "__call__":
            rates[module.name] = module.stochastic_depth_rate
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        profile.abstract_variables(model, 256)
    assert rates["stem_block_0"] == 0.0
    for i in range(15):
        assert rates[f"block_{i}"] == pytest.approx(0.2 * (i + 1) / 16)
    assert "block_15" not in rates  # the level-2 output block is not built


def test_plan_network_merges_unconsumed_blocks():
    plans = spinenet.plan_network(spinenet.SPINENET_BLOCK_SPECS, 1.0, 3, 7)
    by_index = {p.index: p for p in plans}
    # Block 9 (net index 11, level 5) feeds no later block, so the level-5 output block 12 adds it
    # directly; only output blocks take such direct parents.
    assert by_index[12].direct_parents == (11,)
    assert [p.index for p in plans if not p.built] == [15]
    for p in plans:
        if not p.spec.is_output:
            assert p.direct_parents == ()


def test_input_size_must_be_multiple_of_128():
    config = load_config("spinenet49s")
    with pytest.raises(ValueError, match="multiples of 128"):
        profile.abstract_variables(build_model(config.model), 200)


def test_unknown_variant_is_refused():
    config = load_config("spinenet49")
    config.model.backbone.model_id = "50"
    with pytest.raises(ValueError, match="unknown SpineNet variant"):
        build_model(config.model)
