"""Mask R-CNN quickstart: the Faster R-CNN quickstart (SpineNet-49S x0.35 endpoints, RPN, box head)
plus a small mask head, learning boxes and masks of the built-in synthetic shapes at 128x128.

Command: python main.py --config=configs/maskrcnn_quickstart.py --workdir=runs/maskrcnn_quickstart
Generates the dataset (polygon masks in its COCO json), trains, and evaluates bbox and segm AP on the
held-out split; README has the measured time and APs.
"""

import ml_collections

from scaledet_jax import defaults


def get_config():
    config = defaults.fasterrcnn_quickstart_config()
    config.model.name = "mask_rcnn"
    config.model.mask_head = ml_collections.ConfigDict(
        dict(num_convs=4, conv_filters=64, norm="", class_agnostic=False, roi_output_size=14, sampling_ratio=2,
             num_samples=0)
    )  # fmt: skip
    config.loss.mask_weight = 1.0
    config.data.mask_crop_size = 56  # objects are at most ~80 px in the original images
    return config
