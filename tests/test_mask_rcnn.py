"""Mask R-CNN: the mask head's layers against PyTorch, the training forward's mask samples and
targets, the mask loss learning on a fixed batch, predictions with per-detection masks, and
torchvision's parameter count."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from configs_util import load_config

from scaledet_jax import train
from scaledet_jax.heads.roi_heads import upsample_2x2
from scaledet_jax.ops import masks as mask_ops
from scaledet_jax.ops import matching
from scaledet_jax.tasks import build_task


def test_upsample_2x2_equals_torch_conv_transpose():
    rng = np.random.RandomState(0)
    x = rng.normal(size=(3, 5, 6, 7)).astype(np.float32)
    deconv = torch.nn.ConvTranspose2d(7, 4, 2, stride=2)
    with torch.no_grad():
        expected = deconv(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    kernel = deconv.weight.detach().numpy().transpose(2, 3, 0, 1)  # [in, out, a, b] -> [a, b, in, out]
    ours = np.asarray(upsample_2x2(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(deconv.bias.detach().numpy())))
    assert ours.shape == expected.shape == (3, 10, 12, 4)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_mask_head_parameter_count_equals_torchvision():
    import torchvision
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    # As torchvision builds maskrcnn_resnet50_fpn for its COCO weights: FrozenBN body, 3 trainable layers.
    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    reference = MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=91)
    expected = sum(p.numel() for p in reference.parameters())
    expected_mask = sum(
        p.numel() for n, p in reference.named_parameters() if n.startswith(("roi_heads.mask_head", "roi_heads.mask_pr"))
    )
    config = load_config("maskrcnn_resnet50_fpn")
    config.model.image_size = 256
    task = build_task(config)
    shapes = jax.eval_shape(lambda: task.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, 256))
    count = sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]))
    mask = sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]["mask_head"]))
    assert (count, mask) == (expected, expected_mask) == (44_401_393, 2_646_107)


def tiny_config():
    config = load_config("maskrcnn_quickstart")
    config.model.roi.num_samples = 32
    config.data.mask_crop_size = 28
    return config


def _disk_masks(boxes: np.ndarray, size: int) -> np.ndarray:
    """Each instance's mask, cropped to its box: an inscribed ellipse at size x size."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size - 0.5
    ellipse = (yy**2 + xx**2 <= 0.25).astype(np.float32)
    return np.broadcast_to(ellipse, boxes.shape[:-1] + (size, size)).copy()


@pytest.fixture(scope="module")
def task_and_batch():
    config = tiny_config()
    task = build_task(config)
    rng = np.random.RandomState(0)
    yx = rng.uniform(0, 80, (2, 8, 2))
    hw = rng.uniform(20, 45, (2, 8, 2))
    boxes = np.concatenate([yx, yx + hw], -1).astype(np.float32)
    batch = {
        "image": rng.normal(size=(2, 128, 128, 3)).astype(np.float32),
        "boxes": boxes,
        "classes": rng.randint(1, 4, (2, 8)).astype(np.int32),
        "valid": np.array([[True] * 5 + [False] * 3, [True] * 2 + [False] * 6]),
        "crowd": np.zeros((2, 8), bool),
        "masks": _disk_masks(boxes, 28),
    }
    variables = task.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, 128)
    return config, task, batch, variables


def test_training_forward_mask_samples_and_targets(task_and_batch):
    config, task, batch, variables = task_and_batch
    gt = {k: batch[k] for k in task.batch_fields if k != "image"}
    outputs = jax.jit(lambda v, r: task.model.apply(v, batch["image"], gt, train=False, rngs={"sampling": r}))(
        variables, jax.random.key(3)
    )
    k = int(config.model.roi.num_samples * config.model.roi.foreground_fraction)
    assert outputs["mask_logits"].shape == (2, k, 28, 28, 4)
    assert outputs["mask_targets"].shape == (2, k, 28, 28)
    samples = jax.tree_util.tree_map(np.asarray, outputs["roi_targets"])
    valid, classes, targets = (np.asarray(outputs[n]) for n in ("mask_valid", "mask_classes", "mask_targets"))
    # Exactly the foreground samples get masks (foreground comes first; all fit in the k slots).
    assert valid.sum() == (samples["foreground"] & samples["valid"]).sum() > 0
    for b in range(2):
        for j in np.flatnonzero(valid[b]):
            g = samples["matched_gt"][b, j]
            assert batch["valid"][b, g] and classes[b, j] == batch["classes"][b, g] > 0
            iou = matching.box_iou(samples["rois"][b, j][None], batch["boxes"][b, g][None])[0, 0]
            assert iou >= config.model.roi.foreground_iou - 1e-6
            expected = mask_ops.crop_masks_in_target_boxes(
                batch["masks"][b, g][None], batch["boxes"][b, g][None], samples["rois"][b, j][None]
            )[0]
            np.testing.assert_allclose(targets[b, j], expected, atol=1e-5)  # jit vs eager rounding
        assert not targets[b][~valid[b]].any() and not classes[b][~valid[b]].any()
    # The ground-truth boxes are among the RoIs. Model Garden samples the crop at (i + 0.5) * K / 28 in
    # pixel-index coordinates, so a RoI equal to its gt box (K = 28) reads each mask half a pixel down
    # and right: the mean of the 2x2 pixels at (i, j), zero beyond the crop.
    exact = [
        targets[b, j]
        for b in range(2)
        for j in np.flatnonzero(valid[b])
        if np.allclose(samples["rois"][b, j], batch["boxes"][b, samples["matched_gt"][b, j]])
    ]
    assert exact
    ellipse = np.pad(_disk_masks(np.zeros((1, 4)), 28)[0], ((0, 1), (0, 1)))
    shifted = (ellipse[:-1, :-1] + ellipse[1:, :-1] + ellipse[:-1, 1:] + ellipse[1:, 1:]) / 4
    assert max(np.max(np.abs(t - shifted)) for t in exact) < 1e-4


def test_mask_loss_learns_on_a_fixed_batch(task_and_batch):
    """A few Adam steps on one batch: the mask loss falls well below its start (the targets are learnable)."""
    import optax

    config, task, batch, variables = task_and_batch
    tx = optax.adam(2e-3)

    @jax.jit
    def step(params, opt_state, key):
        def loss(p):
            parts, _ = task.losses({"params": p, "batch_stats": variables["batch_stats"]}, batch, key, train=False)
            return parts["model_loss"], parts

        (_, parts), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, parts

    params, opt_state = variables["params"], tx.init(variables["params"])
    history = []
    for i in range(25):
        params, opt_state, parts = step(params, opt_state, jax.random.key(i))
        history.append(float(parts["mask_loss"]))
    assert np.all(np.isfinite(history))
    assert 0.6 < history[0] < 0.8  # ~log 2 at initialisation
    assert np.mean(history[-5:]) < 0.6 * history[0], history


def test_predict_returns_masks_of_the_detected_class(task_and_batch):
    config, task, batch, variables = task_and_batch
    # Spread the box head's logits so that some detections pass the score threshold.
    params = jax.tree_util.tree_map(lambda x: x, variables["params"])
    params["box_head"]["class_logits"]["kernel"] = params["box_head"]["class_logits"]["kernel"] * 300.0
    variables = {**variables, "params": params}
    detections = jax.jit(task.predict)(variables, batch["image"])
    detections = jax.tree_util.tree_map(np.asarray, detections)
    assert detections["masks"].shape == (2, config.model.detection.max_detections, 28, 28)
    valid = detections["valid"]
    assert valid.any() and not detections["masks"][~valid].any()
    assert np.all((detections["masks"][valid] > 0) & (detections["masks"][valid] < 1))
    # The masks are the detected class's channel of the mask head on the detected boxes.
    logits = np.asarray(task.mask_logits_on(variables, batch["image"], detections["boxes"]))
    chosen = np.take_along_axis(logits, detections["classes"][:, :, None, None, None], axis=-1)[..., 0]
    np.testing.assert_allclose(detections["masks"][valid], jax.nn.sigmoid(chosen)[valid], atol=1e-6)


def test_jax_export_gives_the_detectors_boxes_and_masks(task_and_batch):
    """The exported Mask R-CNN (issue 14 item 3) returns each box's mask probabilities; pasted into the image
    they are Detector.predict's masks."""
    from scaledet_jax import export
    from scaledet_jax.detector import Detector

    config, task, batch, variables = task_and_batch
    params = jax.tree_util.tree_map(lambda x: x, variables["params"])
    params["box_head"]["class_logits"]["kernel"] = params["box_head"]["class_logits"]["kernel"] * 300.0
    detector = Detector(config, {**variables, "params": params}, {1: "circle", 2: "square", 3: "triangle"})
    exported = jax.export.deserialize(export.export_jax(detector))
    image = np.random.RandomState(1).randint(0, 256, (150, 110, 3)).astype(np.uint8)
    expected = detector.predict([image])[0]
    found = jax.tree_util.tree_map(np.asarray, exported.call(image))
    n = int(found["num_detections"])
    assert n == len(expected["scores"]) > 0
    assert found["mask_probabilities"].shape == (config.model.detection.max_detections, 28, 28)
    np.testing.assert_array_equal(found["classes"][:n], expected["classes"])
    np.testing.assert_allclose(found["scores"][:n], expected["scores"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(found["boxes"][:n], expected["boxes"], atol=0.01, rtol=0)
    pasted = mask_ops.paste_masks(found["mask_probabilities"][:n], found["boxes"][:n][:, [1, 0, 3, 2]], 150, 110)
    assert expected["masks"].any()
    assert np.mean(pasted != expected["masks"]) < 1e-4  # only pixels at exactly 0.5 +- rounding may differ


def test_trains_and_evaluates_boxes_and_masks_through_the_main_job(tmp_path):
    """A few steps on synthetic shapes (masks from the COCO json's polygons), then the evaluation:
    bbox and segm metrics, both results files, RLE masks of the images' size."""
    config = tiny_config()
    config.data.synthetic_train_images = 12
    config.data.synthetic_val_images = 4
    config.data.train_batch_size = config.data.eval_batch_size = 4
    config.total_steps = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    result = train.train_and_evaluate(config, str(tmp_path))
    metrics = result["eval"]
    for prefix in ("", "segm_"):
        assert all(0.0 <= metrics[prefix + k] <= 1.0 for k in ("AP", "AP50", "AP75", "APs", "APm"))
        assert np.isnan(metrics[prefix + "APl"])  # no large object in the synthetic images: undefined, not 0
    saved = json.load(open(tmp_path / "eval_2.json"))
    assert saved["step"] == 2 and "segm_AP" in saved and "AP" in saved and saved["APl"] is None
    assert {r["name"] for r in saved["segm_per_class"]} == {"circle", "square", "triangle"}
    boxes = json.load(open(tmp_path / "detections_2.json"))
    masks = json.load(open(tmp_path / "segmentations_2.json"))
    assert boxes and len(masks) == len(boxes)
    sizes = {i["id"]: (i["height"], i["width"]) for i in json.load(open(tmp_path / "synthetic_data" / "annotations" /
                                                                          "instances_val.json"))["images"]}  # fmt: skip
    for box, mask in zip(boxes, masks, strict=True):
        assert (box["image_id"], box["category_id"], box["score"]) == (
            mask["image_id"], mask["category_id"], mask["score"]
        )  # fmt: skip
        assert tuple(mask["segmentation"]["size"]) == sizes[mask["image_id"]]
        assert isinstance(mask["segmentation"]["counts"], str)
    assert os.path.isdir(tmp_path / "checkpoints" / "2")
    # TensorBoard: ground truth next to predictions for config.eval_pictures images at the evaluation.
    import tensorflow as tf

    images = {}
    for path in tmp_path.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag.startswith("eval/image_"):  # tf.summary.image: [width, height, png]
                    images[value.tag] = tf.io.decode_png(value.tensor.string_val[2]).numpy()
    assert sorted(images) == [f"eval/image_{i}" for i in range(config.eval_pictures)]
    assert all(p.shape[-1] == 3 and p.shape[1] > p.shape[0] for p in images.values())  # two panels side by side
