"""``model.dtype='bfloat16'`` (issue 13 item 6): bfloat16 compute, float32 parameters, BN statistics, optimizer
state and losses; outputs and gradients within stated tolerances of float32 on a fixed batch.

The tolerances are bfloat16's: an 8-bit mantissa rounds each product to ~0.4%, and through the quickstart's
~40 layers the outputs differ from float32 by ~0.8% of their range (measured). Training to the same AP is
measured by ``benchmarks/bf16_quickstart.py`` (README: bfloat16).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from configs_util import load_config

from scaledet_jax import train
from scaledet_jax.tasks import build_task

OUTPUT_TOLERANCE = 0.02  # max |bf16 - fp32| per output level, as a fraction of max |fp32| on that level
GRADIENT_TOLERANCE = 0.02  # |g_bf16 - g_fp32| / |g_fp32| over all parameters, inference-mode BN (measured 0.004)


def _configs():
    configs = {}
    for dtype in ("float32", "bfloat16"):
        config = load_config("quickstart")
        config.model.dtype = dtype
        config.data.train_batch_size = 2
        configs[dtype] = config
    return configs


@pytest.fixture(scope="module")
def setup():
    configs = _configs()
    tasks = {dtype: build_task(config) for dtype, config in configs.items()}
    config = configs["float32"]
    tx = train.make_optimizer(config, train.learning_rate_schedule(config, 10, 100))
    state = jax.jit(lambda r: train.init_state(config, tasks["float32"], tx, r))(jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves((state.params, state.opt_state)) if x.ndim)
    rng = np.random.default_rng(0)
    size = config.model.image_size
    yx = rng.uniform(0, size * 0.6, (2, 4, 2))
    batch = {
        "image": jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32),
        "boxes": jnp.asarray(np.concatenate([yx, yx + rng.uniform(16, 48, (2, 4, 2))], -1), jnp.float32),
        "classes": jnp.asarray(rng.integers(1, 4, (2, 4)), jnp.int32),
        "valid": jnp.ones((2, 4), bool),
        "crowd": jnp.zeros((2, 4), bool),
    }
    return configs, tasks, tx, state, batch


def _spread(variables, key):
    """Random-init heads output ~0 (prior bias, 1e-5-scale box kernels): perturb every variable so that
    every output carries signal through every layer."""
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(key, len(leaves))
    spread = [
        x + (0.05 if x.ndim > 1 else 0.1) * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)
    ]
    variables = jax.tree_util.tree_unflatten(treedef, spread)
    variables["batch_stats"] = jax.tree_util.tree_map(lambda x: jnp.abs(x) + 0.5, variables["batch_stats"])
    return variables


def test_bf16_outputs_are_within_tolerance_of_fp32(setup):
    _, tasks, _, state, batch = setup
    variables = _spread({"params": state.params, "batch_stats": state.batch_stats}, jax.random.key(1))
    outputs = {
        dtype: jax.jit(lambda v, x, task=task: task.model.apply(v, x, train=False))(variables, batch["image"])
        for dtype, task in tasks.items()
    }
    for head in ("class_outputs", "box_outputs"):
        for level, fp32 in outputs["float32"][head].items():
            bf16 = outputs["bfloat16"][head][level]
            assert fp32.dtype == jnp.float32 and bf16.dtype == jnp.bfloat16
            scale = float(jnp.max(jnp.abs(fp32)))
            diff = float(jnp.max(jnp.abs(bf16.astype(jnp.float32) - fp32)))
            assert scale > 0.1, (head, level, scale)  # real signal, not the init's near-zero outputs
            assert diff <= OUTPUT_TOLERANCE * scale, (head, level, diff, scale)
            assert diff > 0  # bfloat16 really ran
    # Decoding and NMS run in float32 on bfloat16 outputs.
    detections = jax.jit(tasks["bfloat16"].predict)(variables, batch["image"])
    assert detections["boxes"].dtype == detections["scores"].dtype == jnp.float32


def _gradients(config, task, state, batch, train_mode: bool):
    def loss_fn(params):
        return train.compute_losses(config, task, params, state.batch_stats, batch, jax.random.key(2), train=train_mode)

    (loss, (parts, stats)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params)
    return loss, parts, stats, jnp.concatenate([g.ravel() for g in jax.tree_util.tree_leaves(grads)]), grads


def _relative(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_bf16_training_keeps_float32_state_and_gradients_within_tolerance(setup):
    configs, tasks, _, state, batch = setup
    fp32, bf16 = (configs["float32"], tasks["float32"]), (configs["bfloat16"], tasks["bfloat16"])
    # Inference-mode BN: bf16's gradient must be close to fp32's. (With training-mode BN at random init on
    # noise images the fp32 gradient itself moves by ~90% when only the input is rounded to bf16 — measured —
    # so that setting cannot tell bf16 errors apart; its loss can.)
    g16 = _gradients(*bf16, state, batch, False)[3]
    assert 0 < _relative(g16, _gradients(*fp32, state, batch, False)[3]) <= GRADIENT_TOLERANCE
    # Training mode: the loss as fp32's; gradients, new BN statistics and the loss itself in float32.
    loss32 = jax.jit(
        lambda p: train.compute_losses(*fp32, p, state.batch_stats, batch, jax.random.key(2), train=True)[0]
    )(state.params)
    loss16, parts, stats, flat, grads = _gradients(*bf16, state, batch, True)
    assert float(loss16) == pytest.approx(float(loss32), rel=0.005)
    assert loss16.dtype == parts["cls_loss"].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves((grads, stats)))
    assert bool(jnp.all(jnp.isfinite(flat))) and float(jnp.linalg.norm(flat)) > 0
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), stats, state.batch_stats)
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-3  # batch statistics were updated (in float32)
