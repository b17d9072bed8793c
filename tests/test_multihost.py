"""Multi-host training and evaluation with real processes (issue 13 item 2).

Two CPU processes, each with its own device, joined by ``jax.distributed.initialize`` on a local coordinator
(``main.py --multihost``), train and evaluate the tiny quickstart; one process with two devices does the same
on the same global batch. Parameters, metrics and detections must agree: each process reads its own shard
of every batch, the eval shards are uneven (5 images over 2 processes) and still every process makes the
same number of predict calls, and process 0 scores the whole split once.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from configs_util import CONFIG_DIR, load_config

from scaledet_jax.data import pipeline

ROOT = str(CONFIG_DIR.parent)
STEPS = 3
OVERRIDES = [
    "--config=configs/quickstart.py",
    "--config.model.image_size=128",
    "--config.data.synthetic_train_images=8",
    "--config.data.synthetic_val_images=5",  # 3 + 2 images: uneven eval shards
    "--config.data.train_batch_size=4",
    "--config.data.eval_batch_size=2",  # one image per process per batch: 3 batches vs 2 + 1 padding batch
    f"--config.total_steps={STEPS}",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=1",
    "--config.optim.warmup_steps=1",
    "--config.model.detection.score_threshold=0.0",  # 3 steps from scratch: keep every image's top detections
    "--config.model.detection.max_detections=20",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(workdir, devices: int, *extra: str) -> subprocess.Popen:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        SCALEDET_JAX_TRACEBACK="1",
    )
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # processes of one run must not race on a shared cache
    return subprocess.Popen(
        [sys.executable, "main.py", *OVERRIDES, f"--workdir={workdir}", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process: subprocess.Popen, name: str) -> str:
    try:
        out, _ = process.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        pytest.fail(f"{name} did not finish:\n{out[-4000:]}")
    assert process.returncode == 0, f"{name} failed:\n{out[-4000:]}"
    return out


def _params(workdir, step: int = STEPS) -> dict:
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), "default")
    checkpointer = ocp.PyTreeCheckpointer()
    # As host NumPy arrays: the checkpoints were written by meshes of other topologies than this process's.
    tree = checkpointer.metadata(path).item_metadata.tree
    restored = checkpointer.restore(
        path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    )
    return {"/".join(str(k) for k in path): np.asarray(v) for path, v in _flatten(restored["params"])}


def _flatten(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _detections(workdir) -> list[tuple]:
    with open(os.path.join(workdir, f"detections_{STEPS}.json")) as f:
        found = json.load(f)
    return sorted((d["image_id"], d["category_id"], d["score"], *d["bbox"]) for d in found)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one process with 2 devices, two processes with 1 device each): workdirs and process 1's log."""
    base = tmp_path_factory.mktemp("multihost")
    single, multi = str(base / "one_process"), str(base / "two_processes")
    coordinator = f"--coordinator_address=localhost:{_free_port()}"
    processes = [_start(single, 2)] + [
        _start(multi, 1, "--multihost", coordinator, "--num_processes=2", f"--process_id={i}") for i in range(2)
    ]
    logs = [_finish(p, name) for p, name in zip(processes, ["1-process run", "process 0", "process 1"], strict=True)]
    return single, multi, logs


def test_two_processes_train_to_the_parameters_of_one(runs):
    single, multi, logs = runs
    assert "2 devices" in logs[1] and "from step 0" in logs[1]
    one, two = _params(single), _params(multi)
    assert one.keys() == two.keys()
    diff = max(float(np.max(np.abs(one[k] - two[k]))) for k in one)
    assert diff == 0.0, f"parameters differ by {diff}"  # same devices, same program: bit-identical
    earlier = _params(multi, step=1)
    assert max(float(np.max(np.abs(two[k] - earlier[k]))) for k in two) > 1e-3  # the steps really trained


def test_two_processes_evaluate_the_whole_split_once(runs):
    single, multi, logs = runs
    with open(os.path.join(single, f"eval_{STEPS}.json")) as f:
        expected = json.load(f)
    with open(os.path.join(multi, f"eval_{STEPS}.json")) as f:
        found = json.load(f)
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float):
            assert found[key] == pytest.approx(value, abs=1e-6), key
    # Every image's detections, from both processes' shards, scored and written once by process 0.
    one, two = _detections(single), _detections(multi)
    assert {d[0] for d in two} == {d[0] for d in one} and len({d[0] for d in one}) == 5
    assert len(one) == len(two)
    np.testing.assert_allclose(np.array(two)[:, 2:], np.array(one)[:, 2:], atol=0.02)  # rounded to 0.01 px
    # Both processes print process 0's metrics.
    summary = [line for line in logs[1].splitlines() if line.startswith("COCO AP@")]
    assert summary and summary[-1] in logs[2]


def test_uneven_eval_shards_give_every_process_the_same_number_of_batches(tmp_path):
    config = load_config("quickstart")
    config.data.synthetic_train_images = 2
    config.data.synthetic_val_images = 5
    config.data.eval_batch_size = 4
    builder = pipeline.get_builder(config, str(tmp_path))
    shards = [list(pipeline.eval_batches(config, builder, process_index=i, process_count=2)) for i in range(2)]
    assert [len(s) for s in shards] == [2, 2]  # 3 images (2 batches of 2) and 2 images (1 batch + 1 padding)
    ids = [int(i) for shard in shards for batch in shard for i in batch["image_id"]]
    real = [i for i in ids if i >= 0]
    assert len(real) == len(set(real)) == 5 and ids.count(-1) == 3
    assert all(batch["image"].shape == shards[0][0]["image"].shape for shard in shards for batch in shard)


@pytest.mark.parametrize(
    "env, flags, expected",
    [
        ({"SLURM_NTASKS": "4"}, [], "SLURM started 4 processes (SLURM_NTASKS=4) but --multihost is not set"),
        ({}, ["--multihost"], "--multihost: jax.distributed.initialize failed"),
    ],
)
def test_multihost_mistakes_are_one_line(tmp_path, env, flags, expected):
    result = subprocess.run(
        [sys.executable, "main.py", "--config=configs/quickstart.py", f"--workdir={tmp_path / 'run'}", *flags],
        cwd=ROOT,
        env={k: v for k, v in {**os.environ, **env}.items() if k != "SCALEDET_JAX_TRACEBACK"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # nothing written
