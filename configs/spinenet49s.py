"""SpineNet-49S RetinaNet on COCO, TF Model Garden recipe at 640x640.

Command:   python main.py --config=configs/spinenet49s.py --workdir=runs/spinenet49s
Profile:   python -m scaledet_jax.tools.profile --config=configs/spinenet49s.py
Published: 39.5 AP (350 epochs) / 41.5 AP (500 epochs, swish + stochastic depth); 11.9M params, 33.8B multiply-adds.
"""

from scaledet_jax import defaults


def get_config():
    config = defaults.get_config()
    config.model.backbone.model_id = "49S"
    config.model.image_size = 640
    config.model.head.num_filters = 128
    return config
