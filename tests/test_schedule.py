"""Learning-rate schedule (Model Garden: linear warmup, then stepwise; or cosine) and L2 penalty."""

import jax.numpy as jnp
import numpy as np
import pytest

from scaledet_jax import train
from scaledet_jax.cli import UserError
from scaledet_jax.defaults import get_config


def test_stepwise_schedule_matches_model_garden_recipe():
    config = get_config()  # batch 256: lr 0.32, warmup 2000 steps from 0.0067, x0.1 at epochs 475, 490
    steps_per_epoch = 462
    schedule = train.learning_rate_schedule(config, steps_per_epoch, 500 * steps_per_epoch)
    assert float(schedule(0)) == pytest.approx(0.0067, rel=1e-5)  # float32
    assert float(schedule(1000)) == pytest.approx(0.0067 + (0.32 - 0.0067) / 2, rel=1e-5)
    assert float(schedule(2000)) == pytest.approx(0.32, rel=1e-6)
    assert float(schedule(475 * steps_per_epoch - 1)) == pytest.approx(0.32, rel=1e-6)
    assert float(schedule(475 * steps_per_epoch + 1)) == pytest.approx(0.032, rel=1e-6)
    assert float(schedule(490 * steps_per_epoch + 1)) == pytest.approx(0.0032, rel=1e-6)


def test_learning_rate_scales_with_batch_and_cosine_ends_at_zero():
    config = get_config()
    config.data.train_batch_size = 64
    config.optim.schedule = "cosine"
    config.optim.warmup_steps = 10
    schedule = train.learning_rate_schedule(config, 100, 1000)
    assert float(schedule(10)) == pytest.approx(0.32 * 64 / 256)
    assert float(schedule(1000)) == pytest.approx(0.0, abs=1e-7)
    assert float(schedule(505)) == pytest.approx(0.08 * 0.5, rel=1e-3)


def test_unknown_schedule_is_refused():
    config = get_config()
    config.optim.schedule = "linear-ish"
    with pytest.raises(UserError, match="unknown optim.schedule"):
        train.learning_rate_schedule(config, 10, 100)


def test_l2_penalty_on_kernels_only():
    params = {"a": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "bn": {"scale": jnp.ones(3)}}
    np.testing.assert_allclose(float(train.l2_penalty(params, 4e-5)), 0.5 * 4e-5 * 6)
