"""SpineNet-96 RetinaNet on COCO, TF Model Garden recipe at 1024x1024.

Command:   python main.py --config=configs/spinenet96.py --workdir=runs/spinenet96
Profile:   python -m scaledet_jax.tools.profile --config=configs/spinenet96.py
Published: 46.7 AP (350 epochs) / 48.5 AP (500 epochs, swish + stochastic depth); 43.0M params, 265.4B multiply-adds.
"""

from scaledet_jax import defaults


def get_config():
    config = defaults.get_config()
    config.model.backbone.model_id = "96"
    config.model.image_size = 1024
    return config
