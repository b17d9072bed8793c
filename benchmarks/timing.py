"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` (the caller warms up and synchronises)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_batch(batch_size: int, size: int, max_instances: int, rng, num_classes: int = 3) -> dict:
    """A training batch of our pipeline's layout: random images and 70% valid random boxes (ymin, xmin, ymax, xmax)."""
    import numpy as np

    yx = rng.uniform(0, size * 0.7, (batch_size, max_instances, 2))
    hw = rng.uniform(size * 0.05, size * 0.3, (batch_size, max_instances, 2))
    return {
        "image": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
        "boxes": np.concatenate([yx, yx + hw], -1).astype(np.float32),
        "classes": rng.randint(1, num_classes + 1, (batch_size, max_instances)).astype(np.int32),
        "valid": rng.uniform(size=(batch_size, max_instances)) < 0.7,
        "crowd": np.zeros((batch_size, max_instances), bool),
    }


def compiled_train_step(config, batch: dict):
    """(compile seconds, state, step) of our full train step for ``config`` (forward, anchor labeling, losses,
    backward, optimizer update, BN statistics) on ``batch``'s shapes; ``step(state, batch) -> (state, metrics)``."""
    import functools

    import jax

    from scaledet_jax import train
    from scaledet_jax.tasks import build_task

    task = build_task(config)
    schedule = train.learning_rate_schedule(config, 100, 1000)
    tx = train.make_optimizer(config, schedule)
    state = jax.jit(lambda r: train.init_state(config, task, tx, r))(jax.random.key(0))
    step = jax.jit(functools.partial(train.train_step, config, task, tx, schedule, jax.random.key(1)), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    return time.perf_counter() - start, state, compiled


def batch2_train_step(config):
    """(compiled step, run) for a batch-2 train step on random data; ``run()`` does one step and waits for it
    (the state is carried between calls). One warm-up step has run."""
    import jax
    import numpy as np

    config.data.train_batch_size = 2
    batch = random_batch(2, config.model.image_size, 100, np.random.RandomState(0))
    _, state, step = compiled_train_step(config, batch)
    holder = {"state": state}

    def run() -> None:
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)

    run()
    return step, run


def config_for_row(spec: str):
    """``configs/NAME.py``'s config for a benchmark row 'NAME' or 'NAME@SIZE' (SIZE overrides the input size)."""
    from configs_util import load_config

    name, _, size = spec.partition("@")
    config = load_config(name)
    if size:
        config.model.image_size = int(size)
    return config
