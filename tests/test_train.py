"""The main job end to end: tfds mock COCO, synthetic data, resume, NaN guard, cross-replica BN, CLI."""

import glob
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from configs_util import CONFIG_DIR, load_config

from scaledet_jax import train
from scaledet_jax.cli import UserError
from scaledet_jax.evaluate import CocoEvaluator

ROOT = str(CONFIG_DIR.parent)


def tiny_config(**overrides):
    """The quickstart recipe on a few synthetic images, small batch."""
    config = load_config("quickstart")
    config.data.synthetic_train_images = 16
    config.data.synthetic_val_images = 6
    config.data.train_batch_size = 4
    config.data.eval_batch_size = 4
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return config


def _repair_mock_boxes(dataset):
    """tfds mock objects have unrelated lengths per field and inverted corners: make them consistent."""

    def fix(example):
        objects = example["objects"]
        n = tf.reduce_min([tf.shape(objects[k])[0] for k in ("bbox", "label", "is_crowd", "area") if k in objects])
        objects = {k: v[:n] for k, v in objects.items()}
        b = objects["bbox"]
        objects["bbox"] = tf.concat([tf.minimum(b[:, :2], b[:, 2:]), tf.maximum(b[:, :2], b[:, 2:])], axis=1)
        example["objects"] = objects
        return example

    return dataset.map(fix)


def test_one_step_train_and_evaluate_on_tfds_mock_coco(tmp_path, monkeypatch):
    config = load_config("spinenet49s")
    config.model.image_size = 128
    config.model.head.num_convs = 1
    config.data.train_batch_size = 2
    config.data.eval_batch_size = 2
    config.total_steps = 1
    config.log_every_steps = 1
    config.model.detection.pre_nms_top_k = 500
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        mocked = tfds.core.DatasetBuilder.as_dataset
        monkeypatch.setattr(
            tfds.core.DatasetBuilder, "as_dataset", lambda self, *a, **k: _repair_mock_boxes(mocked(self, *a, **k))
        )
        result = train.train_and_evaluate(config, str(tmp_path))
    assert int(result["state"].step) == 1
    assert set(result["eval"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert json.load(open(tmp_path / "eval_1.json"))["step"] == 1
    assert isinstance(json.load(open(tmp_path / "detections_1.json")), list)
    assert os.path.isdir(tmp_path / "checkpoints" / "1")
    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))


def test_efficientdet_trains_and_evaluates_with_ema(tmp_path):
    config = tiny_config(total_steps=2)
    small = load_config("efficientdet_quickstart")
    config.model, config.optim = small.model, small.optim
    config.model.image_size = 64
    config.optim.ema_decay = 0.9
    result = train.train_and_evaluate(config, str(tmp_path))
    state = result["state"]
    assert int(state.step) == 2 and state.ema_params is not None
    leaves = zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(state.ema_params), strict=True)
    assert max(float(np.max(np.abs(p - e))) for p, e in leaves) > 0  # EMA is a separate average
    assert set(result["eval"]) >= {"AP", "AP50"}
    detections = json.load(open(tmp_path / "detections_2.json"))
    assert {d["category_id"] for d in detections} <= {1, 2, 3}  # automl layout mapped back to category ids


def test_evaluator_scores_ground_truth_at_ap_1():
    rng = np.random.RandomState(0)
    evaluator = CocoEvaluator()
    for batch_index in range(2):
        boxes = np.zeros((3, 5, 4), np.float32)
        valid = np.zeros((3, 5), bool)
        for i in range(3):
            n = rng.randint(1, 6)
            yx = rng.uniform(0, 200, (n, 2))
            boxes[i, :n] = np.concatenate([yx, yx + rng.uniform(5, 100, (n, 2))], 1)
            valid[i, :n] = True
        batch = {
            "image_id": np.arange(3) + 3 * batch_index + 1,
            "boxes": boxes,
            "valid": valid,
            "classes": rng.randint(1, 4, (3, 5)).astype(np.int32),
            "crowd": np.zeros((3, 5), bool),
            "scale": np.full(3, 0.5, np.float32),
            "original_size": np.full((3, 2), 700, np.int32),
        }
        evaluator.add_ground_truth(batch)
        evaluator.add_detections(
            batch, {"boxes": boxes, "valid": valid, "classes": batch["classes"], "scores": np.where(valid, 0.9, 0.0)}
        )
    metrics = evaluator.evaluate()
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    # And a wrong class everywhere scores 0.
    evaluator.detections = [dict(d, category_id=d["category_id"] % 3 + 1) for d in evaluator.detections]
    assert evaluator.evaluate()["AP"] == pytest.approx(0.0)


def _params(state):
    return jax.device_get(state.params)


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path):
    straight = train.train_and_evaluate(tiny_config(total_steps=4), str(tmp_path / "a"), evaluate=False)
    first = train.train_and_evaluate(
        tiny_config(total_steps=4, stop_after_steps=2), str(tmp_path / "b"), evaluate=False
    )
    assert int(first["state"].step) == 2
    resumed = train.train_and_evaluate(tiny_config(total_steps=4), str(tmp_path / "b"), evaluate=False)
    assert int(resumed["state"].step) == 4
    a, b = _params(straight["state"]), _params(resumed["state"])
    diffs = [
        float(np.max(np.abs(x - y)))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    ]
    assert max(diffs) == 0.0
    # ... and the run really moved the parameters.
    fresh = _params(first["state"])
    assert (
        max(
            float(np.max(np.abs(x - y)))
            for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(fresh), strict=True)
        )
        > 0
    )


def test_nan_loss_stops_with_the_step_and_no_nan_checkpoint(tmp_path):
    config = tiny_config(total_steps=8, checkpoint_every_steps=1)
    config.optim.optimizer = "sgd"  # a huge SGD step overflows (Adam's steps are bounded by the lr alone)
    config.optim.base_learning_rate = 1e9
    config.optim.gradient_clip_norm = 0.0
    config.optim.warmup_steps = 0
    with pytest.raises(FloatingPointError, match=r"NaN or Inf at step (\d+)") as info:
        train.train_and_evaluate(config, str(tmp_path), evaluate=False)
    bad_step = int(str(info.value).split("step ")[1].split(";")[0])
    entries = os.listdir(tmp_path / "checkpoints")
    assert all(e.isdigit() for e in entries), entries  # no half-written (tmp) checkpoint left behind
    saved = sorted(int(e) for e in entries)
    assert all(step <= bad_step for step in saved)  # step s holds the state after s updates: all finite
    for step in saved:
        restored = train.Run(config, str(tmp_path)).checkpoints.restore(step)
        assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(restored["params"]))


def test_cross_replica_batch_norm_8_devices_equals_1_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "helpers", "cross_replica_step.py"), ROOT],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["positives"][0] == out["positives"][1] > 0
    assert out["stats_moved"] > 1e-3  # batch statistics really were updated
    assert out["loss"] <= 1e-5 and out["grads"] <= 1e-5 and out["batch_stats"] <= 1e-5, out


def _main(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "main.py", *args], capture_output=True, text=True, cwd=cwd, timeout=900)


def test_coco_recipe_without_data_gives_one_clear_line(tmp_path):
    result = _main(
        "--config=configs/spinenet49.py",
        f"--workdir={tmp_path / 'run'}",
        f"--config.data.tfds_data_dir={tmp_path / 'no_data'}",
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("main.py: error:")]
    assert len(errors) == 1 and "not prepared" in errors[0] and "coco_folder" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "0")


def test_main_refuses_config_typos(tmp_path):
    result = _main("--config=configs/quickstart.py", f"--workdir={tmp_path}", "--config.optim.lerning_rate=1")
    assert result.returncode == 2 and "Did you mean" in result.stderr and "Traceback" not in result.stderr


def test_eval_predict_is_compiled_once_per_run(tmp_path):
    """Evaluating twice in one run traces (and so compiles) the predict function once (issue 13 item 4)."""
    config = tiny_config(total_steps=1)
    run = train.Run(config, str(tmp_path), needs_eval=True)
    state = run.restore_or_init()
    traces = []
    predict = run.task.predict

    def counted(variables, images):
        traces.append(images.shape)  # runs at trace time only
        return predict(variables, images)

    run.task.predict = counted
    first = run.evaluate(state)
    second = run.evaluate(state)
    assert len(traces) == 1
    assert first["AP"] == second["AP"] and first["AR100"] == second["AR100"]


def test_tfds_ground_truth_has_every_object_with_its_stored_area(monkeypatch):
    """tfds coco/2017 (mock): evaluation's ground truth is every object of the eval split with the dataset's
    stored area and crowd flag (issue 13 item 1), not the preprocessed batches cut to max_instances."""
    from scaledet_jax.data import pipeline, preprocess

    config = load_config("spinenet49s")
    config.data.max_instances = 1
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        mocked = tfds.core.DatasetBuilder.as_dataset
        monkeypatch.setattr(
            tfds.core.DatasetBuilder, "as_dataset", lambda self, *a, **k: _repair_mock_boxes(mocked(self, *a, **k))
        )
        builder = tfds.builder("coco/2017")
        truth = pipeline.tfds_ground_truth(config, builder)
        raw = list(tfds.as_numpy(builder.as_dataset(split=config.data.eval_split)))
    assert [i["id"] for i in truth["images"]] == [int(e["image/id"]) for e in raw]
    expected = []
    for example in raw:
        h, w = example["image"].shape[:2]
        o = example["objects"]
        for box, label, crowd, area in zip(o["bbox"], o["label"], o["is_crowd"], o["area"], strict=True):
            expected.append(
                (int(example["image/id"]), preprocess.COCO_80_TO_91[int(label)], int(crowd), float(area),
                 [box[1] * w, box[0] * h, (box[3] - box[1]) * w, (box[2] - box[0]) * h])
            )  # fmt: skip
    assert max(len(e["objects"]["label"]) for e in raw) > config.data.max_instances
    got = [(a["image_id"], a["category_id"], a["iscrowd"], a["area"], a["bbox"]) for a in truth["annotations"]]
    assert len(got) == len(expected)
    for (gi, gc, gcrowd, garea, gbox), (ei, ec, ecrowd, earea, ebox) in zip(got, expected, strict=True):
        assert (gi, gc, gcrowd) == (ei, ec, ecrowd) and garea == pytest.approx(earea, rel=1e-6)
        np.testing.assert_allclose(gbox, ebox, rtol=1e-5, atol=1e-4)
    names = builder.info.features["objects"]["label"].names
    assert all(c["name"] == names[preprocess.COCO_80_TO_91.index(c["id"])] for c in truth["categories"])


def test_compilation_cache_dir_lets_a_second_launch_load_the_compiled_step(tmp_path):
    """config.compilation_cache_dir (issue 13 item 4): the first launch fills the cache, the second (a new
    process, another workdir) loads its train step from it instead of compiling (counted by JAX's events)."""
    cache = tmp_path / "xla_cache"
    common = [
        "--config=configs/quickstart.py",
        "--mode=train",
        "--config.total_steps=1",
        "--config.data.synthetic_train_images=4",
        "--config.data.synthetic_val_images=2",
        "--config.data.train_batch_size=2",
        f"--config.data.cache_dir={tmp_path / 'prepared'}",
        f"--config.compilation_cache_dir={cache}",
    ]
    first = _main(*common, f"--workdir={tmp_path / 'first'}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "0 executables from the compilation cache" in first.stderr
    assert len(os.listdir(cache)) > 0
    second = _main(*common, f"--workdir={tmp_path / 'second'}")
    assert second.returncode == 0, second.stderr[-3000:]
    hits = re.search(r"(\d+) executables from the compilation cache", second.stderr)
    assert hits and int(hits.group(1)) >= 1, second.stderr[-3000:]


def test_unwritable_compilation_cache_dir_is_one_clear_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="compilation_cache_dir .* cannot be created"):
        train.use_compilation_cache(str(blocker / "cache"))
