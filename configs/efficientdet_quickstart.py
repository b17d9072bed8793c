"""A small EfficientDet (D0's EfficientNet-B0 + BiFPN, 128x128, levels 3-5) learning the synthetic shapes.

Command: python main.py --config=configs/efficientdet_quickstart.py --workdir=runs/efficientdet_quickstart
Generates the dataset (COCO-format folder in WORKDIR/synthetic_data), trains, and evaluates on the
held-out split with pycocotools; README has the measured time and AP on a 2-core CPU.
"""

from scaledet_jax import defaults


def get_config():
    config = defaults.efficientdet_config("d0")
    m = config.model
    m.num_classes = 3  # circle, square, triangle: category c is output c - 1 (automl layout)
    m.image_size = 128
    m.min_level, m.max_level = 3, 5  # objects are 15-64 px
    m.backbone.drop_connect_rate = 0.0
    m.anchor.anchor_size = 2.0
    m.detection.pre_nms_top_k = 1000

    defaults.use_synthetic_data(config)

    o = config.optim
    o.optimizer = "adam"  # from scratch on a small dataset Adam learns far faster than SGD
    o.base_learning_rate = 8e-3 * 256 / 16  # lr 8e-3 at batch 16 (the SpineNet quickstart's sweep)
    o.warmup_steps = 50
    o.warmup_learning_rate = 2e-4
    o.ema_decay = 0.0

    config.num_epochs = 24  # 888 steps: data, compile, training and evaluation in 20 minutes on 2 cores
    config.log_every_steps = 20
    config.checkpoint_every_steps = 200
    config.eval_every_steps = 0  # evaluate once, at the end
    return config
