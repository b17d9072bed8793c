"""Faster R-CNN through the detector-agnostic trainer: train + evaluate + resume through the main job,
frozen parameters, the two-stage forward's fixed shapes and masks."""

import json
import os

import flax
import jax
import numpy as np
import pytest
from configs_util import load_config

from scaledet_jax import train
from scaledet_jax.tasks import build_task


def tiny_config(**overrides):
    """The Faster R-CNN quickstart on a few synthetic images, small batch and sample counts."""
    config = load_config("fasterrcnn_quickstart")
    config.data.synthetic_train_images = 12
    config.data.synthetic_val_images = 4
    config.data.train_batch_size = config.data.eval_batch_size = 4
    config.model.roi.num_samples = 32
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return config


def _leaves_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def test_trains_resumes_and_evaluates_through_the_main_job(tmp_path):
    first = train.train_and_evaluate(tiny_config(total_steps=3, stop_after_steps=2), str(tmp_path), evaluate=False)
    assert int(first["state"].step) == 2 and os.path.isdir(tmp_path / "checkpoints" / "2")
    result = train.train_and_evaluate(tiny_config(total_steps=3), str(tmp_path))
    assert int(result["state"].step) == 3
    assert set(result["eval"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(0.0 <= result["eval"][k] <= 1.0 for k in ("AP", "AP50"))
    assert json.load(open(tmp_path / "eval_3.json"))["step"] == 3
    detections = json.load(open(tmp_path / "detections_3.json"))
    assert detections and {d["category_id"] for d in detections} <= {1, 2, 3}  # background (0) never reported
    assert _leaves_diff(first["state"].params, result["state"].params) > 0


@pytest.fixture(scope="module")
def task_and_batch():
    config = tiny_config()
    task = build_task(config)
    rng = np.random.RandomState(0)
    yx = rng.uniform(0, 80, (2, 8, 2))
    hw = rng.uniform(15, 45, (2, 8, 2))
    batch = {
        "image": rng.normal(size=(2, 128, 128, 3)).astype(np.float32),
        "boxes": np.concatenate([yx, yx + hw], -1).astype(np.float32),
        "classes": rng.randint(1, 4, (2, 8)).astype(np.int32),
        "valid": np.array([[True] * 5 + [False] * 3, [True] * 2 + [False] * 6]),
        "crowd": np.zeros((2, 8), bool),
    }
    batch["crowd"][0, 4] = True
    variables = task.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, 128)
    return config, task, batch, variables


def test_training_forward_samples_rois_with_ground_truth_and_fixed_shapes(task_and_batch):
    config, task, batch, variables = task_and_batch
    gt = {k: batch[k] for k in ("boxes", "classes", "valid", "crowd")}
    outputs = jax.jit(lambda v, b, r: task.model.apply(v, b["image"], gt, train=False, rngs={"sampling": r}))(
        variables, batch, jax.random.key(3)
    )
    samples = outputs["roi_targets"]
    n = config.model.roi.num_samples
    assert outputs["rois"].shape == (2, n, 4) and outputs["class_logits"].shape == (2, n, 4)
    assert outputs["box_deltas"].shape == (2, n, 16)
    foreground = np.asarray(samples["foreground"] & samples["valid"])
    assert (foreground.sum(1) <= int(n * config.model.roi.foreground_fraction)).all() and foreground.sum() > 0
    # Ground truth is among the candidates, so every valid non-crowd box can be sampled as foreground with
    # its own class; crowd boxes never are.
    matched = np.asarray(samples["matched_gt"])
    classes = np.asarray(samples["classes"])
    for image in range(2):
        fg = foreground[image]
        assert (classes[image][fg] == batch["classes"][image][matched[image][fg]]).all()
        assert not batch["crowd"][image][matched[image][fg]].any()
        assert (classes[image][~fg] == 0).all()


def test_inference_outputs_fixed_shapes_and_valid_detections(task_and_batch):
    config, task, batch, variables = task_and_batch
    detections = jax.jit(task.predict)(variables, batch["image"])
    k = config.model.detection.max_detections
    assert detections["boxes"].shape == (2, k, 4) and detections["valid"].shape == (2, k)
    valid = np.asarray(detections["valid"])
    boxes = np.asarray(detections["boxes"])[valid]
    assert valid.any() and (boxes >= 0).all() and (boxes <= 128).all()
    assert set(np.asarray(detections["classes"])[valid].tolist()) <= {1, 2, 3}
    scores = np.asarray(detections["scores"])
    assert (scores[valid] > config.model.detection.score_threshold).all() and (scores[~valid] == 0).all()


def test_frozen_parameters_and_batch_stats(tmp_path):
    """optim.frozen: no update, no weight decay. optim.frozen_batch_stats (mmdetection's norm_eval): matching
    batch norms keep their running statistics bit for bit through a train step (the others update theirs)
    while their scale and offset still train. One compiled step checks both."""
    config = tiny_config(total_steps=2)
    config.optim.frozen = ("^backbone/stem/", "^rpn_head/conv/")
    config.optim.frozen_batch_stats = ("^backbone/stem_block_0/",)
    config.loss.l2_weight_decay = 1e-2
    task = build_task(config)
    schedule = train.learning_rate_schedule(config, 10, 2)
    tx = train.make_optimizer(config, schedule)
    state = train.init_state(config, task, tx, jax.random.key(0))
    before, stats_before = jax.device_get(state.params), jax.device_get(state.batch_stats)
    _, _, batch, _ = _batch_for(config)
    step = jax.jit(lambda s, b: train.train_step(config, task, tx, schedule, jax.random.key(1), s, b))
    state, _ = step(state, batch)
    after, stats_after = jax.device_get(state.params), jax.device_get(state.batch_stats)
    kept = [name for name in stats_before["backbone"] if name.startswith("stem_block_0")]
    updated = [name for name in stats_before["backbone"] if not name.startswith("stem_block_0")]
    assert kept and updated
    assert all(_leaves_diff(stats_before["backbone"][n], stats_after["backbone"][n]) == 0.0 for n in kept)
    assert all(_leaves_diff(stats_before["backbone"][n], stats_after["backbone"][n]) > 0 for n in updated)
    # The frozen-statistics batch norms' own scale and offset trained.
    stem_bn = [
        (path, leaf) for path, leaf in flax.traverse_util.flatten_dict(before["backbone"]["stem_block_0"]).items()
        if any("bn" in str(part) for part in path)
    ]  # fmt: skip
    stem_bn_after = flax.traverse_util.flatten_dict(after["backbone"]["stem_block_0"])
    assert stem_bn and all(np.any(leaf != stem_bn_after[path]) for path, leaf in stem_bn)
    assert _leaves_diff(before["backbone"]["stem"], after["backbone"]["stem"]) == 0.0
    assert _leaves_diff(before["backbone"]["stem_block_0"], after["backbone"]["stem_block_0"]) > 0
    assert _leaves_diff(before["rpn_head"]["conv"], after["rpn_head"]["conv"]) == 0.0
    assert _leaves_diff(before["rpn_head"]["objectness"], after["rpn_head"]["objectness"]) > 0
    assert _leaves_diff(before["box_head"], after["box_head"]) > 0
    # The L2 penalty leaves frozen kernels out.
    full = float(train.l2_penalty(before, 1e-2))
    partial = float(train.l2_penalty(before, 1e-2, config.optim.frozen))
    frozen_sq = sum(
        float(np.sum(np.square(v)))
        for tree in (before["backbone"]["stem"], before["rpn_head"]["conv"])
        for path, v in flax.traverse_util.flatten_dict(tree).items()
        if path[-1] == "kernel"
    )
    assert partial == pytest.approx(full - 0.5 * 1e-2 * frozen_sq, rel=1e-5)


def _batch_for(config):
    rng = np.random.RandomState(1)
    size, n, b = config.model.image_size, 4, config.data.train_batch_size
    yx = rng.uniform(0, size * 0.6, (b, n, 2))
    batch = {
        "image": rng.normal(size=(b, size, size, 3)).astype(np.float32),
        "boxes": np.concatenate([yx, yx + rng.uniform(12, size * 0.35, (b, n, 2))], -1).astype(np.float32),
        "classes": rng.randint(1, 4, (b, n)).astype(np.int32),
        "valid": np.ones((b, n), bool),
        "crowd": np.zeros((b, n), bool),
    }
    return None, None, batch, None


def test_retinanet_resnet50_fpn_config_has_model_gardens_parameter_count():
    """configs/retinanet_resnet50_fpn.py against tf-models-official's ``retinanet_resnetfpn_coco`` build."""
    import tf_keras
    from official.core import exp_factory
    from official.vision.configs import retinanet  # noqa: F401  (registers the experiments)
    from official.vision.modeling import factory

    from scaledet_jax.tools import profile

    config = load_config("retinanet_resnet50_fpn")
    model_config = exp_factory.get_exp_config("retinanet_resnetfpn_coco").task.model
    size = config.model.image_size
    keras_model = factory.build_retinanet(tf_keras.layers.InputSpec(shape=[None, size, size, 3]), model_config)
    theirs = sum(int(np.prod(v.shape)) for v in keras_model.trainable_variables)
    ours = profile.count_params(profile.abstract_variables(build_task(config).model, size)["params"])
    assert ours == theirs, (ours, theirs)


def test_rpn_level_sizes_follow_the_anchor_layout(task_and_batch):
    config, task, _, _ = task_and_batch
    a = config.model.anchor
    per_location = a.num_scales * len(a.aspect_ratios)
    expected = tuple((128 // 2**level) ** 2 * per_location for level in range(3, 6))
    assert task.level_sizes == expected and sum(expected) == task.anchors.shape[0]
