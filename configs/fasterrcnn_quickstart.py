"""Faster R-CNN quickstart: the quickstart's small SpineNet-49S backbone with an RPN and a box head,
learning the built-in synthetic shapes at 128x128.

Command: python main.py --config=configs/fasterrcnn_quickstart.py --workdir=runs/fasterrcnn_quickstart
Generates the dataset, trains and evaluates on the held-out split; README has the measured time and AP.
SpineNet's endpoints feed the RPN and RoIAlign directly (no FPN), as in Model Garden's Mask R-CNN SpineNet.
"""

import ml_collections

from scaledet_jax import defaults


def get_config():
    config = defaults.fasterrcnn_config()
    quick = defaults.get_config()  # the RetinaNet quickstart's backbone settings
    m = config.model
    m.num_classes = 4  # background + circle, square, triangle
    m.image_size = 128
    m.min_level, m.max_level = 3, 5
    m.activation = "swish"
    m.conv_padding = m.pool_padding = "same"
    m.norm = quick.model.norm
    m.backbone = quick.model.backbone
    m.backbone.model_id = "49S"
    m.backbone.filter_size_scale = 0.35
    m.backbone.endpoints_num_filters = 64
    m.backbone.stochastic_depth_rate = 0.0
    m.decoder = ml_collections.ConfigDict(dict(name="none"))
    m.anchor.update(
        num_scales=2,
        aspect_ratios=(2.0, 1.0, 0.5),
        anchor_size=3.0,
        center_offset=0.5,
        round_base=False,
        integer_stride=False,
    )
    m.rpn.update(num_filters=64, pre_nms_top_k_train=600, post_nms_top_k_train=256, pre_nms_top_k=300,
                 post_nms_top_k=100)  # fmt: skip
    m.roi.update(min_level=3, max_level=5, canonical_size=64.0, num_samples=64, foreground_fraction=0.25)
    m.box_head.update(num_fcs=2, fc_dims=256)
    m.detection.pre_nms_top_k = 1000

    defaults.use_synthetic_data(config)
    config.loss.l2_weight_decay = 4e-5
    o = config.optim
    o.frozen = ()
    o.optimizer = "adam"
    o.base_learning_rate = 4e-3 * 256 / 16  # lr 4e-3 at batch 16
    o.schedule = "cosine"
    o.warmup_steps = 50
    o.warmup_learning_rate = 2e-4
    o.gradient_clip_norm = 10.0

    config.num_epochs = 18  # 666 steps
    config.log_every_steps = 20
    config.checkpoint_every_steps = 200
    config.eval_every_steps = 0
    return config
