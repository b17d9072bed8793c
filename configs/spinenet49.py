"""SpineNet-49 RetinaNet on COCO, TF Model Garden recipe at 640x640.

Command:   python main.py --config=configs/spinenet49.py --workdir=runs/spinenet49
Profile:   python -m scaledet_jax.tools.profile --config=configs/spinenet49.py
Published: 42.8 AP (350 epochs) / 44.3 AP (500 epochs, swish + stochastic depth); 28.5M params, 85.4B multiply-adds.
"""

from scaledet_jax import defaults


def get_config():
    config = defaults.get_config()
    config.model.backbone.model_id = "49"
    config.model.image_size = 640
    return config
