"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8: one loss/grad/BN step of the quickstart
model on the same global batch, sharded over 8 devices and on 1 device; prints the max differences.

The step runs in float64: sharding changes the order of the batch reductions (BN statistics, filter
gradients), and in float32 that alone moves gradients by ~1e-5 (5e-5 of their scale), which would
hide a real cross-replica error of the same size. In float64 the two runs agree to ~1e-12.
"""

import json
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]

from configs_util import load_config  # noqa: E402

from scaledet_jax import train  # noqa: E402
from scaledet_jax.tasks import build_task  # noqa: E402


def main():
    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 8, jax.devices()
    config = load_config("quickstart")
    config.model.image_size = 128
    task = build_task(config)
    rng = np.random.RandomState(0)
    batch = {
        "image": rng.normal(size=(8, 128, 128, 3)).astype(np.float32),
        "boxes": np.tile(np.array([[10, 10, 60, 70], [40, 50, 100, 120]], np.float32), (8, 1, 1))
        + rng.uniform(-5, 5, (8, 2, 4)).astype(np.float32),
        "classes": rng.randint(1, 4, (8, 2)).astype(np.int32),
        "valid": np.array([[True, True]] * 4 + [[True, False]] * 4),
        "crowd": np.zeros((8, 2), bool),
    }
    variables = task.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, 128)
    variables = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), variables)
    batch = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in batch.items()}

    def step(params, stats, batch):
        (loss, (parts, new_stats)), grads = jax.value_and_grad(
            lambda p: train.compute_losses(config, task, p, stats, batch, jax.random.key(2)), has_aux=True
        )(params)
        return loss, parts["num_positives"], grads, new_stats

    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = Mesh(np.array(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        fn = jax.jit(step, in_shardings=(rep, rep, data), out_shardings=rep)
        sharded = {k: jax.device_put(v, data) for k, v in batch.items()}
        assert len(sharded["image"].sharding.device_set) == len(devices)
        results.append(jax.device_get(fn(variables["params"], variables["batch_stats"], sharded)))
    (loss1, pos1, g1, s1), (loss8, pos8, g8, s8) = results
    diff = lambda a, b: max(
        float(np.max(np.abs(x - y)))
        for x, y in zip(
            jax.tree_util.tree_leaves(a),  # noqa: E731
            jax.tree_util.tree_leaves(b),
            strict=True,
        )
    )
    moved = diff(s1, variables["batch_stats"])
    print(
        json.dumps(
            {
                "loss": abs(float(loss1 - loss8)),
                "loss_value": float(loss1),
                "positives": [float(pos1), float(pos8)],
                "grads": diff(g1, g8),
                "batch_stats": diff(s1, s8),
                "stats_moved": moved,
                "grad_scale": max(float(np.max(np.abs(x))) for x in jax.tree_util.tree_leaves(g1)),
            }
        )
    )


if __name__ == "__main__":
    main()
