"""EfficientDet-D5 on COCO, google/automl's architecture and recipe.

Command:   python main.py --config=configs/efficientdet_d5.py --workdir=runs/efficientdet_d5
Profile:   python -m scaledet_jax.tools.profile --config=configs/efficientdet_d5.py
Published: 51.2 AP (COCO val, 300 epochs); 33.7M params, 135.7B multiply-adds (automl).
"""

from scaledet_jax import defaults


def get_config():
    return defaults.efficientdet_config("d5")
