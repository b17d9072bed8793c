"""SpineNet-143 RetinaNet on COCO, TF Model Garden recipe at 1280x1280.

Command:   python main.py --config=configs/spinenet143.py --workdir=runs/spinenet143
Profile:   python -m scaledet_jax.tools.profile --config=configs/spinenet143.py
Published: 48.0 AP (350 epochs) / 50.6 AP (500 epochs, swish + stochastic depth); 67.0M params, 524.0B multiply-adds.
"""

from scaledet_jax import defaults


def get_config():
    config = defaults.get_config()
    config.model.backbone.model_id = "143"
    config.model.image_size = 1280
    config.model.anchor.anchor_size = 4.0
    config.optim.gradient_clip_norm = 10.0
    return config
