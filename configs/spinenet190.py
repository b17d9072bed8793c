"""SpineNet-190 RetinaNet on COCO, TF Model Garden recipe at 1280x1280.

Command:   python main.py --config=configs/spinenet190.py --workdir=runs/spinenet190
Profile:   python -m scaledet_jax.tools.profile --config=configs/spinenet190.py
Published: 52.0 AP (500 epochs, swish + stochastic depth); 163.6M params, 1885B multiply-adds.
"""

from scaledet_jax import defaults


def get_config():
    config = defaults.get_config()
    config.model.backbone.model_id = "190"
    config.model.image_size = 1280
    config.model.head.num_filters = 512
    config.model.head.num_convs = 7
    config.model.anchor.anchor_size = 4.0
    return config
